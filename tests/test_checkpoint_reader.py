"""Tests of lazy checkpoint reading, validation errors and tied-weight aliases."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergelab.checkpoint import TensorNotFoundError, open_checkpoint
from mergelab.errors import CheckpointError


def tensors_fixture() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(6, 4, generator=generator).bfloat16(),
        "model.layers.0.mlp.weight": torch.randn(4, 4, generator=generator),
        "model.layers.0.norm.weight": torch.randn(4, generator=generator).half(),
        "model.step": torch.tensor(7),
        "model.mask": torch.tensor([True, False, True]),
    }


def write_sharded_safetensors(
    folder: Path, tensors: dict[str, torch.Tensor], groups: list[list[str]]
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def write_sharded_bin(
    folder: Path, tensors: dict[str, torch.Tensor], groups: list[list[str]]
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i, names in enumerate(groups):
        file = f"pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin"
        torch.save({n: tensors[n] for n in names}, folder / file)
        weight_map.update(dict.fromkeys(names, file))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


GROUPS = [
    ["model.embed_tokens.weight", "model.step"],
    ["model.layers.0.mlp.weight"],
    ["model.layers.0.norm.weight", "model.mask"],
]


def check_reader_matches(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with open_checkpoint(path) as reader:
        assert sorted(reader.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert name in reader
            assert reader.shape(name) == tuple(tensor.shape)
            assert reader.dtype(name) == tensor.dtype
            assert reader.nbytes(name) == tensor.numel() * tensor.element_size()
            got = reader.get(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
        assert "missing.weight" not in reader


# -- layouts ------------------------------------------------------------------------------------


def test_single_safetensors_folder_and_file(tmp_path: Path) -> None:
    tensors = tensors_fixture()
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    check_reader_matches(tmp_path, tensors)
    check_reader_matches(tmp_path / "model.safetensors", tensors)
    with open_checkpoint(tmp_path / "model.safetensors") as reader:
        assert reader.path == (tmp_path / "model.safetensors").resolve()
        assert reader.root == tmp_path.resolve()
        assert reader.file_of("model.step") == (tmp_path / "model.safetensors").resolve()
        assert reader.config() == {"model_type": "llama"}


def test_keys_follow_file_order(tmp_path: Path) -> None:
    # save_file orders data by dtype width then name; keys() must report that data order.
    tensors = {
        "b.f32": torch.ones(2),
        "a.bool": torch.ones(3, dtype=torch.bool),
        "c.f64": torch.ones(1, dtype=torch.float64),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    assert open_checkpoint(tmp_path).keys() == ["c.f64", "b.f32", "a.bool"]


def test_sharded_safetensors(tmp_path: Path) -> None:
    tensors = tensors_fixture()
    write_sharded_safetensors(tmp_path, tensors, GROUPS)
    check_reader_matches(tmp_path, tensors)
    reader = open_checkpoint(tmp_path)
    assert reader.file_of("model.layers.0.mlp.weight").name == "model-00002-of-00003.safetensors"
    # Shards in index order: the first shard's tensors come first.
    assert set(reader.keys()[:2]) == {"model.embed_tokens.weight", "model.step"}
    assert reader.config() is None


def test_single_and_sharded_bin(tmp_path: Path) -> None:
    tensors = tensors_fixture()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    check_reader_matches(tmp_path, tensors)
    assert open_checkpoint(tmp_path).keys() == list(tensors)  # pickle order
    write_sharded_bin(tmp_path / "sharded", tensors, GROUPS)
    check_reader_matches(tmp_path / "sharded", tensors)


def test_bin_wrapped_state_dict(tmp_path: Path) -> None:
    tensors = tensors_fixture()
    torch.save({"state_dict": tensors, "epoch": 3}, tmp_path / "ckpt.pt")
    check_reader_matches(tmp_path / "ckpt.pt", tensors)


def test_safetensors_preferred_over_bin(tmp_path: Path) -> None:
    save_file({"safe": torch.ones(1)}, tmp_path / "model.safetensors")
    torch.save({"pickled": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    assert open_checkpoint(tmp_path).keys() == ["safe"]


def test_get_slice_reads_rows(tmp_path: Path) -> None:
    tensors = tensors_fixture()
    save_file(tensors, tmp_path / "model.safetensors")
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    embed = tensors["model.embed_tokens.weight"]
    for path in (tmp_path / "model.safetensors", tmp_path / "pytorch_model.bin"):
        with open_checkpoint(path) as reader:
            assert torch.equal(
                reader.get_slice("model.embed_tokens.weight", slice(2, 5)), embed[2:5]
            )


def test_unknown_tensor_and_closed_reader(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, tmp_path / "model.safetensors")
    reader = open_checkpoint(tmp_path)
    with pytest.raises(TensorNotFoundError, match="'nope' is not in checkpoint") as info:
        reader.shape("nope")
    assert isinstance(info.value, KeyError) and isinstance(info.value, CheckpointError)
    reader.close()
    with pytest.raises(CheckpointError, match="closed"):
        reader.get("w")


# -- validation errors name the file ----------------------------------------------------------


def test_missing_path_and_folder_without_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    for looked_for in (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ):
        assert looked_for in message


def test_ambiguous_safetensors_files(tmp_path: Path) -> None:
    save_file({"a": torch.ones(1)}, tmp_path / "one.safetensors")
    assert open_checkpoint(tmp_path).keys() == ["a"]  # a lone non-standard name is fine
    save_file({"b": torch.ones(1)}, tmp_path / "two.safetensors")
    with pytest.raises(CheckpointError, match="several candidate weight files"):
        open_checkpoint(tmp_path)


def test_truncated_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(10), "b": torch.ones(10)}, path)
    raw = path.read_bytes()
    path.write_bytes(raw[:-12])
    with pytest.raises(CheckpointError, match="truncated") as info:
        open_checkpoint(tmp_path)
    assert str(path) in str(info.value) and "'b'" in str(info.value)  # the tensor cut short
    path.write_bytes(raw[:-48])  # cuts into 'a' as well
    with pytest.raises(CheckpointError, match=r"tensor 'a' \(and 1 tensor\(s\) after it\)"):
        open_checkpoint(tmp_path)
    path.write_bytes(raw[:5])
    with pytest.raises(CheckpointError, match="truncated") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)
    path.write_bytes(raw[:20])  # header cut in the middle
    with pytest.raises(CheckpointError, match="header claims") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)


def test_truncated_after_open_fails_on_get_naming_tensor(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.ones(10), "b": torch.ones(10)}, path)
    reader = open_checkpoint(tmp_path)
    os.truncate(path, path.stat().st_size - 8)
    with pytest.raises(CheckpointError) as info:
        reader.get("b")
    assert str(path) in str(info.value) and "'b'" in str(info.value)


@pytest.mark.parametrize(
    "header",
    [
        b"\x00\xff garbage \x13\x37 not json",
        b"[1, 2, 3]",
        b'{"w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}',
        b'{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}',
        b'{"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}',
        b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}',
        b'{"__metadata__": {"a": 1}}',
    ],
    ids=["bytes", "array", "dtype", "size-mismatch", "negative-shape", "gap", "metadata"],
)
def test_garbage_header(tmp_path: Path, header: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match="corrupt") as info:
        open_checkpoint(tmp_path)
    assert str(path) in str(info.value)


def test_huge_header_length(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(CheckpointError, match="header claims") as info:
        open_checkpoint(path)
    assert str(path) in str(info.value)


def test_index_naming_missing_shard(tmp_path: Path) -> None:
    tensors = tensors_fixture()
    write_sharded_safetensors(tmp_path, tensors, GROUPS)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path)
    message = str(info.value)
    assert "model.safetensors.index.json" in message
    assert "model-00002-of-00003.safetensors is missing" in message
    assert "model.layers.0.mlp.weight" in message


def test_index_naming_tensor_the_shard_lacks(tmp_path: Path) -> None:
    write_sharded_safetensors(tmp_path, tensors_fixture(), GROUPS)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.ghost.weight"] = "model-00001-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path)
    assert "'model.ghost.weight'" in str(info.value)
    assert "model-00001-of-00003.safetensors" in str(info.value)


def test_index_refuses_paths_outside_folder(tmp_path: Path) -> None:
    save_file({"w": torch.ones(1)}, tmp_path / "outside.safetensors")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    index = {"weight_map": {"w": "../outside.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        open_checkpoint(folder)


def test_corrupt_index_and_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="weight_map"):
        open_checkpoint(tmp_path)
    save_file({"w": torch.ones(1)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="config.json"):
        open_checkpoint(tmp_path).config()


class _RunsCode:
    """Unpickling this calls os.system: the attack a weights-only loader must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_bin_with_pickled_code_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(2), "payload": _RunsCode(marker)}, path)
    with pytest.raises(CheckpointError, match="pickled code") as info:
        open_checkpoint(tmp_path)
    assert str(path) in str(info.value) and "refused" in str(info.value)
    assert not marker.exists()

    # Also when the bad file is one shard of an index.
    write_sharded_bin(tmp_path / "sharded", {"w": torch.ones(2)}, [["w"]])
    torch.save(
        {"w": torch.ones(2), "payload": _RunsCode(marker)},
        tmp_path / "sharded" / "pytorch_model-00001-of-00001.bin",
    )
    with pytest.raises(CheckpointError, match="pickled code"):
        open_checkpoint(tmp_path / "sharded")
    assert not marker.exists()


def test_corrupt_bin(tmp_path: Path) -> None:
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"definitely not a zip or a pickle")
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(tmp_path)
    assert str(path) in str(info.value)
    torch.save([torch.ones(1)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        open_checkpoint(tmp_path)


# -- tied weights -------------------------------------------------------------------------------


def _checkpoint(folder: Path, names: list[str], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({n: torch.ones(2) for n in names}, folder / "model.safetensors")
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_resolve_tied_lm_head(tmp_path: Path) -> None:
    reader = open_checkpoint(
        _checkpoint(tmp_path / "llama", ["model.embed_tokens.weight", "model.norm.weight"])
    )
    assert reader.resolve("model.norm.weight") == "model.norm.weight"
    assert reader.resolve("lm_head.weight") == "model.embed_tokens.weight"
    assert reader.resolve("model.layers.0.weight") is None
    gpt2 = open_checkpoint(
        _checkpoint(tmp_path / "gpt2", ["transformer.wte.weight"], {"model_type": "gpt2"})
    )
    assert gpt2.resolve("lm_head.weight") == "transformer.wte.weight"
    # The other direction: only the head was stored.
    head_only = open_checkpoint(_checkpoint(tmp_path / "head", ["lm_head.weight"]))
    assert head_only.resolve("model.embed_tokens.weight") == "lm_head.weight"


def test_resolve_respects_untied_config(tmp_path: Path) -> None:
    names = ["model.embed_tokens.weight"]
    untied = open_checkpoint(_checkpoint(tmp_path / "a", names, {"tie_word_embeddings": False}))
    assert untied.resolve("lm_head.weight") is None
    nested = open_checkpoint(
        _checkpoint(tmp_path / "b", names, {"text_config": {"tie_word_embeddings": False}})
    )
    assert nested.resolve("lm_head.weight") is None
    tied = open_checkpoint(_checkpoint(tmp_path / "c", names, {"tie_word_embeddings": True}))
    assert tied.resolve("lm_head.weight") == "model.embed_tokens.weight"


def test_resolve_bert_decoder(tmp_path: Path) -> None:
    bert = open_checkpoint(
        _checkpoint(
            tmp_path / "bert", ["bert.embeddings.word_embeddings.weight", "cls.predictions.bias"]
        )
    )
    assert (
        bert.resolve("cls.predictions.decoder.weight") == "bert.embeddings.word_embeddings.weight"
    )
    assert bert.resolve("lm_head.weight") is None  # a BERT embedding is not a causal LM head
    head_only = open_checkpoint(_checkpoint(tmp_path / "head", ["cls.predictions.decoder.weight"]))
    assert (
        head_only.resolve("bert.embeddings.word_embeddings.weight")
        == "cls.predictions.decoder.weight"
    )
