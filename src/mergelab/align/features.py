"""Feature statistics for alignment: joint means and second moments of several models' hidden
units, observed on the same batches through forward pre-hooks at each space's probes.

For a space of n units and N models the statistics are over the concatenated features
[f_1, ..., f_N] (N*n of them), so the same matrix gives the cross-model correlations that
activation matching needs (Ainsworth et al. 2023) and the within- and across-model correlations
ZipIt! needs (Stoica et al. 2024, Sec. 4.1). Accumulated in float64: second moments of large
activations lose precision fast in float32.

mergelab.stats collects per-layer Gram matrices of *one* model's layer inputs (RegMean); alignment
needs moments *across* models, on the same batches, at chosen probes (some of them projections
such as attention queries), so it keeps these small hooks of its own. Both hook layer inputs with
forward pre-hooks; a shared hook layer could serve both later.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergelab.align.spec import AlignError, PermutationSpec, Probe


@dataclass
class JointMoments:
    """Running sums for one space over N models: sum of x, sum of x x^T, sample count."""

    total: torch.Tensor  # (N*n,)
    outer: torch.Tensor  # (N*n, N*n)
    count: int = 0

    def add(self, feats: torch.Tensor) -> None:
        feats = feats.to(torch.float64)
        self.total += feats.sum(0)
        self.outer += feats.T @ feats
        self.count += feats.shape[0]

    def mean(self) -> torch.Tensor:
        return self.total / self.count

    def covariance(self) -> torch.Tensor:
        mean = self.mean()
        return self.outer / self.count - torch.outer(mean, mean)

    def correlation(self, eps: float = 1e-8) -> torch.Tensor:
        """Pearson correlation; a unit with no variance correlates 0 with everything."""
        cov = self.covariance()
        std = cov.diagonal().clamp_min(0).sqrt()
        return cov / torch.outer(std, std).clamp_min(eps)

    def std(self) -> torch.Tensor:
        return self.covariance().diagonal().clamp_min(0).sqrt()


def _observe(x: torch.Tensor, probe: Probe, module: nn.Module) -> torch.Tensor:
    feats = x.movedim(probe.dim, -1)
    feats = feats.reshape(-1, feats.shape[-1])
    if probe.weight is not None:
        weight = getattr(module, probe.weight)
        lo, hi = probe.rows if probe.rows else (0, weight.shape[0])
        feats = feats @ weight[lo:hi].T
        if probe.bias is not None:
            feats = feats + getattr(module, probe.bias)[lo:hi]
    return feats.detach()


def _as_tuple(batch) -> tuple:
    if isinstance(batch, (tuple, list)):
        return tuple(batch)
    return (batch,)


def collect_moments(
    models: Sequence[nn.Module],
    spec: PermutationSpec,
    batches: Iterable,
    *,
    spaces: Iterable[str] | None = None,
    num_batches: int | None = None,
    min_samples: int = 2,
) -> dict[str, JointMoments]:
    """Run every model on the same batches and accumulate joint moments per space.

    batches: yields model inputs (a tensor or a tuple of positional inputs; labels are not
        needed: pass inputs only).
    num_batches: use this many batches; AlignError if `batches` yields fewer.
    Raises AlignError for a space without probes, for too few batches or samples.
    """
    names = list(spaces) if spaces is not None else list(spec.spaces)
    for name in names:
        if not spec.spaces[name].probes:
            raise AlignError(
                f"space `{name}` has no probe: data-based alignment needs to observe its features "
                "(give `probes` when declaring the spec)"
            )
    if num_batches is not None and num_batches < 1:
        raise AlignError(f"`num_batches` must be at least 1; got {num_batches}")
    n_models = len(models)
    moments = {
        name: JointMoments(
            torch.zeros(n_models * spec.spaces[name].size, dtype=torch.float64),
            torch.zeros(
                n_models * spec.spaces[name].size,
                n_models * spec.spaces[name].size,
                dtype=torch.float64,
            ),
        )  # fmt: skip
        for name in names
    }
    # (space, probe index) -> features of the current batch, one entry per model
    current: dict[tuple[str, int], list[torch.Tensor]] = {}
    handles = []
    for m_index, model in enumerate(models):
        modules = dict(model.named_modules())
        for name in names:
            for p_index, probe in enumerate(spec.spaces[name].probes):
                if probe.module not in modules:
                    raise AlignError(
                        f"probe of space `{name}`: model has no module `{probe.module}`"
                    )
                module = modules[probe.module]

                def hook(mod, args, _key=(name, p_index), _probe=probe, _m=m_index):
                    slot = current.setdefault(_key, [None] * n_models)
                    slot[_m] = _observe(args[0], _probe, mod)

                handles.append(module.register_forward_pre_hook(hook))
    used = 0
    try:
        with torch.no_grad():
            for batch in batches:
                if num_batches is not None and used >= num_batches:
                    break
                inputs = _as_tuple(batch)
                current.clear()
                for model in models:
                    model(*inputs)
                for (name, _), feats in current.items():
                    if any(f is None for f in feats):
                        raise AlignError(f"space `{name}`: a probe did not fire in every model")
                    moments[name].add(torch.cat(feats, dim=1))
                used += 1
    finally:
        for handle in handles:
            handle.remove()
    if used == 0:
        raise AlignError("`batches` yielded no batch: correlations need data")
    if num_batches is not None and used < num_batches:
        raise AlignError(
            f"`batches` yielded {used} batch(es) but `num_batches`={num_batches} were requested; "
            "give more data or lower `num_batches`"
        )
    for name, mom in moments.items():
        if mom.count < min_samples:
            raise AlignError(
                f"space `{name}` saw {mom.count} sample(s) in {used} batch(es); correlations need "
                f"at least {min_samples}: give more or larger batches"
            )
    return moments
