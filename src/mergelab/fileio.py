"""Atomic file writes: a reader (or a crash) never sees half a file.

Every text or small binary artefact mergelab writes (JSON results, markdown reports, docs
sections, cache entries, PNG charts) goes through `write_atomic`: the content is written to a
uniquely named temporary file in the destination's folder and renamed over the destination only
once complete, so two runs finishing at the same instant cannot clobber each other's temporary
file, and a failed write leaves the old file untouched and no temporary behind.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_atomic(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Call `fill(temporary)` to write the file, then rename it onto `path`.

    The temporary keeps `path`'s extension, so writers that infer the format from the name
    (matplotlib's `savefig`) behave as they would on `path` itself.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        fill(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (see `write_atomic`)."""
    return write_atomic(path, lambda temporary: temporary.write_text(text))
