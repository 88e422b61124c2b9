"""`mergelab lora extract`: SVD of fine-tuned minus base, written as a PEFT adapter.

Full rank reproduces the fine-tune exactly (folded by mergelab and by PEFT after
`PeftModel.from_pretrained`); a low rank has exactly the Eckart-Young error of the truncated
spectrum; `--energy` picks per-module ranks written as `rank_pattern`.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")
pytest.importorskip("transformers")

from _lora_models import save_model, tiny_gpt2, tiny_llama  # noqa: E402

from mergelab.errors import CheckpointError, ConfigError  # noqa: E402
from mergelab.lora.ops import REPORT_FILE, extract_adapter, fold_adapter  # noqa: E402


def _finetune(model, seed: int, names: tuple[str, ...]):
    tuned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if any(part in name for part in names):
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return tuned


LLAMA_CHANGED = ("q_proj", "v_proj", "down_proj", "input_layernorm", "embed_tokens")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    model = tiny_llama()
    tuned = _finetune(model, 5, LLAMA_CHANGED)
    return model, tuned, save_model(model, root / "base"), save_model(tuned, root / "tuned")


def _peft_folded(model, adapter) -> dict[str, torch.Tensor]:
    from peft import PeftModel

    loaded = PeftModel.from_pretrained(copy.deepcopy(model), str(adapter))
    return {k: v.detach() for k, v in loaded.merge_and_unload().state_dict().items()}


def _assert_state_close(ours: dict, reference: dict, atol: float) -> None:
    for name, value in ours.items():
        torch.testing.assert_close(value, reference[name], atol=atol, rtol=0, msg=name)


def test_full_rank_extract_then_fold_reproduces_the_finetune(llama, tmp_path):
    model, tuned, base, tuned_dir = llama
    report = extract_adapter(base, tuned_dir, tmp_path / "lora", rank=64, progress=False)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    # Embeddings and norms changed; without --embeddings they are saved whole.
    assert "model.embed_tokens" in config["modules_to_save"]
    assert any("input_layernorm" in m for m in config["modules_to_save"])
    assert max(m["relative_error"] for m in report.modules.values()) < 1e-5

    fold_adapter(base, tmp_path / "lora", tmp_path / "folded", progress=False)
    expected = {k: v.detach() for k, v in tuned.state_dict().items()}
    _assert_state_close(load_file(tmp_path / "folded" / "model.safetensors"), expected, 1e-5)
    _assert_state_close(_peft_folded(model, tmp_path / "lora"), expected, 1e-5)


def test_low_rank_error_is_the_truncated_spectrum(llama, tmp_path):
    model, tuned, base, tuned_dir = llama
    rank = 2
    report = extract_adapter(base, tuned_dir, tmp_path / "lora", rank=rank, progress=False)
    on_disk = json.loads((tmp_path / "lora" / REPORT_FILE).read_text())
    base_sd, tuned_sd = model.state_dict(), tuned.state_dict()
    assert set(report.modules) == {n[: -len(".weight")] for n in base_sd
                                   if any(p in n for p in ("q_proj", "v_proj", "down_proj"))}
    folded = _peft_folded(model, tmp_path / "lora")
    for module, entry in report.modules.items():
        name = module + ".weight"
        delta = tuned_sd[name] - base_sd[name]
        spectrum = torch.linalg.svdvals(delta.double())
        expected = math.sqrt(float(spectrum[rank:].square().sum() / spectrum.square().sum()))
        assert entry["rank"] == rank
        assert entry["relative_error"] == pytest.approx(expected, rel=1e-4)
        assert on_disk["modules"][module]["relative_error"] == pytest.approx(expected, rel=1e-4)
        # What PEFT folds is that best rank-2 approximation.
        achieved = float(torch.linalg.matrix_norm((folded[name] - tuned_sd[name]).double()))
        assert achieved / float(torch.linalg.matrix_norm(delta.double())) == pytest.approx(expected, rel=1e-3)


def test_energy_threshold_picks_per_module_ranks(llama, tmp_path):
    model, tuned, base, tuned_dir = llama
    report = extract_adapter(base, tuned_dir, tmp_path / "lora", energy=0.8, progress=False)
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    base_sd, tuned_sd = model.state_dict(), tuned.state_dict()
    for module, entry in report.modules.items():
        delta = (tuned_sd[module + ".weight"] - base_sd[module + ".weight"]).double()
        energy = torch.cumsum(torch.linalg.svdvals(delta).square(), 0)
        energy = energy / energy[-1]
        wanted = int((energy < 0.8).sum()) + 1
        assert entry["rank"] == wanted
        assert entry["energy_kept"] >= 0.8
        assert config["rank_pattern"].get(module, config["r"]) == wanted
    assert len({e["rank"] for e in report.modules.values()}) > 1  # down_proj differs from q/v
    folded = _peft_folded(model, tmp_path / "lora")  # PEFT reads rank_pattern back
    fold_adapter(base, tmp_path / "lora", tmp_path / "folded", progress=False)
    _assert_state_close(load_file(tmp_path / "folded" / "model.safetensors"), folded, 1e-5)


def test_embeddings_as_lora_modules(llama, tmp_path):
    model, tuned, base, tuned_dir = llama
    report = extract_adapter(base, tuned_dir, tmp_path / "lora", rank=64, embeddings=True, progress=False)
    assert "model.embed_tokens" in report.modules
    keys = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    _assert_state_close(_peft_folded(model, tmp_path / "lora"),
                        {k: v.detach() for k, v in tuned.state_dict().items()}, 1e-5)


def test_gpt2_conv1d_extract_loads_in_peft(tmp_path):
    model = tiny_gpt2()
    tuned = _finetune(model, 6, ("c_attn", "c_fc"))
    base = save_model(model, tmp_path / "base")
    tuned_dir = save_model(tuned, tmp_path / "tuned")
    extract_adapter(base, tuned_dir, tmp_path / "lora", rank=64, progress=False)
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["fan_in_fan_out"]
    _assert_state_close(_peft_folded(model, tmp_path / "lora"),
                        {k: v.detach() for k, v in tuned.state_dict().items()}, 1e-5)


def test_randomized_svd_at_full_rank_is_exact(llama, tmp_path):
    _, tuned, base, tuned_dir = llama
    report = extract_adapter(base, tuned_dir, tmp_path / "lora", rank=16, svd="randomized", progress=False)
    assert max(m["relative_error"] for m in report.modules.values()) < 1e-5


def test_bad_extract_requests_fail_before_writing(llama, tmp_path):
    _, _, base, tuned_dir = llama
    for kwargs, message in [
        ({}, "give --rank or --energy"),
        ({"rank": 0}, "at least 1"),
        ({"energy": 1.5}, "in \\(0, 1\\]"),
        ({"energy": 0.5, "svd": "randomized"}, "whole spectrum"),
    ]:
        with pytest.raises(ConfigError, match=message):
            extract_adapter(base, tuned_dir, tmp_path / "out", progress=False, **kwargs)
    other = save_model(tiny_llama(seed=1, tie=False).__class__(
        tiny_llama().config.__class__(**{**tiny_llama().config.to_dict(), "intermediate_size": 20})
    ), tmp_path / "other")
    with pytest.raises(CheckpointError, match=r"tensor `model.layers.0.mlp.down_proj.weight`: shape \[16, 20\] in the fine-tune, \[16, 24\] in the base"):
        extract_adapter(base, other, tmp_path / "out", rank=2, progress=False)
    with pytest.raises(CheckpointError, match="does not differ"):
        extract_adapter(base, base, tmp_path / "out", rank=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_extract_cli_writes_report(llama, tmp_path):
    from typer.testing import CliRunner

    from mergelab.cli import app

    _, _, base, tuned_dir = llama
    result = CliRunner().invoke(app, ["lora", "extract", str(base), str(tuned_dir), str(tmp_path / "lora"),
                                      "--energy", "0.9", "--rank", "8", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "lora" / REPORT_FILE).is_file()
    assert "extracted 6 module(s)" in result.output
