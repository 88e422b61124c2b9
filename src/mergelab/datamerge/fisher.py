"""Fisher merging on any torch module (Matena & Raffel 2022, https://arxiv.org/abs/2111.09832).

Each model's diagonal Fisher is computed on its own task's data (mergelab.stats.fisher), then
every parameter is the Fisher-weighted average `fisher_average`. Tensors without a Fisher
(buffers, frozen parameters, which are identical in every fine-tune) are averaged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mergelab.datamerge.common import StateDict, average, load_into, working_copy
from mergelab.methods.data_aware import fisher_average
from mergelab.stats.batches import TaskData
from mergelab.stats.fisher import Target, collect_fisher


def normalise_fisher(fisher: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Divide a model's Fisher by its mean entry over all parameters (so the mean is 1)."""
    total = sum(float(f.double().sum()) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    scale = total / count if count and total > 0 else 1.0
    return {k: f / scale for k, f in fisher.items()}


def fisher_merge(
    module: nn.Module,
    finetuned: Mapping[str, StateDict],
    data: Mapping[str, TaskData],
    keys: Sequence[str],
    *,
    model_weights: Mapping[str, float],
    fisher_floor: float,
    normalize: bool,
    target: Target = "auto",
    generator: torch.Generator | None = None,
    max_examples: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    stats_dir: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, int], float]:
    """Fisher merging over the models of `finetuned`; returns (merged state, examples per model,
    seconds spent computing Fishers)."""
    names = list(finetuned)
    work = working_copy(module)
    fishers: dict[str, dict[str, torch.Tensor]] = {}
    examples: dict[str, int] = {}
    stats_seconds = 0.0
    for name in names:
        load_into(work, finetuned[name])
        stats = collect_fisher(
            work,
            data[name].iterate(),
            forward=data[name].logits_fn(),
            target=target,
            generator=generator,
            max_examples=max_examples,
            device=device,
            progress=progress,
            description=f"Fisher {name}",
            out_dir=None if stats_dir is None else f"{stats_dir}/{name}",
        )
        fishers[name] = normalise_fisher(stats.fisher) if normalize else stats.fisher
        examples[name] = stats.examples
        stats_seconds += stats.seconds
    merged: dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = [finetuned[n][key] for n in names]
        if all(key in fishers[n] for n in names) and tensors[0].is_floating_point():
            merged[key] = fisher_average(
                tensors,
                [fishers[n][key].to(tensors[0].device) for n in names],
                model_weights=[model_weights[n] for n in names],
                floor=fisher_floor,
            )
        else:
            merged[key] = average(tensors)
    return merged, examples, stats_seconds
