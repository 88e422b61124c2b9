"""The safetensors file format, read and written by hand where the library cannot help.

A safetensors file is: 8 bytes (little-endian u64) giving the header length N, N bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
padded with spaces), then the tensor data, offsets relative to the end of the header. We parse
the header ourselves to give errors that name the file and tensor, and we build headers
ourselves so the streaming writer can place tensors at known offsets before any data exists.
See https://github.com/huggingface/safetensors#format.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from mergelab.errors import CheckpointError

# The safetensors library refuses headers larger than this (a guard against garbage lengths).
MAX_HEADER_SIZE = 100_000_000
METADATA_KEY = "__metadata__"


def _dtype_table() -> dict[str, torch.dtype]:
    names = {
        "BOOL": "bool",
        "U8": "uint8",
        "I8": "int8",
        "I16": "int16",
        "U16": "uint16",
        "F16": "float16",
        "BF16": "bfloat16",
        "I32": "int32",
        "U32": "uint32",
        "F32": "float32",
        "I64": "int64",
        "U64": "uint64",
        "F64": "float64",
        "C64": "complex64",
        "F8_E4M3": "float8_e4m3fn",
        "F8_E5M2": "float8_e5m2",
        "F8_E4M3FNUZ": "float8_e4m3fnuz",
        "F8_E5M2FNUZ": "float8_e5m2fnuz",
    }
    # Older torch builds lack some of these (uint16/32/64 arrived in 2.3, float8 in 2.1).
    return {code: getattr(torch, attr) for code, attr in names.items() if hasattr(torch, attr)}


DTYPE_FROM_CODE: dict[str, torch.dtype] = _dtype_table()
CODE_FROM_DTYPE: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPE_FROM_CODE.items()}


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors dtype string of a torch dtype, e.g. ``torch.bfloat16 -> "BF16"``."""
    try:
        return CODE_FROM_DTYPE[dtype]
    except KeyError:
        supported = ", ".join(str(d).removeprefix("torch.") for d in CODE_FROM_DTYPE)
        raise CheckpointError(
            f"dtype {dtype} cannot be stored in safetensors (supported: {supported})"
        ) from None


def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of this shape and dtype (1 element for a 0-d tensor)."""
    return math.prod(shape) * dtype.itemsize


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor lives in a safetensors file: offsets are relative to the data start."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A parsed and validated header: tensors in data-offset (file) order, plus metadata."""

    path: Path
    data_start: int
    tensors: tuple[TensorRecord, ...]
    metadata: Mapping[str, str]


def read_header(path: Path) -> SafetensorsHeader:
    """Read and validate a safetensors header without touching the tensor data.

    Checks everything the safetensors library would refuse later (length, JSON, dtypes, shapes,
    offsets that tile the data region exactly) and that the file is long enough to hold it.

    Raises:
        CheckpointError: naming the file (and the tensor when one is at fault).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(
                    f"{path}: truncated safetensors file ({size} bytes; the header length alone "
                    "takes 8)"
                )
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_SIZE or 8 + header_len > size:
                raise CheckpointError(
                    f"{path}: corrupt or truncated safetensors file: header claims {header_len} "
                    f"bytes but the file has {size} bytes"
                )
            raw = handle.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read safetensors file: {exc}") from exc
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{path}: corrupt safetensors header (not valid UTF-8 JSON): {exc}"
        ) from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")

    metadata = header.pop(METADATA_KEY, None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not str->str)")

    data_start = 8 + header_len
    data_len = size - data_start
    records = [_parse_entry(path, name, entry) for name, entry in header.items()]
    records.sort(key=lambda r: (r.begin, r.end))
    # The library requires the tensors to tile the data region with no gap or overlap.
    position = 0
    for record in records:
        if record.begin != position:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: tensor {record.name!r} starts at data byte "
                f"{record.begin}, expected {position} (gap or overlap)"
            )
        position = record.end
    if position > data_len:
        cut = [r for r in records if r.end > data_len]
        more = f" (and {len(cut) - 1} tensor(s) after it)" if len(cut) > 1 else ""
        raise CheckpointError(
            f"{path}: truncated safetensors file: tensor {cut[0].name!r}{more} ends at data "
            f"byte {cut[0].end} but only {data_len} data bytes are present"
        )
    if position < data_len:
        raise CheckpointError(
            f"{path}: corrupt safetensors file: {data_len - position} trailing bytes after the "
            "last tensor"
        )
    return SafetensorsHeader(path, data_start, tuple(records), dict(metadata))


def _parse_entry(path: Path, name: str, entry: object) -> TensorRecord:
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header for tensor {name!r}: {why}")

    if not isinstance(entry, dict):
        raise bad("entry is not an object")
    code = entry.get("dtype")
    if code not in DTYPE_FROM_CODE:
        raise bad(f"unknown or unsupported dtype {code!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise bad(f"shape must be a list of non-negative ints, got {shape!r}")
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise bad(f"data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    dtype = DTYPE_FROM_CODE[code]
    expected = tensor_nbytes(shape, dtype)
    if offsets[1] - offsets[0] != expected:
        raise bad(
            f"shape {shape} of {code} needs {expected} bytes but data_offsets span "
            f"{offsets[1] - offsets[0]}"
        )
    return TensorRecord(name, dtype, tuple(shape), offsets[0], offsets[1])


def build_header(
    tensors: Sequence[tuple[str, tuple[int, ...], torch.dtype]], metadata: Mapping[str, str]
) -> tuple[bytes, list[int]]:
    """Serialise a header for tensors stored back to back in the order given.

    Returns:
        ``(prefix, offsets)``: the bytes to write at file offset 0 (length + JSON padded with
        spaces to a multiple of 8, so the data starts 8-byte aligned, as the library does) and
        each tensor's absolute file offset.
    """
    header: dict[str, object] = {METADATA_KEY: dict(metadata)} if metadata else {}
    relative: list[int] = []
    position = 0
    for name, shape, dtype in tensors:
        nbytes = tensor_nbytes(shape, dtype)
        header[name] = {
            "dtype": dtype_code(dtype),
            "shape": list(shape),
            "data_offsets": [position, position + nbytes],
        }
        relative.append(position)
        position += nbytes
    body = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    data_start = 8 + len(body)
    return struct.pack("<Q", len(body)) + body, [data_start + r for r in relative]


# Side files a written checkpoint copies from its donor (a merge: the base model, or
# tokenizer_source for tokenizer files; a LoRA fold or an alignment: the base).
CONFIG_FILES = ("generation_config.json",)
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def read_side_manifest(path: Path, format_name: str, version: int, what: str) -> dict:
    """A JSON manifest beside a checkpoint's weights (modulators, upscaled extras): parsed and
    checked for its `format` and `version`; CheckpointError naming `path` otherwise."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the {what} manifest {path}: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != format_name:
        raise CheckpointError(f"{path} is not a mergelab {what} manifest")
    if raw.get("version") != version:
        raise CheckpointError(
            f"{path}: version {raw.get('version')!r} (this mergelab reads {version})"
        )
    return raw
