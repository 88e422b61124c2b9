"""Diagonal Fisher information through per-example gradients, on any torch module.

Fisher merging (Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging",
https://arxiv.org/abs/2111.09832) weights each parameter of each model by the diagonal of that
model's Fisher information, F = E_x E_{y ~ p(y|x)} [(d log p(y|x) / d theta)^2]. The square
is of *per-example* gradients (the square of a batch gradient would add cross terms between
examples), so gradients are taken one example at a time: with `torch.func.vmap` over
`torch.func.grad` when the module allows it, else in a loop.

y is, per `target`: drawn from the model's own predictive distribution ("sample", the
definition above; a `torch.Generator` makes it reproducible), the model's arg-max prediction
("argmax"), or the labels the batches carry ("labels", the empirical Fisher). "auto" takes the
labels when a batch has them and samples otherwise. Label values below 0 (e.g. -100 on
padding tokens) are ignored.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

from mergelab.progress import progress_bar
from mergelab.stats.batches import (
    Batch,
    DataError,
    Forward,
    Inputs,
    batch_size,
    default_forward,
    limited,
    to_device,
)
from mergelab.stats.gram import available_memory_bytes

Target = Literal["auto", "labels", "sample", "argmax"]
_VMAP_MAX_ENTRIES = 1 << 24  # per-example gradient entries of one vmap chunk under mode="auto"


@dataclass
class FisherStats:
    """Diagonal Fisher of one model on one data set: the mean over examples of squared
    per-example gradients, keyed by parameter name (float32, the parameter's shape)."""

    fisher: dict[str, torch.Tensor]
    examples: int
    seconds: float = 0.0
    estimated_bytes: int = 0
    mode: str = "vmap"
    notes: list[str] = field(default_factory=list)


class BoundForward(nn.Module):
    """`forward(inner, inputs)` as a module, so `functional_call` can swap `inner`'s parameters
    (named `inner.<name>`) while the user's forward (and head) runs unchanged."""

    def __init__(self, inner: nn.Module, call: Forward):
        super().__init__()
        self.inner = inner
        self._call = call

    def forward(self, inputs: Inputs) -> torch.Tensor:
        return self._call(self.inner, inputs)


def _targets(
    logits: torch.Tensor, labels: torch.Tensor | None, target: Target, generator: torch.Generator | None
) -> torch.Tensor:
    if target == "labels" or (target == "auto" and labels is not None):
        if labels is None:
            raise DataError("target='labels' but a batch carries no labels")
        return labels.to(logits.device).long()
    if target == "argmax":
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float(), dim=-1).reshape(-1, logits.shape[-1])
    gen_device = generator.device if generator is not None else probs.device
    drawn = torch.multinomial(probs.to(gen_device), 1, generator=generator)
    return drawn.to(logits.device).reshape(logits.shape[:-1])


def _negative_log_likelihood(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    keep = target >= 0
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum()


def estimate_fisher_bytes(module: nn.Module, params: Sequence[str] | None, chunk_size: int) -> int:
    """Bytes of the Fisher accumulators plus one chunk of per-example gradients."""
    wanted = _parameter_names(module, params)
    numel = sum(p.numel() for n, p in module.named_parameters() if n in wanted)
    return 4 * numel * (1 + chunk_size)


def _parameter_names(module: nn.Module, params: Sequence[str] | None) -> list[str]:
    named = dict(module.named_parameters())
    if params is None:
        return [n for n, p in named.items() if p.requires_grad and p.is_floating_point()]
    unknown = sorted(set(params) - set(named))
    if unknown:
        raise DataError(f"no parameter(s) named {unknown} in the module")
    return list(params)


def collect_fisher(
    module: nn.Module,
    batches: Iterable[Batch],
    *,
    forward: Forward | None = None,
    target: Target = "auto",
    generator: torch.Generator | None = None,
    params: Sequence[str] | None = None,
    max_examples: int | None = None,
    device: str | torch.device | None = None,
    mode: Literal["auto", "vmap", "loop"] = "auto",
    chunk_size: int = 16,
    progress: bool = False,
    description: str = "Fisher",
    out_dir: str | os.PathLike | None = None,
) -> FisherStats:
    """Diagonal Fisher of `module` (eval mode) on `batches`.

    forward: `forward(module, inputs) -> logits` [batch, (positions...,) classes]; pass
        `with_head(head)` when the module returns features.
    params: parameter names (default: every float parameter with requires_grad; frozen ones,
        identical in every fine-tune, need no weighting).
    mode: "vmap" (fast for small modules), "loop" (one example at a time; works for any module)
        or "auto": vmap when a chunk of per-example gradients stays under 16M entries and the
        module supports it (else the loop, with a warning when vmap failed).
    Raises DataError for an empty loader, a batch the module cannot take, non-finite logits or
    gradients (naming the batch and the parameter).
    """
    if target not in ("auto", "labels", "sample", "argmax"):
        raise DataError(f"target must be auto, labels, sample or argmax; got {target!r}")
    call = forward or default_forward
    names = _parameter_names(module, params)
    if not names:
        raise DataError("the module has no trainable float parameter to compute a Fisher for")
    estimated = estimate_fisher_bytes(module, names, chunk_size if mode != "loop" else 1)
    available = available_memory_bytes()
    if available is not None and estimated > available:
        raise DataError(
            f"the Fisher needs about {estimated / 1e9:.2f} GB but {available / 1e9:.2f} GB is "
            "available; lower chunk_size or restrict params"
        )
    if progress:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True).print(
            f"{description}: about {estimated / 1e6:.1f} MB for {len(names)} parameter tensors",
            highlight=False,
        )
    bound = BoundForward(module, call)
    named = dict(module.named_parameters())
    theta = {f"inner.{n}": named[n].detach() for n in names}
    sums = {n: torch.zeros_like(named[n], dtype=torch.float32) for n in names}

    def example_loss(p: dict[str, torch.Tensor], inputs_1: Inputs, target_1: torch.Tensor):
        inputs_b = tree_map(lambda x: x.unsqueeze(0) if isinstance(x, torch.Tensor) else x, inputs_1)
        logits = functional_call(bound, p, (inputs_b,))
        return _negative_log_likelihood(logits, target_1.unsqueeze(0))

    per_example_grad = grad(example_loss)
    batched_grad = vmap(per_example_grad, in_dims=(None, 0, 0), chunk_size=chunk_size)

    def add_squares(grads: dict[str, torch.Tensor], batched: bool, index: int) -> None:
        for key, g in grads.items():
            name = key[len("inner.") :]
            sq = g.detach().float().square()
            if not torch.isfinite(sq).all():
                raise DataError(f"non-finite gradient of `{name}` in batch {index}")
            sums[name] += sq.sum(0) if batched else sq

    was_training = module.training
    module.eval()
    numel = sum(named[n].numel() for n in names)
    # vmap holds a chunk of per-example gradients at once; past a few million entries that
    # memory traffic costs more than it saves on CPU (MiniLM, 11M trainable parameters:
    # 0.9 s per example through vmap, 0.13 s in the loop), so "auto" loops for large modules.
    use_vmap = mode == "vmap" or (mode == "auto" and numel * chunk_size <= _VMAP_MAX_ENTRIES)
    start = time.perf_counter()
    examples = 0
    n_batches = 0
    try:
        with progress_bar(description, max_examples, progress) as advance:
            for index, (inputs, labels) in enumerate(limited(batches, max_examples)):
                inputs = to_device(inputs, device)
                n = batch_size(inputs)
                try:
                    with torch.no_grad():
                        logits = call(module, inputs)
                except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                    raise DataError(
                        f"batch {index} does not fit the module ({type(exc).__name__}: {exc})"
                    ) from exc
                if not torch.isfinite(logits).all():
                    raise DataError(f"non-finite logits (NaN loss) in batch {index}")
                targets = _targets(logits, labels, target, generator)
                if use_vmap:
                    try:
                        add_squares(batched_grad(theta, inputs, targets), True, index)
                    except DataError:
                        raise
                    except Exception as exc:  # vmap cannot trace some modules
                        if mode == "vmap" or n_batches > 0:
                            raise
                        warnings.warn(
                            f"per-example gradients through vmap failed ({type(exc).__name__}: "
                            f"{exc}); computing them one example at a time",
                            stacklevel=2,
                        )
                        use_vmap = False
                if not use_vmap:
                    for i in range(n):
                        one = tree_map(lambda x, i=i: x[i] if isinstance(x, torch.Tensor) else x, inputs)
                        add_squares(per_example_grad(theta, one, targets[i]), False, index)
                examples += n
                n_batches += 1
                advance(n)
    finally:
        module.train(was_training)
    if n_batches == 0:
        raise DataError("the data loader yielded no batch: the Fisher needs data")
    fisher = {n: s / examples for n, s in sums.items()}
    stats = FisherStats(
        fisher=fisher,
        examples=examples,
        seconds=time.perf_counter() - start,
        estimated_bytes=estimated,
        mode="vmap" if use_vmap else "loop",
    )
    if out_dir is not None:
        from mergelab.stats.store import save_fisher

        save_fisher(fisher, examples, out_dir)
    return stats
