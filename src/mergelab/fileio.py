"""Atomic file and folder writes: a reader (or a crash) never sees half a file or folder.

Every text or small binary artefact mergelab writes (JSON results, markdown reports, docs
sections, cache entries, PNG charts) goes through `write_atomic`: the content is written to a
uniquely named temporary file in the destination's folder and renamed over the destination only
once complete, so two runs finishing at the same instant cannot clobber each other's temporary
file, and a failed write leaves the old file untouched and no temporary behind.

Every folder mergelab writes (checkpoints, statistics folders, fine-tuned model folders,
diagnostics reports, cache entries) goes through `atomic_folder`: the folder is filled under a
hidden temporary name beside the destination and moved into place by `move_into_place` only
when complete. This module is the only place that renames folders.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mergelab.errors import CheckpointError

# Linux renameat2() flags: swap two paths atomically / fail instead of replacing.
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


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
        normal_permissions(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def replace_file(temporary: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename the finished file `temporary` onto `path` (in the same folder), atomically: a
    reader sees the old file or the new one, never part of one. For files filled in place by
    their own writer (a shard written tensor by tensor at its offsets)."""
    os.replace(temporary, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` atomically (see `write_atomic`)."""
    return write_atomic(path, lambda temporary: temporary.write_text(text))


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Call Linux renameat2; False when the platform or filesystem does not support it."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def move_into_place(tmp_dir: Path, out_dir: Path, *, overwrite: bool) -> None:
    """Rename the finished folder `tmp_dir` to `out_dir`: the one atomic-folder step.

    A missing `out_dir` is never clobbered if it appears meanwhile (CheckpointError). An
    existing one is replaced only with `overwrite`: in one atomic swap where the kernel offers
    it (readers see the old or the new folder, never neither), else by moving it aside, which
    is put back if the second rename fails. Leaves nothing of the old folder behind on success.
    """
    if not out_dir.exists():
        # NOREPLACE: someone may have created out_dir since we checked; never clobber it.
        if not _renameat2(tmp_dir, out_dir, _RENAME_NOREPLACE):
            if out_dir.exists():
                raise CheckpointError(f"output folder {out_dir} appeared while writing")
            os.rename(tmp_dir, out_dir)
        return
    if not overwrite:
        raise CheckpointError(f"output folder {out_dir} appeared while writing")
    # The old folder ends up under the temporary name and is deleted after.
    if _renameat2(tmp_dir, out_dir, _RENAME_EXCHANGE):
        shutil.rmtree(tmp_dir, ignore_errors=True)
        return
    aside = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out_dir, aside)
    try:
        os.rename(tmp_dir, out_dir)
    except OSError:
        os.rename(aside, out_dir)  # put the previous folder back
        raise
    shutil.rmtree(aside, ignore_errors=True)


def temporary_folder(out_dir: Path) -> Path:
    """A fresh, uniquely named hidden folder beside `out_dir` (its parents created)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows (os.umask sets it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(path: Path) -> None:
    """Give `path` (and, for a folder, everything in it) the permissions a plain `mkdir` or
    `open` would: mkdtemp/mkstemp (and some writers) create them readable by the owner only."""
    mask = _umask()
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


@contextmanager
def atomic_folder(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out_dir`; when the block completes, move it into place
    (`move_into_place`: an existing `out_dir` is replaced only with `overwrite`, atomically).
    If the block or the move fails, the temporary folder is removed and `out_dir` is as it was.
    """
    final = Path(out_dir).absolute()
    temporary = temporary_folder(final)
    try:
        yield temporary
        normal_permissions(temporary)
        move_into_place(temporary, final, overwrite=overwrite)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def write_folder_atomic(
    out_dir: str | os.PathLike, fill: Callable[[Path], None], *, overwrite: bool = False
) -> Path:
    """Call `fill(temporary)` to write the folder, then move it onto `out_dir` (see
    `atomic_folder`); returns the absolute `out_dir`."""
    with atomic_folder(out_dir, overwrite=overwrite) as temporary:
        fill(temporary)
    return Path(out_dir).absolute()
