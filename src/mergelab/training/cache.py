"""A cache of built folders (fine-tunes, zoo pieces, study results) keyed by a hash of every
setting that produced them, each built in a temporary folder and renamed into place."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mergelab.errors import CheckpointError
from mergelab.fileio import move_into_place, normal_permissions, temporary_folder

# Bump when the meaning of a cached folder changes (layout, recipe code) so old ones are ignored.
CACHE_FORMAT = 1
DONE_MARKER = ".complete"


def cache_key(settings: Mapping[str, Any]) -> str:
    """A short stable hash of JSON-serialisable `settings` (key order does not matter)."""
    blob = json.dumps({"cache_format": CACHE_FORMAT, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def folder_fingerprint(folder: Path, names: Sequence[str] = ("config.json", "model.safetensors")):
    """Cheap identity of a checkpoint folder: size and hash of the first 64 KiB of each file.

    A safetensors file's first bytes are its header (names, shapes, dtypes, offsets), so this
    tells checkpoints apart without reading hundreds of megabytes.
    """
    parts: dict[str, str] = {}
    for name in names:
        path = Path(folder) / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        with path.open("rb") as handle:
            head = handle.read(1 << 16)
        parts[name] = f"{path.stat().st_size}:{hashlib.sha256(head).hexdigest()[:16]}"
    return parts


def cached_folder(root: Path, name: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return `root/name`, building it first with `build(temporary_folder)` if absent.

    `build` writes into a fresh temporary folder next to the destination; only when it returns
    is a completion marker written and the folder renamed into place, so a crash mid-build
    leaves no folder that a later run would take as finished. Returns (folder, was_cached).
    """
    root = Path(root)
    final = root / name
    if (final / DONE_MARKER).is_file():
        return final, True
    root.mkdir(parents=True, exist_ok=True)
    if final.exists():
        # A folder without the marker is not ours to trust (older layout or manual copy).
        shutil.rmtree(final)
    temporary = temporary_folder(final)
    try:
        build(temporary)
        (temporary / DONE_MARKER).write_text("")
        normal_permissions(temporary)
        try:
            move_into_place(temporary, final, overwrite=False)
        except (CheckpointError, OSError):
            # Another process finished the same folder first; theirs is as good as ours.
            if not (final / DONE_MARKER).is_file():
                raise
            shutil.rmtree(temporary, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final, False
