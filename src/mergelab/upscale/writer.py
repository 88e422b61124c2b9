"""Writing an upscaling method's extra tensors into a merge's output, as the engine goes."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import torch

from mergelab.checkpoint import ShardedWriter
from mergelab.methods.registry import MergeMethod, Upscaled
from mergelab.upscale.format import (
    EXTRAS_FILE,
    FOLDER,
    FORMAT,
    MANIFEST,
    VERSION,
    base_parameter_count,
    extra_name,
    is_layer_record,
    planned_records,
    upscaled_cost,
)


class ExtrasWriter:
    """Streams the extras into `upscaled/extras/extras.safetensors` inside `writer`'s temporary folder.

    planned: (name, shape, dtype, number of merged models, params) of every merged float tensor;
    the method's `Upscaling.shapes` says which get extras. trained: tensor -> key -> the values
    a data stage learned (`Upscaling.trained`, e.g. WEMoE's routers): written instead of the
    kernel's initial ones. Thread-safe.
    """

    def __init__(
        self,
        writer: ShardedWriter,
        method: MergeMethod,
        models: Sequence[str],
        planned: Sequence[tuple[str, tuple[int, ...], torch.dtype, int, dict]],
        trained: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    ):
        assert method.upscaling is not None
        self._writer, self._method, self._models = writer, method, list(models)
        self._upscaling = method.upscaling
        self._lock = threading.Lock()
        self._trained = {name: dict(v) for name, v in (trained or {}).items()}
        planned = list(planned)
        self._records = planned_records(self._upscaling, planned)
        self._base_parameters = base_parameter_count(planned)
        dtypes = {name: dtype for name, _, dtype, _, _ in planned}
        entries = [(extra_name(name, k), tuple(v), dtypes[name])
                   for name, record in self._records.items() for k, v in record["extras"].items()]  # fmt: skip
        self._dtypes = {n: d for n, _, d in entries}
        self._extras = ShardedWriter(
            writer.tmp_dir / FOLDER / "extras", entries, max_shard_size=2**62,
            single_file_name=EXTRAS_FILE, metadata={"mergelab_upscaled": method.name},
        )  # fmt: skip

    def add(self, name: str, params: dict, result: Upscaled) -> None:
        record = self._records.get(name)
        if record is None:
            return
        learned = self._trained.get(name, {})
        for key in record["extras"]:
            full = extra_name(name, key)
            value = learned.get(key, result.extras[key])
            self._extras.write(full, value.to(self._dtypes[full]).cpu().contiguous())
        with self._lock:
            record["active"] = bool(result.active)

    def finish(self) -> list[str]:
        """Commit the extras, write the manifest; returns notes on size and inference cost."""
        self._extras.commit()
        cost = upscaled_cost(self._upscaling, self._records, self._base_parameters)
        extra, upscaled_macs, base_macs = (cost["extra_parameters"], cost["upscaled_macs"],
                                           cost["base_macs"])  # fmt: skip
        self._writer.write_json(f"{FOLDER}/{MANIFEST}", {
            "format": FORMAT, "version": VERSION, "method": self._method.name,
            "tasks": self._models, "tensors": dict(sorted(self._records.items())), "cost": cost,
        })  # fmt: skip
        layers = sum(1 for n, r in self._records.items() if r["active"] and is_layer_record(n))
        ratio = upscaled_macs / base_macs if base_macs else 1.0
        return [
            f"upscaled ({self._method.name}): {layers} layer(s) with experts of "
            f"{len(self._models)} task(s); {extra:,} extra parameters "
            f"({100 * extra / max(self._base_parameters, 1):.1f}% of the {self._base_parameters:,} "
            f"of one model); their linear layers cost {ratio:.2f}x the multiply-adds per token "
            "of the same layers in one model"
        ]

    def abort(self) -> None:
        self._extras.abort()
