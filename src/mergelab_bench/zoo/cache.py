"""On-disk cache of zoo pieces (fine-tuned encoders, heads, probes), built atomically, verified.

Each piece is one folder `ROOT/NAME` holding safetensors files and a `manifest.json` with the
SHA-256 of every file and free-form facts (`meta`). Folders are built in a temporary folder and
renamed into place with a completion marker (`mergelab.training.cached_folder`), so an
interrupted build leaves nothing that a later run takes as finished: a folder without the marker
is rebuilt. A folder *with* the marker whose manifest or files do not check out (a disk error, a
hand edit, a copy cut short) raises `ZooCacheError` naming the file: silently rebuilding would
hide a broken disk, silently using it would report numbers of a model nobody trained.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mergelab.errors import MergeLabError
from mergelab.training.cache import DONE_MARKER, cached_folder

StateDict = dict[str, torch.Tensor]
Files = dict[str, StateDict]
MANIFEST = "manifest.json"
ENTRY_FORMAT = 1


class ZooCacheError(MergeLabError):
    """A cached zoo piece exists but is unreadable or does not match its manifest."""


def default_cache_root() -> Path:
    """`$MERGELAB_CACHE/zoo` or `~/.cache/mergelab/zoo`: outside the repository."""
    env = os.environ.get("MERGELAB_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "mergelab") / "zoo"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_entry(folder: Path, files: Mapping[str, Mapping[str, torch.Tensor]], meta: Mapping) -> None:
    """Write `files` (name -> state dict) as `name.safetensors` plus the manifest into `folder`."""
    hashes = {}
    for name, tensors in files.items():
        path = folder / f"{name}.safetensors"
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
        hashes[name] = _sha256(path)
    manifest = {"format": ENTRY_FORMAT, "files": hashes, "meta": dict(meta)}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))


def read_entry(folder: Path) -> tuple[Files, dict[str, Any]]:
    """Read a folder written by `write_entry`, checking every file against the manifest."""
    folder = Path(folder)
    hint = f"delete {folder} (or rebuild with --rebuild) to build it again"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        hashes = manifest["files"]
        meta = manifest["meta"]
        if manifest.get("format") != ENTRY_FORMAT or not isinstance(hashes, dict):
            raise ValueError(f"unknown manifest format {manifest.get('format')!r}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ZooCacheError(f"zoo cache entry {folder}: bad {MANIFEST} ({exc}); {hint}") from None
    files: Files = {}
    for name, expected in hashes.items():
        path = folder / f"{name}.safetensors"
        if not path.is_file():
            raise ZooCacheError(f"zoo cache entry {folder}: {path.name} is missing; {hint}")
        if _sha256(path) != expected:
            raise ZooCacheError(
                f"zoo cache entry {folder}: {path.name} does not match its checksum "
                f"(corrupt or half-written); {hint}"
            )
        try:
            files[name] = load_file(str(path))
        except (SafetensorError, OSError) as exc:  # pragma: no cover - checksum catches it first
            raise ZooCacheError(f"zoo cache entry {folder}: cannot read {path.name}: {exc}") from None
    return files, meta


def cached_entry(
    root: Path,
    name: str,
    build: Callable[[], tuple[Mapping[str, Mapping[str, torch.Tensor]], Mapping]],
    *,
    rebuild: bool = False,
) -> tuple[Files, dict[str, Any], bool]:
    """Load `root/name`, building it first with `build()` -> (files, meta) if absent.

    Returns (files, meta, was_cached). `rebuild` deletes a finished entry first.
    """
    final = Path(root) / name
    if rebuild and final.exists():
        shutil.rmtree(final)
    _, hit = cached_folder(Path(root), name, lambda folder: write_entry(folder, *build()))
    files, meta = read_entry(final)
    return files, meta, hit


def is_complete(root: Path, name: str) -> bool:
    """Whether `root/name` was finished (it may still fail verification when read)."""
    return (Path(root) / name / DONE_MARKER).is_file()


def state_dict_delta(tensors: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> StateDict:
    """The entries of `tensors` that differ from `base` (frozen ones are stored once, in base)."""
    return {k: v for k, v in tensors.items() if k not in base or not torch.equal(v, base[k])}


def with_base(delta: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> StateDict:
    """Undo `state_dict_delta`: `base` with `delta`'s entries replaced (base tensors shared)."""
    unknown = sorted(set(delta) - set(base))
    if unknown:
        raise ZooCacheError(f"cached encoder has tensors the pretrained model lacks: {unknown[:5]}")
    return {k: delta.get(k, v) for k, v in base.items()}


def linear_from_tensors(tensors: Mapping[str, torch.Tensor]) -> torch.nn.Linear:
    """An `nn.Linear` (no grad) from {"weight": [classes, dim], "bias": [classes]}."""
    missing = sorted({"weight", "bias"} - set(tensors))
    if missing:
        raise ZooCacheError(f"a cached head lacks tensor(s) {missing}")
    num_classes, dim = tensors["weight"].shape
    head = torch.nn.Linear(dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        head.bias.copy_(tensors["bias"])
    return head.requires_grad_(False)


def linear_tensors(head: torch.nn.Linear) -> StateDict:
    return {"weight": head.weight.detach().clone(), "bias": head.bias.detach().clone()}
