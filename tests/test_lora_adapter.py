"""Reading PEFT adapters: what is read (ranks, alphas, patterns, rsLoRA, saved modules, .bin) and
every bad input refused up front with the file, tensor and shapes named, nothing written."""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("peft")
pytest.importorskip("transformers")

from _lora_models import make_adapter, merged_with_peft, save_model, tiny_llama  # noqa: E402

import mergelab  # noqa: E402
from mergelab.checkpoint import open_checkpoint  # noqa: E402
from mergelab.checkpoint.adapter import open_adapter  # noqa: E402
from mergelab.errors import CheckpointError  # noqa: E402
from mergelab.lora.ops import fold_adapter  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapter")
    model = tiny_llama()
    base = save_model(model, root / "base")
    good = make_adapter(
        model, root / "good", seed=1, r=4, lora_alpha=6, use_rslora=True,
        target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"],
    )
    return model, base, good


def _copy_adapter(src, dst, *, config_edits=None, tensors=None):
    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(config_edits or {})
    (dst / "adapter_config.json").write_text(json.dumps(config))
    state = load_file(src / "adapter_model.safetensors")
    if tensors is not None:
        state = tensors(state)
    save_file(state, dst / "adapter_model.safetensors")
    return dst


def test_reads_ranks_scales_and_saved_modules(setup):
    _, base, good = setup
    with open_adapter(good) as adapter:
        module = adapter.modules["model.layers.0.self_attn.q_proj.weight"]
        assert (module.rank, module.alpha, module.layout, module.kind) == (4, 6.0, "linear", "linear")
        assert module.scale == pytest.approx(6 / math.sqrt(4))  # use_rslora
        assert set(adapter.saved) == {"lm_head.weight"}
        with open_checkpoint(base) as reader:
            adapter.check_against(reader, base)


def test_rank_and_alpha_patterns(setup, tmp_path):
    model, _, _ = setup
    path = make_adapter(model, tmp_path / "p", seed=2, r=4, lora_alpha=8,
                        rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})
    with open_adapter(path) as adapter:
        q1 = adapter.modules["model.layers.1.self_attn.q_proj.weight"]
        v0 = adapter.modules["model.layers.0.self_attn.v_proj.weight"]
        assert (q1.rank, q1.scale) == (2, 8 / 2)
        assert (v0.rank, v0.scale) == (4, 3 / 4)


def test_pickled_bin_adapter_is_read_with_weights_only(setup, tmp_path):
    model, base, good = setup
    path = tmp_path / "bin"
    path.mkdir()
    (path / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    torch.save(load_file(good / "adapter_model.safetensors"), path / "adapter_model.bin")
    fold_adapter(base, path, tmp_path / "out", progress=False)
    folded = load_file(tmp_path / "out" / "model.safetensors")
    reference = merged_with_peft(model, good)
    for name, value in folded.items():
        torch.testing.assert_close(value, reference[name], atol=1e-5, rtol=0)


class _Payload:
    def __reduce__(self):
        return (print, ("this would run code",))


def _assert_refused(base, adapter, out, *messages):
    with pytest.raises(CheckpointError) as caught:
        fold_adapter(base, adapter, out, progress=False)
    for message in messages:
        assert message in str(caught.value), str(caught.value)
    assert not out.exists()
    return str(caught.value)


def test_bin_holding_code_is_refused(setup, tmp_path):
    _, base, good = setup
    path = tmp_path / "evil"
    path.mkdir()
    (path / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    with open(path / "adapter_model.bin", "wb") as handle:
        pickle.dump({"base_model.model.x.lora_A.weight": _Payload()}, handle)
    _assert_refused(base, path, tmp_path / "out", "adapter_model.bin", "pickled code")


def test_config_without_weights(setup, tmp_path):
    _, base, good = setup
    path = tmp_path / "empty"
    path.mkdir()
    (path / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    _assert_refused(base, path, tmp_path / "out", str(path), "no weights", "adapter_model.safetensors")


def test_dora_is_refused_clearly(setup, tmp_path):
    model, base, _ = setup
    path = make_adapter(model, tmp_path / "dora", seed=3, use_dora=True)
    _assert_refused(base, path, tmp_path / "out", "use_dora", "DoRA")


def test_factor_shapes_that_do_not_match_the_base(setup, tmp_path):
    _, base, good = setup
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def widen(state):
        state[name] = torch.zeros(4, 20)
        return state

    path = _copy_adapter(good, tmp_path / "wide", tensors=widen)
    _assert_refused(
        base, path, tmp_path / "out",
        f"tensor `{name}` has shape [4, 20]",
        "weight `model.layers.0.self_attn.q_proj.weight`", "[16, 16]", "needs [4, 16]",
    )


def test_unknown_target_module(setup, tmp_path):
    _, base, good = setup

    def rename(state):
        prefix = "base_model.model.model.layers.0.self_attn."
        for part in ("lora_A.weight", "lora_B.weight"):
            state[prefix + "qq_proj." + part] = state.pop(prefix + "q_proj." + part)
        return state

    path = _copy_adapter(good, tmp_path / "unknown", tensors=rename)
    _assert_refused(base, path, tmp_path / "out",
                    "target module `model.layers.0.self_attn.qq_proj`",
                    "did you mean `model.layers.0.self_attn.q_proj.weight`")


def test_rank_larger_than_the_matrix(setup, tmp_path):
    _, base, good = setup

    def grow(state):
        prefix = "base_model.model.model.layers.0.self_attn.q_proj."
        state[prefix + "lora_A.weight"] = torch.randn(20, 16)
        state[prefix + "lora_B.weight"] = torch.randn(16, 20)
        return state

    path = _copy_adapter(good, tmp_path / "big", tensors=grow,
                         config_edits={"rank_pattern": {"layers.0.self_attn.q_proj": 20}})
    _assert_refused(base, path, tmp_path / "out", "rank 20 is larger than its 16x16 matrix")


def test_rank_disagreeing_with_the_config_and_a_lone_factor(setup, tmp_path):
    _, base, good = setup

    def damage(state):
        state.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
        return state

    path = _copy_adapter(good, tmp_path / "bad", tensors=damage, config_edits={"r": 3})
    text = _assert_refused(base, path, tmp_path / "out", "has rank 4", "says 3",
                           "module `model.layers.1.self_attn.v_proj`", "not both LoRA factors")
    assert "problem(s)" in text  # every problem at once


def test_saved_module_with_the_wrong_shape(setup, tmp_path):
    _, base, good = setup

    def shrink(state):
        state["base_model.model.lm_head.weight"] = torch.zeros(10, 16)
        return state

    path = _copy_adapter(good, tmp_path / "head", tensors=shrink)
    _assert_refused(base, path, tmp_path / "out", "`base_model.model.lm_head.weight` has shape [10, 16]",
                    "`lm_head.weight`", "[48, 16]")


def test_bad_adapter_in_a_config_is_reported_with_the_other_problems(setup, tmp_path):
    model, base, _ = setup
    dora = make_adapter(model, tmp_path / "dora", seed=3, use_dora=True)
    config = {"merge_method": "ties", "base_model": str(base),
              "models": [{"model": f"{base}+{dora}", "parameters": {"weight": 1.0, "density": 2.0}}]}
    with pytest.raises(mergelab.ConfigError) as caught:
        mergelab.plan_merge(config)
    assert "use_dora" in str(caught.value) and "density" in str(caught.value)


def test_not_a_lora_adapter(setup, tmp_path):
    _, base, good = setup
    path = _copy_adapter(good, tmp_path / "ia3", config_edits={"peft_type": "IA3"})
    _assert_refused(base, path, tmp_path / "out", "peft_type is 'IA3'")


def test_adapter_trained_for_another_base(setup, tmp_path):
    """A real PEFT adapter of a wider Llama (hidden 24): refused by fold, in a `model+lora`
    config and by `lora merge` beside an adapter of this base, naming the factor, the base's
    weight and both shapes, before anything is written."""
    from mergelab.lora.ops import merge_adapters

    model, base, good = setup
    other = make_adapter(tiny_llama(seed=5, hidden_size=24), tmp_path / "other", seed=4, r=4,
                         lora_alpha=8, target_modules=["q_proj", "v_proj"])
    factor = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    text = _assert_refused(
        base, other, tmp_path / "out",
        f"tensor `{factor}` has shape [4, 24]", "weight `model.layers.0.self_attn.q_proj.weight`",
        "[16, 16]", "needs [4, 16]",
    )
    # Every module of the wrong base is named, not only the first.
    assert "model.layers.1.self_attn.v_proj" in text
    config = {"merge_method": "ties", "base_model": str(base), "models": [
        {"model": f"{base}+{other}", "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": f"{base}+{good}", "parameters": {"weight": 1.0, "density": 0.5}},
    ]}
    with pytest.raises(mergelab.ConfigError) as caught:
        mergelab.merge(config, tmp_path / "merged", progress=False)
    assert f"tensor `{factor}` has shape [4, 24]" in str(caught.value)
    assert "[16, 16]" in str(caught.value)
    assert not (tmp_path / "merged").exists()
    plain = make_adapter(model, tmp_path / "plain", seed=6, r=4, lora_alpha=8)
    with pytest.raises(mergelab.ConfigError) as caught:
        merge_adapters([plain, other], tmp_path / "lora", combination="cat", progress=False)
    message = str(caught.value)
    assert "module `model.layers.0.self_attn.q_proj` differs between adapters" in message
    assert "A [4, 16]" in message and "A [4, 24]" in message
    assert not (tmp_path / "lora").exists()
