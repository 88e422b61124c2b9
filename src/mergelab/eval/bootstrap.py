"""Confidence intervals of scores by the percentile bootstrap over examples.

A score measured on n test examples is itself uncertain: another draw of n examples from the
same distribution would give another score. The percentile bootstrap (Efron & Tibshirani 1993,
"An Introduction to the Bootstrap", ch. 13) estimates that spread by scoring `resamples` sets of
n examples drawn with replacement from the test set; the central `confidence` share of those
scores is the interval. It says how much the score depends on which examples were drawn, not how
much it depends on training randomness (seeds) or on the choice of data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

RESAMPLES = 1000
CONFIDENCE = 0.95
# Bounds the index matrix drawn at once (resamples x examples): about 16 MB of int64.
_CHUNK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class Interval:
    """A two-sided interval [low, high] at `confidence` (e.g. 0.95)."""

    low: float
    high: float
    confidence: float = CONFIDENCE

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high


def bootstrap_interval(
    values: Sequence[float] | torch.Tensor,
    weights: Sequence[float] | torch.Tensor | None = None,
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """Percentile-bootstrap interval of the mean of `values` over examples (or, with `weights`,
    of the ratio sum(values) / sum(weights), e.g. summed token losses over token counts).

    Every resample draws len(values) examples with replacement from a `torch.Generator` seeded
    with `seed`, so the interval is reproducible. The bounds are the (1 - confidence) / 2 and
    (1 + confidence) / 2 quantiles of the resampled statistics (linear interpolation).
    Resamples whose weights sum to zero are left out. For accuracy, `values` are 1 for a correct
    prediction and 0 otherwise.
    Raises ValueError for no values, mismatched weights, a non-positive total weight,
    resamples < 1 or confidence outside (0, 1).
    """
    x = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if x.numel() == 0:
        raise ValueError("a bootstrap interval needs at least one value")
    _check(resamples, confidence)
    w = None
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if w.shape != x.shape:
            raise ValueError(f"{w.numel()} weights for {x.numel()} values")
        if float(w.sum()) <= 0:
            raise ValueError("the weights sum to zero: the ratio is undefined")
    generator = torch.Generator().manual_seed(seed)
    return _percentile_interval(_resampled_statistics(x, w, resamples, generator), confidence)


def stratified_bootstrap_interval(
    groups: Sequence[Sequence[float] | torch.Tensor],
    *,
    resamples: int = RESAMPLES,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """Percentile-bootstrap interval of the mean over `groups` of each group's mean (e.g. the
    average accuracy over tasks, each task with its own test examples).

    Every resample draws len(group) examples with replacement inside each group, independently
    (the groups' sizes stay fixed: a stratified bootstrap), and averages the groups' means with
    equal weight, as the table's average over tasks does. Reproducible from `seed`.
    Raises ValueError for no groups, an empty group, resamples < 1 or confidence outside (0, 1).
    """
    if not groups:
        raise ValueError("a stratified bootstrap interval needs at least one group")
    _check(resamples, confidence)
    generator = torch.Generator().manual_seed(seed)
    total = None
    for index, values in enumerate(groups):
        x = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
        if x.numel() == 0:
            raise ValueError(f"group {index} of the stratified bootstrap has no values")
        means = _resampled_statistics(x, None, resamples, generator)
        total = means if total is None else total + means
    return _percentile_interval(total / len(groups), confidence)


def _check(resamples: int, confidence: float) -> None:
    if resamples < 1:
        raise ValueError(f"`resamples` must be at least 1; got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"`confidence` must be in (0, 1); got {confidence}")


def _resampled_statistics(
    x: torch.Tensor, w: torch.Tensor | None, resamples: int, generator: torch.Generator
) -> torch.Tensor:
    """`resamples` means of x (or ratios sum(x) / sum(w)) over draws with replacement."""
    n = x.numel()
    chunk = max(1, _CHUNK_ELEMENTS // n)
    statistics = []
    for start in range(0, resamples, chunk):
        index = torch.randint(0, n, (min(chunk, resamples - start), n), generator=generator)
        if w is None:
            statistics.append(x[index].mean(dim=1))
        else:
            statistics.append(x[index].sum(dim=1) / w[index].sum(dim=1))
    return torch.cat(statistics)


def _percentile_interval(resampled: torch.Tensor, confidence: float) -> Interval:
    resampled = resampled[torch.isfinite(resampled)]
    tail = (1.0 - confidence) / 2.0
    quantiles = torch.tensor([tail, 1.0 - tail], dtype=torch.float64)
    low, high = torch.quantile(resampled, quantiles).tolist()
    return Interval(low, high, confidence)
