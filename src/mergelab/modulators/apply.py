"""Applying one task's modulators: its dense weights, in memory or written as a checkpoint."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from mergelab.checkpoint import ShardedWriter, open_checkpoint
from mergelab.checkpoint.format import CONFIG_FILES, TOKENIZER_FILES
from mergelab.checkpoint.heads import HEADS_MANIFEST, folder_heads, head_file_name, heads_manifest
from mergelab.errors import CheckpointError
from mergelab.modulators.format import (
    FOLDER,
    MANIFEST,
    Manifest,
    TaskEntry,
    checksum,
    read_manifest,
    unpack_mask,
)


def has_modulators(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a merge output with per-task modulators."""
    return (Path(folder) / FOLDER / MANIFEST).is_file()


class ModulatedFolder:
    """A merged checkpoint with modulators, and the base they apply over.

    Opening checks everything that can be checked without reading tensor data: the manifest,
    that every masked tensor is in the merged checkpoint and in the base with its recorded
    shape, and that every task's mask file holds one mask per tensor. Tensor contents (the
    CRC-32 checksums: modulators saved for another model, or another base) are checked as each
    tensor is read. Use as a context manager or call `close`.

    base: the base checkpoint (default: the folder recorded in the manifest).
    Raises CheckpointError naming the folder, file, tensor or task.
    """

    def __init__(self, folder: str | os.PathLike, base: str | os.PathLike | None = None):
        self.folder = Path(folder)
        if not has_modulators(self.folder):
            raise CheckpointError(f"{self.folder} holds no modulators ({FOLDER}/{MANIFEST})")
        self.manifest: Manifest = read_manifest(self.folder)
        base_path = base if base is not None else self.manifest.base_path
        if base_path is None:
            raise CheckpointError(
                f"{self.folder}: the manifest records no base folder (an in-memory base?): "
                "give the base model"
            )
        self.base_path = Path(base_path)
        self._readers = []
        try:
            self.merged = self._open(self.folder)
            self.base = self._open(self.base_path)
            self._check_layout()
        except BaseException:
            self.close()
            raise

    def _open(self, path: Path):
        reader = open_checkpoint(path)
        self._readers.append(reader)
        return reader

    def _check_layout(self) -> None:
        problems = []
        for name, record in self.manifest.tensors.items():
            shape = tuple(record["shape"])
            for what, reader in (("merged checkpoint", self.merged), ("base", self.base)):
                actual = reader.resolve(name)
                if actual is None:
                    problems.append(f"tensor `{name}` is missing from the {what} {reader.path}")
                elif tuple(reader.shape(actual)) != shape:
                    problems.append(
                        f"tensor `{name}` has shape {list(reader.shape(actual))} in the {what} "
                        f"{reader.path}; the modulators were made for {list(shape)}"
                    )
        for entry in self.manifest.tasks:
            path = self.folder / FOLDER / entry.masks
            try:
                masks = self._open(path)
            except CheckpointError as exc:
                problems.append(f"task {entry.name!r}: {exc}")
                continue
            missing = sorted(set(self.manifest.tensors) - set(masks.keys()))
            if missing:
                problems.append(f"task {entry.name!r}: {path} lacks masks of {missing[:5]}")
        if problems:
            raise CheckpointError(
                f"the modulators of {self.folder} do not fit: " + "; ".join(problems)
                + " (were they saved for another model?)"
            )

    @property
    def tasks(self) -> list[str]:
        return [t.name for t in self.manifest.tasks]

    def task(self, name: str) -> TaskEntry:
        """The task's manifest entry; CheckpointError listing the tasks when there is none."""
        return self.manifest.task(name, self.folder)

    def _read_checked(self, reader, name: str, what: str, key: str) -> torch.Tensor:
        tensor = reader.get(reader.resolve(name) or name)
        if checksum(tensor) != self.manifest.tensors[name][key]:
            raise CheckpointError(
                f"tensor `{name}` of the {what} {reader.path} differs from the one the "
                f"modulators of {self.folder} were made with (saved for another model?)"
            )
        return tensor

    def tensors(self, task: str) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor of the task's dense model, in the merged checkpoint's order:
        base + rescaler * mask * (merged - base) for masked tensors, the merged tensor as
        written for the others. Read one tensor at a time."""
        entry = self.task(task)
        masks = self._open(self.folder / FOLDER / entry.masks)
        for name in self.merged.keys():
            if name not in self.manifest.tensors:
                yield name, self.merged.get(name)
                continue
            merged = self._read_checked(self.merged, name, "merged checkpoint", "merged_crc32")
            base = self._read_checked(self.base, name, "base", "base_crc32")
            mask = unpack_mask(masks.get(name), tuple(merged.shape))
            shared = merged.to(torch.float32) - base.to(torch.float32)
            dense = base.to(torch.float32) + entry.rescaler * torch.where(
                mask, shared, torch.zeros_like(shared)
            )
            yield name, dense.to(merged.dtype)

    def state_dict(self, task: str) -> dict[str, torch.Tensor]:
        """The task's dense weights in memory (as `tensors`)."""
        return dict(self.tensors(task))

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
        self._readers.clear()

    def __enter__(self) -> ModulatedFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def export_task(
    folder: str | os.PathLike,
    task: str,
    out_dir: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "5GB",
) -> Path:
    """Write task `task`'s dense weights as a plain checkpoint in `out_dir` (atomically), with
    the merged folder's config and tokenizer files and the task's head when the folder holds
    one of that name (heads.json). Returns the output folder."""
    with ModulatedFolder(folder, base) as modulated:
        modulated.task(task)  # an unknown task fails before anything is created
        merged = modulated.merged
        entries = [(n, tuple(merged.shape(n)), merged.dtype(n)) for n in merged.keys()]
        writer = ShardedWriter(
            out_dir, entries, max_shard_size=max_shard_size, overwrite=overwrite,
            inputs=[modulated.folder, modulated.base_path],
            metadata={"mergelab_modulated_task": task},
        )  # fmt: skip
        with writer:
            for name, tensor in modulated.tensors(task):
                writer.write(name, tensor)
            for file_name in ("config.json", *CONFIG_FILES, *TOKENIZER_FILES):
                if (modulated.folder / file_name).is_file():
                    writer.copy_file(modulated.folder / file_name, file_name)
            head = next((h for h in folder_heads(modulated.folder) if h.name == task), None)
            if head is not None:  # the task's own head travels with its weights
                writer.copy_file(head.path, head_file_name(head.name))
                writer.write_json(HEADS_MANIFEST, heads_manifest([head]))
            return writer.commit()


@dataclass(frozen=True)
class TaskSummary:
    """One task's modulators in numbers (for `mergelab modulators show`): kept is the fraction
    of masked entries its mask keeps, nbytes its mask file's size."""

    name: str
    model: str
    rescaler: float
    kept: float
    nbytes: int


def task_summary(modulated: ModulatedFolder) -> list[TaskSummary]:
    """Per task: its rescaler, the fraction of masked entries it keeps and its mask file's size."""
    rows = []
    for entry in modulated.manifest.tasks:
        path = modulated.folder / FOLDER / entry.masks
        masks = modulated._open(path)
        kept = total = 0
        for name, record in modulated.manifest.tensors.items():
            mask = unpack_mask(masks.get(name), tuple(record["shape"]))
            kept += int(mask.sum())
            total += mask.numel()
        rows.append(TaskSummary(entry.name, entry.model, entry.rescaler,
                                kept / total if total else 0.0, path.stat().st_size))
    return rows
