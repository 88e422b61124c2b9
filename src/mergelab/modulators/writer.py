"""Writing a merge's modulators into its output folder, tensor by tensor, as the engine goes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from mergelab.checkpoint import ShardedWriter
from mergelab.modulators.format import (
    FOLDER,
    FORMAT,
    MANIFEST,
    MASK_FILE,
    VERSION,
    checksum,
    pack_mask,
    packed_size,
    task_names,
)


class ModulatorWriter:
    """Streams each task's bit-packed masks into `modulators/<task>/masks.safetensors` of the
    output being written by `writer` (inside its temporary folder, so they appear with it).

    models: the config's model keys of the merged sources, in order (their tasks).
    entries: (name, shape) of every tensor that gets masks (the merged float tensors).
    base: (model key, folder path or None) of the base model, recorded in the manifest.
    names: the tasks' names (default: the models' folder names); made file-safe and unique.
    Thread-safe: the engine's merge threads call `add` concurrently.
    """

    def __init__(
        self,
        writer: ShardedWriter,
        method: str,
        models: Sequence[str],
        entries: Sequence[tuple[str, tuple[int, ...]]],
        base: tuple[str, str | None],
        names: Sequence[str] | None = None,
    ):
        self._writer = writer
        self._method = method
        self._models = list(models)
        self._names = task_names(list(names) if names is not None else self._models)
        self._index = {model: i for i, model in enumerate(self._models)}
        self._shapes = dict(entries)
        self._base = base
        self._lock = threading.Lock()
        self._totals: list[dict[str, float]] = [{} for _ in self._models]
        self._tensors: dict[str, dict] = {}
        packed = [(name, (packed_size(shape),), torch.uint8) for name, shape in entries]
        self._masks: list[ShardedWriter] = []
        try:
            for name in self._names:
                self._masks.append(ShardedWriter(
                    writer.tmp_dir / FOLDER / name, packed, max_shard_size=2**62,
                    single_file_name=MASK_FILE, metadata={"mergelab_modulators": name},
                ))  # fmt: skip
        except BaseException:
            self.abort()
            raise

    def add(
        self,
        name: str,
        models: Sequence[str],
        merged: torch.Tensor,
        base: torch.Tensor,
        masks: Sequence[torch.Tensor],
        sums: Sequence[dict[str, float]],
    ) -> None:
        """Record one tensor: `merged` as written (output dtype), `base` as read, and one mask
        (and rescaler terms) per entry of `models` (the tensor's merged sources)."""
        for model, mask in zip(models, masks, strict=True):
            self._masks[self._index[model]].write(name, pack_mask(mask))
        record = {
            "shape": list(self._shapes[name]),
            "merged_crc32": checksum(merged),
            "base_crc32": checksum(base),
        }
        with self._lock:
            self._tensors[name] = record
            for model, terms in zip(models, sums, strict=False):
                total = self._totals[self._index[model]]
                for key, value in terms.items():
                    total[key] = total.get(key, 0.0) + value

    def finish(self, rescalers: Callable[[list[dict[str, float]]], list[float]] | None) -> None:
        """Commit every task's masks and write the manifest (the rescalers from the totals)."""
        scales = rescalers(self._totals) if rescalers is not None else [1.0] * len(self._models)
        for masks in self._masks:
            masks.commit()
        self._writer.write_json(f"{FOLDER}/{MANIFEST}", {
            "format": FORMAT,
            "version": VERSION,
            "method": self._method,
            "base": {"model": self._base[0], "path": self._base[1]},
            "tasks": [
                {"name": name, "model": model, "rescaler": float(scale),
                 "masks": f"{name}/{MASK_FILE}"}
                for name, model, scale in zip(self._names, self._models, scales, strict=True)
            ],
            "tensors": dict(sorted(self._tensors.items())),
        })  # fmt: skip

    def abort(self) -> None:
        for masks in self._masks:
            masks.abort()
