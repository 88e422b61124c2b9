"""Repairing the statistics of a merged model.

Averaging aligned units shrinks their variance ("variance collapse", Jordan et al., "REPAIR:
REnormalizing Permuted Activations for Interpolation Repair", ICLR 2023, arXiv:2211.08403), so
after any merge:
  * `reset_batchnorm`: forget BatchNorm running statistics and re-estimate them on a few batches
    (ZipIt! and Git Re-Basin do this for every merged network with BatchNorm);
  * `repair_rescale`: REPAIR proper, for layers without BatchNorm: rescale and shift each output
    unit of every Linear/Conv layer so its mean and standard deviation on data match the
    average (through the merge matrices) of the source models' corresponding units.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from mergelab.align.batchnorm import batchnorm_layers, reestimate_batchnorm
from mergelab.align.spec import AlignError, PermutationSpec


def _inputs(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def reset_batchnorm(model: nn.Module, batches: Iterable, *, num_batches: int | None = None) -> int:
    """Reset BatchNorm running statistics and re-estimate them on `batches` (model inputs).

    A thin adapter over `mergelab.align.batchnorm.reestimate_batchnorm` (a plain average over the
    batches, independent of their order; modes and `num_batches_tracked` preserved). For a
    partial zip pass the trunk: only its layers are re-estimated. Returns the number of batches
    used, 0 for a model without BatchNorm; AlignError when `batches` is empty.
    """
    if not batchnorm_layers(model):
        return 0
    chosen = list(batches if num_batches is None else itertools.islice(batches, num_batches))
    if not chosen:
        raise AlignError("BatchNorm repair needs at least one batch; `batches` yielded none")
    return reestimate_batchnorm(model, chosen)


def _channel_stats(
    model: nn.Module, modules: Sequence[str], batches: Iterable, num_batches: int | None
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-output-unit mean and std of each module's output (channel axis 1 for convs)."""
    table = dict(model.named_modules())
    sums: dict[str, list] = {}
    handles = []
    for name in modules:
        module = table[name]
        axis = 1 if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) else -1

        def hook(mod, args, out, _name=name, _axis=axis):
            feats = out.detach().movedim(_axis, -1).reshape(-1, out.shape[_axis]).double()
            acc = sums.setdefault(_name, [0.0, 0.0, 0])
            acc[0] = acc[0] + feats.sum(0)
            acc[1] = acc[1] + (feats * feats).sum(0)
            acc[2] += feats.shape[0]

        handles.append(module.register_forward_hook(hook))
    model.eval()
    used = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if num_batches is not None and used >= num_batches:
                    break
                model(*_inputs(batch))
                used += 1
    finally:
        for handle in handles:
            handle.remove()
    if used == 0:
        raise AlignError("REPAIR needs at least one batch; `batches` yielded none")
    stats = {}
    for name, (total, square, count) in sums.items():
        mean = total / count
        std = (square / count - mean * mean).clamp_min(0).sqrt()
        stats[name] = (mean, std)
    return stats


def producers(spec: PermutationSpec, model: nn.Module) -> list[tuple[str, str]]:
    """(module, space) for every Linear/Conv whose output units form one space, in spec order."""
    table = dict(model.named_modules())
    found = []
    for tensor, per_axis in spec.axes.items():
        module_name, _, leaf = tensor.rpartition(".")
        if leaf != "weight" or not per_axis or len(per_axis[0]) != 1:
            continue
        seg = per_axis[0][0]
        module = table.get(module_name)
        if seg.space is None or seg.role != "out":
            continue
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            found.append((module_name, seg.space))
    return found


def repair_rescale(
    merged: nn.Module,
    sources: Sequence[nn.Module],
    spec: PermutationSpec,
    batches: Sequence,
    *,
    merges: Mapping[str, Sequence[torch.Tensor]] | None = None,
    modules: Sequence[str] | None = None,
    num_batches: int | None = None,
) -> list[str]:
    """REPAIR (Jordan et al. 2023): match each merged unit's output mean/std to its targets.

    merges: space -> per source model, the merge matrix (merged units x source units) that
        built the merged model (ZipIt!); None means the sources are already aligned and were
        averaged, i.e. every merge matrix is I / N.
    modules: restrict to these Linear/Conv modules (e.g. the trunk of a partial zip).
    Layers are repaired in order, each measured after the earlier ones were fixed.
    BatchNorm statistics are re-estimated afterwards. Returns the repaired module names.
    batches must be re-iterable (a list).
    """
    todo = [(m, s) for m, s in producers(spec, merged) if modules is None or m in set(modules)]
    if not todo:
        return []
    names = [m for m, _ in todo]
    source_stats = [_channel_stats(src, names, batches, num_batches) for src in sources]
    n_sources = len(sources)
    table = dict(merged.named_modules())
    for name, space in todo:
        mats = (merges or {}).get(space)
        if mats is None:
            size = spec.spaces[space].size
            mats = [torch.eye(size, dtype=torch.float64) / n_sources] * n_sources
        target_mean = sum(
            m.double() @ st[name][0] for m, st in zip(mats, source_stats, strict=True)
        )
        target_std = sum(m.double() @ st[name][1] for m, st in zip(mats, source_stats, strict=True))
        mean, std = _channel_stats(merged, [name], batches, num_batches)[name]
        scale = (target_std / std.clamp_min(1e-8)).float()
        module = table[name]
        with torch.no_grad():
            shape = (-1,) + (1,) * (module.weight.dim() - 1)
            module.weight.mul_(scale.view(shape))
            if module.bias is not None:
                module.bias.copy_((module.bias - mean.float()) * scale + target_mean.float())
    reset_batchnorm(merged, batches, num_batches=num_batches)
    return names
