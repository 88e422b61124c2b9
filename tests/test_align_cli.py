"""`mergelab align run`: two tiny models of different seeds, merged from their checkpoints by the
CLI; the written checkpoint equals the Python API's result on the same models and inputs."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import word_ids
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _align_models import CNN, MLP, Transformer  # noqa: E402

from mergelab import merge_state_dicts  # noqa: E402
from mergelab.align import align_to_reference, derive_spec, reset_batchnorm, zip_models  # noqa: E402
from mergelab.align.config import parse_align_config  # noqa: E402
from mergelab.checkpoint import open_checkpoint  # noqa: E402
from mergelab.cli import app  # noqa: E402
from mergelab.errors import ConfigError  # noqa: E402

ARCHITECTURES = {"mlp": MLP, "cnn": CNN, "transformer": Transformer}


def _seeded(kind: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = ARCHITECTURES[kind]()
    for module in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2)
    return model.eval()


def _inputs(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    if kind == "mlp":
        return torch.randn(40, 12, generator=g)
    if kind == "transformer":
        return torch.randint(0, 20, (40, 6), generator=g)
    return torch.randn(40, 1, 8, 8, generator=g)


def _checkpoints(tmp_path: Path, kind: str) -> tuple[list[nn.Module], list[Path]]:
    models, folders = [], []
    for seed in (0, 1):
        model = _seeded(kind, seed)
        folder = tmp_path / f"{kind}-seed{seed}"
        folder.mkdir()
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
        models.append(model)
        folders.append(folder)
    return models, folders


def _run(tmp_path: Path, section: dict, *extra: str):
    config = tmp_path / "align.yml"
    config.write_text(yaml.safe_dump({"align": section}))
    out = tmp_path / "merged"
    result = CliRunner().invoke(app, ["align", "run", str(config), "--out", str(out), *extra])
    return result, out


def _written(out: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(out) as reader:
        return {k: reader.get(k) for k in reader.keys()}


def _assert_same(written: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(written) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(written[name], tensor, rtol=0, atol=0, msg=name)


def _linear_average(aligned: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    floats = [k for k, v in aligned[0].items() if v.is_floating_point()]
    config = {"merge_method": "linear", "models": [
        {"model": f"m{i}", "parameters": {"weight": 1.0}} for i in range(len(aligned))
    ]}  # fmt: skip
    merged = merge_state_dicts(config, {f"m{i}": {k: sd[k] for k in floats} for i, sd in enumerate(aligned)})
    return {k: merged[k] if k in floats else v for k, v in aligned[0].items()}


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_weight_matching_from_checkpoints_equals_the_python_api(tmp_path, kind):
    models, folders = _checkpoints(tmp_path, kind)
    shape, dtype = ([1, 12], "float32") if kind == "mlp" else ([1, 6], "int64")
    section = {
        "method": "weight", "models": [str(f) for f in folders],
        "architecture": f"_align_models:{ARCHITECTURES[kind].__name__}",
        "input_shape": shape, "input_dtype": dtype, "seed": 3,
    }  # fmt: skip
    result, out = _run(tmp_path, section)
    assert result.exit_code == 0, result.output
    assert "weight: merged" in result.output

    example = torch.zeros(shape, dtype=torch.int64 if dtype == "int64" else torch.float32)
    spec = derive_spec(models[0], example)
    aligned, _ = align_to_reference(spec, models, method="weight", generator=torch.Generator().manual_seed(3))
    expected = _linear_average(aligned)
    written = _written(out)
    _assert_same(written, expected)
    # The merge is not the plain average of the unaligned models.
    plain = _linear_average([m.state_dict() for m in models])
    assert not all(torch.equal(plain[k], written[k]) for k in plain)
    reloaded = ARCHITECTURES[kind]()
    reloaded.load_state_dict(written)


def test_activation_matching_with_batchnorm_reset(tmp_path):
    models, folders = _checkpoints(tmp_path, "cnn")
    inputs = _inputs("cnn")
    save_file({"inputs": inputs}, tmp_path / "inputs.safetensors")
    section = {
        "method": "activation", "models": [f.name for f in folders],  # relative to the config
        "architecture": "_align_models:CNN",
        "data": {"inputs": "inputs.safetensors", "batch_size": 16},
    }  # fmt: skip
    result, out = _run(tmp_path, section)
    assert result.exit_code == 0, result.output

    batches = list(inputs.split(16))
    spec = derive_spec(models[0], batches[0])
    aligned, _ = align_to_reference(spec, models, method="activation", batches=batches)
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(_linear_average(aligned))
    reset_batchnorm(merged, batches)
    _assert_same(_written(out), merged.state_dict())


@pytest.mark.parametrize("stop_at", [None, "bn1"])
def test_zipit_full_and_partial_from_checkpoints(tmp_path, stop_at):
    models, folders = _checkpoints(tmp_path, "cnn")
    inputs = _inputs("cnn")
    torch.save({"x": inputs}, tmp_path / "inputs.pt")
    section = {
        "method": "zipit", "models": [str(f) for f in folders], "architecture": "_align_models:CNN",
        "data": {"inputs": str(tmp_path / "inputs.pt"), "key": "x", "batch_size": 20},
        "alpha": 0.5, "beta": 0.25, "stop_at": stop_at,
    }  # fmt: skip
    result, out = _run(tmp_path, section)
    assert result.exit_code == 0, result.output
    expected = zip_models(models, list(inputs.split(20)), alpha=0.5, beta=0.25, stop_at=stop_at)
    _assert_same(_written(out), expected.state_dict())
    if stop_at is not None:
        assert "multi-head model" in result.output


def test_bert_folders_are_aligned_with_the_hand_written_spec(tmp_path):
    transformers = pytest.importorskip("transformers")
    from mergelab.align.specs import bert_spec

    config = transformers.BertConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=12, num_labels=3,
    )  # fmt: skip
    models, folders = [], []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model = transformers.BertForSequenceClassification(config).eval()
        model.save_pretrained(tmp_path / f"bert{seed}")
        models.append(model)
        folders.append(tmp_path / f"bert{seed}")
    result, out = _run(tmp_path, {"method": "weight", "models": [str(f) for f in folders]})
    assert result.exit_code == 0, result.output
    aligned, _ = align_to_reference(bert_spec(models[0]), models, method="weight", generator=torch.Generator().manual_seed(0))
    expected = _linear_average(aligned)
    written = _written(out)
    assert (out / "config.json").is_file()
    for name, tensor in written.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)
    reloaded = transformers.BertForSequenceClassification.from_pretrained(out)
    torch.testing.assert_close(
        reloaded.bert.encoder.layer[0].intermediate.dense.weight,
        expected["bert.encoder.layer.0.intermediate.dense.weight"],
    )


def test_align_config_problems_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as info:
        parse_align_config({"align": {"method": "zipit", "models": ["a"], "weights": [1.0], "bogus": 1}})
    text = str(info.value)
    assert "align.models" in text and "align.bogus: unknown key" in text
    with pytest.raises(ConfigError, match="needs `data`"):
        parse_align_config({"align": {"method": "activation", "models": ["a", "b"]}})
    with pytest.raises(ConfigError, match="no `align:` section .*mergelab merge"):
        parse_align_config({"merge_method": "linear", "models": []})


def test_align_cli_errors_and_validate(tmp_path):
    _, folders = _checkpoints(tmp_path, "mlp")
    section = {"method": "weight", "models": [str(f) for f in folders], "architecture": "_align_models:MLP"}
    result, out = _run(tmp_path, section)  # no example input to trace the MLP with
    assert result.exit_code == 1 and "error: " in result.stderr and "input_shape" in result.stderr
    assert not out.exists()
    good = {**section, "input_shape": [1, 12]}
    assert _run(tmp_path, good)[0].exit_code == 0
    again, _ = _run(tmp_path, good)
    assert again.exit_code == 1 and "pass --overwrite to replace" in again.stderr
    assert _run(tmp_path, good, "--overwrite")[0].exit_code == 0
    config = tmp_path / "check.yml"
    config.write_text(yaml.safe_dump({"align": {**good, "models": [str(folders[0]), "missing"]}}))
    checked = CliRunner().invoke(app, ["align", "validate", str(config)])
    assert checked.exit_code == 1 and "align.models.1: no checkpoint" in checked.stderr


def test_activation_matching_of_bert_folders_on_a_text_task(tmp_path):
    import transformers

    words = ["good", "bad", "film", "plot", "the", "was"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab=word_ids(vocab))
    config = transformers.BertConfig(
        vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=24, max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = tmp_path / f"bert{seed}"
        transformers.BertForSequenceClassification(config).eval().save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(folder)
    rows = ["text,label"] + [f"the film was {w},{i % 2}" for i, w in enumerate(words * 4)]
    (tmp_path / "task.csv").write_text("\n".join(rows) + "\n")
    section = {
        "method": "activation", "models": [str(f) for f in folders],
        "data": {"task": "task.csv", "examples": 12, "batch_size": 6},
    }  # fmt: skip
    result, out = _run(tmp_path, section)
    assert result.exit_code == 0, result.output
    assert "12 input examples" in result.output
    merged = transformers.BertForSequenceClassification.from_pretrained(out)
    assert (out / "tokenizer.json").is_file()
    tokens = tokenizer(["the film was good"], return_tensors="pt")
    assert torch.isfinite(merged(**tokens).logits).all()
