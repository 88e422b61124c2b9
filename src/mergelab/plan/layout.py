"""What the planner's layouts share: sources, layer names, and one output tensor before its
parameters are resolved.

A layout decides which input tensors make each output tensor: the `models` form (same names in
every model), `slices` (layer ranges), or expert groups (copies inside one model,
mergelab.plan.expert_groups). Each describes an output as a `PlannedTensor`; the planner
(mergelab.plan.planner) then resolves and checks its parameters the same way for all of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from mergelab.plan.config import Parameters

LAYER_RE = re.compile(
    r"^(?P<stack>(?:.*\.)?(?:layers|layer|h|blocks|block))\.(?P<index>\d+)\.(?P<rest>.+)$"
)
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


class TensorSource(Protocol):
    """What the planner and engine need of a checkpoint (see mergelab.checkpoint)."""

    root: Path | None

    def keys(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> torch.Tensor: ...
    def resolve(self, name: str) -> str | None: ...
    def config(self) -> dict | None: ...
    def file_of(self, name: str) -> Path: ...


def split_layer_name(name: str) -> tuple[str, int, str] | None:
    """`model.layers.3.mlp.up_proj.weight` -> (`model.layers`, 3, `mlp.up_proj.weight`)."""
    m = LAYER_RE.match(name)
    if m is None:
        return None
    return m["stack"], int(m["index"]), m["rest"]


def count_layers(source: TensorSource) -> int:
    """Number of layers: from config.json when it says, else from the tensor names."""
    cfg = source.config() or {}
    for key in LAYER_COUNT_KEYS:
        if isinstance(cfg.get(key), int):
            return cfg[key]
    indices = [p[1] for p in map(split_layer_name, source.keys()) if p is not None]
    return max(indices) + 1 if indices else 0


@dataclass(frozen=True)
class PlannedInput:
    """One input tensor of an output tensor.

    key: the source (a model string of the config); name: the tensor's name in it.
    parameters: the input's own parameter scope (`models.N.parameters`, a slice source's, or an
        expert-group member's `member_parameters`), searched before the shared scopes.
    label: how messages name the input (`model 'b'`, `member `v``).
    """

    key: str
    name: str
    parameters: Parameters | None = None
    label: str = ""


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor as a layout defines it, before its parameters are resolved.

    base_index: position of the base model's tensor in `inputs` (None: no base input).
    scopes: the shared parameter scopes (a slice's or group's, then the global ones), most
        specific first. t: the tensor's position in its layer stack, in [0, 1] (gradients).
    reference: the input whose dtype the output takes (None: the base's, else the first).
    copied: written unchanged from its single input, without the method (tensors outside
        every expert group).
    statistics: the tensor's statistics references, where the layout knows them (an expert
        group's members' Grams), as `TensorTask.statistics`.
    """

    name: str
    inputs: tuple[PlannedInput, ...]
    base_index: int | None
    scopes: tuple[Parameters | None, ...]
    t: float
    reference: int | None = None
    copied: bool = False
    statistics: tuple[tuple[str, str] | None, ...] = ()
