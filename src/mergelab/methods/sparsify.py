"""Sparsification of task vectors: the pruning steps of TIES, DARE, Model Breadcrumbs and DELLA.

Every function here is a pure tensor step. Functions whose name ends in `_` prune their argument
in place (the caller owns the buffer, see `task_vector` users in task_arithmetic.py) and return
it, so a merge of N models allocates one (N, *shape) buffer and little else.

Selection by magnitude uses a threshold (`kth_smallest`, a linear-time selection) instead of a
full sort, which is several times faster on large matrices. The result equals a *stable* sort's:
among entries tied with the threshold value, the ones with the lowest flat index come first. A
plain `torch.argsort` (what mergekit uses) is not stable on tensors of 1000+ entries, so on exact
ties at the threshold (common with bfloat16 checkpoints) mergekit keeps an arbitrary subset of
the tied entries; we keep a documented one. Everything else matches mergekit 0.1.5's
`sparsify.py` value for value.

Rescaling follows mergekit: `rescale=True` multiplies the kept entries by
||delta||_1 / ||pruned delta||_1 (the L1 norm is preserved), not by the paper's 1/density; for
random pruning the two agree in expectation. It is skipped when either norm is below 1e-7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Below this L1 norm mergekit returns the pruned tensor unscaled (avoids 0/0 and huge factors).
_RESCALE_EPS = 1e-7
# Size of the sample that brackets a k-th value; tensors under 4x this use kthvalue directly.
_SELECT_SAMPLE = 1 << 14


def kth_smallest(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry (1-based) of a 1-d tensor, as a 0-d tensor.

    Equals `torch.kthvalue(flat, k).values`, about 5x faster on large tensors: a deterministic
    strided sample brackets the answer, and only the entries inside the bracket (a few percent)
    go through kthvalue. If the bracket misses, which is always detected, it falls back to
    kthvalue over all entries, so the result is exact either way.
    """
    bracket = _bracket(flat, k)
    if bracket is None:
        return torch.kthvalue(flat, k).values
    below, candidates, _ = bracket
    return torch.kthvalue(candidates, k - below).values


def _bracket(flat: torch.Tensor, k: int) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """(entries below the bracket, the entries inside it, their flat indices), where the
    bracket is known to hold the k-th smallest entry; None for small tensors or a miss."""
    numel = flat.numel()
    if numel <= 4 * _SELECT_SAMPLE:
        return None
    # An odd stride walks through every column of power-of-two-wide matrices, so the sample is
    # not one column's distribution.
    stride = (numel // _SELECT_SAMPLE) | 1
    sample = torch.sort(flat[::stride]).values
    bounds = bracket_bounds(sample, k, numel)
    if bounds is None:
        return None
    low, high = bounds
    below = 0
    if low > -math.inf:
        inside = flat >= low
        below = numel - int(torch.count_nonzero(inside))
        if high < math.inf:
            inside.logical_and_(flat <= high)
    else:
        inside = flat <= high
    # nonzero + index_select: faster than boolean indexing on the CPU
    indices = inside.nonzero().squeeze(1)
    del inside
    candidates = flat.index_select(0, indices)
    if below < k <= below + candidates.numel():
        return below, candidates, indices
    return None


def bracket_bounds(
    sorted_sample, k: int, numel: int, margin_sd: float = 4.0
) -> tuple[float, float] | None:
    """(low, high) values that hold the k-th smallest of `numel` entries with high probability,
    from a sorted sample of them (a tensor or array); -inf / inf where the bracket is open on that
    side, None when it is open on both. Callers check whether the bracket held."""
    size = len(sorted_sample)
    fraction = k / numel
    # The answer's rank within the sample is Binomial(size, fraction); take +/- margin_sd sd.
    margin = margin_sd * math.sqrt(size * fraction * (1 - fraction)) + 2
    low_index = math.floor(fraction * size - margin)
    high_index = math.ceil(fraction * size + margin)
    if low_index < 0 and high_index >= size:
        return None
    low = float(sorted_sample[low_index]) if low_index >= 0 else -math.inf
    high = float(sorted_sample[high_index]) if high_index < size else math.inf
    return low, high


def _keep_first_ties(
    mask: torch.Tensor, flat: torch.Tensor, threshold: torch.Tensor, wanted: int
) -> torch.Tensor:
    """Trim `mask` (entries on the kept side of `threshold`, ties included) to `wanted` entries
    by dropping the tied entries with the highest flat indices (stable-sort order)."""
    excess = int(torch.count_nonzero(mask)) - wanted
    if excess > 0:
        tied = (flat == threshold).nonzero().squeeze(1)
        mask[tied[tied.numel() - excess :]] = False
    return mask


def largest_mask(values: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the `count` largest entries of `values` (any shape).

    Equals taking the first `count` indices of a stable descending sort: of the entries equal to
    the count-th largest value, those with the lowest flat index are kept.
    """
    numel = values.numel()
    if count <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if count >= numel:
        return torch.ones_like(values, dtype=torch.bool)
    flat = values.reshape(-1)
    k = numel - count + 1
    bracket = _bracket(flat, k)
    if bracket is None:
        threshold = torch.kthvalue(flat, k).values
        return _keep_first_ties(flat >= threshold, flat, threshold, count).view(values.shape)
    # The bracket tells how many entries reach the threshold and where the tied ones are,
    # without another pass over the whole tensor.
    below, candidates, indices = bracket
    threshold = torch.kthvalue(candidates, k - below).values
    mask = flat >= threshold
    reaching = numel - below - int(torch.count_nonzero(candidates < threshold))
    excess = reaching - count
    if excess > 0:
        tied = indices[candidates == threshold]
        mask[tied[tied.numel() - excess :]] = False
    return mask.view(values.shape)


def smallest_mask(values: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the `count` smallest entries of `values` (any shape).

    Equals taking the first `count` indices of a stable ascending sort (lowest index first among
    entries equal to the count-th smallest value).
    """
    numel = values.numel()
    if count <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if count >= numel:
        return torch.ones_like(values, dtype=torch.bool)
    flat = values.reshape(-1)
    threshold = kth_smallest(flat, count)
    return _keep_first_ties(flat <= threshold, flat, threshold, count).view(values.shape)


def rescale_l1_(pruned: torch.Tensor, l1_before: torch.Tensor) -> torch.Tensor:
    """Scale `pruned` in place so its L1 norm is `l1_before` (the norm before pruning).

    Left unscaled when either norm is below 1e-7, as mergekit does (an all-pruned tensor stays 0).
    """
    l1_after = pruned.abs().sum()
    if l1_before < _RESCALE_EPS or l1_after < _RESCALE_EPS:
        return pruned
    return pruned.mul_(l1_before / l1_after)


def magnitude_prune_(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    """TIES "trim" step: keep the `density` fraction of entries with the largest magnitude.

    TIES-Merging (Yadav et al., 2023, https://arxiv.org/abs/2306.01708), section 3: "we trim each
    task vector to retain only the top-k% values according to their magnitude".
    Keeps max(1, int(density * numel)) entries, so any positive density keeps at least one entry.
    density >= 1 returns `delta` untouched (never rescaled); density <= 0 zeroes it.
    """
    if density >= 1:
        return delta
    numel = delta.numel()
    if density <= 0 or numel == 0:
        return delta.zero_()
    magnitudes = delta.abs()
    keep = largest_mask(magnitudes, max(1, int(density * numel)))
    l1_before = magnitudes.sum() if rescale else None
    del magnitudes
    delta.mul_(keep)
    return delta if l1_before is None else rescale_l1_(delta, l1_before)


def random_prune_(
    delta: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None
) -> torch.Tensor:
    """DARE "drop": keep each entry independently with probability `density`.

    DARE (Yu et al., 2024, https://arxiv.org/abs/2311.03099), section 3: "randomly drops delta
    parameters with a drop rate p and rescales the remaining ones by 1 / (1 - p)". As in mergekit
    the rescale preserves the L1 norm instead (equal to 1/density in expectation).
    density >= 1 returns `delta` untouched; density <= 0 zeroes it without drawing.
    """
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    # uniform < p is a Bernoulli(p) draw, and 4x faster than bernoulli_ on the CPU
    keep = torch.rand(delta.shape, generator=generator, device=delta.device) < density
    l1_before = delta.abs().sum() if rescale else None
    delta.mul_(keep)
    return delta if l1_before is None else rescale_l1_(delta, l1_before)


def breadcrumbs_prune_(
    delta: torch.Tensor, density: float, gamma: float, rescale: bool
) -> torch.Tensor:
    """Model Breadcrumbs: drop the `gamma` fraction of largest-magnitude entries (outliers) and
    then the smallest ones, so that a `density` fraction remains.

    Model Breadcrumbs (Davari & Belilovsky, 2023, https://arxiv.org/abs/2312.06795), section 3:
    "masking out the large outliers ... and the small perturbations".
    With n entries it keeps int(density * n) entries; the number of dropped outliers is
    reduced when int(gamma * n) + int(density * n) > n, so the density is always met.
    Of tied magnitudes, the lowest flat indices count as smaller (stable ascending order).
    density >= 1 returns `delta` untouched (gamma is then ignored, as in mergekit).
    """
    if density >= 1:
        return delta
    numel = delta.numel()
    kept = int(density * numel)
    outliers = int(gamma * numel)
    small = max(0, numel - kept - outliers)
    magnitudes = delta.abs()
    # Keep the entries whose stable ascending rank lies in [small, small + kept).
    keep = smallest_mask(magnitudes, small + kept)
    if small > 0:
        keep &= ~smallest_mask(magnitudes, small)
    l1_before = magnitudes.sum() if rescale else None
    del magnitudes
    delta.mul_(keep)
    return delta if l1_before is None else rescale_l1_(delta, l1_before)


def della_params_problem(density: float, epsilon: float) -> str | None:
    """Why (`density`, `epsilon`) cannot be used by DELLA's MagPrune, or None if they can.

    The keep probabilities span [density - epsilon, density + epsilon] and must lie in (0, 1).
    Only checked when 0 < density < 1 (otherwise no sampling happens), as in mergekit.
    """
    if 0 < density < 1 and (density + epsilon >= 1 or density - epsilon <= 0):
        return (
            f"`epsilon` ({epsilon:g}) must keep `density` +/- `epsilon` inside (0, 1) for "
            f"`density` {density:g}; use epsilon < {min(density, 1 - density):g}"
        )
    return None


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities: linear in the magnitude rank within each row.

    DELLA-Merging (Deep et al., 2024, https://arxiv.org/abs/2406.11617), section 3.1: "assign
    higher probabilities to parameters with higher magnitudes"; the smallest entry of a row gets
    density - epsilon, the largest density + epsilon, equally spaced in between.
    Ranks are taken along dim 1 (for 0-d and 1-d tensors: over the whole tensor), as in mergekit;
    tied magnitudes are ranked by index (stable sort). A row of a single entry, where the rank
    is undefined (mergekit then yields NaN and fails), gets probability `density`.
    Returns a tensor shaped like `delta`.
    """
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta
    length = rows.shape[1]
    if length <= 1:
        return torch.full_like(delta, density)
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    # Inverting the permutation by a scatter is linear time (mergekit sorts a second time).
    position_shape = [1] * rows.ndim
    position_shape[1] = length
    positions = torch.arange(length, dtype=rows.dtype, device=rows.device).view(position_shape)
    rank_fraction = torch.empty_like(rows).scatter_(1, order, positions.expand_as(order))
    del order
    # Same arithmetic as mergekit: ((rank - 1) / (n - 1)) * 2 * epsilon + (density - epsilon).
    rank_fraction.div_(length - 1)
    return rank_fraction.mul_(2).mul_(epsilon).add_(density - epsilon).view(delta.shape)


def della_prune_(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    rescale: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """DELLA MagPrune: drop entries at random, large magnitudes being kept more often.

    DELLA-Merging (Deep et al., 2024, https://arxiv.org/abs/2406.11617). The paper rescales each
    kept entry by 1/p_i; mergekit (and we) preserve the L1 norm of the whole tensor instead.
    density >= 1 returns `delta` untouched; density <= 0 zeroes it. Raises ValueError naming
    `epsilon` when density +/- epsilon leaves (0, 1).
    """
    if density >= 1:
        return delta
    if density <= 0:
        return delta.zero_()
    problem = della_params_problem(density, epsilon)
    if problem:
        raise ValueError(problem)
    probabilities = della_keep_probabilities(delta, density, epsilon)
    keep = torch.rand(probabilities.shape, generator=generator, device=delta.device) < probabilities
    l1_before = delta.abs().sum() if rescale else None
    delta.mul_(keep)
    return delta if l1_before is None else rescale_l1_(delta, l1_before)


# --- top-k by magnitude over a tensor seen in blocks ------------------------------------------------


@dataclass
class MagnitudeCut:
    """TIES's trim of one task vector, decided over the whole tensor and applied block by block.

    Keeps the entries with |delta| > `threshold`, plus the first `ties_to_keep` entries (in flat
    order) with |delta| == `threshold`: the same entries `magnitude_prune_` keeps on the whole
    tensor. `scale` is the L1 rescale factor (None: no rescale). Blocks must be applied in row
    order, since the tie budget is spent as it goes.
    """

    threshold: float
    ties_to_keep: int
    keep_all_ties: bool
    scale: float | None = None

    def apply_(self, delta: torch.Tensor) -> torch.Tensor:
        magnitudes = delta.abs()
        keep = magnitudes > self.threshold
        if self.keep_all_ties:
            keep |= magnitudes == self.threshold
        elif self.ties_to_keep > 0:
            tied = (magnitudes == self.threshold).reshape(-1).nonzero().squeeze(1)
            take = tied[: self.ties_to_keep]
            keep.view(-1)[take] = True
            self.ties_to_keep -= take.numel()
        del magnitudes
        delta.mul_(keep)
        if self.scale is not None:
            delta.mul_(self.scale)
        return delta


class MagnitudeCutSearch:
    """Finds one task vector's `MagnitudeCut` from a sample and passes over its blocks.

    As `kth_smallest`: a sample brackets the k-th smallest magnitude, one pass counts the entries
    below the bracket and collects those inside it (a few percent), and kthvalue over those gives
    the exact threshold. When the bracket misses (always detected), `widen` and pass again.
    """

    def __init__(self, sample: torch.Tensor, numel: int, density: float, rescale: bool):
        self.numel, self.rescale = numel, rescale
        self.keep = max(1, int(density * numel))
        self.k = numel - self.keep + 1  # the threshold is the k-th smallest magnitude
        self.sample = torch.sort(sample.reshape(-1).double()).values
        self.margin_sd = 4.0
        self._bracket()

    def _bracket(self) -> None:
        bounds = bracket_bounds(self.sample, self.k, self.numel, self.margin_sd)
        self.low, self.high = bounds if bounds is not None else (-math.inf, math.inf)
        self.below = 0
        self.candidates: list[torch.Tensor] = []
        self.l1 = 0.0
        self.l1_above = 0.0

    def widen(self) -> None:
        self.margin_sd *= 8
        self._bracket()

    def add(self, below: int, candidates: torch.Tensor) -> None:
        """Count a block's entries below the bracket and keep its `candidates` (the magnitudes
        inside the bracket, float64): what `observe` does, from a caller that found them."""
        self.below += below
        self.candidates.append(candidates)

    def observe(self, magnitudes: torch.Tensor) -> None:
        flat = magnitudes.reshape(-1)
        inside = flat >= self.low
        below = flat.numel() - int(torch.count_nonzero(inside))
        inside.logical_and_(flat <= self.high)
        self.add(below, flat.index_select(0, inside.nonzero().squeeze(1)).double())
        if self.rescale:
            self.l1 += float(flat.sum(dtype=torch.float64))
            self.l1_above += float(flat[flat > self.high].sum(dtype=torch.float64))

    def result(self) -> MagnitudeCut | None:
        """The cut, or None when the bracket missed the threshold (call `widen`, pass again)."""
        candidates = torch.cat(self.candidates) if self.candidates else torch.empty(0)
        self.candidates = []
        if not self.below < self.k <= self.below + candidates.numel():
            return None
        threshold = torch.kthvalue(candidates, self.k - self.below).values
        above_high = self.numel - self.below - candidates.numel()
        greater = above_high + int((candidates > threshold).sum())
        tied = int((candidates == threshold).sum())
        ties_to_keep = self.keep - greater
        scale = None
        if self.rescale:
            kept_l1 = (
                self.l1_above
                + float(candidates[candidates > threshold].sum())
                + float(threshold) * ties_to_keep
            )
            if self.l1 >= _RESCALE_EPS and kept_l1 >= _RESCALE_EPS:
                scale = self.l1 / kept_l1
        return MagnitudeCut(float(threshold), ties_to_keep, ties_to_keep == tied, scale)
