"""Config validation, parameter resolution and in-memory merges through the planner + engine."""

from __future__ import annotations

import pytest
import torch
from conftest import layered

from mergelab import ConfigError, MergeError, merge_state_dicts
from mergelab.plan.config import ConditionalValue, parse_config
from mergelab.plan.params import evaluate_setting
from mergelab.plan.planner import split_layer_name

_layered = layered


# ---------------------------------------------------------------- parameter resolution


def test_gradient_interpolates_between_evenly_spaced_points():
    assert evaluate_setting([0.0, 1.0], "x", 0.5) == pytest.approx(0.5)
    # three points at t = 0, 0.5, 1; t = 0.25 lies halfway between the first two
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert evaluate_setting([0.2, 0.4, 0.6, 0.8], "x", 1.0) == pytest.approx(0.8)
    assert evaluate_setting([5.0], "x", 0.7) == 5.0
    # booleans are picked, not interpolated
    assert evaluate_setting([True, False], "x", 0.4) is True
    assert evaluate_setting([True, False], "x", 1.0) is False
    # YAML 1.1 reads 1e-3 as a string; it is a number
    assert evaluate_setting("1e-3", "x", 0.0) == pytest.approx(1e-3)


def test_filters_first_match_wins_and_star_matches_all():
    setting = [
        ConditionalValue(filter="self_attn", value=0.1),
        ConditionalValue(filter="mlp", value=[0.0, 1.0]),
        ConditionalValue(value=0.9),
    ]
    assert evaluate_setting(setting, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.1
    assert evaluate_setting(setting, "model.layers.0.mlp.up.weight", 0.5) == pytest.approx(0.5)
    assert evaluate_setting(setting, "model.norm.weight", 0.5) == 0.9
    only = [ConditionalValue(filter="mlp", value=0.3)]
    assert evaluate_setting(only, "model.norm.weight", 0.0) is None
    assert evaluate_setting([ConditionalValue(filter="*", value=2.0)], "a", 0.0) == 2.0


def test_split_layer_name_covers_common_layouts():
    assert split_layer_name("model.layers.12.mlp.up_proj.weight") == ("model.layers", 12, "mlp.up_proj.weight")
    assert split_layer_name("encoder.layer.3.attention.self.query.bias") == (
        "encoder.layer",
        3,
        "attention.self.query.bias",
    )
    assert split_layer_name("transformer.h.0.attn.c_attn.weight") == ("transformer.h", 0, "attn.c_attn.weight")
    assert split_layer_name("model.embed_tokens.weight") is None
    assert split_layer_name("0.weight") is None


# ---------------------------------------------------------------- validation errors


def test_schema_typos_are_all_reported_with_key_paths():
    with pytest.raises(ConfigError) as info:
        parse_config(
            {
                "merge_method": "linear",
                "modles": [{"model": "a"}],
                "models": [{"model": "a", "paramters": {"weight": 1}}],
                "dtype": "float8",
            }
        )
    text = str(info.value)
    assert "modles: unknown key (did you mean `models`?)" in text
    assert "models.0.paramters: unknown key (did you mean `parameters`?)" in text
    assert "dtype" in text and "float8" in text
    assert len(info.value.problems) == 3


def test_method_and_parameter_problems_reported_together():
    a, b = _layered([1, 2, 3]), _layered([1, 2, 3])
    config = {
        "merge_method": "ties",
        "base_model": "a",
        "models": [
            {"model": "b", "parameters": {"weight": 1.0, "density": 1.3, "desnity": 0.5}},
        ],
        "parameters": {"lamda": 1.0},
    }
    with pytest.raises(ConfigError) as info:
        merge_state_dicts(config, {"a": a, "b": b})
    text = str(info.value)
    assert "models.0.parameters.density" in text and "(0, 1]" in text and "1.3" in text
    assert "models.0.parameters.desnity: unknown parameter of method `ties` (did you mean `density`?)" in text
    assert "parameters.lamda" in text and "`lambda`" in text


def test_unknown_method_suggests_a_close_name():
    with pytest.raises(ConfigError, match="unknown merge method 'tie'.*did you mean 'ties'"):
        merge_state_dicts(
            {"merge_method": "tie", "models": [{"model": "a"}]}, {"a": _layered([1, 2, 3])}
        )


def test_missing_tensor_and_shape_mismatch_name_model_and_tensor():
    a, b, c = _layered([1, 2, 3]), _layered([1, 2, 3]), _layered([1, 2, 3])
    del b["model.layers.1.mlp.weight"]
    c["model.norm.weight"] = torch.ones(3)
    with pytest.raises(ConfigError) as info:
        merge_state_dicts(
            {
                "merge_method": "linear",
                "models": [{"model": m, "parameters": {"weight": 1.0}} for m in "abc"],
            },
            {"a": a, "b": b, "c": c},
        )
    text = str(info.value)
    assert "tensor `model.layers.1.mlp.weight` is missing from model 'b'" in text
    assert "tensor `model.norm.weight`: shape [3] in model 'c' differs from [2] in model 'a'" in text


def test_required_parameter_missing_and_arity():
    a, b = _layered([1, 2, 3]), _layered([1, 2, 3])
    with pytest.raises(ConfigError) as info:
        merge_state_dicts(
            {"merge_method": "task_arithmetic", "models": [{"model": "b"}]}, {"a": a, "b": b}
        )
    assert "needs a `base_model`" in str(info.value)
    with pytest.raises(ConfigError, match="parameter `weight` of method `task_arithmetic` is required for model 'b'"):
        merge_state_dicts(
            {"merge_method": "task_arithmetic", "base_model": "a", "models": [{"model": "b"}]},
            {"a": a, "b": b},
        )


# ---------------------------------------------------------------- merged values


def test_linear_with_layer_gradient_matches_hand_computation():
    a, b = _layered([0, 0, 0], extra=0.0), _layered([4, 4, 4], extra=4.0)
    out = merge_state_dicts(
        {
            "merge_method": "linear",
            "models": [
                {"model": "a", "parameters": {"weight": [1.0, 0.0]}},
                {"model": "b", "parameters": {"weight": [0.0, 1.0]}},
            ],
        },
        {"a": a, "b": b},
    )
    # 3 layers: t = 0, 0.5, 1 -> weights (1,0), (.5,.5), (0,1), normalised -> values 0, 2, 4
    for i, expected in enumerate([0.0, 2.0, 4.0]):
        assert torch.allclose(out[f"model.layers.{i}.mlp.weight"], torch.full((2, 2), expected))
    # non-layer tensors take t = 0 (mergekit 0.1.5): weights (1, 0)
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], a["model.norm.weight"])


def test_filtered_parameters_apply_by_tensor_name():
    a, b = _layered([0, 0, 0]), _layered([4, 4, 4], extra=4.0)
    out = merge_state_dicts(
        {
            "merge_method": "linear",
            "models": [{"model": "a"}, {"model": "b"}],
            "parameters": {"weight": [{"filter": "mlp", "value": 1.0}, {"value": 3.0}]},
            "dtype": "float32",
        },
        {"a": a, "b": {**b, "model.layers.0.mlp.weight": torch.full((2, 2), 8.0)}},
    )
    assert torch.allclose(out["model.layers.0.mlp.weight"], torch.full((2, 2), 4.0))
    assert torch.allclose(out["model.norm.weight"], torch.full((2,), 3.0))  # (1+5)/2 with equal w


def test_task_arithmetic_base_listed_or_not_gives_same_result():
    base = _layered([1, 1, 1], extra=1.0)
    ft1 = _layered([2, 3, 4], extra=1.5)
    ft2 = _layered([0, 1, 1], extra=1.0)
    common = {"merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 0.5}}
    models = [{"model": "ft1", "parameters": {"weight": 1.0}}, {"model": "ft2", "parameters": {"weight": 2.0}}]
    sds = {"base": base, "ft1": ft1, "ft2": ft2}
    out1 = merge_state_dicts({**common, "models": models}, sds)
    out2 = merge_state_dicts({**common, "models": [{"model": "base"}, *models]}, sds)
    for name in out1:
        assert torch.equal(out1[name], out2[name])
    # layer 1: base 1 + 0.5 * (1 * (3-1) + 2 * (1-1)) = 2
    assert torch.allclose(out1["model.layers.1.mlp.weight"], torch.full((2, 2), 2.0))
    # layer 2: 1 + 0.5 * (3 + 0) = 2.5
    assert torch.allclose(out1["model.layers.2.mlp.weight"], torch.full((2, 2), 2.5))


def test_slices_renumber_layers_and_take_pre_and_post_weights_from_first_and_last():
    a, b = _layered([10, 11, 12], extra=1.0), _layered([20, 21, 22], extra=2.0)
    out = merge_state_dicts(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "a", "layer_range": [0, 2]}]},
                {"sources": [{"model": "b", "layer_range": [1, 3]}]},
            ],
        },
        {"a": a, "b": b},
    )
    values = [float(out[f"model.layers.{i}.mlp.weight"][0, 0]) for i in range(4)]
    assert values == [10.0, 11.0, 21.0, 22.0]
    assert float(out["model.embed_tokens.weight"][0, 0]) == 1.0  # first slice
    assert float(out["model.norm.weight"][0]) == 3.0  # last slice (extra + 1)
    assert "model.layers.4.mlp.weight" not in out


def test_slices_need_equal_lengths_and_base_among_sources():
    a, b = _layered([1, 2, 3]), _layered([1, 2, 3])
    with pytest.raises(ConfigError) as info:
        merge_state_dicts(
            {
                "merge_method": "task_arithmetic",
                "base_model": "a",
                "slices": [
                    {
                        "sources": [
                            {"model": "b", "layer_range": [0, 2], "parameters": {"weight": 1.0}},
                            {"model": "b2", "layer_range": [0, 3], "parameters": {"weight": 1.0}},
                        ]
                    }
                ],
            },
            {"a": a, "b": b, "b2": b},
        )
    text = str(info.value)
    assert "same number of layers" in text
    assert "base model 'a' is not among this slice's sources" in text


def test_non_float_tensors_are_copied_when_equal_and_rejected_when_not():
    a, b = _layered([1, 1, 1]), _layered([3, 3, 3])
    a["position_ids"] = torch.arange(4)
    b["position_ids"] = torch.arange(4)
    config = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"weight": 1.0}}
    out = merge_state_dicts(config, {"a": a, "b": b})
    assert torch.equal(out["position_ids"], torch.arange(4)) and out["position_ids"].dtype == torch.int64
    b["position_ids"] = torch.arange(4).flip(0)
    with pytest.raises(MergeError, match="position_ids.*non-floating tensor differs"):
        merge_state_dicts(config, {"a": a, "b": b})


def test_nonfinite_inputs_are_refused_unless_allowed():
    a, b = _layered([1, 1, 1]), _layered([3, 3, 3])
    b["model.layers.2.mlp.weight"][0, 1] = float("nan")
    config = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"weight": 1.0}}
    with pytest.raises(MergeError, match=r"tensor `model.layers.2.mlp.weight` of model 'b'.*1 NaN/Inf"):
        merge_state_dicts(config, {"a": a, "b": b})
    out = merge_state_dicts(config, {"a": a, "b": b}, allow_nonfinite=True)
    assert torch.isnan(out["model.layers.2.mlp.weight"][0, 1])


def test_dtype_and_out_dtype_are_honoured():
    a = {k: v.to(torch.bfloat16) for k, v in _layered([1, 2, 3]).items()}
    b = _layered([3, 2, 1])
    config = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"weight": 1.0}}
    out = merge_state_dicts(config, {"a": a, "b": b})
    assert out["model.layers.0.mlp.weight"].dtype == torch.bfloat16  # reference (first) model's
    out = merge_state_dicts({**config, "out_dtype": "float16"}, {"a": a, "b": b})
    assert out["model.layers.0.mlp.weight"].dtype == torch.float16
    assert torch.allclose(out["model.layers.0.mlp.weight"].float(), torch.full((2, 2), 2.0))


def test_randomised_methods_depend_on_seed_only():
    base = {"w": torch.zeros(64, 64)}
    ft = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(1))}
    config = {
        "merge_method": "dare_linear",
        "base_model": "base",
        "models": [{"model": "ft", "parameters": {"weight": 1.0, "density": 0.5}}],
    }
    r1 = merge_state_dicts(config, {"base": base, "ft": ft}, seed=3)["w"]
    r2 = merge_state_dicts(config, {"base": base, "ft": ft}, seed=3)["w"]
    r3 = merge_state_dicts(config, {"base": base, "ft": ft}, seed=4)["w"]
    assert torch.equal(r1, r2)
    assert not torch.equal(r1, r3)


def test_cross_parameter_constraints_are_checked_before_merging():
    base = {"w": torch.zeros(4, 4)}
    ft = {"w": torch.ones(4, 4)}
    config = {
        "merge_method": "della",
        "base_model": "base",
        "models": [{"model": "ft", "parameters": {"weight": 1.0, "density": 0.9, "epsilon": 0.2}}],
    }
    with pytest.raises(ConfigError, match=r"model 'ft', tensor `w`:.*epsilon"):
        merge_state_dicts(config, {"base": base, "ft": ft})


def test_integer_buffer_missing_from_some_models_is_copied_from_the_others():
    a, b = _layered([1, 1, 1]), _layered([3, 3, 3])
    a["embeddings.position_ids"] = torch.arange(6)[None]
    config = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"weight": 1.0}}
    out = merge_state_dicts(config, {"a": a, "b": b})
    assert torch.equal(out["embeddings.position_ids"], torch.arange(6)[None])
    # a missing floating-point tensor is still an error
    b_missing = dict(b)
    del b_missing["model.norm.weight"]
    with pytest.raises(ConfigError, match="`model.norm.weight` is missing from model 'b'"):
        merge_state_dicts(config, {"a": a, "b": b_missing})


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "breadcrumbs"])
def test_in_memory_merge_never_modifies_the_callers_tensors(method):
    g = torch.Generator().manual_seed(0)
    sds = {k: {"w": torch.randn(64, 64, generator=g)} for k in ("base", "a", "b")}
    before = {k: v["w"].clone() for k, v in sds.items()}
    merge_state_dicts(
        {
            "merge_method": method,
            "base_model": "base",
            "models": [{"model": m, "parameters": {"weight": 1.0, "density": 0.5}} for m in "ab"],
        },
        sds,
    )
    for k in sds:
        assert torch.equal(sds[k]["w"], before[k]), k


def test_batchnorm_step_counters_may_differ_and_keep_the_first_models_value():
    a, b = _layered([1, 1, 1]), _layered([3, 3, 3])
    a["bn.num_batches_tracked"] = torch.tensor(10)
    b["bn.num_batches_tracked"] = torch.tensor(99)
    config = {"merge_method": "linear", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"weight": 1.0}}
    out = merge_state_dicts(config, {"a": a, "b": b})
    assert int(out["bn.num_batches_tracked"]) == 10
