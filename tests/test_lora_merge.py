"""`mergelab lora merge` against PEFT's `add_weighted_adapter` on the same adapters.

PEFT's semantics per combination type, and what mergelab matches:
- `cat`: exact concatenation (weight x scale folded into A): mergelab's `cat`, same factors.
- `svd` / `ties_svd`: the deltas B_i A_i merged (task arithmetic / TIES), then truncated SVD:
  mergelab's delta-space combination with `task_arithmetic` / `ties`, same folded deltas. With
  unequal weights TIES differs on purpose (mergelab divides by the sum of the agreeing weights,
  as mergekit and the paper; PEFT by their count): tested explicitly.
- `linear`: A's and B's averaged separately (not the weighted sum of deltas): mergelab's
  `factors` combination reproduces it; its delta-space `task_arithmetic` gives the exact
  weighted sum instead, and the difference is PEFT's cross terms, tested explicitly.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")

from _lora_models import make_adapter, save_model, tiny_llama  # noqa: E402

from mergelab.errors import ConfigError  # noqa: E402
from mergelab.lora.ops import merge_adapters  # noqa: E402

WEIGHTS = [0.7, 0.4]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    model = tiny_llama()
    save_model(model, root / "base")
    a = make_adapter(model, root / "a", seed=11, r=4, lora_alpha=8)
    b = make_adapter(model, root / "b", seed=12, r=4, lora_alpha=4,
                     target_modules=["q_proj", "v_proj", "embed_tokens"])
    return model, root, a, b


def _peft(model, a, b, **kwargs):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(a), adapter_name="a")
    peft_model.load_adapter(str(b), adapter_name="b")
    peft_model.add_weighted_adapter(["a", "b"], adapter_name="m", **kwargs)
    return peft_model


def _peft_modules(peft_model, adapter: str = "m"):
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and (adapter in module.lora_A or adapter in module.lora_embedding_A):
            found[name] = module
    return found


def _ours(out_dir):
    from mergelab.checkpoint.adapter import open_adapter

    reader = open_adapter(out_dir)
    try:
        return {
            m.module: (reader.get(m.lora_A), reader.get(m.lora_B), m.scale, m.kind)
            for m in reader.modules.values()
        }
    finally:
        reader.close()


def _our_delta(entry) -> torch.Tensor:
    lora_A, lora_B, scale, _ = entry
    return scale * lora_B.reshape(lora_B.shape[0], -1) @ lora_A.reshape(lora_A.shape[0], -1)


def _peft_delta(module, adapter="m") -> torch.Tensor:
    delta = module.get_delta_weight(adapter)
    return delta.T if adapter in module.lora_embedding_A else delta  # B @ A orientation


def test_cat_equals_peft_cat_factors(adapters, tmp_path):
    model, _, a, b = adapters
    merge_adapters([a, b], tmp_path / "cat", weights=WEIGHTS, combination="cat", progress=False)
    ours = _ours(tmp_path / "cat")
    theirs = _peft_modules(_peft(model, a, b, weights=WEIGHTS, combination_type="cat"))
    # PEFT pads every module to the summed rank; mergelab writes each module's own rank
    # (rank_pattern), so compare the leading rows/columns and check PEFT's padding is zero.
    assert set(ours) == set(theirs)
    for name, module in theirs.items():
        lora_A, lora_B, scale, kind = ours[name]
        if kind == "embedding":
            peft_A, peft_B = module.lora_embedding_A["m"], module.lora_embedding_B["m"]
        else:
            peft_A, peft_B = module.lora_A["m"].weight, module.lora_B["m"].weight
        rank = lora_A.shape[0]
        assert scale == 1.0
        torch.testing.assert_close(lora_A, peft_A[:rank], atol=1e-6, rtol=0)
        torch.testing.assert_close(lora_B, peft_B[:, :rank], atol=1e-6, rtol=0)
        assert float(peft_A[rank:].abs().sum()) == 0.0


@pytest.mark.parametrize("peft_type, method, params", [
    ("svd", "task_arithmetic", {}),
    ("ties_svd", "ties", {"density": 0.5}),
])
def test_delta_space_equals_peft_svd_family(adapters, tmp_path, peft_type, method, params):
    model, _, a, b = adapters
    # Weights of 1: TIES's two normalisations (count vs sum of weights) coincide.
    weights = WEIGHTS if method == "task_arithmetic" else [1.0, 1.0]
    merge_adapters([a, b], tmp_path / "m", weights=weights, combination="delta", method=method,
                   params=params, rank=4, progress=False)
    ours = _ours(tmp_path / "m")
    extra = {"density": params["density"]} if "density" in params else {}
    theirs = _peft_modules(_peft(model, a, b, weights=weights, combination_type=peft_type, svd_rank=4, **extra))
    assert set(ours) == set(theirs)
    for name, module in theirs.items():
        torch.testing.assert_close(_our_delta(ours[name]), _peft_delta(module), atol=1e-5, rtol=0)


def test_ties_with_unequal_weights_normalises_by_the_weights_on_purpose(adapters, tmp_path):
    """PEFT's ties elects signs from the unweighted pruned deltas and divides the agreeing
    weighted deltas by their count; mergelab (as mergekit) elects from the weighted deltas and
    divides by the sum of the agreeing weights. Both formulas checked on the same inputs."""
    from peft.utils.merge_utils import ties as peft_ties

    from mergelab.lora.ops import _apply_method
    from mergelab.methods.registry import get_method, resolve_defaults

    torch.manual_seed(0)
    deltas = [torch.randn(12, 10), torch.randn(12, 10)]
    weights = [2.0, 0.5]
    method = get_method("ties")
    model_params = [resolve_defaults(method.model_params, {"weight": w, "density": 0.6}) for w in weights]
    ours = _apply_method(method, deltas, model_params, resolve_defaults(method.global_params, {}), "x", 0)
    theirs = peft_ties(deltas, torch.tensor(weights), 0.6)
    # The same entries are kept (top 60% by magnitude, per delta).
    pruned = [d * (d.abs() >= d.abs().flatten().kthvalue(d.numel() - int(0.6 * d.numel()) + 1).values) for d in deltas]
    stacked = torch.stack(pruned)
    w = torch.tensor(weights)[:, None, None]

    peft_agree = (stacked.sign() == torch.where(stacked.sum(0) >= 0, 1.0, -1.0)).float()
    peft_expected = (stacked * w * peft_agree).sum(0) / peft_agree.sum(0).clamp(min=1)
    torch.testing.assert_close(theirs, peft_expected, atol=1e-6, rtol=0)

    sign = torch.where((stacked * w).sum(0) >= 0, 1.0, -1.0)
    agree = (stacked.sign() == sign).float()
    divisor = (w * agree).sum(0)
    weighted = (stacked * w * agree).sum(0)
    expected = torch.where(divisor > 0, weighted / divisor.clamp(min=1e-12), torch.zeros(()))
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(ours, theirs)


def test_factor_space_linear_equals_peft_linear(adapters, tmp_path):
    model, root, a, _ = adapters
    # PEFT's linear needs one rank and one set of modules across adapters.
    c = make_adapter(model, root / "c", seed=13, r=4, lora_alpha=2)
    merge_adapters([a, c], tmp_path / "lin", weights=WEIGHTS, combination="factors",
                   method="task_arithmetic", progress=False)
    ours = _ours(tmp_path / "lin")
    theirs = _peft_modules(_peft(model, a, c, weights=WEIGHTS, combination_type="linear"))
    for name, module in theirs.items():
        lora_A, lora_B, scale, _ = ours[name]
        assert scale == 1.0
        torch.testing.assert_close(lora_A, module.lora_A["m"].weight, atol=1e-6, rtol=0)
        torch.testing.assert_close(lora_B, module.lora_B["m"].weight, atol=1e-6, rtol=0)


def test_delta_space_linear_is_the_weighted_sum_peft_linear_is_not(adapters, tmp_path):
    model, root, a, _ = adapters
    c = make_adapter(model, root / "c2", seed=14, r=4, lora_alpha=2)
    # Full rank (2 x 4 = 8): the delta-space result is exactly sum_i w_i s_i B_i A_i.
    merge_adapters([a, c], tmp_path / "delta", weights=WEIGHTS, combination="delta",
                   method="task_arithmetic", rank=8, progress=False)
    ours = _ours(tmp_path / "delta")
    peft_model = _peft(model, a, c, weights=WEIGHTS, combination_type="linear")
    for name, module in _peft_modules(peft_model).items():
        sa, sc = module.scaling["a"], module.scaling["b"]
        A1, B1 = module.lora_A["a"].weight, module.lora_B["a"].weight
        A2, B2 = module.lora_A["b"].weight, module.lora_B["b"].weight
        exact = WEIGHTS[0] * sa * B1 @ A1 + WEIGHTS[1] * sc * B2 @ A2
        torch.testing.assert_close(_our_delta(ours[name]), exact, atol=1e-5, rtol=0)
        c1, c2 = WEIGHTS[0] * sa, WEIGHTS[1] * sc
        cross = (c1 * c2) ** 0.5 * (B1 @ A2 + B2 @ A1)
        torch.testing.assert_close(_peft_delta(module), exact + cross, atol=1e-5, rtol=0)


def test_merged_adapter_loads_in_peft_and_matches_the_written_factors(adapters, tmp_path):
    from peft import PeftModel

    model, _, a, b = adapters
    merge_adapters([a, b], tmp_path / "cat", weights=WEIGHTS, combination="cat", progress=False)
    config = json.loads((tmp_path / "cat" / "adapter_config.json").read_text())
    assert config["rank_pattern"]  # embed_tokens (rank 4) differs from the attention's (8)
    loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "cat"))
    ours = _ours(tmp_path / "cat")
    for name, module in _peft_modules(loaded, "default").items():
        torch.testing.assert_close(_peft_delta(module, "default"), _our_delta(ours[name]), atol=1e-6, rtol=0)


def test_knots_full_rank_task_arithmetic_is_exact_and_ties_runs(adapters, tmp_path):
    _, _, a, b = adapters
    merge_adapters([a, b], tmp_path / "ta", weights=WEIGHTS, combination="delta", rank=8, progress=False)
    report = merge_adapters([a, b], tmp_path / "knots", weights=WEIGHTS, combination="knots",
                            method="task_arithmetic", rank=8, progress=False)
    exact, knots = _ours(tmp_path / "ta"), _ours(tmp_path / "knots")
    for name in exact:  # task arithmetic is linear, so the shared basis changes nothing
        torch.testing.assert_close(_our_delta(knots[name]), _our_delta(exact[name]), atol=1e-5, rtol=0)
    assert max(m.relative_error for m in report.modules) < 1e-5
    merge_adapters([a, b], tmp_path / "knots_ties", combination="knots", method="ties",
                   params={"density": 0.5}, rank=4, progress=False)
    assert (tmp_path / "knots_ties" / "adapter_model.safetensors").is_file()


def test_randomized_svd_matches_exact_at_full_rank(adapters, tmp_path):
    _, _, a, b = adapters
    merge_adapters([a, b], tmp_path / "exact", weights=WEIGHTS, rank=8, progress=False)
    merge_adapters([a, b], tmp_path / "rand", weights=WEIGHTS, rank=8, svd="randomized", seed=3, progress=False)
    exact, rand = _ours(tmp_path / "exact"), _ours(tmp_path / "rand")
    for name in exact:
        torch.testing.assert_close(_our_delta(rand[name]), _our_delta(exact[name]), atol=1e-4, rtol=0)


def test_bad_merge_requests_fail_before_writing(adapters, tmp_path):
    _, _, a, b = adapters
    cases = [
        ({"weights": [1.0]}, "1 weight\\(s\\) for 2 adapter"),
        ({"method": "tiess"}, "did you mean 'ties'"),
        ({"method": "ties", "params": {"densty": 0.5}}, "`densty` is not a parameter"),
        ({"method": "ties", "params": {"density": 1.5}}, "must be in \\(0, 1\\]"),
        ({"combination": "sum"}, "combination: must be one of"),
        ({"method": "regmean"}, "data-free"),
        ({"combination": "factors"}, "one rank"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            merge_adapters([a, b], tmp_path / "out", progress=False, **kwargs)
        assert not (tmp_path / "out").exists()


def test_merge_cli(adapters, tmp_path):
    from typer.testing import CliRunner

    from mergelab.cli import app

    _, _, a, b = adapters
    result = CliRunner().invoke(app, [
        "lora", "merge", str(a), str(b), "--out", str(tmp_path / "m"), "--weights", "0.5,0.5",
        "--method", "ties", "--param", "density=0.5", "--rank", "4", "--svd", "randomized",
        "--no-progress",
    ])
    assert result.exit_code == 0, result.output
    assert "with `delta:ties`" in result.output
    report = json.loads((tmp_path / "m" / "mergelab_lora_report.json").read_text())
    assert all(entry["rank"] == 4 for entry in report["modules"].values())
    bad = CliRunner().invoke(app, ["lora", "merge", str(a), "--out", str(tmp_path / "x"), "--param", "density"])
    assert bad.exit_code != 0 and "NAME=VALUE" in bad.output
