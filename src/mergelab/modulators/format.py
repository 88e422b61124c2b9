"""The modulators folder of a merged checkpoint: per-task bit-packed masks and rescalers.

A merge with a modulated method (TALL masks, EMR; `MergeMethod.modulation`) writes an ordinary
checkpoint of the shared weights W plus::

    modulators/modulators.json              the manifest (below)
    modulators/<task>/masks.safetensors      one uint8 tensor per masked weight, same name

Task t's weights are, tensor by tensor, base + rescaler_t * mask_t * (W - base); tensors the
manifest does not list (integer buffers) are W's as written. The base is read from the folder
the manifest records (or one given instead: it must hold the same tensors).

A mask of n entries is stored as ceil(n / 8) bytes, the flattened (row-major) mask packed 8
entries a byte, least significant bit first (numpy's `packbits(mask, bitorder="little")`).

Manifest fields: `format` ("mergelab-modulators"), `version` (1), `method`, `base` (`path`, the
base checkpoint's folder when known, and `model`, its name in the merge config), `tasks` (list
of `name`, `model`, `rescaler`, `masks`: the file relative to `modulators/`), and `tensors`:
for each masked weight its `shape`, and CRC-32 checksums of the W tensor as written
(`merged_crc32`) and of the base tensor as read (`base_crc32`), so modulators applied to
another model's weights, or with another base, are refused.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from mergelab.checkpoint.format import read_side_manifest
from mergelab.errors import CheckpointError

FOLDER = "modulators"
MANIFEST = "modulators.json"
MASK_FILE = "masks.safetensors"
FORMAT = "mergelab-modulators"
VERSION = 1

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor -> its flattened bits packed 8 a byte, least significant first (uint8)."""
    flat = mask.reshape(-1).to(torch.uint8).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8) * _BIT_WEIGHTS).sum(dim=1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of `pack_mask`: a boolean tensor of `shape`.

    Raises CheckpointError when `packed` has not ceil(numel / 8) bytes."""
    numel = 1
    for size in shape:
        numel *= size
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise CheckpointError(
            f"a packed mask of shape {list(shape)} needs {(numel + 7) // 8} uint8 bytes; got "
            f"{list(packed.shape)} {packed.dtype}"
        )
    bits = (packed.unsqueeze(1) & _BIT_WEIGHTS) != 0
    return bits.reshape(-1)[:numel].reshape(shape)


def packed_size(shape: tuple[int, ...]) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return (numel + 7) // 8


def checksum(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (contiguous, on the CPU)."""
    data = tensor.detach().cpu().contiguous()
    if data.numel() == 0:
        return 0
    return zlib.crc32(data.reshape(-1).view(torch.uint8).numpy().tobytes())


def task_names(models: list[str]) -> list[str]:
    """File-safe, unique task names from head names or the config's model strings (their
    folder names)."""
    names: list[str] = []
    for model in models:
        stem = _SAFE_NAME.sub("_", Path(model.rstrip("/")).name or model).strip("._") or "task"
        name, n = stem, 2
        while name in names:
            name, n = f"{stem}-{n}", n + 1
        names.append(name)
    return names


@dataclass(frozen=True)
class TaskEntry:
    name: str
    model: str
    rescaler: float
    masks: str


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked `modulators.json`."""

    method: str
    base_path: str | None
    base_model: str
    tasks: tuple[TaskEntry, ...]
    tensors: dict[str, dict]

    def task(self, name: str, where: Path) -> TaskEntry:
        for entry in self.tasks:
            if entry.name == name:
                return entry
        known = ", ".join(t.name for t in self.tasks)
        raise CheckpointError(
            f"{where} holds modulators for task(s) {known}; none is named {name!r}"
        )


def read_manifest(folder: Path) -> Manifest:
    """Read and check `folder/modulators/modulators.json`; CheckpointError naming the file."""
    path = folder / FOLDER / MANIFEST
    raw = read_side_manifest(path, FORMAT, VERSION, "modulators")
    problems = []
    tasks = []
    for i, item in enumerate(raw.get("tasks") or []):
        try:
            tasks.append(TaskEntry(str(item["name"]), str(item["model"]),
                                   float(item["rescaler"]), str(item["masks"])))
        except (KeyError, TypeError, ValueError):
            problems.append(f"tasks[{i}] lacks name, model, rescaler or masks")
    if not tasks:
        problems.append("no tasks")
    tensors = raw.get("tensors")
    if not isinstance(tensors, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("shape"), list) for v in tensors.values()
    ):
        problems.append("`tensors` must map names to {shape, merged_crc32, base_crc32}")
        tensors = {}
    base = raw.get("base") if isinstance(raw.get("base"), dict) else {}
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    return Manifest(str(raw.get("method", "")), base.get("path"), str(base.get("model", "")),
                    tuple(tasks), tensors)
