"""The interface every zoo implements, so the evaluation harness and the benchmark runner work
the same on text, vision and the unit-test MLP zoo.

A zoo is a pretrained encoder and, per task, a fine-tuned copy of it plus that task's head. What
gets merged is the encoder (a state dict); each task keeps its own head. Building fine-tunes is
deterministic from (recipe, seed) and cached outside the repository.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

StateDict = dict[str, torch.Tensor]


@dataclass
class BuiltZoo:
    """One built zoo: everything a merge benchmark needs, in memory.

    pretrained: the pretrained encoder's state dict (the merge base).
    finetuned: task -> the fine-tuned encoder's state dict (same keys and shapes).
    heads: task -> the task's own head (used on top of any encoder, merged or not).
    probe_heads: task -> a linear probe fitted on the frozen pretrained encoder (the cheap
        alternative a user has); for LP-FT zoos it is also the frozen head fine-tuning used.
    info: free-form facts for reports (recipe, seed, steps, wall time, data origin and licence).
    method_settings: method -> global parameters every benchmark grid point of that method gets
        on this zoo: settings its architecture needs (a CNN has no MLP block for WEMoE to find).
    """

    zoo: str
    recipe: str
    seed: int
    tasks: list[str]
    pretrained: StateDict
    finetuned: dict[str, StateDict]
    heads: dict[str, torch.nn.Module]
    probe_heads: dict[str, torch.nn.Module]
    evaluator: Evaluator
    info: dict = field(default_factory=dict)
    method_settings: dict[str, dict] = field(default_factory=dict)


class Evaluator:
    """Scores an encoder (state dict) with a head on one task's split, fast enough to call once
    per merge in a grid search. A zoo's evaluator implements `correct` (whether each example of
    the split is classified right, in the split's order: the confidence intervals of the tables
    resample these); `accuracy` is their mean. (The library's `mergelab.eval.evaluator` scores
    a model with confidence intervals; the zoos' data are its task types.)

    A zoo whose encoder can also be scored as a torch module (a model that is no state dict:
    an upscaled merge's routed layers) adds `module(encoder) -> nn.Module` (its architecture
    holding `encoder`'s weights) and `correct_module(module, head, task, split)`, as `correct`
    for that module; the benchmark runner scores upscaled methods through them."""

    def correct(
        self, encoder: StateDict, head: torch.nn.Module, task: str, split: str
    ) -> torch.Tensor:
        raise NotImplementedError

    def accuracy(self, encoder: StateDict, head: torch.nn.Module, task: str, split: str) -> float:
        return self.correct(encoder, head, task, split).float().mean().item()


class Zoo(Protocol):
    """A family of fine-tunes. `build` is cached: a second call with the same arguments loads."""

    name: str
    recipes: tuple[str, ...]

    def tasks(self) -> list[str]: ...

    def build(self, *, recipe: str, seed: int, progress: bool = True) -> BuiltZoo: ...
