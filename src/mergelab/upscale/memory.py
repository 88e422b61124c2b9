"""An upscaling method's extras kept in memory (the engine's `extras` sink): for a data stage
that trains some of them on the upscaled model before anything is written, and for an
in-memory upscaled merge (`mergelab.merge_upscaled`: search loops and the benchmark harness
score the upscaled model without writing a folder)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergelab.methods import get_method
from mergelab.methods.registry import Upscaled, Upscaling
from mergelab.upscale.format import (
    base_parameter_count,
    is_layer_record,
    planned_records,
    upscaled_cost,
)
from mergelab.upscale.load import wrap_layers


@dataclass
class UpscaledStateDicts:
    """An upscaled merge in memory: what a merge folder holds, without the folder.

    method: the registry name of the upscaling method; tasks: the config's names of the merged
    models (the experts' order). state_dict: the shared weights (SMILE: the base's), what the
    folder's checkpoint holds. records: the manifest's `tensors` entries; extras: tensor ->
    key -> extra tensor (on the CPU); cost: the manifest's `cost` (`base_parameters`,
    `extra_parameters`, `upscaled_macs`, `base_macs`; see mergelab.upscale.format)."""

    method: str
    tasks: list[str]
    state_dict: dict[str, torch.Tensor]
    records: dict[str, dict]
    extras: dict[str, dict[str, torch.Tensor]]
    cost: dict[str, int]

    @property
    def upscaled_layers(self) -> int:
        """Linear layers (pointwise convolutions included) with active extras (0: the upscaled
        model is the shared one)."""
        return sum(1 for n, r in self.records.items() if r["active"] and is_layer_record(n))

    @property
    def extra_bytes(self) -> int:
        """Bytes of the active extras (in the merge's output dtype)."""
        return sum(t.numel() * t.element_size() for name, record in self.records.items()
                   if record["active"] for t in self.extras[name].values())  # fmt: skip

    @property
    def macs_ratio(self) -> float:
        """Multiply-adds per token of the upscaled layers against the same layers of one model
        (1.0 when no layer is upscaled)."""
        base = self.cost["base_macs"]
        return self.cost["upscaled_macs"] / base if base else 1.0

    def upscale(self, module: torch.nn.Module) -> torch.nn.Module:
        """Replace, in place, every layer of `module` (which holds `state_dict`'s weights) that
        has extras by the method's module, as `mergelab.upscale.upscale_module` does for a
        folder; returns `module`. Raises CheckpointError when the extras fit no layer of it."""
        upscaling = get_method(self.method).upscaling
        assert upscaling is not None

        def read(tensor: str, key: str, shape) -> torch.Tensor:
            return self.extras[tensor][key]

        wrap_layers(module, upscaling, self.records, read, f"the in-memory `{self.method}` merge")
        return module


class MemoryExtras:
    """Collects what `ExtrasWriter` would write: `records` (the manifest's `tensors` entries,
    `active` set as merged) and `tensors` (tensor -> key -> extra, on the CPU)."""

    def __init__(
        self,
        upscaling: Upscaling,
        planned: Sequence[tuple[str, tuple[int, ...], torch.dtype, int, dict]],
    ):
        planned = list(planned)
        self.upscaling = upscaling
        self.records = planned_records(upscaling, planned)
        self.base_parameters = base_parameter_count(planned)
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

    def finish(
        self, method: str, tasks: Sequence[str], shared: dict[str, torch.Tensor]
    ) -> UpscaledStateDicts:
        """The merge's result, once the engine has run: `shared` is the sink's tensors."""
        return UpscaledStateDicts(
            method=method, tasks=list(tasks), state_dict=shared, records=self.records,
            extras=self.tensors, cost=upscaled_cost(self.upscaling, self.records, self.base_parameters),
        )  # fmt: skip


def planned_extras(plan) -> list[tuple[str, tuple[int, ...], torch.dtype, int, dict]]:
    """(name, shape, dtype, number of merged models, params) of every tensor of `plan` (a
    MergePlan) that an upscaling method's richer kernel merges: what its extras are planned
    from (`planned_records`)."""
    from mergelab.engine.execute import takes_extras

    return [
        (t.name, t.shape, t.out_dtype, len(t.inputs) - (t.base_index is not None), t.params)
        for t in plan.tasks if takes_extras(t)
    ]  # fmt: skip
