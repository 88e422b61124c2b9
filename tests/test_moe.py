"""`mergelab moe`: a Mixtral mixture of experts from dense tiny Llamas, against mergekit-moe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from _tokenizer_models import save_llama
from conftest import MERGEKIT_HINT, require
from safetensors.torch import load_file

import mergelab
from mergelab import ConfigError

LAYERS = 2


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {name: save_llama(root / name, 20 + i) for i, name in enumerate(["base", "e1", "e2", "e3"])}


def _config(tmp_path: Path, dense: dict[str, Path], mode: str, **extra) -> Path:
    cfg = {
        "base_model": str(dense["base"]),
        "gate_mode": mode,
        "dtype": "float32",
        "experts_per_token": 2,
        "experts": [
            {"source_model": str(dense["e1"]), "positive_prompts": ["w0 w1 w2"]},
            {"source_model": str(dense["e2"]), "positive_prompts": ["w3 w4"], "negative_prompts": ["w0"]},
            {"source_model": str(dense["e3"]), "positive_prompts": ["w5 w6 w7 w8"], "residual_scale": 0.5},
        ],
        **extra,
    }
    path = tmp_path / f"{mode}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _mergekit_moe(config: Path, out: Path) -> None:
    """mergekit-moe's own build, in this process (as `mergekit-moe CONFIG OUT --device cpu
    --random-seed 0` runs it)."""
    require("mergekit.scripts.moe", MERGEKIT_HINT)
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    options = MergeOptions(device="cpu", random_seed=0)
    options.apply_global_options()
    build(MoEMergeConfig.model_validate(yaml.safe_load(config.read_text())), str(out), options,
          device="cpu")


@pytest.mark.parametrize(("mode", "atol"), [("cheap_embed", 0.0), ("random", 0.0), ("hidden", 1e-2)])
def test_parity_with_mergekit_moe(tmp_path, dense, mode, atol):
    config = _config(tmp_path, dense, mode)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    mergelab.moe(config, ours, seed=0, progress=False)
    _mergekit_moe(config, theirs)
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        # hidden: both run the base in bfloat16; the router rows agree to its rounding
        tol = atol if name.endswith("mlp.gate.weight") else 0.0
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=tol, msg=name)
    ours_cfg, theirs_cfg = (json.loads((f / "config.json").read_text()) for f in (ours, theirs))
    assert ours_cfg == theirs_cfg


def test_a_shared_expert_makes_a_qwen_moe_like_mergekit_moe(tmp_path, dense):
    from transformers import AutoModelForCausalLM

    cfg = yaml.safe_load(_config(tmp_path, dense, "cheap_embed").read_text())
    # mergekit 0.1.5 loads only the base and the experts, so its shared expert must be one of
    # them (another model crashes it); mergelab takes any.
    cfg["shared_experts"] = [{"source_model": str(dense["base"]), "positive_prompts": ["w0 w5"],
                              "residual_scale": 0.25}]
    config = tmp_path / "qwen.yml"
    config.write_text(yaml.safe_dump(cfg))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    report = mergelab.moe(config, ours, progress=False)
    assert "Qwen-MoE: 3 experts per layer over 2 layers and a shared expert" in report.notes[0]
    _mergekit_moe(config, theirs)
    a, b = load_file(str(ours / "model.safetensors")), load_file(str(theirs / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert json.loads((ours / "config.json").read_text()) == json.loads((theirs / "config.json").read_text())
    base = load_file(str(dense["base"] / "model.safetensors"))
    torch.testing.assert_close(a["model.layers.0.mlp.shared_expert.down_proj.weight"],
                               base["model.layers.0.mlp.down_proj.weight"] * 0.25)
    assert not a["model.layers.1.self_attn.q_proj.bias"].any()  # Llama has none: zeros
    model = AutoModelForCausalLM.from_pretrained(str(ours), local_files_only=True)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 3, 4, 5]])).logits).all()


def test_experts_are_the_dense_mlps_and_the_model_runs_in_transformers(tmp_path, dense):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    mergelab.moe(_config(tmp_path, dense, "cheap_embed"), out, progress=False)
    merged = load_file(str(out / "model.safetensors"))
    experts = [load_file(str(dense[k] / "model.safetensors")) for k in ("e1", "e2", "e3")]
    base = load_file(str(dense["base"] / "model.safetensors"))
    for layer in range(LAYERS):
        mlp = f"model.layers.{layer}.mlp"
        for i, sd in enumerate(experts):
            gate_up = torch.cat([sd[f"{mlp}.gate_proj.weight"], sd[f"{mlp}.up_proj.weight"]])
            torch.testing.assert_close(merged[f"{mlp}.experts.gate_up_proj"][i], gate_up)
            scale = 0.5 if i == 2 else 1.0  # residual_scale of the third expert
            torch.testing.assert_close(merged[f"{mlp}.experts.down_proj"][i],
                                       sd[f"{mlp}.down_proj.weight"] * scale)
        rows = merged[f"{mlp}.gate.weight"]
        torch.testing.assert_close(rows.norm(dim=-1), torch.ones(3))
    for name, tensor in base.items():
        if ".mlp." not in name:
            torch.testing.assert_close(merged[name], tensor)
    model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    ids = tok("w0 w1 w5", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == 12 and torch.isfinite(logits).all()


def test_bad_moe_configs_are_refused_before_any_tensor_is_read(tmp_path, dense, monkeypatch):
    from mergelab.checkpoint.reader import CheckpointReader

    reads: list[str] = []
    original = CheckpointReader.get
    monkeypatch.setattr(CheckpointReader, "get", lambda self, n: reads.append(n) or original(self, n))
    cfg = yaml.safe_load(_config(tmp_path, dense, "hidden").read_text())
    cfg["experts"][0].pop("positive_prompts")
    cfg["shared_experts"] = [{"source_model": str(dense["e1"])}]
    (tmp_path / "bad.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as info:
        mergelab.moe(tmp_path / "bad.yml", tmp_path / "never", progress=False)
    text = str(info.value)
    assert "experts.0.positive_prompts: gate_mode hidden needs prompts" in text
    assert "a shared expert without prompts makes mergekit build a DeepSeek-MoE output" in text
    # an expert of another shape, and one that does not exist
    wide = save_llama(tmp_path / "wide", 5)
    state = load_file(str(wide / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(13, 8)
    from safetensors.torch import save_file

    save_file(state, str(wide / "model.safetensors"))
    cfg = yaml.safe_load(_config(tmp_path, dense, "random").read_text())
    cfg["experts"][1]["source_model"] = str(wide)
    cfg["experts"][2]["source_model"] = str(tmp_path / "missing")
    (tmp_path / "bad2.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError) as info:
        mergelab.moe(tmp_path / "bad2.yml", tmp_path / "never", progress=False)
    assert "missing" in str(info.value)
    cfg["experts"][2]["source_model"] = str(dense["e3"])
    (tmp_path / "bad2.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"experts.1: tensor `model.layers.1.mlp.up_proj.weight` has shape \[13, 8\]"):
        mergelab.moe(tmp_path / "bad2.yml", tmp_path / "never", progress=False)
    assert reads == [] and not (tmp_path / "never").exists()


def test_cli_moe(tmp_path, dense):
    from typer.testing import CliRunner

    from mergelab.cli import app

    result = CliRunner().invoke(app, ["moe", str(_config(tmp_path, dense, "random")), "--out",
                                      str(tmp_path / "out"), "--no-progress", "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert "by `random`" in " ".join(result.output.split())
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_merge_on_a_moe_config_points_at_mergelab_moe(tmp_path, dense):
    with pytest.raises(ConfigError, match="a mergekit-moe config .*`mergelab moe CONFIG --out OUT`"):
        mergelab.merge(_config(tmp_path, dense, "random"), tmp_path / "never", progress=False)
