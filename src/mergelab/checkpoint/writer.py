"""Atomic, streaming, sharded safetensors writing.

The layout of every shard is fixed before the first tensor arrives (names, shapes and dtypes
are known from the merge plan), so each shard's header is written up front and each tensor goes
straight to its offset with ``os.pwrite``, in any order, from any thread, without holding a
shard in memory. Everything is written into a hidden folder beside the output and renamed into
place by `ShardedWriter.commit`, so a crashed or interrupted merge never leaves a
finished-looking checkpoint.

The shards may also be written by other processes, on other machines that see the folder (a
merge over a Ray cluster): a `ShardFileWriter` writes some shards exactly as the writer would,
and the writer `adopt`s each one after checking its size, header and CRC-32.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import secrets
import shutil
import threading
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType

import torch

from mergelab.checkpoint.format import build_header, dtype_code, tensor_nbytes
from mergelab.checkpoint.shards import INDEX_FILE_NAME, ShardPlan, parse_size, plan_shards
from mergelab.errors import CheckpointError
from mergelab.fileio import move_into_place, replace_file


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists but belongs to someone else, or we cannot tell: keep its folder
    return True


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _is_disk_full(exc: OSError) -> bool:
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class ShardedWriter:
    """Write a checkpoint of known tensors as HF-style safetensors shards, atomically.

    Args:
        out_dir: the folder to create.
        entries: ``(name, shape, dtype)`` of every tensor, in the order shards are filled.
        max_shard_size: bytes of tensor data per shard, or a size string such as "5GB" (see
            `parse_size`); a larger tensor gets a shard of its own.
        overwrite: replace an existing `out_dir` (atomically, at `commit`).
        inputs: the checkpoints being read; `out_dir` may not equal, contain or sit inside one.
        metadata: extra safetensors metadata (str -> str), added to ``{"format": "pt"}``.
        single_file_name: write one file of this name instead of ``model.safetensors`` (e.g.
            ``adapter_model.safetensors`` for a PEFT adapter, which is never sharded); the
            tensors must then fit in one shard of `max_shard_size`.

    Raises:
        CheckpointError: before anything is created, for a bad entry, a clash with an input or
            an existing `out_dir` without `overwrite` (all problems at once).

    Use as a context manager: an exception inside the block aborts (removes the temporary
    folder); leaving it normally does nothing, so call `commit` inside the block.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        max_shard_size: int | str,
        overwrite: bool = False,
        inputs: Sequence[str | os.PathLike] = (),
        metadata: dict[str, str] | None = None,
        single_file_name: str | None = None,
        shards_elsewhere: bool = False,
    ):
        self.out_dir = Path(out_dir).expanduser().resolve()
        self.overwrite = overwrite
        self._check_target(inputs)
        self._shapes, self._dtypes = self._check_entries(entries)
        self._metadata = {"format": "pt", **self._check_metadata(metadata)}
        try:
            self.plan: ShardPlan = plan_shards(
                [(name, tensor_nbytes(shape, self._dtypes[name])) for name, shape, _ in entries],
                parse_size(max_shard_size),
            )
        except ValueError as exc:
            raise CheckpointError(f"cannot plan output shards for {self.out_dir}: {exc}") from exc
        if single_file_name is not None:
            self.plan = _renamed_single_file(self.plan, single_file_name, self.out_dir)

        self._lock = threading.Lock()
        self._pending = set(self._shapes)  # planned, not yet started
        self._written: set[str] = set()
        self._rows_left: dict[str, int] = {}  # tensors written block by block
        self._failure: CheckpointError | None = None  # the error that aborted the writer
        self._state = "open"  # -> "committing" -> "committed", or -> "aborted"

        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self._remove_stale_partials()
            self.tmp_dir = self.out_dir.parent / (
                f".{self.out_dir.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
            )
            self.tmp_dir.mkdir()
        except OSError as exc:
            raise CheckpointError(
                f"cannot create the output folder beside {self.out_dir}: {exc}"
            ) from exc
        self._offsets: dict[str, tuple[Path, int]] = {}
        self._max_shard_size = parse_size(max_shard_size)
        self._entries = tuple((name, tuple(shape), dtype) for name, shape, dtype in entries)
        self._shards_elsewhere = shards_elsewhere
        if shards_elsewhere:
            return  # the shards come from ShardFileWriters (see `layout` and `adopt`)
        try:
            self._prewrite_headers(self.plan.filenames, lambda file_name: self.tmp_dir / file_name)
        except BaseException:
            self.abort()
            raise

    # -- validation (nothing created yet) --------------------------------------------------------

    def _check_target(self, inputs: Sequence[str | os.PathLike]) -> None:
        problems = []
        out = self.out_dir
        for raw in inputs:
            source = Path(raw).expanduser().resolve()
            if out == source:
                problems.append(f"output folder {out} is the input checkpoint {source}")
            elif source in out.parents:
                problems.append(f"output folder {out} is inside the input checkpoint {source}")
            elif out in source.parents:
                problems.append(f"output folder {out} contains the input checkpoint {source}")
        if out.exists() and not out.is_dir():
            problems.append(f"output path {out} exists and is not a folder")
        elif out.exists() and not self.overwrite:
            problems.append(f"output folder {out} already exists (pass overwrite=True to replace)")
        if problems:
            raise CheckpointError("refusing to write checkpoint: " + "; ".join(problems))

    @staticmethod
    def _check_entries(
        entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    ) -> tuple[dict[str, tuple[int, ...]], dict[str, torch.dtype]]:
        problems: list[str] = []
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: dict[str, torch.dtype] = {}
        if not entries:
            problems.append("no tensors to write")
        for name, shape, dtype in entries:
            if not isinstance(name, str) or not name:
                problems.append(f"tensor name {name!r} is not a non-empty string")
                continue
            if name in shapes:
                problems.append(f"tensor {name!r} is listed twice")
            shape = tuple(shape)
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                problems.append(f"tensor {name!r} has invalid shape {shape!r}")
            try:
                dtype_code(dtype)
            except CheckpointError as exc:
                problems.append(f"tensor {name!r}: {exc}")
            shapes[name] = shape
            dtypes[name] = dtype
        if problems:
            raise CheckpointError(
                "invalid output tensor list:\n" + "\n".join(f"  - {p}" for p in problems)
            )
        return shapes, dtypes

    @staticmethod
    def _check_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
        metadata = dict(metadata or {})
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise CheckpointError(f"safetensors metadata must map str to str; bad keys: {bad}")
        return metadata

    def _remove_stale_partials(self) -> None:
        """Delete partial folders of this target left by processes that no longer run."""
        pattern = re.compile(rf"^\.{re.escape(self.out_dir.name)}\.partial-(\d+)-[0-9a-f]+$")
        for candidate in self.out_dir.parent.iterdir():
            match = pattern.match(candidate.name)
            if match and candidate.is_dir() and not _pid_alive(int(match.group(1))):
                shutil.rmtree(candidate, ignore_errors=True)

    # -- layout ----------------------------------------------------------------------------------

    def _shard_header(self, file_name: str) -> tuple[bytes, list[str], list[int], int]:
        """The header bytes of shard `file_name`, its tensors in file order, their offsets and
        the file's size: the same for every process that writes or checks it."""
        names = self.plan.names_by_shard[self.plan.filenames.index(file_name)]
        # Widest dtypes first (stable within a width) keeps every tensor aligned to its
        # element size, as the safetensors library lays files out, so readers that map
        # tensors in place never need a realigning copy.
        ordered = sorted(names, key=lambda n: -self._dtypes[n].itemsize)
        specs = [(n, self._shapes[n], self._dtypes[n]) for n in ordered]
        prefix, offsets = build_header(specs, self._metadata)
        size = len(prefix) + sum(tensor_nbytes(s, d) for _, s, d in specs)
        return prefix, ordered, offsets, size

    def _prewrite_headers(self, file_names: Sequence[str], path_of) -> None:
        for file_name in file_names:
            prefix, ordered, offsets, size = self._shard_header(file_name)
            path = path_of(file_name)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    _pwrite_all(fd, memoryview(prefix), 0)
                    # Sized (sparse) now so every tensor can land at its offset in any order.
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
            except OSError as exc:
                self.abort()
                raise self._io_error(exc, "the header", path) from exc
            for name, offset in zip(ordered, offsets, strict=True):
                self._offsets[name] = (path, offset)

    @property
    def files(self) -> tuple[str, ...]:
        """Shard file names, in order."""
        return self.plan.filenames

    # -- writing ---------------------------------------------------------------------------------

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write tensor `name` at its planned offset. Thread-safe; any order.

        Raises:
            CheckpointError: an unplanned or already written name, a shape or dtype that differs
                from the plan (cast before writing), or a failed write (the writer is then
                aborted; a full disk says so).
        """
        with self._lock:
            self._check_state()
            if name not in self._shapes:
                raise CheckpointError(
                    f"tensor {name!r} is not in the output plan of {self.out_dir}"
                )
            if name not in self._pending:
                raise CheckpointError(f"tensor {name!r} was already written to {self.out_dir}")
            expected_shape, expected_dtype = self._shapes[name], self._dtypes[name]
            if tuple(tensor.shape) != expected_shape or tensor.dtype != expected_dtype:
                raise CheckpointError(
                    f"tensor {name!r}: got shape {tuple(tensor.shape)} {tensor.dtype}, planned "
                    f"{expected_shape} {expected_dtype}"
                )
            self._pending.discard(name)  # claimed: a concurrent duplicate write now fails

        path, offset = self._offsets[name]
        try:
            data = _as_bytes(tensor)
            if len(data):
                fd = os.open(path, os.O_WRONLY)
                try:
                    _pwrite_all(fd, data, offset)
                finally:
                    os.close(fd)
        except OSError as exc:
            error = self._io_error(exc, f"tensor {name!r}", path)
            if self._failure is None:
                self._failure = error
            self.abort()
            raise error from exc
        except BaseException:
            with self._lock:  # e.g. KeyboardInterrupt: let the caller retry or abort
                self._pending.add(name)
            raise
        with self._lock:
            self._written.add(name)

    def write_rows(self, name: str, row_start: int, rows: torch.Tensor) -> None:
        """Write rows [row_start, row_start + len(rows)) of tensor `name`. Thread-safe.

        Large tensors are merged and written block by block this way; the tensor counts as
        written once all its rows are. Errors as for `write`, plus rows outside the tensor.
        """
        with self._lock:
            self._check_state()
            if name not in self._shapes:
                raise CheckpointError(
                    f"tensor {name!r} is not in the output plan of {self.out_dir}"
                )
            shape, dtype = self._shapes[name], self._dtypes[name]
            count = rows.shape[0] if rows.dim() else 0
            if (
                not shape
                or rows.dtype != dtype
                or tuple(rows.shape[1:]) != shape[1:]
                or row_start < 0
                or row_start + count > shape[0]
            ):
                raise CheckpointError(
                    f"tensor {name!r}: cannot write {tuple(rows.shape)} {rows.dtype} at row "
                    f"{row_start}; planned {shape} {dtype}"
                )
            left = self._rows_left.get(name, shape[0] if name in self._pending else 0) - count
            if left < 0:
                raise CheckpointError(f"tensor {name!r}: more rows written than it has")
            self._pending.discard(name)
            self._rows_left[name] = left
        path, offset = self._offsets[name]
        row_bytes = tensor_nbytes(shape[1:], dtype)
        try:
            data = _as_bytes(rows)
            if len(data):
                fd = os.open(path, os.O_WRONLY)
                try:
                    _pwrite_all(fd, data, offset + row_start * row_bytes)
                finally:
                    os.close(fd)
        except OSError as exc:
            error = self._io_error(exc, f"tensor {name!r}", path)
            if self._failure is None:
                self._failure = error
            self.abort()
            raise error from exc
        with self._lock:
            if self._rows_left[name] == 0:
                self._written.add(name)

    def copy_file(self, src: str | os.PathLike, name: str | None = None) -> None:
        """Copy a file (tokenizer, generation config, ...) into the output as `name`."""
        source = Path(src)
        target = self._extra_path(name or source.name)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        except OSError as exc:
            if not source.is_file():
                raise CheckpointError(f"cannot copy {source} into the output: {exc}") from exc
            self.abort()
            raise self._io_error(exc, f"copy of {source}", target) from exc

    def write_json(self, name: str, obj: object) -> None:
        """Write `obj` as indented JSON into the output as `name` (e.g. an edited config.json)."""
        target = self._extra_path(name)
        try:
            text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"cannot write {name} as JSON: {exc}") from exc
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text, encoding="utf-8")
        except OSError as exc:
            self.abort()
            raise self._io_error(exc, name, target) from exc

    def _extra_path(self, name: str) -> Path:
        with self._lock:
            self._check_state()
            relative = Path(name)
            reserved = set(self.plan.filenames) | {INDEX_FILE_NAME}
            if relative.is_absolute() or ".." in relative.parts or not relative.parts:
                raise CheckpointError(f"output file name {name!r} must be a relative path")
            if relative.as_posix() in reserved:
                raise CheckpointError(f"output file name {name!r} is reserved for the weights")
        return self.tmp_dir / relative

    # -- shards written elsewhere ---------------------------------------------------------------

    @property
    def layout(self) -> ShardLayout:
        """What a `ShardFileWriter` needs to write some of this checkpoint's shards into the
        temporary folder, byte for byte as this writer would (picklable)."""
        return ShardLayout(self.tmp_dir, self._entries, self._max_shard_size,
                           dict(self._metadata), self.plan.filenames)  # fmt: skip

    def adopt(self, receipt: ShardReceipt) -> None:
        """Take shard `receipt.file_name`, written into the temporary folder by a
        `ShardFileWriter`, as part of the output once it checks out: its size and header are
        the planned ones and its CRC-32, read back here, is the one its writer computed.

        Raises:
            CheckpointError: naming the shard and what differs (the shard is not taken; write
                it again and adopt it then).
        """
        with self._lock:
            self._check_state()
            if not self._shards_elsewhere:
                raise CheckpointError(f"the writer of {self.out_dir} writes its own shards; "
                                      "adopt needs ShardedWriter(..., shards_elsewhere=True)")  # fmt: skip
            if receipt.file_name not in self.plan.filenames:
                raise CheckpointError(f"{receipt.file_name!r} is not a shard of {self.out_dir}")
        prefix, ordered, _, size = self._shard_header(receipt.file_name)
        path = self.tmp_dir / receipt.file_name
        try:
            seen = path.stat().st_size
            with open(path, "rb") as handle:
                head = handle.read(len(prefix))
            crc = file_crc32(path) if seen == size and head == prefix else None
        except OSError as exc:
            raise CheckpointError(f"shard {path} cannot be read back: {exc}") from exc
        problem = None
        if seen != size or receipt.nbytes != size:
            problem = f"{seen} bytes on disk, {receipt.nbytes} reported, {size} planned"
        elif head != prefix:
            problem = "its header is not the planned one"
        elif crc != receipt.crc32:
            problem = f"CRC-32 {crc:08x} read back, {receipt.crc32:08x} when written"
        if problem is not None:
            raise CheckpointError(f"shard {path} does not check out: {problem}")
        with self._lock:
            self._pending.difference_update(ordered)
            self._written.update(ordered)

    # -- finishing ------------------------------------------------------------------------------

    def commit(self) -> Path:
        """Check completeness, sync, write the index and rename the folder into place.

        Returns:
            The final output folder.

        Raises:
            CheckpointError: tensors never written (all listed), or a failed write or rename.
        """
        with self._lock:
            self._check_state()
            missing = [n for n in self._shapes if n not in self._written]
            if missing:
                shown = ", ".join(repr(n) for n in missing[:20])
                more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
                raise CheckpointError(
                    f"cannot commit {self.out_dir}: {len(missing)} planned tensor(s) were never "
                    f"written: {shown}{more}"
                )
            self._state = "committing"
        current = self.tmp_dir
        try:
            if self._shards_elsewhere:
                _remove_unfinished_parts(self.tmp_dir)  # left by workers killed midway
            if self.plan.is_sharded:
                index = {
                    "metadata": {"total_size": self.plan.total_size},
                    "weight_map": dict(sorted(self.plan.shard_of.items())),
                }
                current = self.tmp_dir / INDEX_FILE_NAME
                current.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            # Data must be on disk before the rename makes it visible under the final name.
            for path in sorted(self.tmp_dir.rglob("*")):
                if path.is_file():
                    current = path
                    _fsync_path(path)
            current = self.tmp_dir
            _fsync_path(self.tmp_dir, directory=True)
            self._move_into_place()
        except OSError as exc:
            with self._lock:
                self._state = "open"
            self.abort()
            raise self._io_error(exc, "commit", current) from exc
        except BaseException:
            with self._lock:
                self._state = "open"
            self.abort()
            raise
        with self._lock:
            self._state = "committed"
        try:
            # Makes the rename itself durable; the checkpoint is complete and in place already.
            _fsync_path(self.out_dir.parent, directory=True)
        except OSError as exc:
            raise CheckpointError(
                f"{self.out_dir} is complete, but syncing its parent folder failed: {exc}"
            ) from exc
        return self.out_dir

    def _move_into_place(self) -> None:
        move_into_place(self.tmp_dir, self.out_dir, overwrite=self.overwrite)

    def abort(self) -> None:
        """Remove the temporary folder. Does nothing after a commit; safe to call twice."""
        with self._lock:
            if self._state in ("committed", "committing", "aborted"):
                return
            self._state = "aborted"
        # Other threads may still be inside pwrite: each owns its descriptor, so deleting the
        # files under them only makes their writes land in unlinked inodes.
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def _check_state(self) -> None:
        if self._state == "aborted":
            # Writes run on several threads: one that fails after another's error says why.
            reason = f": {self._failure}" if self._failure is not None else ""
            raise CheckpointError(f"writer for {self.out_dir} was aborted{reason}")
        if self._state in ("committed", "committing"):
            raise CheckpointError(f"writer for {self.out_dir} was already committed")

    def _io_error(self, exc: OSError, what: str, path: Path) -> CheckpointError:
        if _is_disk_full(exc):
            return CheckpointError(
                f"disk full while writing {what} to {path}: {exc.strerror}; the partial output "
                f"was removed and {self.out_dir} was not created"
            )
        return CheckpointError(
            f"cannot write {what} to {path}: {exc}; the partial output was removed"
        )

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()


@dataclass(frozen=True)
class ShardLayout:
    """A checkpoint's shard layout and temporary folder, for `ShardFileWriter` (picklable)."""

    folder: Path
    entries: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
    max_shard_size: int
    metadata: dict[str, str]
    file_names: tuple[str, ...]

    def names_of(self, file_names: Sequence[str]) -> list[str]:
        """The tensors the shards `file_names` hold, in plan order."""
        wanted = set(file_names)
        plan = _plan_of(self)
        return [n for f, names in zip(plan.filenames, plan.names_by_shard) if f in wanted
                for n in names]  # fmt: skip


@dataclass(frozen=True)
class ShardReceipt:
    """A shard a `ShardFileWriter` finished: its file name, size and CRC-32."""

    file_name: str
    nbytes: int
    crc32: int


def _plan_of(layout: ShardLayout) -> ShardPlan:
    return plan_shards(
        [(name, tensor_nbytes(shape, dtype)) for name, shape, dtype in layout.entries],
        layout.max_shard_size,
    )


class ShardFileWriter(ShardedWriter):
    """Writes some shards of a `ShardedWriter(..., shards_elsewhere=True)` into its temporary
    folder, from any process that sees that folder (a Ray worker on another machine).

    The same layout, headers and offsets as the writer itself, so the bytes are the same. Each
    shard is filled under a hidden name of its own and renamed to its shard name by `finish`
    once complete and synced, so a writer killed midway leaves no shard that looks written; a
    second writer of the same shard (a retry) writes identical bytes.

    Args:
        layout: `ShardedWriter.layout` of the checkpoint.
        file_names: the shards this writer fills; only their tensors may be written.
    """

    def __init__(self, layout: ShardLayout, file_names: Sequence[str]):
        self.out_dir = self.tmp_dir = Path(layout.folder)
        self.overwrite = False
        shapes, dtypes = self._check_entries(layout.entries)
        self._metadata = dict(layout.metadata)
        self.plan = _plan_of(layout)
        if self.plan.filenames != layout.file_names:
            raise CheckpointError(f"the shard layout of {self.out_dir} does not plan its files")
        unknown = sorted(set(file_names) - set(self.plan.filenames))
        if unknown:
            raise CheckpointError(f"{unknown} are not shards of {self.out_dir}")
        names = layout.names_of(file_names)
        self._shapes = {n: shapes[n] for n in names}  # writing any other tensor is an error
        self._dtypes = {n: dtypes[n] for n in names}
        self._lock = threading.Lock()
        self._pending = set(names)
        self._written = set()
        self._rows_left = {}
        self._failure = None
        self._state = "open"
        self._offsets = {}
        self._token = secrets.token_hex(4)
        self._file_names = tuple(dict.fromkeys(file_names))
        self._parts: dict[str, Path] = {}
        try:
            self._prewrite_headers(self._file_names, self._part_path)
        except BaseException:
            self.abort()
            raise

    def _part_path(self, file_name: str) -> Path:
        path = self.tmp_dir / f".{file_name}.{os.getpid()}-{self._token}.part"
        self._parts[file_name] = path
        return path

    def finish(self) -> list[ShardReceipt]:
        """Check every tensor was written, sync each shard, compute its CRC-32 and rename it
        to its shard name. Returns one receipt per shard, for `ShardedWriter.adopt`.

        Raises:
            CheckpointError: tensors never written (listed), or a failed sync or rename.
        """
        with self._lock:
            self._check_state()
            missing = sorted(n for n in self._shapes if n not in self._written)
            if missing:
                raise CheckpointError(
                    f"cannot finish shards {list(self._file_names)} of {self.out_dir}: "
                    f"{len(missing)} tensor(s) were never written: {missing[:20]}"
                )
            self._state = "committing"
        receipts = []
        try:
            for file_name in self._file_names:
                part = self._parts[file_name]
                _fsync_path(part)
                receipts.append(ShardReceipt(file_name, part.stat().st_size, file_crc32(part)))
                replace_file(part, self.tmp_dir / file_name)
            _fsync_path(self.tmp_dir, directory=True)
        except OSError as exc:
            with self._lock:
                self._state = "open"
            self.abort()
            raise self._io_error(exc, "the shards", self.tmp_dir) from exc
        with self._lock:
            self._state = "committed"
        return receipts

    def commit(self) -> Path:
        raise CheckpointError("a ShardFileWriter is finished with `finish`; its ShardedWriter commits")

    def abort(self) -> None:
        """Remove this writer's unfinished shard files (never the folder). Safe to call twice."""
        with self._lock:
            if self._state in ("committed", "committing", "aborted"):
                return
            self._state = "aborted"
        for part in self._parts.values():
            part.unlink(missing_ok=True)


def _remove_unfinished_parts(folder: Path) -> None:
    """Delete the hidden files of ShardFileWriters that never finished (killed workers)."""
    for path in folder.glob(".*.part"):
        path.unlink(missing_ok=True)


def file_crc32(path: str | os.PathLike, chunk: int = 16 << 20) -> int:
    """The CRC-32 (zlib's) of a file's bytes, read in chunks."""
    crc = 0
    buffer = bytearray(chunk)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                return crc
            crc = zlib.crc32(view[:count], crc)


def _renamed_single_file(plan: ShardPlan, file_name: str, out_dir: Path) -> ShardPlan:
    if plan.is_sharded:
        raise CheckpointError(
            f"cannot write {out_dir / file_name}: the tensors need {len(plan.filenames)} shards "
            "and this format is one file; raise the shard size"
        )
    if Path(file_name).name != file_name or not file_name.endswith(".safetensors"):
        raise CheckpointError(f"output file name {file_name!r} must be a plain *.safetensors name")
    return dataclasses.replace(
        plan,
        filenames=(file_name,) if plan.filenames else (),
        shard_of=MappingProxyType({name: file_name for name in plan.shard_of}),
    )


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order on the CPU (one copy at most: device or layout change)."""
    flat = tensor.detach()
    if flat.device.type != "cpu":
        flat = flat.cpu()
    flat = flat.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    # Reinterpret as bytes; numpy has no bfloat16/float8, uint8 works for every dtype.
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    # pwrite may write less than asked (Linux caps one call near 2 GiB): loop until done.
    while len(data):
        written = os.pwrite(fd, data, offset)
        if written <= 0:
            raise OSError(errno.EIO, "pwrite wrote nothing")
        data = data[written:]
        offset += written
