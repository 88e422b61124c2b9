"""interpolation and modality_arithmetic (Sung et al. 2023) as ordinary registry methods:
hand-computed values on small tensors, in configs of separate models (no expert groups), their
declarations, and their parameter errors through the planner's one validator."""

from __future__ import annotations

import pytest
import torch

import mergelab
from mergelab import ConfigError
from mergelab.methods.registry import TensorMerge, get_method

T = torch.tensor


def _kernel(name: str, tensors, base=None, **params) -> torch.Tensor:
    method = get_method(name)
    full = {p.name: params.get(p.name, p.default) for p in method.global_params}
    job = TensorMerge(tensors=tensors, base=base, model_params=[{} for _ in tensors], params=full)
    return method.kernel(job)


# --- hand-computed values --------------------------------------------------------------------------


def test_interpolation_two_models_is_alpha_and_one_minus_alpha():
    out = _kernel("interpolation", [T([4.0, -2.0]), T([0.0, 2.0])], alpha=0.25)
    # 0.25 * [4, -2] + 0.75 * [0, 2]
    assert torch.allclose(out, T([1.0, 1.0]), atol=1e-6)


def test_interpolation_three_models_gives_the_vl_copy_a_third():
    v, lang, vl = T([3.0, 0.0]), T([0.0, 3.0]), T([6.0, -3.0])
    out = _kernel("interpolation", [v, lang, vl], alpha=0.5)
    # 2a/3 = 1/3, 2(1-a)/3 = 1/3, 1/3: the plain mean
    assert torch.allclose(out, T([3.0, 0.0]), atol=1e-6)
    out = _kernel("interpolation", [v, lang, vl], alpha=1.0)
    # 2/3 v + 0 l + 1/3 vl = [2 + 2, 0 - 1]
    assert torch.allclose(out, T([4.0, -1.0]), atol=1e-6)


def test_modality_arithmetic_adds_lambda_times_the_summed_modality_vectors():
    seed = T([1.0, 1.0])
    v, lang = T([2.0, 1.0]), T([1.0, 4.0])  # vectors [1, 0] and [0, 3]
    out = _kernel("modality_arithmetic", [v, lang], base=seed, **{"lambda": 0.5})
    assert torch.allclose(out, T([1.5, 2.5]), atol=1e-6)
    # lambda 1: the seed plus both vectors
    assert torch.allclose(_kernel("modality_arithmetic", [v, lang], base=seed), T([2.0, 4.0]), atol=1e-6)


def test_the_kernels_do_not_write_to_their_inputs():
    v, lang, seed = T([2.0, 1.0]), T([1.0, 4.0]), T([1.0, 1.0])
    _kernel("modality_arithmetic", [v, lang], base=seed, **{"lambda": 0.3})
    _kernel("interpolation", [v, lang], alpha=0.3)
    assert torch.equal(v, T([2.0, 1.0])) and torch.equal(lang, T([1.0, 4.0]))
    assert torch.equal(seed, T([1.0, 1.0]))


# --- in configs of separate models -----------------------------------------------------------------


def _models(**state_dicts):
    return {name: {"w": t, "b": t[:1].clone()} for name, t in state_dicts.items()}


def test_interpolation_in_a_models_config():
    sds = _models(v=T([4.0, -2.0]), l=T([0.0, 2.0]), vl=T([3.0, 3.0]))
    out = mergelab.merge_state_dicts(
        {"merge_method": "interpolation", "models": [{"model": "v"}, {"model": "l"}],
         "parameters": {"alpha": 0.25}}, sds,
    )  # fmt: skip
    assert torch.allclose(out["w"], T([1.0, 1.0]), atol=1e-6)
    out = mergelab.merge_state_dicts(
        {"merge_method": "interpolation", "models": [{"model": "v"}, {"model": "l"}, {"model": "vl"}],
         "parameters": {"alpha": 0.25}}, sds,
    )  # fmt: skip
    # 1/6 v + 1/2 l + 1/3 vl
    assert torch.allclose(out["w"], T([4 / 6 + 0 + 1, -2 / 6 + 1 + 1]), atol=1e-6)


def test_modality_arithmetic_in_a_models_config():
    sds = _models(seed=T([1.0, 1.0]), v=T([2.0, 1.0]), l=T([1.0, 4.0]))
    out = mergelab.merge_state_dicts(
        {"merge_method": "modality_arithmetic", "base_model": "seed",
         "models": [{"model": "v"}, {"model": "l"}], "parameters": {"lambda": 0.5}}, sds,
    )  # fmt: skip
    assert torch.allclose(out["w"], T([1.5, 2.5]), atol=1e-6)


def test_declarations():
    interpolation = get_method("interpolation")
    assert (interpolation.min_models, interpolation.max_models, interpolation.base) == (2, 3, "none")
    assert interpolation.param("alpha").low == 0 and interpolation.param("alpha").high == 1
    arithmetic = get_method("modality_arithmetic")
    assert arithmetic.base == "required" and arithmetic.param("lambda").default == 1.0
    for method in (interpolation, arithmetic):
        assert method.url == "https://arxiv.org/abs/2304.14933"
        assert method.blockwise is not None and not method.merges_with_grams


# --- errors through the planner's validator --------------------------------------------------------


def _error(raw: dict, sds: dict) -> str:
    with pytest.raises(ConfigError) as info:
        mergelab.merge_state_dicts(raw, sds)
    return str(info.value)


def test_alpha_out_of_range_is_named_with_its_key_path():
    sds = _models(v=T([1.0]), l=T([2.0]))
    msg = _error({"merge_method": "interpolation", "models": [{"model": "v"}, {"model": "l"}],
                  "parameters": {"alpha": [0.5, 1.5]}}, sds)
    assert "parameters.alpha: `alpha` must be in [0, 1]; got 1.5 (method `interpolation`)" in msg
    msg = _error({"merge_method": "interpolation",
                  "models": [{"model": "v", "parameters": {"alpha": 0.5}}, {"model": "l"}]}, sds)
    assert "models.0.parameters.alpha: `alpha` is a global parameter of `interpolation`" in msg


def test_interpolation_refuses_four_models_and_arithmetic_needs_the_seed():
    sds = _models(a=T([1.0]), b=T([2.0]), c=T([3.0]), d=T([4.0]))
    msg = _error({"merge_method": "interpolation",
                  "models": [{"model": k} for k in "abcd"]}, sds)
    assert "method `interpolation` takes at most 3 models; got 4" in msg
    msg = _error({"merge_method": "modality_arithmetic", "models": [{"model": "a"}, {"model": "b"}]}, sds)
    assert "method `modality_arithmetic` needs a `base_model`" in msg
    msg = _error({"merge_method": "modality_arithmetic", "models": [{"model": "a"}, {"model": "b"}],
                  "base_model": "c", "parameters": {"lambda": -1.0}}, sds)
    assert "parameters.lambda: `lambda` must be in [0, inf]; got -1.0" in msg
