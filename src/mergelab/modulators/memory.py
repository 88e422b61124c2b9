"""A modulated merge in memory: shared weights, each task's masks and rescaler (search loops and
the benchmark harness score each task's own model without writing a folder)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mergelab.errors import MergeLabError


@dataclass
class ModulatedStateDicts:
    """shared: the merged state dict W; base: the base's tensors of the masked weights;
    masks[task][name]: boolean masks; rescalers[task]: floats. Tasks are the config's model
    names of the merged sources."""

    shared: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor] = field(default_factory=dict)
    masks: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    rescalers: dict[str, float] = field(default_factory=dict)

    @property
    def tasks(self) -> list[str]:
        return list(self.masks)

    def task_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        """Task `task`'s dense weights: base + rescaler * mask * (W - base) per masked tensor,
        W's tensor for the others."""
        if task not in self.masks:
            raise MergeLabError(
                f"no modulators for task {task!r}; tasks: {', '.join(self.masks)}"
            )
        out = {}
        scale = self.rescalers[task]
        for name, tensor in self.shared.items():
            mask = self.masks[task].get(name)
            if mask is None:
                out[name] = tensor
                continue
            base = self.base[name].to(torch.float32)
            shared = tensor.to(torch.float32) - base
            out[name] = (base + scale * torch.where(mask, shared, torch.zeros_like(shared))).to(
                tensor.dtype
            )
        return out

    def extra_bytes_per_task(self) -> int:
        """Bytes one task's modulators take on disk: one bit per masked entry (+ a float)."""
        any_task = next(iter(self.masks.values()), {})
        return sum((m.numel() + 7) // 8 for m in any_task.values()) + 4


class MemoryModulators:
    """The engine's modulator sink for an in-memory merge (see ModulatedStateDicts)."""

    def __init__(self, models: Sequence[str]):
        self.result = ModulatedStateDicts(shared={}, masks={m: {} for m in models})
        self._totals: dict[str, dict[str, float]] = {m: {} for m in models}
        self._lock = threading.Lock()

    def add(self, name, models, merged, base, masks, sums) -> None:
        with self._lock:
            self.result.base[name] = base
            for model, mask in zip(models, masks, strict=True):
                self.result.masks[model][name] = mask.cpu()
            for model, terms in zip(models, sums, strict=False):
                total = self._totals[model]
                for key, value in terms.items():
                    total[key] = total.get(key, 0.0) + value

    def finish(
        self,
        shared: Mapping[str, torch.Tensor],
        rescalers: Callable[[list[dict[str, float]]], list[float]] | None,
    ) -> ModulatedStateDicts:
        models = list(self._totals)
        values = rescalers([self._totals[m] for m in models]) if rescalers else [1.0] * len(models)
        self.result.shared = dict(shared)
        self.result.rescalers = dict(zip(models, (float(v) for v in values), strict=True))
        return self.result
