"""BatchNorm on purpose: frozen statistics while fine-tuning, re-estimated statistics after a merge.

A BatchNorm layer carries running statistics (mean, variance) besides its weights. They are
buffers, not trained parameters, and a weight-space merge does not know what they should become:
averaging the weights of several fine-tunes changes every layer's activation statistics (the
variance collapse of interpolated networks, Jordan et al. 2022, "REPAIR",
https://arxiv.org/abs/2211.08403), while the running statistics still describe the old network.
Re-estimating them on a few batches of real inputs (as the RESET baseline of Ainsworth et al.
2022, "Git Re-Basin", https://arxiv.org/abs/2209.04836, and AdaBN, Li et al. 2016,
https://arxiv.org/abs/1603.04779) puts each layer back where the next layer expects it.

While fine-tuning, the statistics stay frozen (BatchNorm layers in eval mode, the rest training):
every fine-tune then shares the base's statistics, task vectors hold only weights, and small
batches cannot corrupt the statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


def batchnorm_layers(model: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """Every BatchNorm layer of `model` (1d, 2d, 3d, SyncBatchNorm), with its dotted name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm)]


@contextmanager
def frozen_batchnorm_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in training mode except its BatchNorm layers, which normalise with (and do not
    update) their running statistics; restore every module's mode on exit.

    BatchNorm affine parameters (weight, bias) still train. Dropout, if any, is active.
    """
    modes = {module: module.training for module in model.modules()}
    model.train()
    for _, layer in batchnorm_layers(model):
        layer.eval()
    try:
        yield model
    finally:
        for module, mode in modes.items():
            module.train(mode)


def _images(batch) -> torch.Tensor:
    """A batch is a tensor, or a tuple/list whose first item is the inputs (as (x, y) pairs)."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"a batch must be a tensor or an (inputs, ...) tuple; got {type(batch)}")
    return batch


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable, *, reset: bool = True) -> int:
    """Recompute the running mean and variance of every BatchNorm layer of `model` in place.

    batches: tensors (or (inputs, ...) tuples) passed to `model(...)`; for a merged multi-task
        encoder, a few batches of each task, so the statistics describe the mixture it serves.
    reset: start from zero statistics and give every batch the same weight (a cumulative
        average, as `momentum=None`), so the result does not depend on the batch order; with
        `reset=False` each layer updates its current statistics with its own momentum.
    Only the running statistics change; weights, `num_batches_tracked` (left as it was, so a
    repaired encoder still merges with its sources, which need equal integer tensors) and each
    module's train/eval mode end as they started. Dropout is off during the passes.
    Returns the number of batches used. Raises ValueError when `model` has no BatchNorm layer or
    `batches` is empty; on any error the statistics are left as they were.
    """
    layers = [layer for _, layer in batchnorm_layers(model) if layer.track_running_stats]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no BatchNorm layer with running statistics")
    modes = {module: module.training for module in model.modules()}
    saved = {
        layer: (
            layer.momentum,
            layer.running_mean.clone(),
            layer.running_var.clone(),
            layer.num_batches_tracked.clone(),
        )
        for layer in layers
    }
    model.eval()
    used = 0
    completed = False
    try:
        for layer in layers:
            if reset:
                layer.reset_running_stats()
                layer.momentum = None  # cumulative average over the batches seen
            layer.train()
        for batch in batches:
            model(_images(batch))
            used += 1
        completed = True
    finally:
        for layer, (momentum, mean, var, tracked) in saved.items():
            layer.momentum = momentum
            layer.num_batches_tracked.copy_(tracked)
            if used == 0 or not completed:  # no batch, or a batch failed: keep the old ones
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
        for module, mode in modes.items():
            module.train(mode)
    if used == 0:
        raise ValueError("reestimate_batchnorm needs at least one batch")
    return used
