"""Gram matrices of layer inputs, collected through forward hooks on any torch module.

RegMean (Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models",
https://arxiv.org/abs/2212.09849) needs, for every linear map y = W x of every model, the Gram
matrix G = X^T X of the inputs X that map saw on that model's own data. Here:

- `nn.Linear`: the inputs with every leading dimension (batch, tokens...) flattened into rows;
- `nn.Conv1d` / `nn.Conv2d`: a convolution is a linear map of unfolded input patches, so the Gram
  is that of the patches (one Gram per group: grouped and depthwise convolutions included);
- `nn.Embedding`: the input is a one-hot token, whose Gram is diagonal: token counts.

Products are taken in (at least) float32 and summed into float64 accumulators: a Gram sums
millions of products and RegMean then solves a linear system with it, where rounding in the sum
would show. The number of rows is kept with each Gram, so Grams of different amounts of data can
be averaged (`LayerGram.mean`).
"""

from __future__ import annotations

import fnmatch
import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mergelab.progress import progress_bar
from mergelab.stats.batches import (
    Batch,
    DataError,
    Forward,
    batch_size,
    default_forward,
    limited,
    to_device,
)

GRAM_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)
# Keep one unfolded chunk of conv patches below this many entries (memory, not correctness).
_UNFOLD_CHUNK_ENTRIES = 1 << 24


@dataclass
class LayerGram:
    """The input statistics of one layer.

    kind: "linear", "conv" or "embedding".
    gram: linear: [in, in]; conv: [groups, in/groups * kernel, same]; embedding: [num_embeddings]
        token counts (the diagonal of the one-hot Gram). Always float64, a sum over `count` rows.
    count: rows summed (tokens for linear layers and embeddings, output positions for convs).
    """

    kind: str
    gram: torch.Tensor
    count: int = 0

    def mean(self) -> torch.Tensor:
        return self.gram / max(self.count, 1)


@dataclass
class GramStats:
    """Gram matrices of one model on one data set, keyed by module name."""

    layers: dict[str, LayerGram]
    examples: int
    batches: int
    seconds: float = 0.0
    estimated_bytes: int = 0
    notes: list[str] = field(default_factory=list)


class StopForward(Exception):
    """Raised from a hook to end a forward pass early (the rest of the model is not needed)."""


def _check_supported(name: str, module: nn.Module) -> str | None:
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.padding_mode != "zeros":
            return (
                f"layer `{name}` ({type(module).__name__}) uses padding_mode "
                f"{module.padding_mode!r}; Gram statistics support only zero padding"
            )
        if isinstance(module.padding, str) and module.padding != "valid":
            return (
                f"layer `{name}` ({type(module).__name__}) uses padding={module.padding!r}; "
                "Gram statistics support numeric padding or 'valid'"
            )
        return None
    if isinstance(module, GRAM_TYPES):
        return None
    return (
        f"layer `{name}` is a {type(module).__name__}; Gram statistics support "
        + ", ".join(t.__name__ for t in GRAM_TYPES)
    )


def gram_layers(
    module: nn.Module, include: Sequence[str] | None = None
) -> dict[str, nn.Module]:
    """The layers whose input Grams are collected, by module name ("" for the root module).

    include: module names or glob patterns; None means every supported layer (unsupported
        convolutions, e.g. with reflect padding, are then skipped: their parameters are averaged).
        A name that matches a layer of an unsupported type is an error naming it.
    """
    named = dict(module.named_modules())
    if include is None:
        return {
            n: m
            for n, m in named.items()
            if isinstance(m, GRAM_TYPES) and _check_supported(n, m) is None
        }
    chosen: dict[str, nn.Module] = {}
    problems: list[str] = []
    for pattern in include:
        hits = [n for n in named if fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            problems.append(f"no layer named `{pattern}`")
        for n in hits:
            if not isinstance(named[n], GRAM_TYPES) and pattern != n:
                continue  # a glob passes over containers, norms...; an exact name may not
            problem = _check_supported(n, named[n])
            if problem:
                problems.append(problem)
            else:
                chosen[n] = named[n]
    if problems:
        raise DataError("; ".join(sorted(set(problems))))
    return chosen


def _gram_shape(module: nn.Module) -> tuple[int, ...]:
    if isinstance(module, nn.Linear):
        return (module.in_features, module.in_features)
    if isinstance(module, nn.Embedding):
        return (module.num_embeddings,)
    assert isinstance(module, (nn.Conv1d, nn.Conv2d))
    per_group = module.in_channels // module.groups
    for k in module.kernel_size:
        per_group *= k
    return (module.groups, per_group, per_group)


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "conv"


def estimate_gram_bytes(layers: dict[str, nn.Module]) -> int:
    """Bytes of the float64 accumulators `collect_grams` will hold for these layers."""
    total = 0
    for m in layers.values():
        n = 1
        for s in _gram_shape(m):
            n *= s
        total += 8 * n
    return total


def available_memory_bytes() -> int | None:
    """Memory the OS reports available now (None where it cannot tell)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _unfold(module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Input patches [batch, in_channels * kernel, positions], in the weight's column order."""
    padding = 0 if isinstance(module.padding, str) else module.padding
    if isinstance(module, nn.Conv1d):
        (k,), (d,), (s,) = module.kernel_size, module.dilation, module.stride
        p = padding if isinstance(padding, int) else padding[0]
        return F.unfold(x.unsqueeze(2), (1, k), dilation=(1, d), padding=(0, p), stride=(1, s))
    return F.unfold(
        x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride
    )


def _accumulate(name: str, module: nn.Module, x: torch.Tensor, acc: LayerGram) -> None:
    if isinstance(module, nn.Embedding):
        ids = x.reshape(-1).long()
        acc.gram += torch.bincount(ids, minlength=module.num_embeddings).to(acc.gram)
        acc.count += ids.numel()
        return
    work = torch.promote_types(x.dtype, torch.float32)
    if isinstance(module, nn.Linear):
        rows = x.detach().reshape(-1, module.in_features).to(work)
        acc.gram += (rows.T @ rows).to(torch.float64)
        acc.count += rows.shape[0]
        return
    # Convolution: unfold a few examples at a time so the patches stay small.
    x = x.detach()
    unbatched = x.dim() == (2 if isinstance(module, nn.Conv1d) else 3)
    if unbatched:
        x = x.unsqueeze(0)
    groups = module.groups
    per_example = x[0].numel() * max(1, module.weight[0, 0].numel())
    step = max(1, _UNFOLD_CHUNK_ENTRIES // max(per_example, 1))
    for start in range(0, x.shape[0], step):
        patches = _unfold(module, x[start : start + step].to(work))
        b, d, positions = patches.shape
        patches = patches.reshape(b, groups, d // groups, positions)
        acc.gram += torch.einsum("bgdl,bgel->gde", patches, patches).to(torch.float64)
        acc.count += b * positions


def collect_grams(
    module: nn.Module,
    batches: Iterable[Batch],
    *,
    forward: Forward | None = None,
    layers: Sequence[str] | None = None,
    max_examples: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    description: str = "Gram statistics",
    out_dir: str | os.PathLike | None = None,
    stop_after: str | None = None,
) -> GramStats:
    """Run `batches` through `module` (eval mode, no gradients) and return each layer's Gram.

    forward: `forward(module, inputs) -> anything`; only the hooks' inputs matter here, so a
        head is not needed. Default: call the module on the inputs.
    layers: module names or glob patterns (default: every Linear, Conv1d/2d and Embedding).
    max_examples: stop after this many examples.
    out_dir: also write the statistics there (safetensors, atomically; see `save_grams`).
    stop_after: a module name; the forward pass ends when it finishes (RegMean++ uses this to
        run only the layers it needs).
    Raises DataError for an empty loader, a batch the module cannot take (with the batch index),
    non-finite inputs reaching a layer (named), or an unsupported layer named in `layers`.
    """
    chosen = gram_layers(module, layers)
    estimated = estimate_gram_bytes(chosen)
    available = available_memory_bytes()
    notes = [f"Gram accumulators for {len(chosen)} layers: {estimated / 1e6:.1f} MB (float64)"]
    if available is not None and estimated > available:
        raise DataError(
            f"the Gram matrices of {len(chosen)} layers need {estimated / 1e9:.2f} GB but only "
            f"{available / 1e9:.2f} GB of memory is available; restrict `layers`"
        )
    if progress:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(f"{description}: {notes[0]}", highlight=False)
    acc = {
        n: LayerGram(_kind(m), torch.zeros(_gram_shape(m), dtype=torch.float64, device=device))
        for n, m in chosen.items()
    }
    call = forward or default_forward
    handles = []

    def make_hook(name: str, layer: nn.Module):
        def hook(_mod, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            _accumulate(name, layer, x, acc[name])

        return hook

    for n, m in chosen.items():
        handles.append(m.register_forward_pre_hook(make_hook(n, m), with_kwargs=True))
    if stop_after is not None:
        stopper = dict(module.named_modules()).get(stop_after)
        if stopper is None:
            raise DataError(f"stop_after: no module named `{stop_after}`")

        def stop(*_):
            raise StopForward

        handles.append(stopper.register_forward_hook(stop))

    was_training = module.training
    module.eval()
    start = time.perf_counter()
    examples = 0
    n_batches = 0
    try:
        with torch.no_grad(), progress_bar(description, max_examples, progress) as advance:
            for index, (inputs, _labels) in enumerate(limited(batches, max_examples)):
                inputs = to_device(inputs, device)
                n = batch_size(inputs)
                try:
                    call(module, inputs)
                except StopForward:
                    pass
                except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                    raise DataError(
                        f"batch {index} does not fit the module ({type(exc).__name__}: {exc})"
                    ) from exc
                examples += n
                n_batches += 1
                advance(n)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    if n_batches == 0:
        raise DataError("the data loader yielded no batch: Gram statistics need data")
    for name, layer_gram in acc.items():
        if not torch.isfinite(layer_gram.gram).all():
            raise DataError(f"non-finite values reached layer `{name}`: check the inputs")
    silent = sorted(n for n, g in acc.items() if g.count == 0)
    if silent:
        shown = ", ".join(silent[:5]) + (" ..." if len(silent) > 5 else "")
        notes.append(f"{len(silent)} layer(s) never ran on this data: {shown}")
        if stop_after is None:
            warnings.warn(f"layers never ran on this data (their Grams are zero): {shown}", stacklevel=2)
    stats = GramStats(
        layers=acc,
        examples=examples,
        batches=n_batches,
        seconds=time.perf_counter() - start,
        estimated_bytes=estimated,
        notes=notes,
    )
    if out_dir is not None:
        from mergelab.stats.store import save_grams

        save_grams(stats, out_dir)
    return stats
