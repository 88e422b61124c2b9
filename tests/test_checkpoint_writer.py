"""Tests of the shard planner, size parsing and the atomic streaming writer."""

from __future__ import annotations

import errno
import json
import os
import re
import struct
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergelab import fileio as writer_module
from mergelab.checkpoint import ShardedWriter, open_checkpoint, parse_size, plan_shards
from mergelab.errors import CheckpointError

ALL_DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.float8_e4m3fn,
    torch.float8_e5m2,
]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random bit patterns (NaNs, infinities, subnormals included) for bit-exact round trips."""
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    count = 1
    for dim in shape:
        count *= dim
    raw = torch.randint(0, 256, (count * dtype.itemsize,), generator=generator, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def entries_of(tensors: dict[str, torch.Tensor]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


def write_all(
    out: Path, tensors: dict[str, torch.Tensor], max_shard_size: int = 10**9, **kw
) -> Path:
    with ShardedWriter(out, entries_of(tensors), max_shard_size=max_shard_size, **kw) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        return writer.commit()


# -- parse_size -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (1000, 1000),
        ("1000", 1000),
        ("5GB", 5_000_000_000),
        ("5gb", 5_000_000_000),
        ("2GiB", 2 * 2**30),
        ("500MB", 500_000_000),
        ("500 MiB", 500 * 2**20),
        ("5B", 5_000_000_000),  # mergekit's default out_shard_size: parse_kmb("5B") = 5e9
        ("1.5GB", 1_500_000_000),
        ("10K", 10_000),
        ("3M", 3_000_000),
        ("1TB", 10**12),
    ],
)
def test_parse_size_values(text: int | str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", [0, -5, "0GB", "", "abc", "5XB", "GB", "-1GB", True, 2.5, None])
def test_parse_size_rejects_with_value_in_message(bad: object) -> None:
    with pytest.raises(ValueError, match="shard size") as info:
        parse_size(bad)  # type: ignore[arg-type]
    assert repr(bad) in str(info.value) or str(bad) in str(info.value)


# -- plan_shards ------------------------------------------------------------------------------


def names(sizes: list[int]) -> list[tuple[str, int]]:
    return [(f"t{i}", size) for i, size in enumerate(sizes)]


def test_plan_shards_greedy_in_order() -> None:
    # huggingface_hub's documented example: [6, 6, 2, 6, 2, 2] with a limit of 10.
    plan = plan_shards(names([6, 6, 2, 6, 2, 2]), 10)
    assert plan.names_by_shard == (("t0",), ("t1", "t2"), ("t3", "t4", "t5"))
    assert plan.sizes == (6, 8, 10)
    assert plan.total_size == 24
    assert plan.filenames == (
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    )
    assert plan.shard_of["t4"] == "model-00003-of-00003.safetensors"
    assert plan.is_sharded


def test_plan_shards_oversized_tensor_gets_own_shard() -> None:
    # 12 > 10 goes alone, ahead of the shard being filled; 4 and 3 still share one.
    plan = plan_shards(names([4, 12, 3, 5]), 10)
    assert plan.names_by_shard == (("t1",), ("t0", "t2"), ("t3",))
    assert plan.sizes == (12, 7, 5)


def test_plan_shards_exact_fit_and_single_file() -> None:
    assert plan_shards(names([10, 1]), 10).names_by_shard == (("t0",), ("t1",))
    assert plan_shards(names([5, 5]), 10).names_by_shard == (("t0", "t1"),)
    single = plan_shards(names([3, 0, 4]), 10)
    assert single.filenames == ("model.safetensors",)
    assert not single.is_sharded
    assert single.total_size == 7
    empty = plan_shards([], 10)
    assert empty.filenames == () and empty.total_size == 0


def test_plan_shards_rejects_bad_input_listing_all() -> None:
    with pytest.raises(ValueError) as info:
        plan_shards([("a", 1), ("a", 2), ("b", -1)], 10)
    assert "'a' is listed twice" in str(info.value) and "'b'" in str(info.value)
    with pytest.raises(ValueError, match="at least 1"):
        plan_shards(names([1]), 0)


def test_plan_shards_matches_huggingface_hub() -> None:
    hub = pytest.importorskip("huggingface_hub.serialization._base")
    generator = torch.Generator().manual_seed(0)
    for trial in range(200):
        count = int(torch.randint(0, 12, (1,), generator=generator))
        sizes = torch.randint(0, 30, (count,), generator=generator).tolist()
        limit = int(torch.randint(1, 25, (1,), generator=generator))
        state = {f"t{i}": size for i, size in enumerate(sizes)}
        expected = hub.split_state_dict_into_shards_factory(
            state,
            get_storage_size=lambda size: size,
            filename_pattern="model{suffix}.safetensors",
            max_shard_size=limit,
        )
        plan = plan_shards(list(state.items()), limit)
        got = {f: list(n) for f, n in zip(plan.filenames, plan.names_by_shard, strict=True)}
        if count:
            assert got == expected.filename_to_tensors, (trial, sizes, limit)
            assert dict(plan.shard_of) == expected.tensor_to_filename
        assert plan.total_size == expected.metadata["total_size"]


# -- round trips ------------------------------------------------------------------------------


def test_round_trip_every_dtype_single_file(tmp_path: Path) -> None:
    tensors = {
        f"w.{str(d).removeprefix('torch.')}": random_tensor((3, 5), d, i)
        for i, d in enumerate(ALL_DTYPES)
    }
    tensors["scalar.bf16"] = random_tensor((), torch.bfloat16, 99)
    tensors["scalar.f32"] = torch.tensor(-2.5)
    tensors["empty.f16"] = torch.zeros(0, 4, dtype=torch.float16)
    tensors["transposed.f32"] = random_tensor((4, 6), torch.float32, 7).t()  # non-contiguous
    tensors["strided.bf16"] = random_tensor((8, 6), torch.bfloat16, 8)[::2, 1:5]
    assert not tensors["transposed.f32"].is_contiguous()

    out = write_all(tmp_path / "out", tensors, metadata={"mergelab": "test"})
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    loaded = load_file(out / "model.safetensors")
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert same_bits(loaded[name], tensor), name
    with safe_open(out / "model.safetensors", framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "mergelab": "test"}
    with open_checkpoint(out) as reader:
        for name, tensor in tensors.items():
            assert same_bits(reader.get(name), tensor), name


def test_header_is_padded_and_tensors_aligned(tmp_path: Path) -> None:
    tensors = {
        "odd.bool": torch.ones(3, dtype=torch.bool),
        "f64": torch.arange(3, dtype=torch.float64),
        "bf16": torch.ones(5, dtype=torch.bfloat16),
        "f32": torch.arange(7, dtype=torch.float32),
    }
    out = write_all(tmp_path / "out", tensors)
    raw = (out / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    assert header_len % 8 == 0
    header = json.loads(raw[8 : 8 + header_len])
    for name, tensor in tensors.items():
        begin, end = header[name]["data_offsets"]
        assert begin % tensor.element_size() == 0, name
        assert end - begin == tensor.numel() * tensor.element_size()
    assert len(raw) == 8 + header_len + sum(t.numel() * t.element_size() for t in tensors.values())


def test_sharded_layout_and_index(tmp_path: Path) -> None:
    tensors = {
        f"layer.{i}.weight": random_tensor((4, 4), torch.float32, i) for i in range(5)
    }  # 64 B
    tensors["big"] = random_tensor((100,), torch.float32, 10)  # 400 B > limit: own shard
    out = write_all(tmp_path / "out", tensors, max_shard_size=150)
    # layer.0+1 (128), layer.2+3 (128), big, layer.4: HF's greedy plan.
    files = [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert sorted(os.listdir(out)) == sorted([*files, "model.safetensors.index.json"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 5 * 64 + 400}
    assert list(index["weight_map"]) == sorted(tensors)
    assert index["weight_map"]["big"] == files[2]
    assert index["weight_map"]["layer.4.weight"] == files[3]
    for file in files:
        shard = load_file(out / file)
        assert {n for n, f in index["weight_map"].items() if f == file} == set(shard)
        for name, tensor in shard.items():
            assert same_bits(tensor, tensors[name])


def test_out_of_order_writes_from_threads(tmp_path: Path) -> None:
    tensors = {f"t{i}": random_tensor((i + 1, 3), torch.bfloat16, i) for i in range(24)}
    entries = entries_of(tensors)
    with ShardedWriter(tmp_path / "out", entries, max_shard_size=60) as writer:
        order = list(reversed(tensors))
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda n: writer.write(n, tensors[n]), order))
        out = writer.commit()
    with open_checkpoint(out) as reader:
        assert sorted(reader.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert same_bits(reader.get(name), tensor)


def test_transformers_loads_written_checkpoint_bit_exactly(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)  # model init uses the global RNG; only to get non-trivial weights
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with ShardedWriter(tmp_path / "out", entries_of(state), max_shard_size=3000) as writer:
        for name in reversed(list(state)):
            writer.write(name, state[name])
        writer.write_json("config.json", model.config.to_dict())
        out = writer.commit()
    assert (out / "model.safetensors.index.json").exists()
    loaded = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, tensor in loaded.state_dict().items():
        assert tensor.dtype == torch.bfloat16
        assert same_bits(tensor, state[name]), name


# -- write() checks ---------------------------------------------------------------------------


def test_write_rejects_wrong_name_shape_dtype_and_duplicates(tmp_path: Path) -> None:
    entries = [("a", (2, 2), torch.float32), ("b", (3,), torch.bfloat16)]
    with ShardedWriter(tmp_path / "out", entries, max_shard_size=100) as writer:
        with pytest.raises(CheckpointError, match="'zzz' is not in the output plan"):
            writer.write("zzz", torch.zeros(2, 2))
        with pytest.raises(CheckpointError, match=r"shape \(2, 3\)"):
            writer.write("a", torch.zeros(2, 3))
        with pytest.raises(CheckpointError, match="torch.float32"):
            writer.write("b", torch.zeros(3))  # the caller casts, not the writer
        writer.write("a", torch.ones(2, 2))
        with pytest.raises(CheckpointError, match="already written"):
            writer.write("a", torch.ones(2, 2))
        with pytest.raises(CheckpointError, match=r"1 planned tensor\(s\) were never written: 'b'"):
            writer.commit()
        writer.write("b", torch.ones(3, dtype=torch.bfloat16))
        out = writer.commit()
    with pytest.raises(CheckpointError, match="already committed"):
        writer.write("a", torch.ones(2, 2))
    assert torch.equal(load_file(out / "model.safetensors")["a"], torch.ones(2, 2))


def test_constructor_rejects_bad_entries_creating_nothing(tmp_path: Path) -> None:
    entries = [("a", (2,), torch.float32), ("a", (2,), torch.float32), ("c", (-1,), torch.float32)]
    with pytest.raises(CheckpointError) as info:
        ShardedWriter(tmp_path / "out", entries, max_shard_size=100)
    assert "'a' is listed twice" in str(info.value) and "'c' has invalid shape" in str(info.value)
    with pytest.raises(CheckpointError, match="no tensors"):
        ShardedWriter(tmp_path / "out", [], max_shard_size=100)
    assert os.listdir(tmp_path) == []


def test_copy_file_and_write_json(tmp_path: Path) -> None:
    source = tmp_path / "tokenizer.json"
    source.write_text('{"vocab": 3}')
    with ShardedWriter(tmp_path / "out", [("w", (1,), torch.float32)], max_shard_size=10) as writer:
        writer.write("w", torch.ones(1))
        writer.copy_file(source)
        writer.copy_file(source, "copy/tok.json")
        writer.write_json("config.json", {"model_type": "llama", "ünï": 1})
        for reserved in ("model.safetensors", "../escape.json", "/abs.json"):
            with pytest.raises(CheckpointError, match="output file name"):
                writer.write_json(reserved, {})
        out = writer.commit()
    assert (out / "tokenizer.json").read_text() == '{"vocab": 3}'
    assert (out / "copy" / "tok.json").exists()
    assert json.loads((out / "config.json").read_text()) == {"model_type": "llama", "ünï": 1}
    assert not (tmp_path / "escape.json").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_are_copied_to_cpu(tmp_path: Path) -> None:
    tensor = random_tensor((5, 7), torch.bfloat16, 3)
    out = write_all(tmp_path / "out", {"w": tensor.cuda().t().contiguous().t()})
    assert same_bits(load_file(out / "model.safetensors")["w"], tensor)


# -- refusing to clobber inputs ---------------------------------------------------------------


def test_refuses_output_equal_to_inside_or_containing_an_input(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"")
    entries = [("w", (1,), torch.float32)]
    cases = {
        model: "is the input",
        model / "merged": "is inside the input",
        tmp_path: "contains the input",
    }
    for out, message in cases.items():
        with pytest.raises(CheckpointError, match=message):
            ShardedWriter(out, entries, max_shard_size=10, inputs=[model], overwrite=True)
    # A single-file input inside the output folder counts too.
    with pytest.raises(CheckpointError, match="contains the input"):
        ShardedWriter(
            tmp_path,
            entries,
            max_shard_size=10,
            inputs=[model / "model.safetensors"],
            overwrite=True,
        )
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert os.listdir(model) == ["model.safetensors"]


def test_refuses_existing_output_without_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(CheckpointError, match="already exists"):
        ShardedWriter(out, [("w", (1,), torch.float32)], max_shard_size=10)
    assert os.listdir(tmp_path) == ["out"]
    assert (out / "keep.txt").read_text() == "old"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "rename-aside"])
def test_overwrite_replaces_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exchange: bool
) -> None:
    real_renameat2 = writer_module._renameat2
    exchanges: list[bool] = []

    def spy(src: Path, dst: Path, flags: int) -> bool:
        if flags == writer_module._RENAME_EXCHANGE:
            exchanges.append(exchange and real_renameat2(src, dst, flags))
            return exchanges[-1]
        return real_renameat2(src, dst, flags) if exchange else False

    monkeypatch.setattr(writer_module, "_renameat2", spy)
    out = write_all(tmp_path / "out", {"old": torch.zeros(2)})
    (out / "extra.txt").write_text("old")
    with ShardedWriter(
        out, [("new", (3,), torch.float32)], max_shard_size=10, overwrite=True
    ) as writer:
        writer.write("new", torch.ones(3))
        # Until commit the old checkpoint is untouched.
        assert set(load_file(out / "model.safetensors")) == {"old"}
        writer.commit()
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert torch.equal(load_file(out / "model.safetensors")["new"], torch.ones(3))
    assert os.listdir(tmp_path) == ["out"]  # neither the old folder nor a partial is left
    if exchange and exchanges != [True]:
        pytest.skip("this filesystem has no renameat2(RENAME_EXCHANGE); fallback was used")
    assert exchanges == [exchange]


# -- failures leave nothing behind ------------------------------------------------------------


def test_exception_inside_context_leaves_no_folder(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with ShardedWriter(
            tmp_path / "out",
            [("a", (4,), torch.float32), ("b", (1,), torch.float32)],
            max_shard_size=8,
        ) as writer:
            writer.write("a", torch.ones(4))
            assert len(os.listdir(tmp_path)) == 1  # the partial folder exists meanwhile
            raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []


def test_exception_after_commit_keeps_output(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with ShardedWriter(
            tmp_path / "out", [("a", (1,), torch.float32)], max_shard_size=8
        ) as writer:
            writer.write("a", torch.ones(1))
            writer.commit()
            raise RuntimeError("after commit")
    assert os.listdir(tmp_path) == ["out"]


def _enospc(*args: object) -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_disk_full_while_writing_tensor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entries = [("a", (4,), torch.float32), ("b", (4,), torch.float32)]
    writer = ShardedWriter(tmp_path / "out", entries, max_shard_size=16)
    writer.write("a", torch.ones(4))
    monkeypatch.setattr(os, "pwrite", _enospc)
    with pytest.raises(CheckpointError, match="disk full") as info:
        writer.write("b", torch.ones(4))
    assert "'b'" in str(info.value) and "model-00002-of-00002.safetensors" in str(info.value)
    assert os.listdir(tmp_path) == []
    with pytest.raises(CheckpointError, match="aborted"):
        writer.commit()


def test_disk_full_while_writing_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "pwrite", _enospc)
    with pytest.raises(CheckpointError, match="disk full"):
        ShardedWriter(tmp_path / "out", [("a", (4,), torch.float32)], max_shard_size=16)
    assert os.listdir(tmp_path) == []


_KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, torch
    from mergelab.checkpoint import ShardedWriter
    entries = [("a", (4,), torch.float32), ("b", (4,), torch.float32)]
    writer = ShardedWriter(sys.argv[1], entries, max_shard_size=16)
    writer.write("a", torch.ones(4))
    os._exit(1)  # killed mid-merge: no commit, no abort, no cleanup
    """
)


def test_killed_writer_leaves_only_a_partial_that_the_next_writer_removes(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITER, str(out)], capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr
    leftovers = os.listdir(tmp_path)
    assert not out.exists()
    assert len(leftovers) == 1 and re.fullmatch(r"\.out\.partial-\d+-[0-9a-f]+", leftovers[0])

    # A partial of a process that is still alive (this one) must survive the cleanup.
    alive = tmp_path / f".out.partial-{os.getpid()}-00000000"
    alive.mkdir()
    with ShardedWriter(out, [("a", (1,), torch.float32)], max_shard_size=16) as writer:
        assert leftovers[0] not in os.listdir(tmp_path)
        assert alive.exists()
        writer.write("a", torch.ones(1))
        writer.commit()
    assert sorted(os.listdir(tmp_path)) == sorted(["out", alive.name])


def test_disk_full_while_committing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = ShardedWriter(tmp_path / "out", [("a", (4,), torch.float32)], max_shard_size=16)
    writer.write("a", torch.ones(4))
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(CheckpointError, match="disk full"):
        writer.commit()
    assert os.listdir(tmp_path) == []


def test_size_strings_and_bad_sizes(tmp_path: Path) -> None:
    entries = [(f"t{i}", (100,), torch.float32) for i in range(5)]  # 400 bytes each
    with ShardedWriter(tmp_path / "out", entries, max_shard_size="1KB") as writer:
        assert writer.files == tuple(f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))
        writer.abort()
    with pytest.raises(CheckpointError, match="shard size"):
        ShardedWriter(tmp_path / "out", entries, max_shard_size="lots")
    assert os.listdir(tmp_path) == []
