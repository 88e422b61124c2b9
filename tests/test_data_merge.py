"""Data-aware merges (mergelab.data_merge and `mergelab merge` with `data:`): exact closed forms,
properties and bad input."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import yaml
from torch import nn

import mergelab
from mergelab.datamerge import TaskData, data_merge
from mergelab.errors import ConfigError, MergeError
from mergelab.methods import get_method
from mergelab.methods.data_aware import (
    SingularGramWarning,
    count_weighted_rows,
    fisher_average,
    regmean_solve,
)
from mergelab.stats import DataError, with_head


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _regression_tasks(n_tasks: int = 3, d: int = 4, k: int = 2):
    """Each task: inputs X_i (different scales per feature), targets Y_i = X_i A_i + noise; model
    i is task i's least-squares fit."""
    xs, ys, sds = [], [], {}
    for i in range(n_tasks):
        g = _gen(10 + i)
        scale = torch.rand(d, generator=g, dtype=torch.float64) * 3 + 0.1
        x = torch.randn(20 + 5 * i, d, generator=g, dtype=torch.float64) * scale
        a = torch.randn(d, k, generator=g, dtype=torch.float64)
        y = x @ a + 0.1 * torch.randn(x.shape[0], k, generator=g, dtype=torch.float64)
        w = torch.linalg.lstsq(x, y).solution.T  # [k, d]
        xs.append(x)
        ys.append(y)
        sds[f"task{i}"] = {"weight": w}
    return xs, ys, sds


def test_regmean_recovers_the_joint_least_squares_solution():
    xs, ys, sds = _regression_tasks()
    module = nn.Linear(4, 2, bias=False).double()
    data = {f"task{i}": [x[:7], x[7:]] for i, x in enumerate(xs)}  # two batches each
    result = data_merge("regmean", module, sds, data, alpha=1.0)
    joint = torch.linalg.lstsq(torch.cat(xs), torch.cat(ys)).solution.T
    assert torch.allclose(result.state_dict["weight"], joint, atol=1e-10)
    assert result.examples == {"task0": 20, "task1": 25, "task2": 30}
    # ...which is not the plain average (the test can fail).
    average = torch.stack([sd["weight"] for sd in sds.values()]).mean(0)
    assert not torch.allclose(average, joint, atol=1e-2)
    # RegMean++ on a one-layer model has no earlier layer to merge first: the same result.
    plus = data_merge("regmean_plusplus", module, sds, data, alpha=1.0)
    assert torch.allclose(plus.state_dict["weight"], joint, atol=1e-10)
    # mergelab's `scaling` extension: base + s * (RegMean - base), base = the module's weights.
    scaled = data_merge("regmean", module, sds, data, alpha=1.0, scaling=2.0)
    origin = module.weight.detach()
    assert torch.allclose(scaled.state_dict["weight"], origin + 2.0 * (joint - origin), atol=1e-10)
    # An explicit device works on copies (the caller's module is not moved or changed).
    before = module.weight.detach().clone()
    on_device = data_merge("regmean", module, sds, data, alpha=1.0, device="cpu")
    assert torch.allclose(on_device.state_dict["weight"], joint, atol=1e-10)
    assert torch.equal(module.weight, before)


def test_regmean_alpha_zero_is_a_per_feature_weighted_average_by_hand():
    w1 = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    w2 = torch.tensor([[0.0, 4.0]], dtype=torch.float64)
    g1 = torch.tensor([[9.0, 3.0], [3.0, 1.0]], dtype=torch.float64)
    g2 = torch.tensor([[1.0, 2.0], [2.0, 4.0]], dtype=torch.float64)
    merged = regmean_solve([w1, w2], [g1, g2], alpha=0.0)
    # feature 0: (9*2 + 1*0) / (9 + 1); feature 1: (1*0 + 4*4) / (1 + 4)
    assert torch.allclose(merged, torch.tensor([[1.8, 3.2]], dtype=torch.float64))
    # alpha = 1 by hand: (G1 + G2)^-1 (G1 w1^T + G2 w2^T)
    exact = torch.linalg.solve(g1 + g2, g1 @ w1.T + g2 @ w2.T).T
    assert torch.allclose(regmean_solve([w1, w2], [g1, g2], alpha=1.0), exact)


def test_regmean_properties_identical_models_and_one_model_dominating():
    g = torch.randn(6, 3, generator=_gen(1), dtype=torch.float64)
    gram = g.T @ g
    w = torch.randn(2, 3, generator=_gen(2), dtype=torch.float64)
    assert torch.allclose(regmean_solve([w, w, w], [gram, 2 * gram, gram], alpha=0.7), w)
    other = torch.randn(2, 3, generator=_gen(3), dtype=torch.float64)
    tiny = 1e-12 * torch.eye(3, dtype=torch.float64)
    assert torch.allclose(regmean_solve([w, other], [gram, tiny], alpha=1.0), w, atol=1e-8)


def test_singular_gram_is_regularised_with_a_warning_naming_the_layer():
    module = nn.Sequential(nn.Linear(3, 2, bias=False))
    sds = {}
    for i in range(2):
        sds[f"m{i}"] = {"0.weight": torch.randn(2, 3, generator=_gen(i))}
    x = torch.randn(8, 3, generator=_gen(5))
    x[:, 2] = 0.0  # feature 2 is never active: column 2 of W is undetermined
    with pytest.warns(SingularGramWarning, match=r"summed Gram of layer `0` is singular"):
        result = data_merge("regmean", module, sds, {"m0": [x], "m1": [x]}, alpha=1.0)
    merged = result.state_dict["0.weight"]
    average = (sds["m0"]["0.weight"] + sds["m1"]["0.weight"]) / 2
    assert torch.allclose(merged[:, 2], average[:, 2], atol=1e-4)  # falls back to the average
    assert torch.isfinite(merged).all()
    # The kernel alone names the layer it was given.
    w = torch.ones(1, 2, dtype=torch.float64)
    with pytest.warns(SingularGramWarning, match="layer `encoder.fc`"):
        out = regmean_solve([w, 3 * w], [torch.zeros(2, 2, dtype=torch.float64)] * 2, name="encoder.fc")
    assert torch.allclose(out, 2 * w)  # no data at all: the average


def test_regmean_ridge_grows_until_a_noisy_singular_gram_factorises():
    # A float32 Gram of exactly collinear inputs (a grayscale image on three channels) can have
    # a slightly negative eigenvalue, larger than the smallest ridge: the ridge must grow.
    x = torch.randn(64, 2, generator=_gen(7))
    inputs = torch.cat([x, x[:, :1]], dim=1)  # feature 2 repeats feature 0
    gram = (inputs.T @ inputs).double()
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues[0] = -1e-4 * torch.diagonal(gram).mean()  # rounding noise below -1e-6 x mean(diag)
    noisy = vectors @ torch.diag(eigenvalues) @ vectors.T
    w0, w1 = torch.randn(2, 3, generator=_gen(8)).double(), torch.randn(2, 3, generator=_gen(9)).double()
    with pytest.warns(SingularGramWarning, match=r"added 0\.001 x mean\(diag\)"):
        merged = regmean_solve([w0, w1], [noisy / 2, noisy / 2], alpha=1.0, name="features.0.0")
    assert torch.isfinite(merged).all()
    # On the inputs' span the merge still fits both models' outputs on average.
    expected = inputs.double() @ ((w0 + w1) / 2).T
    assert torch.allclose(inputs.double() @ merged.T, expected, rtol=1e-2, atol=1e-2)
    with pytest.raises(MergeError, match="not positive definite even with"):
        regmean_solve([w0, w1], [-gram, -gram], alpha=1.0, name="broken")


def test_regmean_on_convolutions_and_embeddings_recovers_joint_least_squares():
    # A convolution is a linear map of its patches: RegMean (alpha=1) minimises the summed
    # squared output differences, so the merged conv's outputs are the joint LS fit.
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False).double()
    xs = [torch.randn(3, 2, 5, 5, generator=_gen(20 + i), dtype=torch.float64) for i in range(2)]
    sds = {f"m{i}": {"weight": torch.randn(3, 2, 3, 3, generator=_gen(30 + i), dtype=torch.float64)} for i in range(2)}
    result = data_merge("regmean", conv, sds, {"m0": [xs[0]], "m1": [xs[1]]}, alpha=1.0)
    merged = result.state_dict["weight"]

    def loss(w):
        total = 0.0
        for i, x in enumerate(xs):
            target = nn.functional.conv2d(x, sds[f"m{i}"]["weight"], padding=1)
            total = total + (nn.functional.conv2d(x, w, padding=1) - target).square().sum()
        return total

    w = merged.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(w), w)
    assert grad.abs().max() < 1e-8  # the merged weight is the minimiser
    # Embedding: rows weighted by token counts; unseen rows averaged.
    t1, t2 = torch.tensor([[1.0, 1.0], [5.0, 5.0]]), torch.tensor([[3.0, 3.0], [7.0, 7.0]])
    merged_rows = count_weighted_rows([t1, t2], [torch.tensor([3.0, 0.0]), torch.tensor([1.0, 0.0])])
    assert torch.allclose(merged_rows, torch.tensor([[1.5, 1.5], [6.0, 6.0]]))


def test_fisher_average_by_hand_and_equal_fishers_give_the_average():
    a, b = torch.tensor([0.0, 2.0]), torch.tensor([4.0, 6.0])
    merged = fisher_average([a, b], [torch.tensor([1.0, 5.0]), torch.tensor([3.0, 5.0])], floor=0.0)
    assert torch.allclose(merged, torch.tensor([3.0, 4.0]))  # (1*0+3*4)/4, (5*2+5*6)/10
    f = torch.rand(2, generator=_gen(1))
    assert torch.allclose(fisher_average([a, b], [f, f]), (a + b) / 2)
    assert torch.allclose(fisher_average([a, b], [torch.zeros(2)] * 2), (a + b) / 2)


def _classifier_zoo(n_tasks: int = 2):
    """An encoder (Linear+Tanh) fine-tuned per task, each with its own head."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(4, 6), nn.Tanh())
    sds, data, heads = {}, {}, {}
    for i in range(n_tasks):
        ft = copy.deepcopy(encoder)
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(0.3 * torch.randn(p.shape, generator=_gen(40 + i)))
        head = nn.Linear(6, 3)
        x = torch.randn(12, 4, generator=_gen(50 + i))
        y = torch.randint(0, 3, (12,), generator=_gen(60 + i))
        sds[f"t{i}"] = {k: v.detach().clone() for k, v in ft.state_dict().items()}
        heads[f"t{i}"] = head
        data[f"t{i}"] = TaskData([(x[:6], y[:6]), (x[6:], y[6:])], head=head)
    return encoder, sds, data, heads


def test_fisher_merge_with_equal_fishers_is_the_average_and_identical_models_stay():
    encoder, sds, data, heads = _classifier_zoo()
    # Same model twice with the same data and head: equal Fishers -> exactly the average (= it).
    twin = {"a": sds["t0"], "b": {k: v.clone() for k, v in sds["t0"].items()}}
    twin_data = {"a": data["t0"], "b": data["t0"]}
    result = data_merge("fisher", encoder, twin, twin_data, fisher_target="labels")
    for k, v in sds["t0"].items():
        assert torch.allclose(result.state_dict[k], v, atol=1e-6)
    # Different models: per-model weight 0 on one model returns the other.
    result = data_merge(
        "fisher", encoder, sds, data, fisher_target="labels", model_params={"t1": {"weight": 0.0}}
    )
    for k, v in sds["t0"].items():
        assert torch.allclose(result.state_dict[k], v, atol=1e-6)
    # And with both weighted it differs from the plain average (Fisher weights matter).
    both = data_merge("fisher", encoder, sds, data, fisher_target="labels", normalize=False)
    average = (sds["t0"]["0.weight"] + sds["t1"]["0.weight"]) / 2
    assert not torch.allclose(both.state_dict["0.weight"], average, atol=1e-3)


def test_regmean_plusplus_collects_grams_in_the_partially_merged_model():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    sds = {}
    for i in range(2):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.5 * torch.randn(p.shape, generator=_gen(70 + i)))
        sds[f"m{i}"] = m.state_dict()
    data = {f"m{i}": [torch.randn(16, 3, generator=_gen(80 + i))] for i in range(2)}
    plain = data_merge("regmean", base, sds, data, alpha=1.0).state_dict
    plus = data_merge("regmean_plusplus", base, sds, data, alpha=1.0).state_dict
    assert torch.allclose(plain["0.weight"], plus["0.weight"])  # first layer: same inputs
    assert not torch.allclose(plain["2.weight"], plus["2.weight"])
    # Layer 2 by hand: inputs of model i's data through the *merged* first layer.
    hidden = [torch.tanh(x @ plus["0.weight"].T + plus["0.bias"]) for x in (data["m0"][0], data["m1"][0])]
    grams = [h.double().T @ h.double() for h in hidden]
    expected = regmean_solve([sds["m0"]["2.weight"], sds["m1"]["2.weight"]], grams, alpha=1.0)
    assert torch.allclose(plus["2.weight"], expected, atol=1e-5)
    assert torch.allclose(plus["2.bias"], (sds["m0"]["2.bias"] + sds["m1"]["2.bias"]) / 2)


def test_adamerging_reduces_entropy_and_keeps_coefficients_finite():
    torch.manual_seed(0)
    # Base: a near-zero encoder (every head is unsure); each fine-tune makes its head confident.
    encoder = nn.Sequential(nn.Linear(4, 6))
    with torch.no_grad():
        encoder[0].weight.mul_(0.01)
        encoder[0].bias.zero_()
    base = {k: v.clone() for k, v in encoder.state_dict().items()}
    sds, data = {}, {}
    for i in range(2):
        w = torch.randn(6, 4, generator=_gen(90 + i)) * 2
        sds[f"t{i}"] = {"0.weight": w, "0.bias": torch.zeros(6)}
        head = nn.Linear(6, 3)
        with torch.no_grad():
            head.weight.copy_(torch.randn(3, 6, generator=_gen(95 + i)))
        x = torch.randn(32, 4, generator=_gen(99 + i))
        data[f"t{i}"] = TaskData([x[:16], x[16:]], head=head)
    for method in ("adamerging_taskwise", "adamerging_layerwise"):
        result = data_merge(method, encoder, sds, data, steps=60, lr=0.05, init=0.1)
        hist = result.entropy_history
        assert len(hist) == 60 and hist[-1] < hist[0] - 0.1, (method, hist[0], hist[-1])
        coef = result.coefficients
        assert torch.isfinite(coef).all() and coef.min() >= 0 and coef.max() <= 1
        # layer-wise: one column per tensor that moved (the bias task vectors are zero)
        expected_shape = (2,) if method == "adamerging_taskwise" else (2, 1)
        assert tuple(coef.shape) == expected_shape
        # The returned weights are base + sum_k lambda_k tau_k with the returned lambdas.
        lam = coef if coef.dim() == 1 else coef[:, result.coefficient_tensors.index("0.weight")]
        expected = base["0.weight"] + sum(lam[k] * (sds[f"t{k}"]["0.weight"] - base["0.weight"]) for k in range(2))
        assert torch.allclose(result.state_dict["0.weight"], expected, atol=1e-5)
        assert result.examples == {"t0": 32, "t1": 32}
    # The bias is equal in every model (zero task vector): it keeps the base, no coefficient.
    assert result.coefficient_tensors == ["0.weight"]
    assert torch.equal(result.state_dict["0.bias"], base["0.bias"])


def test_adamerging_with_zero_steps_is_refused_and_zero_init_returns_base():
    encoder, sds, data, _ = _classifier_zoo()
    with pytest.raises(ConfigError, match="`steps` must be in"):
        data_merge("adamerging_taskwise", encoder, sds, data, steps=0)
    base = encoder.state_dict()
    result = data_merge("adamerging_taskwise", encoder, sds, data, steps=1, lr=0.0, init=0.0)
    for k, v in base.items():
        assert torch.allclose(result.state_dict[k], v)


def test_bad_input_is_reported_clearly():
    encoder, sds, data, _ = _classifier_zoo()
    with pytest.raises(DataError, match=r"no data for \['t1'\]"):
        data_merge("regmean", encoder, sds, {"t0": data["t0"]})
    with pytest.raises(ConfigError, match="`alpha` must be in"):
        data_merge("regmean", encoder, sds, data, alpha=1.5)
    with pytest.raises(ConfigError, match="parameters.density: unknown parameter of method `regmean`"):
        data_merge("regmean", encoder, sds, data, density=0.5)
    with pytest.raises(ConfigError, match="needs no data"):
        data_merge("ties", encoder, sds, data)
    bad = {"t0": sds["t0"], "t1": {**sds["t1"], "0.weight": torch.zeros(2, 2)}}
    with pytest.raises(ConfigError, match=r"tensor `0.weight`: shape \[2, 2\] in model 't1' differs"):
        data_merge("regmean", encoder, bad, data)
    with pytest.raises(DataError, match="yielded no batch"):
        data_merge("regmean", encoder, sds, {"t0": [], "t1": data["t1"]})
    with pytest.raises(DataError, match="batch 0 does not fit"):
        data_merge("regmean", encoder, sds, {"t0": [torch.randn(2, 9)], "t1": data["t1"]})
    nan = {"t0": {**sds["t0"], "0.weight": torch.full((6, 4), float("nan"))}, "t1": sds["t1"]}
    with pytest.raises(DataError, match=r"tensor `0.weight` of model .t0. .* holds 24 NaN/Inf value\(s\)"):
        data_merge("fisher", encoder, nan, data)
    # A layer type RegMean cannot use is named in the notes (its weights are averaged).
    mha = nn.MultiheadAttention(4, 2, batch_first=True)
    twin = {"a": mha.state_dict(), "b": mha.state_dict()}
    x = torch.randn(2, 3, 4)
    attend = TaskData([(x,)], forward=lambda m, q: m(q, q, q)[0])
    with pytest.warns(UserWarning, match="never ran on this data .*out_proj"):
        result = data_merge("regmean", mha, twin, {"a": attend, "b": attend})
    assert any("in_proj_weight (MultiheadAttention)" in n for n in result.notes), result.notes


def test_data_free_merge_refuses_data_aware_methods():
    sd = {"w": torch.ones(2)}
    with pytest.raises(ConfigError, match="needs data"):
        mergelab.merge_state_dicts(
            {"merge_method": "regmean", "models": [{"model": "a"}, {"model": "b"}]},
            {"a": sd, "b": sd},
        )
    assert get_method("regmean").needs == ("data",)
    assert get_method("ties").needs == ()


def test_statistics_on_disk_then_plain_mergelab_merge_equals_in_memory(tmp_path):
    """Streaming RegMean from statistics folders is an ordinary config run by the engine."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    sds, data, folders = {}, {}, []
    for i in range(2):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=_gen(110 + i)))
        sds[f"m{i}"] = {k: v.contiguous() for k, v in m.state_dict().items()}
        data[f"m{i}"] = [torch.randn(10, 3, generator=_gen(120 + i))]
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        save_file(sds[f"m{i}"], str(folder / "model.safetensors"))
        folders.append(folder)
    in_memory = data_merge("regmean", base, sds, data, stats_dir=str(tmp_path / "stats"))
    stats = [str(tmp_path / "stats" / f"m{i}") for i in range(2)]
    config = {
        "merge_method": "regmean",
        "models": [{"model": str(f)} for f in folders],
        "data": {"statistics": stats},
    }
    # In memory, from the same folders: merge_state_dicts reads statistics, never runs data.
    in_memory_config = {**config, "models": [{"model": "m0"}, {"model": "m1"}]}
    from_folders = mergelab.merge_state_dicts(in_memory_config, sds)
    assert all(torch.equal(from_folders[k], v) for k, v in in_memory.state_dict.items())
    with pytest.raises(ConfigError, match="only reads statistics folders"):
        mergelab.merge_state_dicts({**in_memory_config, "data": {"task": "sentiment"}}, sds)
    report = mergelab.merge(config, tmp_path / "out", progress=False)
    assert report.tensors == 4
    assert any("2 of 4 tensors merged with gram statistics" in n for n in report.notes), report.notes
    merged = mergelab.checkpoint.open_checkpoint(tmp_path / "out")
    for k, v in in_memory.state_dict.items():
        assert torch.equal(merged.get(k), v), k  # the same engine and kernel: bit for bit
    # A parent folder with one subfolder per model (named after the model's folder) works too.
    (tmp_path / "by_name").mkdir()
    for i in range(2):
        (tmp_path / "stats" / f"m{i}").rename(tmp_path / "by_name" / f"m{i}")
    parent = {**config, "data": {"statistics": str(tmp_path / "by_name")}}
    mergelab.merge(parent, tmp_path / "out_parent", progress=False)
    again = mergelab.checkpoint.open_checkpoint(tmp_path / "out_parent")
    assert all(torch.equal(again.get(k), merged.get(k)) for k in in_memory.state_dict)
    with pytest.raises(ConfigError, match=r"data.statistics: 1 folder\(s\) for 2 model\(s\)"):
        mergelab.merge({**config, "data": {"statistics": stats[:1]}}, tmp_path / "out2")
    with pytest.raises(ConfigError, match="exists and is not a statistics folder"):
        mergelab.merge({**config, "data": {"statistics": [str(tmp_path)] * 2}}, tmp_path / "out3")
    with pytest.raises(ConfigError, match="give `task` or `tasks` to collect them"):
        missing = [str(tmp_path / "nowhere" / f"m{i}") for i in range(2)]
        mergelab.merge({**config, "data": {"statistics": missing}}, tmp_path / "out4")
    assert not any((tmp_path / f"out{i}").exists() for i in (2, 3, 4))
    # The same through the CLI: validate and --dry-run say what will be read, merge runs it.
    from typer.testing import CliRunner

    from mergelab.cli import app

    (tmp_path / "parent.yml").write_text(yaml.safe_dump(parent))
    runner = CliRunner()
    outcome = runner.invoke(app, ["validate", str(tmp_path / "parent.yml")])
    assert outcome.exit_code == 0, outcome.output
    assert "loaded from" in outcome.output and "gram" in outcome.output
    outcome = runner.invoke(app, ["merge", str(tmp_path / "parent.yml"), str(tmp_path / "cli"), "--no-progress"])
    assert outcome.exit_code == 0, outcome.output
    cli_merged = mergelab.checkpoint.open_checkpoint(tmp_path / "cli")
    assert torch.equal(cli_merged.get("0.weight"), merged.get("0.weight"))
    assert "regmean-stream" not in runner.invoke(app, ["--help"]).output


def test_task_data_head_and_plain_batches_mix():
    encoder, sds, data, heads = _classifier_zoo()
    plain = {name: [b[0] for b in task.batches] for name, task in data.items()}
    a = data_merge("regmean", encoder, sds, plain).state_dict
    b = data_merge("regmean", encoder, sds, data).state_dict  # labels and heads are ignored
    for k in a:
        assert torch.allclose(a[k], b[k])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fisher = data_merge(
            "fisher", encoder, sds,
            {n: TaskData(plain[n], forward=with_head(heads[n])) for n in plain},
            fisher_target="argmax",
        )
    assert fisher.examples == {"t0": 12, "t1": 12}


# --- `mergelab merge` with a `data:` section (tiny Hugging Face encoder, CSV task) -------------


@pytest.fixture(scope="module")
def tiny_bert_folders(tmp_path_factory):
    pytest.importorskip("transformers")
    from _data_aware_models import tiny_bert_folders as build

    root = tmp_path_factory.mktemp("tiny_bert")
    return root, build(root)


def test_cli_config_with_data_section_runs_a_data_aware_merge(tiny_bert_folders):
    root, folders = tiny_bert_folders
    from _data_aware_models import bert_config
    from safetensors.torch import load_file

    def config(method, models, **extra):
        return bert_config(root, folders, method, models, **extra)

    # (RegMean's base is optional: a listed `base_model` would be the base, not a merged model.)
    same = config("regmean", ["base", "twin"])
    del same["base_model"]
    report = mergelab.merge(same, root / "same", progress=False)
    merged = load_file(str(root / "same" / "model.safetensors"))
    original = load_file(str(folders["base"] / "model.safetensors"))
    for k, v in original.items():
        assert torch.allclose(merged[k], v, atol=1e-5), k  # identical models come back
    assert (root / "same" / "config.json").is_file() and report.method == "regmean"
    assert any("=12" in n for n in report.notes)
    report = mergelab.merge(
        config("adamerging_taskwise", ["m0", "m1"], parameters={"steps": 2}), root / "ada",
        progress=False,
    )
    assert any("`adamerging_taskwise` coefficients" in n for n in report.notes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mergelab.merge(config("fisher", ["m0", "m1"]), root / "fisher", progress=False)
    # The 4D mask of pooled_forward lets vmap trace BERT: no fallback to the per-example loop.
    assert not [w for w in caught if "one example at a time" in str(w.message)]
    fisher = load_file(str(root / "fisher" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in fisher.values())
    with pytest.raises(ConfigError, match="uses no data"):
        mergelab.merge(config("ties", ["m0", "m1"]), root / "bad", progress=False)
    with pytest.raises(ConfigError, match="data.tasks: 1 task"):
        bad = config("regmean", ["m0", "m1"])
        bad["data"] = {"tasks": [str(root / "task.csv")]}
        mergelab.merge(bad, root / "bad", progress=False)
    assert not (root / "bad").exists()


def test_zoo_adapter_on_the_mlp_zoo_feeds_every_method():
    from mergelab.eval.harness import evaluate_model
    from mergelab_bench.data_aware_zoos import ZooData
    from mergelab_bench.zoo.mlp import MLPZoo, MLPZooSettings

    built = MLPZoo(MLPZooSettings(tasks=("parity", "low_high"), steps=60)).build(recipe="lpft", seed=0)
    adapter = ZooData(built)
    module = adapter.module()
    assert all(torch.equal(module.state_dict()[k], v) for k, v in built.pretrained.items())
    data = {t: adapter.task_data(t, "train", 100, batch_size=32) for t in built.tasks}
    assert [len(b[0]) for b in data["parity"].batches] == [32, 32, 32, 4]
    finetuned = {t: built.finetuned[t] for t in built.tasks}
    probe = evaluate_model(built.evaluator, built.pretrained, built.probe_heads, tasks=built.tasks)
    for method, params in (("regmean", {}), ("fisher", {}), ("adamerging_taskwise", {"steps": 3})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SingularGramWarning)  # blank pixels: always zero
            result = data_merge(method, module, finetuned, data, base_state_dict=built.pretrained, **params)
        scores = evaluate_model(built.evaluator, result.state_dict, built.heads, tasks=built.tasks)
        assert min(scores.values()) > 0.6, (method, scores)  # a working encoder, not a broken one
        assert set(result.state_dict) == set(built.pretrained)
    assert min(probe.values()) > 0.6
    from mergelab_bench.data_aware_zoos import merge_zoo_with_data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SingularGramWarning)
        direct = merge_zoo_with_data(built, "regmean", examples=100, alpha=0.5)
    assert direct.examples == {"parity": 100, "low_high": 100}
    assert set(direct.state_dict) == set(built.pretrained)
