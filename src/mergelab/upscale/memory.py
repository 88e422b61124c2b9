"""An upscaling method's extras kept in memory (the engine's `extras` sink), e.g. for a data
stage that trains some of them on the upscaled model before anything is written."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from mergelab.methods.registry import Upscaled, Upscaling
from mergelab.upscale.format import planned_records


class MemoryExtras:
    """Collects what `ExtrasWriter` would write: `records` (the manifest's `tensors` entries,
    `active` set as merged) and `tensors` (tensor -> key -> extra, on the CPU)."""

    def __init__(
        self,
        upscaling: Upscaling,
        planned: Sequence[tuple[str, tuple[int, ...], torch.dtype, int, dict]],
    ):
        self.records = planned_records(upscaling, planned)
        self.tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def add(self, name: str, params: dict, result: Upscaled) -> None:
        record = self.records.get(name)
        if record is None:
            return
        values = {key: result.extras[key].detach().cpu() for key in record["extras"]}
        with self._lock:
            self.tensors[name] = values
            record["active"] = bool(result.active)

    def read(self, tensor: str, key: str, shape) -> torch.Tensor:
        """The extra `key` of `tensor` (for `mergelab.upscale.load.wrap_layers`)."""
        return self.tensors[tensor][key]


def planned_extras(plan) -> list[tuple[str, tuple[int, ...], torch.dtype, int, dict]]:
    """(name, shape, dtype, number of merged models, params) of every tensor of `plan` (a
    MergePlan) that an upscaling method's richer kernel merges: what its extras are planned
    from (`planned_records`)."""
    from mergelab.engine.execute import takes_extras

    return [
        (t.name, t.shape, t.out_dtype, len(t.inputs) - (t.base_index is not None), t.params)
        for t in plan.tasks if takes_extras(t)
    ]  # fmt: skip
