"""ProDistill (mergelab.plan.prodistill): coefficients learned layer by layer, against hand
computations; the saved task-arithmetic config re-runs to the same weights; bad input."""

from __future__ import annotations

import pytest
import torch
import yaml
from _data_aware_models import bert_config, tiny_zoo
from torch import nn

import mergelab
from mergelab.datamerge import data_merge
from mergelab.errors import ConfigError
from mergelab.methods import get_method
from mergelab.stats import DataError


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared machine: extra threads only spin (restored after each test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear_zoo(tasks=("a", "b"), examples: int = 8, noise: float = 0.5):
    """Two bias-free linear layers (blocks `0` and `1`), one fine-tune and 8 inputs per task
    (two batches of 4)."""
    g = _gen(0)
    base = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    theta0 = {k: v.clone() for k, v in base.state_dict().items()}
    finetuned, inputs = {}, {}
    for t in tasks:
        finetuned[t] = {k: v + noise * torch.randn(v.shape, generator=g) for k, v in theta0.items()}
        inputs[t] = torch.randn(examples, 3, generator=g)
    data = {t: [x[: examples // 2], x[examples // 2 :]] for t, x in inputs.items()}
    return base, theta0, finetuned, inputs, data


def _least_squares(inputs, base_weight, vectors, targets) -> torch.Tensor:
    """argmin_c sum_t ||X_t (W + sum_k c_k tau_k)^T - Y_t||^2: one column per task vector."""
    design = torch.stack([torch.cat([(x @ v.T).flatten() for x in inputs]) for v in vectors], 1)
    rhs = torch.cat([(y - x @ base_weight.T).flatten() for x, y in zip(inputs, targets, strict=True)])
    return torch.linalg.lstsq(design.double(), rhs.double()).solution.float()


def test_each_layer_gets_the_least_squares_coefficients_given_the_frozen_layers_before_it():
    base, theta0, ft, xs, data = _linear_zoo()
    result = data_merge("prodistill", base, ft, data, steps=300, lr=0.05, batch_size=16, init=0.3)
    tasks = list(ft)
    assert result.coefficient_tensors == ["0.weight", "1.weight"]
    assert result.examples == {"a": 8, "b": 8}
    fits = result.optimisation.blocks
    assert [f.name for f in fits] == ["0", "1"] and all(len(f.losses) == 300 for f in fits)
    # Layer 0 sees the same inputs in every model: the targets are X_t W0_t^T.
    x = [xs[t] for t in tasks]
    tau0 = [ft[t]["0.weight"] - theta0["0.weight"] for t in tasks]
    c0 = _least_squares(x, theta0["0.weight"], tau0, [xi @ ft[t]["0.weight"].T for xi, t in zip(x, tasks)])
    learned = result.coefficients
    assert torch.allclose(learned[:, 0], c0, atol=1e-3), (learned[:, 0], c0)
    # Layer 1: inputs through the *learned* merged layer 0 (frozen), targets each fine-tune's
    # own two layers ("dual inputs": fine-tune t's layer 1 on fine-tune t's layer-0 output).
    w0 = theta0["0.weight"] + sum(learned[k, 0] * tau0[k] for k in range(len(tasks)))
    hidden = [xi @ w0.T for xi in x]
    tau1 = [ft[t]["1.weight"] - theta0["1.weight"] for t in tasks]
    targets = [xi @ ft[t]["0.weight"].T @ ft[t]["1.weight"].T for xi, t in zip(x, tasks)]
    c1 = _least_squares(hidden, theta0["1.weight"], tau1, targets)
    assert torch.allclose(learned[:, 1], c1, atol=1e-3), (learned[:, 1], c1)
    # ...which is not what the initial coefficients give (the test can fail).
    assert not torch.allclose(c0, torch.full_like(c0, 0.3), atol=0.05)
    # The feature loss at the learned coefficients is the least-squares residual, below init's.
    for fit, c, inp, tgt, w, tau in (
        (fits[0], c0, x, [xi @ ft[t]["0.weight"].T for xi, t in zip(x, tasks)], theta0["0.weight"], tau0),
        (fits[1], c1, hidden, targets, theta0["1.weight"], tau1),
    ):
        merged = w + sum(c[k] * tau[k] for k in range(len(tasks)))
        residual = torch.cat([(i @ merged.T - y).flatten() for i, y in zip(inp, tgt)]).pow(2).mean()
        assert fit.final_loss == pytest.approx(float(residual), rel=1e-3)
        assert fit.final_loss < fit.initial_loss
    # The merged weights are base + sum_k c_k tau_k with the returned coefficients.
    expected = theta0["1.weight"] + sum(learned[k, 1] * tau1[k] for k in range(len(tasks)))
    assert torch.allclose(result.state_dict["1.weight"], expected, atol=1e-6)


def test_a_layer_depends_on_its_own_and_earlier_coefficients_only():
    base, _, ft, _, data = _linear_zoo()
    first = data_merge("prodistill", base, ft, data, steps=40, lr=0.05, batch_size=16)
    # Another fine-tune of layer 1 leaves layer 0's coefficients bit for bit (its loss never
    # sees later layers); layer 1's change.
    moved = {t: {**sd, "1.weight": sd["1.weight"] * 1.5} for t, sd in ft.items()}
    second = data_merge("prodistill", base, moved, data, steps=40, lr=0.05, batch_size=16)
    assert torch.equal(first.coefficients[:, 0], second.coefficients[:, 0])
    assert not torch.allclose(first.coefficients[:, 1], second.coefficients[:, 1], atol=1e-3)
    # Another fine-tune of layer 0 changes layer 1's coefficients too (its inputs moved).
    shifted = {t: {**sd, "0.weight": sd["0.weight"] * 1.5} for t, sd in ft.items()}
    third = data_merge("prodistill", base, shifted, data, steps=40, lr=0.05, batch_size=16)
    assert not torch.allclose(first.coefficients[:, 1], third.coefficients[:, 1], atol=1e-3)


def test_coefficients_improve_every_blocks_feature_loss_on_a_mixed_architecture():
    base, finetuned, data = tiny_zoo()  # embedding, grouped conv, layer norm, two linears
    result = data_merge("prodistill", base, finetuned, data, examples=6, steps=60, lr=0.05, batch_size=18)
    fits = result.optimisation.blocks
    assert [f.name for f in fits] == ["embed", "conv", "norm", "fc", "out"]
    # One coefficient per task and tensor moves each block's feature loss only a little on
    # this zoo (0.9-7%), but always down from the initial coefficients.
    for fit in fits:
        assert fit.final_loss < 0.995 * fit.initial_loss, (fit.name, fit.initial_loss, fit.final_loss)
    assert sum(f.final_loss for f in fits) < 0.96 * sum(f.initial_loss for f in fits)
    # At most `examples` per task: the first 6 of 8 (the second batch cut in two).
    assert result.examples == {"a": 6, "b": 6, "c": 6}
    assert tuple(result.coefficients.shape) == (3, 9) and torch.isfinite(result.coefficients).all()
    # The YAML holds the learned floats exactly and re-merges to the same bits.
    config = yaml.safe_load(result.yaml)
    assert config["merge_method"] == "task_arithmetic" and "data" not in config
    rerun = mergelab.merge_state_dicts(config, {**finetuned, "__base__": base.state_dict()})
    assert set(rerun) == set(result.state_dict)
    for name, tensor in rerun.items():
        assert torch.equal(tensor, result.state_dict[name]), name
    weights = {m["model"]: m["parameters"]["weight"] for m in config["models"] if "parameters" in m}
    for row, task in enumerate(finetuned):
        by_filter = {w["filter"]: w["value"] for w in weights[task] if "filter" in w}
        for j, name in enumerate(result.coefficient_tensors):
            assert torch.tensor(by_filter[name], dtype=torch.float32) == result.coefficients[row, j]


def test_identical_fine_tunes_give_that_model_back():
    base, theta0, ft, _, data = _linear_zoo()
    same = {"a": ft["a"], "b": {k: v.clone() for k, v in ft["a"].items()}}
    result = data_merge("prodistill", base, same, {"a": data["a"], "b": data["b"]}, steps=300,
                        lr=0.05, batch_size=16)  # fmt: skip
    # Any coefficients summing to 1 reproduce the fine-tune exactly (zero loss).
    assert torch.allclose(result.coefficients.sum(0), torch.ones(2), atol=1e-3)
    for k, v in ft["a"].items():
        assert torch.allclose(result.state_dict[k], v, atol=1e-3), k
    assert all(f.final_loss < 1e-5 for f in result.optimisation.blocks)
    # Fine-tunes equal to the base: no task vector, nothing learned, the base bit for bit.
    unchanged = {"a": theta0, "b": dict(theta0)}
    plain = data_merge("prodistill", base, unchanged, {"a": data["a"], "b": data["b"]}, steps=5)
    assert plain.coefficient_tensors == [] and plain.optimisation.blocks == []
    assert all(torch.equal(plain.state_dict[k], v) for k, v in theta0.items())


def test_seeded_runs_reproduce_and_the_seed_orders_the_examples():
    base, _, ft, _, data = _linear_zoo()
    runs = [data_merge("prodistill", base, ft, data, steps=12, lr=0.05, batch_size=3, seed=s)
            for s in (7, 7, 8)]  # fmt: skip
    assert torch.equal(runs[0].coefficients, runs[1].coefficients)
    assert runs[0].optimisation.blocks[0].losses == runs[1].optimisation.blocks[0].losses
    assert not torch.equal(runs[0].coefficients, runs[2].coefficients)


def test_bad_input_is_refused_before_any_block_trains(monkeypatch):
    import mergelab.training

    base, theta0, ft, _, data = _linear_zoo()

    def refuse(*_args, **_kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(mergelab.training, "train", refuse)
    with pytest.raises(DataError, match=r"no data for \['b'\]"):
        data_merge("prodistill", base, ft, {"a": data["a"]})
    with pytest.raises(ConfigError, match="`examples` must be in"):
        data_merge("prodistill", base, ft, data, examples=0)
    with pytest.raises(ConfigError, match="`lr` must be in"):
        data_merge("prodistill", base, ft, data, lr=0.0)
    with pytest.raises(DataError, match=r"the data of \['b'\] holds no example"):
        data_merge("prodistill", base, ft, {"a": data["a"], "b": []})
    # A fine-tune whose layers do not match the others'.
    wrong = {**ft, "b": {**ft["b"], "1.weight": torch.zeros(3, 4)}}
    with pytest.raises(ConfigError, match=r"tensor `1.weight`: shape \[3, 4\] in model 'b' differs"):
        data_merge("prodistill", base, wrong, data)
    # An architecture whose layers do not match the models'.
    from mergelab.plan.prodistill import prodistill

    other = nn.Sequential(nn.Linear(3, 5, bias=False), nn.Linear(5, 2, bias=False))
    with pytest.raises(DataError, match=r"`0.weight`: shape \[4, 3\] in the models, \[5, 3\] in the architecture"):
        prodistill(other, theta0, ft, {t: mergelab.stats.TaskData(b) for t, b in data.items()})
    given = {t: mergelab.stats.TaskData(b) for t, b in data.items()}
    with pytest.raises(DataError, match=r"no data for \['b'\]; data for unknown model\(s\) \['c'\]"):
        prodistill(base, theta0, ft, {"a": given["a"], "c": given["b"]})
    renamed = nn.Sequential()
    renamed.add_module("first", nn.Linear(3, 4, bias=False))
    with pytest.raises(DataError, match=r"no tensor\(s\) \['0.weight', '1.weight'\] .*layers do not match"):
        prodistill(renamed, theta0, ft, {t: mergelab.stats.TaskData(b) for t, b in data.items()})


def test_registry_declaration_and_its_needs():
    from mergelab.stats.config_data import needs_logits

    method = get_method("prodistill")
    assert method.needs == ("data",) and method.optimiser == "prodistill" and method.base == "required"
    assert "2502.12706" in method.url and "Progressive Layer-wise Distillation" in method.paper
    assert {p.name for p in method.params} == {"examples", "steps", "batch_size", "lr", "init", "seed"}
    assert method.param("examples").default == 64 and method.param("lr").default == 0.01
    # Distillation matches features: no task head needed (AdaMerging's entropy needs one).
    assert not needs_logits(method) and needs_logits(get_method("adamerging_taskwise"))


# --- `mergelab merge` with a `data:` section (tiny Hugging Face encoder, CSV task) -------------


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    pytest.importorskip("transformers")
    from _data_aware_models import tiny_bert_folders

    root = tmp_path_factory.mktemp("bert_prodistill")
    return root, tiny_bert_folders(root)


def test_config_validates_dry_runs_merges_and_its_saved_yaml_reruns_bit_for_bit(bert, monkeypatch):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    import mergelab.plan.prodistill
    from mergelab.cli import app

    root, folders = bert
    config = bert_config(root, folders, "prodistill",
                         parameters={"examples": 8, "steps": 4, "batch_size": 8, "lr": 0.05})  # fmt: skip
    for m in ("m0", "m1"):  # ProDistill needs no task head: the folders' are not read
        (folders[m] / "head.safetensors").rename(folders[m] / "head.unused")
    path = root / "prodistill.yml"
    path.write_text(yaml.safe_dump(config))
    runner = CliRunner()

    def refuse(*_args, **_kwargs):
        raise AssertionError("validation ran data")

    with monkeypatch.context() as patch:
        patch.setattr(mergelab.plan.prodistill, "prodistill", refuse)
        for args in (["validate", str(path)], ["merge", str(path), str(root / "dry"), "--dry-run"]):
            outcome = runner.invoke(app, args)
            assert outcome.exit_code == 0, outcome.output
            assert "optimiser: prodistill" in outcome.output, outcome.output
            # 8 of the 12 examples the data section gives, per model
            assert outcome.output.count("split train, 8 examples") == 2, outcome.output
            assert "estimated forward passes" in outcome.output and "blocks" in outcome.output
        assert not (root / "dry").exists()
    stage = mergelab.plan_merge(path)
    described = mergelab.plan.stages.describe_data_stage(stage, stage.config_dir)
    # blocks from the tensor names: 3 embeddings + their norm, 2 layers, the pooler
    # per block: 4 steps x 8 examples; (fine-tune, merged) x 2 tasks x 8 partial passes; 2 x 2 x 8 scored
    assert described["estimated_forward_passes"] == 7 * (4 * 8 + 2 * 2 * 8 + 2 * 2 * 8)

    report = mergelab.merge(path, root / "out", progress=False)
    assert report.method == "task_arithmetic"
    assert "examples per model: " + ", ".join(f"{folders[m]}=8" for m in ("m0", "m1")) in report.notes
    saved = yaml.safe_load((root / "out" / "mergelab_config.yml").read_text())
    assert saved["merge_method"] == "task_arithmetic" and "data" not in saved
    again = mergelab.merge(root / "out" / "mergelab_config.yml", root / "again", progress=False)
    assert again.method == "task_arithmetic"
    first = load_file(str(root / "out" / "model.safetensors"))
    second = load_file(str(root / "again" / "model.safetensors"))
    assert set(first) == set(second)
    assert all(torch.equal(first[k], second[k]) for k in first)
    # The merge moved away from the base (the coefficients were learned, not all zero).
    original = load_file(str(folders["base"] / "model.safetensors"))
    assert any(not torch.equal(first[k], original[k]) for k in first if first[k].is_floating_point())
    for m in ("m0", "m1"):
        (folders[m] / "head.unused").rename(folders[m] / "head.safetensors")


def test_on_the_mlp_zoo_it_uses_64_training_examples_and_keeps_a_working_encoder():
    from mergelab.eval.harness import evaluate_model
    from mergelab_bench.data_aware_zoos import merge_zoo_with_data
    from mergelab_bench.zoo.mlp import MLPZoo, MLPZooSettings

    built = MLPZoo(MLPZooSettings(tasks=("parity", "low_high"), steps=60)).build(recipe="lpft", seed=0)
    result = merge_zoo_with_data(built, "prodistill", examples=100, steps=20, lr=0.05)
    assert result.examples == {"parity": 64, "low_high": 64}  # the paper's few shots, of 100
    assert set(result.state_dict) == set(built.pretrained)
    fits = result.optimisation.blocks
    assert fits and all(f.final_loss < f.initial_loss for f in fits), [(f.name, f.initial_loss, f.final_loss) for f in fits]
    scores = evaluate_model(built.evaluator, result.state_dict, built.heads, tasks=built.tasks)
    assert min(scores.values()) > 0.6, scores  # a working encoder, not a broken one
