"""End-to-end merges of tiny checkpoints on disk, through the API and the CLI, and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_checkpoint
from safetensors.torch import load_file
from typer.testing import CliRunner

import mergelab
from mergelab import CheckpointError, ConfigError, MergeError
from mergelab.cli import app

LAYERS = 3


def _model(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g) * scale}
    for i in range(LAYERS):
        sd[f"model.layers.{i}.self_attn.q_proj.weight"] = torch.randn(8, 8, generator=g) * scale
        sd[f"model.layers.{i}.mlp.up_proj.weight"] = torch.randn(12, 8, generator=g) * scale
        sd[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(8) + 0.1 * torch.randn(8, generator=g)
    sd["model.norm.weight"] = torch.ones(8)
    sd["lm_head.weight"] = torch.randn(16, 8, generator=g) * scale
    return sd


def _save(folder: Path, sd: dict[str, torch.Tensor], *, shards: int = 1) -> Path:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": LAYERS,
              "hidden_size": 8, "tie_word_embeddings": False}
    files = {"tokenizer_config.json": "{}", "tokenizer.json": '{"version": "1.0"}',
             "generation_config.json": '{"do_sample": false}'}
    return save_checkpoint(folder, sd, shards=shards, config=config, files=files)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    base = _model(0)
    out = {"base": _save(root / "base", base)}
    for k in (1, 2):
        delta = _model(10 + k, scale=0.1)
        out[f"ft{k}"] = _save(root / f"ft{k}", {n: base[n] + delta[n] for n in base}, shards=2 if k == 2 else 1)
    return out


def _config(tmp_path: Path, zoo: dict[str, Path], **extra) -> Path:
    cfg = {
        "merge_method": "ties",
        "base_model": str(zoo["base"]),
        "models": [
            {"model": str(zoo["ft1"]), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(zoo["ft2"]), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "parameters": {"lambda": 1.0},
    }
    cfg.update(extra)
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _load_folder(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def test_ties_merge_on_disk_matches_in_memory_and_writes_side_files(tmp_path, zoo):
    config = _config(tmp_path, zoo)
    out = tmp_path / "merged"
    report = mergelab.merge(config, out, progress=False, out_shard_size=3000)
    assert report.tensors == 3 + 3 * LAYERS
    merged = _load_folder(out)
    sds = {str(p): load_file(str(next(p.glob("*.safetensors")))) if k != "ft2" else _load_folder(p) for k, p in zoo.items()}
    expected = mergelab.merge_state_dicts(yaml.safe_load(config.read_text()), sds)
    assert merged.keys() == expected.keys()
    for name in merged:
        assert torch.equal(merged[name], expected[name]), name
    # sharded output with an index naming every tensor
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(merged)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == LAYERS
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "mergelab_config.yml"):
        assert (out / name).is_file(), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_ties_result_equals_hand_computation_on_one_tensor(tmp_path, zoo):
    out = tmp_path / "merged"
    mergelab.merge(_config(tmp_path, zoo), out, progress=False)
    name = "model.layers.1.mlp.up_proj.weight"
    base = load_file(str(zoo["base"] / "model.safetensors"))[name]
    ft1 = load_file(str(zoo["ft1"] / "model.safetensors"))[name]
    ft2 = _load_folder(zoo["ft2"])[name]
    deltas = []
    for d in (ft1 - base, ft2 - base):
        k = int(0.5 * d.numel())
        threshold = d.abs().flatten().kthvalue(d.numel() - k + 1).values
        deltas.append(torch.where(d.abs() >= threshold, d, torch.zeros_like(d)))
    weighted = [deltas[0] * 1.0, deltas[1] * 0.5]
    sign = torch.where(sum(weighted) >= 0, 1.0, -1.0)
    masks = [(torch.sign(w) == sign).float() for w in weighted]
    mixed = sum(w * m for w, m in zip(weighted, masks))
    divisor = masks[0] * 1.0 + masks[1] * 0.5
    divisor[divisor == 0] = 1.0
    expected = base + mixed / divisor
    assert torch.allclose(_load_folder(out)[name], expected, atol=1e-6)


def test_cli_merge_dry_run_validate_methods_inspect(tmp_path, zoo):
    runner = CliRunner()
    config = _config(tmp_path, zoo)
    out = tmp_path / "cli-out"
    res = runner.invoke(app, ["merge", str(config), "--out", str(out), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "output tensors" in res.output and not out.exists()
    res = runner.invoke(app, ["validate", str(config)])
    assert res.exit_code == 0 and "ok" in res.output
    res = runner.invoke(app, ["merge", str(config), "--out", str(out), "--seed", "1", "--profile", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "tensors/s" in res.output and "merge kernels" in res.output
    assert (out / "model.safetensors").is_file()
    res = runner.invoke(app, ["methods", "*ties*"])
    assert res.exit_code == 0 and "dare_ties" in res.output and "density" in res.output
    res = runner.invoke(app, ["inspect", str(out), "--json"])
    data = json.loads(res.output)
    assert data["parameters"] == sum(t.numel() for t in _load_folder(out).values())


# ---------------------------------------------------------------- bad input: one clear error each


def _no_output_left(tmp_path: Path, name: str) -> None:
    left = [p.name for p in tmp_path.iterdir() if p.name == name or p.name.startswith(f".{name}.")]
    assert not left, left


def test_output_already_present_is_refused_then_overwritten_atomically(tmp_path, zoo):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(CheckpointError, match="exists"):
        mergelab.merge(_config(tmp_path, zoo), out, progress=False)
    assert (out / "keep.txt").read_text() == "old"
    mergelab.merge(_config(tmp_path, zoo), out, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


def test_output_equal_to_or_inside_an_input_is_refused(tmp_path, zoo):
    for target in (zoo["ft1"], zoo["ft1"] / "sub"):
        with pytest.raises(CheckpointError, match="input"):
            mergelab.merge(_config(tmp_path, zoo), target, progress=False, overwrite=True)
    assert (zoo["ft1"] / "model.safetensors").is_file()


def test_truncated_source_names_the_file(tmp_path, zoo):
    bad = tmp_path / "bad"
    bad.mkdir()
    data = (zoo["ft1"] / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    cfg = _config(tmp_path, {**zoo, "ft1": bad})
    with pytest.raises(ConfigError, match=r"bad.*model.safetensors"):
        mergelab.merge(cfg, tmp_path / "out", progress=False)
    _no_output_left(tmp_path, "out")


def test_index_naming_a_missing_shard_names_it(tmp_path, zoo):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(zoo["ft2"], bad)
    (bad / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match="model-00002-of-00002.safetensors"):
        mergelab.merge(_config(tmp_path, {**zoo, "ft2": bad}), tmp_path / "out", progress=False)
    _no_output_left(tmp_path, "out")


def test_yaml_typo_and_unknown_method_and_parameter(tmp_path, zoo):
    path = tmp_path / "typo.yml"
    path.write_text("merge_method: ties\nbase_modle: x\nmodels:\n  - model: y\n")
    with pytest.raises(ConfigError, match=r"base_modle: unknown key \(did you mean `base_model`\?\)"):
        mergelab.merge(path, tmp_path / "out", progress=False)
    path.write_text("merge_method: ties\nmodels: [model: y\n")
    with pytest.raises(ConfigError, match="YAML syntax error"):
        mergelab.merge(path, tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match="unknown merge method 'tiez'"):
        mergelab.merge(_config(tmp_path, zoo, merge_method="tiez"), tmp_path / "out", progress=False)
    with pytest.raises(ConfigError, match=r"parameters.lambda: `lambda` must be a number"):
        mergelab.merge(_config(tmp_path, zoo, parameters={"lambda": "big"}), tmp_path / "out", progress=False)
    _no_output_left(tmp_path, "out")


def test_nan_in_a_source_aborts_and_leaves_nothing(tmp_path, zoo):
    sd = load_file(str(zoo["ft1"] / "model.safetensors"))
    sd["model.layers.2.mlp.up_proj.weight"][3, 3] = float("inf")
    bad = _save(tmp_path / "nan", sd)
    cfg = _config(tmp_path, {**zoo, "ft1": bad})
    with pytest.raises(MergeError, match=r"model.layers.2.mlp.up_proj.weight.*nan.*model.safetensors"):
        mergelab.merge(cfg, tmp_path / "out", progress=False)
    _no_output_left(tmp_path, "out")
    mergelab.merge(cfg, tmp_path / "out", progress=False, allow_nonfinite=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_bin_with_pickled_code_is_refused_without_running_it(tmp_path, zoo):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil"
    bad.mkdir()
    torch.save({"model.embed_tokens.weight": Evil()}, bad / "pytorch_model.bin")
    with pytest.raises(ConfigError, match=r"pytorch_model.bin"):
        mergelab.merge(_config(tmp_path, {**zoo, "ft1": bad}), tmp_path / "out", progress=False)
    assert not marker.exists()
    _no_output_left(tmp_path, "out")


def test_disk_full_while_writing_leaves_nothing(tmp_path, zoo, monkeypatch):
    import errno

    calls = {"n": 0}
    real = os.pwrite

    def full(fd, data, offset):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(CheckpointError, match="disk full"):
        mergelab.merge(_config(tmp_path, zoo), tmp_path / "out", progress=False)
    _no_output_left(tmp_path, "out")


def test_killed_mid_write_leaves_no_finished_looking_output(tmp_path, zoo):
    config = _config(tmp_path, zoo)
    out = tmp_path / "out"
    # Slow the writer down so the kill lands mid-merge.
    script = (
        "import os, time, mergelab\n"
        "real = os.pwrite\n"
        "def slow(fd, data, off):\n"
        "    time.sleep(0.2)\n"
        "    return real(fd, data, off)\n"
        "os.pwrite = slow\n"
        f"mergelab.merge({str(config)!r}, {str(out)!r}, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".out.") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    # a later run succeeds and cleans the dead run's partial folder
    mergelab.merge(config, out, progress=False)
    assert (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_merge_closes_its_sources_however_it_ends(tmp_path, zoo, monkeypatch):
    import mergelab.api as api

    readers = []

    def recording_open(path):
        reader = mergelab.checkpoint.open_checkpoint(path)
        readers.append(reader)
        return reader

    monkeypatch.setattr(api, "open_checkpoint", recording_open)
    # Fails while merging: a source holds NaN.
    poisoned = _model(0)
    poisoned["model.norm.weight"] = torch.full((8,), float("nan"))
    nan_source = _save(tmp_path / "nan", poisoned)
    config = _config(tmp_path, zoo, base_model=str(nan_source))
    with pytest.raises(MergeError):
        mergelab.merge(config, tmp_path / "out", progress=False)
    assert len(readers) == 3 and all(r.closed for r in readers)
    # Fails in validation, after some sources were opened: a tensor of another shape.
    readers.clear()
    wrong = _model(0)
    wrong["lm_head.weight"] = torch.zeros(4, 8)
    config = _config(tmp_path, zoo, base_model=str(_save(tmp_path / "wrong", wrong)))
    with pytest.raises(ConfigError):
        mergelab.merge(config, tmp_path / "out", progress=False)
    assert readers and all(r.closed for r in readers)
    # Succeeds: closed too.
    readers.clear()
    mergelab.merge(_config(tmp_path, zoo), tmp_path / "out", progress=False)
    assert len(readers) == 3 and all(r.closed for r in readers)
    assert (tmp_path / "out" / "mergelab_config.yml").is_file()


def test_unreadable_tokenizers_and_unsupported_modules_are_refused_before_merging(tmp_path, zoo):
    """The zoo's tokenizer files are placeholders: vocabulary merging and a chat template need
    a real tokenizer, so both are refused naming the model and the key, and nothing is written.
    A `modules:` section other than the default module is refused too."""
    base = str(zoo["base"])
    for extra, key in (({"tokenizer": {"source": "union"}}, "tokenizer"),
                       ({"tokenizer_source": "base"}, "tokenizer"),
                       ({"chat_template": "chatml"}, "chat_template")):
        with pytest.raises(ConfigError) as info:
            mergelab.merge(_config(tmp_path, zoo, **extra), tmp_path / "never", progress=False)
        text = str(info.value)
        assert f"{key}: the tokenizer of model {base!r}" in text and "cannot be read" in text, text
        assert not (tmp_path / "never").exists()
    raw = yaml.safe_load(_config(tmp_path, zoo).read_text())
    models = raw.pop("models")
    raw["modules"] = {"default": {"models": models}, "vision_tower": {"models": models}}
    (tmp_path / "modules.yml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="only the `default` module is supported"):
        mergelab.merge(tmp_path / "modules.yml", tmp_path / "never", progress=False)
