"""Folding LoRA adapters: `model+adapter` sources and `mergelab lora fold`, against PEFT's
`merge_and_unload` and mergekit 0.1.5's own LoRA folding (which calls it) on tiny models."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")
pytest.importorskip("transformers")

from _lora_models import make_adapter, merged_with_peft, save_model, tiny_gpt2, tiny_llama  # noqa: E402
from conftest import MERGEKIT_HINT, require, save_checkpoint  # noqa: E402

import mergelab  # noqa: E402
from mergelab.errors import CheckpointError  # noqa: E402
from mergelab.lora.ops import fold_adapter  # noqa: E402
from mergelab.lora.source import open_folded, split_model_adapter  # noqa: E402

LLAMA_SETTINGS = {
    "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
    "modules_to_save": ["lm_head"],
    "rank_pattern": {"layers.1.self_attn.q_proj": 2},
    "alpha_pattern": {"v_proj": 3},
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("fold_llama")
    model = tiny_llama()
    base = save_model(model, root / "base")
    adapters = {
        "plain": make_adapter(model, root / "plain", seed=1),
        "patterns": make_adapter(model, root / "patterns", seed=2, **LLAMA_SETTINGS),
        "rslora": make_adapter(model, root / "rslora", seed=3, use_rslora=True, r=8, lora_alpha=4),
    }
    return model, base, adapters


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol=1e-5) -> float:
    assert sorted(a) == sorted(b)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst <= atol, worst
    return worst


def test_folded_source_tensors_and_rows_equal_peft(llama):
    model, base, adapters = llama
    for which in ("plain", "patterns", "rslora"):
        reference = merged_with_peft(model, adapters[which])
        source = open_folded(base, adapters[which])
        try:
            folded = {name: source.get(name) for name in source.keys()}
            _close(folded, {k: reference[k] for k in folded})
            for name in source.keys():  # block reads, as the engine's blockwise merges do
                if len(source.shape(name)) == 2:
                    rows = source.get_rows(name, 3, 7)
                    torch.testing.assert_close(rows, reference[name][3:7], atol=1e-5, rtol=0)
        finally:
            source.close()


def test_gpt2_conv1d_and_lora_bias_fold_like_peft(tmp_path):
    # GPT-2's Conv1D stores W as (in, out); PEFT orients its delta by the layer class.
    model = tiny_gpt2()
    base = save_model(model, tmp_path / "base")
    adapter = make_adapter(model, tmp_path / "lora", seed=4, target_modules=["c_attn", "c_proj", "c_fc"],
                           fan_in_fan_out=True, lora_bias=True)
    reference = merged_with_peft(model, adapter)
    source = open_folded(base, adapter)
    try:
        folded = {name: source.get(name) for name in source.keys()}
    finally:
        source.close()
    _close(folded, {k: reference[k] for k in folded})


def test_split_model_adapter(tmp_path):
    assert split_model_adapter("./base") is None
    assert split_model_adapter("./base+./lora") == ("./base", "./lora")
    plus = tmp_path / "odd+name"
    plus.mkdir()
    assert split_model_adapter(str(plus)) is None  # an existing path is a plain model
    with pytest.raises(CheckpointError, match="MODEL\\+ADAPTER"):
        split_model_adapter("a+b+c")


def test_config_model_plus_adapter_merges_like_folding_first(llama, tmp_path):
    model, base, adapters = llama
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [
            {"model": f"{base}+{adapters['plain']}", "parameters": {"weight": 0.5}},
            {"model": f"{base}+{adapters['patterns']}", "parameters": {"weight": 0.5}},
        ],
    }
    mergelab.merge(config, tmp_path / "merged", progress=False)
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base_sd = {k: v for k, v in model.state_dict().items()}
    a, b = merged_with_peft(model, adapters["plain"]), merged_with_peft(model, adapters["patterns"])
    expected = {k: base_sd[k] + 0.5 * (a[k] - base_sd[k]) + 0.5 * (b[k] - base_sd[k]) for k in merged}
    _close(merged, expected)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "llama"


def test_config_paths_relative_to_the_config_file(llama, tmp_path):
    import shutil

    import yaml

    _, base, adapters = llama
    shutil.copytree(base, tmp_path / "base")
    shutil.copytree(adapters["plain"], tmp_path / "my-lora")
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(
        {"merge_method": "linear", "models": [{"model": "./base+./my-lora", "parameters": {"weight": 1.0}}]}
    ))
    plan = mergelab.plan_merge(tmp_path / "merge.yml")
    assert len(plan.tasks) == len(load_file(base / "model.safetensors"))


def test_model_plus_adapter_errors_are_config_problems(llama, tmp_path):
    _, base, _ = llama
    (tmp_path / "not-an-adapter").mkdir()
    config = {"merge_method": "linear", "models": [
        {"model": f"{base}+{tmp_path / 'not-an-adapter'}", "parameters": {"weight": 1.0}}]}
    with pytest.raises(mergelab.ConfigError, match="not a LoRA adapter folder"):
        mergelab.plan_merge(config)


def test_fold_command_writes_a_full_checkpoint(llama, tmp_path):
    model, base, adapters = llama
    (base / "tokenizer_config.json").write_text("{}")
    report = fold_adapter(base, adapters["patterns"], tmp_path / "folded", progress=False)
    folded = load_file(tmp_path / "folded" / "model.safetensors")
    reference = merged_with_peft(model, adapters["patterns"])
    _close(folded, {k: reference[k] for k in folded})
    assert (tmp_path / "folded" / "config.json").is_file()
    assert (tmp_path / "folded" / "tokenizer_config.json").is_file()
    assert report.tensors == len(folded) and report.folded == 7 and report.replaced == 2
    # Atomic like `mergelab merge`: an existing output is refused, nothing half-written.
    with pytest.raises(Exception, match="already exists"):
        fold_adapter(base, adapters["patterns"], tmp_path / "folded", progress=False)
    with pytest.raises(Exception, match="inside the input"):
        fold_adapter(base, adapters["patterns"], adapters["patterns"] / "out", progress=False)


def test_fold_cli(llama, tmp_path):
    from typer.testing import CliRunner

    from mergelab.cli import app

    _, base, adapters = llama
    result = CliRunner().invoke(app, ["lora", "fold", str(base), str(adapters["plain"]),
                                      str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "folded 4 tensor(s)" in result.output


def _mergekit_model_reference(monkeypatch):
    """mergekit 0.1.5's `ModelReference` (its `model+lora` parsing and folding)."""
    require("mergekit", MERGEKIT_HINT)
    try:
        import immutables  # noqa: F401
    except ImportError:
        # mergekit.common imports `immutables` only to annotate a pydantic type; the LoRA path
        # never builds one. A stand-in lets the differential run where the package is absent.
        monkeypatch.setitem(sys.modules, "immutables", types.SimpleNamespace(Map=dict))
    monkeypatch.delitem(sys.modules, "mergekit.common", raising=False)
    from mergekit.common import ModelReference

    return ModelReference


def _mergekit_folded(model_reference, spec: str, cache) -> dict[str, torch.Tensor]:
    """The tensors of mergekit's own folding of `spec` (`MODEL+LORA`)."""
    folded = model_reference.parse(spec).merged(cache_dir=str(cache))
    return load_file(f"{folded.model.path}/model.safetensors")


def test_parity_with_mergekit_lora_folding(llama, tmp_path, monkeypatch):
    """mergekit 0.1.5 folds `model+lora` with PEFT (ModelReference.merged); same inputs here."""
    model_reference = _mergekit_model_reference(monkeypatch)
    _, base, adapters = llama
    theirs = _mergekit_folded(model_reference, f"{base}+{adapters['plain']}", tmp_path / "cache")
    mergelab.merge(
        {"merge_method": "linear", "models": [{"model": f"{base}+{adapters['plain']}", "parameters": {"weight": 1.0}}]},
        tmp_path / "ours", progress=False,
    )
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    _close(ours, theirs, atol=1e-6)


def test_ties_config_of_model_plus_lora_sources_matches_mergekit(llama, tmp_path, monkeypatch):
    """A TIES merge of two `base+lora` sources and a full fine-tune against mergekit 0.1.5, end
    to end on the same inputs: mergekit folds each `base+lora` itself (ModelReference.merged),
    then its own TIES kernel merges every tensor with the config's per-model weights and
    densities; mergelab merges the config as written (folding while it streams)."""
    model_reference = _mergekit_model_reference(monkeypatch)
    registry = require("mergekit.merge_methods.registry", MERGEKIT_HINT)
    from mergekit.merge_methods.base import TensorGroup

    model, base, adapters = llama
    # A third source without an adapter: a full fine-tune (every tensor moved), so each tensor
    # has at least one non-zero task vector and the LoRA sources' zero deltas on the tensors
    # they do not adapt take part in the sign election.
    generator = torch.Generator().manual_seed(11)
    full = {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in model.state_dict().items()}
    full_dir = tmp_path / "full"
    save_checkpoint(full_dir, full)
    sources = [
        (f"{base}+{adapters['plain']}", {"weight": 0.7, "density": 0.5}),
        (f"{base}+{adapters['patterns']}", {"weight": 0.4, "density": 0.8}),
        (str(full_dir), {"weight": 1.0, "density": 0.3}),
    ]
    config = {
        "merge_method": "ties",
        "base_model": str(base),
        "parameters": {"normalize": True},
        "models": [{"model": spec, "parameters": dict(p)} for spec, p in sources],
    }
    mergelab.merge(config, tmp_path / "ours", progress=False)
    ours = load_file(tmp_path / "ours" / "model.safetensors")

    base_sd = load_file(base / "model.safetensors")
    inputs = [
        _mergekit_folded(model_reference, spec, tmp_path / "cache") if "+" in spec else full
        for spec, _ in sources
    ]
    ties = registry.get("ties")
    # mergekit's parameters as its planner hands them to the kernel: per-model ones keyed by
    # the input's index (the base is 0), shared ones at their defaults unless the config sets them.
    parameters = {spec.name: spec.default for spec in ties.spec.parameters}
    parameters.update({"normalize": True, **{
        key: {i + 1: p[key] for i, (_, p) in enumerate(sources)} for key in ("weight", "density")
    }})
    theirs = {
        name: ties.merge_group(
            TensorGroup.from_tensors([base_sd[name], *(m[name] for m in inputs)], base_index=0),
            **parameters,
        )
        for name in ours
    }
    _close(ours, theirs, atol=1e-5)
    # The adapters took part: their folded tensors move the merge away from the one of the
    # full fine-tune alone (a fold dropped on the way would fail here, not only above).
    mergelab.merge({**config, "models": [config["models"][2]]}, tmp_path / "alone", progress=False)
    alone = load_file(tmp_path / "alone" / "model.safetensors")
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        assert (ours[name] - alone[name]).abs().max() > 1e-3, name


def test_conv2d_adapters_fold_like_peft(tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 6, 3)
            self.point = torch.nn.Conv2d(6, 4, 1)
            self.head = torch.nn.Linear(4, 2)

    torch.manual_seed(0)
    net = Net()
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "base" / "model.safetensors")
    import copy

    peft_model = get_peft_model(copy.deepcopy(net), LoraConfig(
        r=2, lora_alpha=3, target_modules=["conv", "point", "head"], init_lora_weights=False))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)
    peft_model.save_pretrained(tmp_path / "lora")
    reference = {k: v.detach() for k, v in peft_model.merge_and_unload().state_dict().items()}
    source = open_folded(tmp_path / "base", tmp_path / "lora")
    try:
        _close({name: source.get(name) for name in source.keys()}, reference)
    finally:
        source.close()
