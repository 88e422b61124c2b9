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

from collections.abc import Iterable, Iterator, Sequence
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


# --- REPAIR: match the sources' normalised statistics --------------------------------------------

ChannelStatistics = dict[str, tuple[torch.Tensor, torch.Tensor]]


def _channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel sum and sum of squares of x [N, C, ...] (float64), and the count per channel."""
    flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
    return flat.sum(dim=1), flat.square().sum(dim=1), flat.shape[1]


@torch.no_grad()
def normalised_statistics(model: nn.Module, batches: Iterable) -> ChannelStatistics:
    """For every BatchNorm layer (by name): the per-channel mean and standard deviation of
    z = (x - running_mean) / sqrt(running_var + eps), its normalised input, as the model runs
    at test time (eval mode) on `batches`. This is what the layer's affine part and every later
    layer were trained to see. Modes are restored."""
    layers = dict(batchnorm_layers(model))
    sums: dict[str, list] = {}

    def hook(name: str):
        def record(module: _BatchNorm, inputs, output) -> None:
            s, sq, n = _channel_moments(inputs[0])
            entry = sums.setdefault(name, [0.0, 0.0, 0])
            entry[0] = entry[0] + s
            entry[1] = entry[1] + sq
            entry[2] += n

        return record

    modes = {module: module.training for module in model.modules()}
    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    model.eval()
    try:
        for batch in batches:
            model(_images(batch))
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.train(mode)
    if not sums:
        raise ValueError("normalised_statistics needs at least one batch")
    result: ChannelStatistics = {}
    for name, (s, sq, n) in sums.items():
        layer = layers[name]
        mean = s / n
        std = (sq / n - mean.square()).clamp(min=0).sqrt()
        scale = (layer.running_var.double() + layer.eps).sqrt()
        result[name] = ((mean - layer.running_mean.double()) / scale, std / scale)
    return result


def average_statistics(per_model: Sequence[ChannelStatistics]) -> ChannelStatistics:
    """The mean over models of each layer's normalised mean and standard deviation."""
    if not per_model:
        raise ValueError("average_statistics needs at least one model's statistics")
    return {
        name: (
            torch.stack([m[name][0] for m in per_model]).mean(dim=0),
            torch.stack([m[name][1] for m in per_model]).mean(dim=0),
        )
        for name in per_model[0]
    }


@torch.no_grad()
def repair_batchnorm(
    model: nn.Module, batches: Sequence, targets: ChannelStatistics, *, min_std: float = 1e-8
) -> int:
    """REPAIR for BatchNorm networks (Jordan et al. 2022, https://arxiv.org/abs/2211.08403):
    set each BatchNorm layer's running statistics so that, on `batches`, its normalised input
    has the per-channel mean and standard deviation given in `targets` (from
    `normalised_statistics` of the source models, averaged). Unlike `reestimate_batchnorm`,
    which normalises every channel to mean 0 and variance 1, this keeps the sources' operating
    point, which their heads and later layers were trained for (fine-tunes with frozen
    ImageNet statistics do not see standardised activations).

    One pass: during it, each layer's output is already corrected with the batch's own
    statistics, so later layers are measured on repaired inputs; batches should therefore mix
    all the data the model serves (a batch of one task would be pulled to the mixture's
    statistics). Channels whose target or
    measured spread is below `min_std` (dead ones) keep their statistics. Weights,
    `num_batches_tracked` and modes end as they started. Returns the number of batches used.
    """
    layers = dict(batchnorm_layers(model))
    missing = sorted(set(layers) - set(targets))
    if missing:
        raise ValueError(f"no target statistics for BatchNorm layer(s) {missing[:5]}")
    sums: dict[str, list] = {}

    def hook(name: str):
        target_mean, target_std = (t.float() for t in targets[name])

        def correct(module: _BatchNorm, inputs, output):
            x = inputs[0]
            s, sq, n = _channel_moments(x)
            entry = sums.setdefault(name, [0.0, 0.0, 0])
            entry[0] = entry[0] + s
            entry[1] = entry[1] + sq
            entry[2] += n
            shape = (1, -1) + (1,) * (x.dim() - 2)
            mean = (s / n).float().view(shape)
            std = (sq / n - (s / n).square()).clamp(min=0).sqrt().float().view(shape)
            z = (x - mean) / std.clamp(min=min_std) * target_std.view(shape) + target_mean.view(
                shape
            )
            return z * module.weight.view(shape) + module.bias.view(shape)

        return correct

    modes = {module: module.training for module in model.modules()}
    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    model.eval()
    used = 0
    try:
        for batch in batches:
            model(_images(batch))
            used += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.train(mode)
    if used == 0:
        raise ValueError("repair_batchnorm needs at least one batch")
    for name, (s, sq, n) in sums.items():
        layer = layers[name]
        mean = s / n
        std = (sq / n - mean.square()).clamp(min=0).sqrt()
        target_mean, target_std = (t.double() for t in targets[name])
        ok = (target_std > min_std) & (std > min_std)
        # Solve (mean - m') / sqrt(v' + eps) = target_mean and std / sqrt(v' + eps) = target_std.
        scale = std / target_std.clamp(min=min_std)
        new_var = (scale.square() - layer.eps).clamp(min=0)
        new_mean = mean - target_mean * scale
        layer.running_var.copy_(torch.where(ok, new_var, layer.running_var.double()))
        layer.running_mean.copy_(torch.where(ok, new_mean, layer.running_mean.double()))
    return used
