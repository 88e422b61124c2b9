"""Fused CPU kernels for generalised task arithmetic (TIES, DARE, Model Breadcrumbs, DELLA).

The torch kernels in task_arithmetic.py and sparsify.py are the reference: a TIES merge of N
models there is some 10 N element-wise passes over the tensor (task vector, magnitude, masks,
weighting, sign election, agreement, disjoint sum, divisor), each allocating a buffer. Here the
same arithmetic runs in two compiled loops (numba, one thread, the GIL released so the engine's
tensor workers run side by side):

1. per model, the sparsifying decision as a `KeepRule`: for magnitude pruning one pass computes
   |model - base| and counts it against a sampled bracket, a second collects the few percent of
   entries inside it, and a selection over those gives the exact threshold and the flat index up
   to which tied entries are kept. Random and rank-based decisions (DARE, DELLA, breadcrumbs)
   stay torch masks, so they draw the very same random numbers as the reference.
2. one pass over the entries merges all models: task vector, keep, rescale, weight, sign
   election, agreement, disjoint sum or plain sum, normalisation, lambda, base.

Every value equals the reference's bit for bit (tests/test_methods_fused.py compares them as
integers): each step is the same IEEE operation in the same order and precision (float32 or
float64, scalars rounded to it first, as torch does; no fast-math, so nothing is contracted or
reordered), and the sums that L1 rescaling needs are taken by torch over the same values.
Used when numba is importable and the tensors are CPU float32/float64; anything else takes the
reference path. `MERGELAB_KERNELS=torch` forces the reference (for comparisons and timing).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mergelab.methods.sparsify import _RESCALE_EPS, bracket_bounds

# Entries merged together in the fused pass: the per-model rows of a chunk stay in cache.
_CHUNK = 2048
# KeepRule kinds, as numba sees them.
KEEP_ALL, ZERO, CUT, MASK, DRAW, WINDOW = 0, 1, 2, 3, 4, 5


@dataclass
class KeepRule:
    """How one task vector is sparsified inside the fused merge pass.

    kind: KEEP_ALL (untouched), ZERO (all entries +0, as `zero_()`), CUT (keep entries with
        |delta| > threshold, and those equal to it at flat indices below `tie_limit`: a
        stable-order top-k), MASK (keep where `mask`, a bool tensor shaped like delta) or
        DRAW (keep where `draws` < `threshold`: uniform draws against the density, DARE) or
        WINDOW (keep the entries whose stable ascending magnitude rank is in [low, high):
        those in the `high` smallest and not in the `low` smallest, each set given as a
        threshold and a tie limit: |delta| < threshold, or == it at flat indices below the
        limit; Model Breadcrumbs).
    scale: the L1 rescale factor applied after keeping (None: none), as a value of the compute
        dtype.
    """

    kind: int
    threshold: float = 0.0
    tie_limit: int = 0
    mask: torch.Tensor | None = None
    draws: torch.Tensor | None = None
    high_threshold: float = 0.0
    high_limit: int = 0
    scale: float | None = None


_KERNELS: dict | None = None
_KERNELS_LOCK = threading.Lock()


def _numba_kernels() -> dict | None:
    """The compiled kernels, or None when numba is not installed. Numba is imported on first
    use (merges without these methods never pay its ~0.7 s of start-up), once, whichever of the
    engine's threads gets here first."""
    global _KERNELS
    if _KERNELS is None:
        with _KERNELS_LOCK:
            if _KERNELS is None:
                _KERNELS = _compile() or {}
    return _KERNELS or None


def _compile() -> dict | None:
    try:
        import numba
    except ImportError:
        return None
    # error_model="numpy": IEEE division (as torch), no ZeroDivisionError check per entry
    jit = numba.njit(nogil=True, cache=True, error_model="numpy")

    @jit
    def magnitudes(tensor, base, out):
        for j in range(base.size):
            out[j] = abs(tensor[j] - base[j])

    @jit
    def count_bracket(tensor, base, low, high):
        """Counts of the magnitudes |tensor - base| below `low` and in [low, high]."""
        below = 0
        inside = 0
        for j in range(base.size):
            x = abs(tensor[j] - base[j])
            below += x < low
            inside += (x >= low) & (x <= high)
        return below, inside

    @jit
    def collect_bracket(tensor, base, low, high, values, indices):
        """The magnitudes in [low, high] and their flat indices, in flat order. `values` and
        `indices` hold one entry more than that: every entry is written, and kept by advancing
        (a branch on x >= low would be mispredicted half the time)."""
        count = 0
        for j in range(base.size):
            x = abs(tensor[j] - base[j])
            values[count] = x
            indices[count] = j
            count += (x >= low) & (x <= high)
        return count

    @jit
    def kth_smallest(values, k):
        """The k-th smallest (1-based) of `values`: any exact selection gives the same value."""
        return np.partition(values, k - 1)[k - 1]

    @jit
    def tie_limit(values, indices, threshold, ties):
        """One past the flat index of the `ties`-th entry equal to `threshold` (0 if ties <= 0;
        with fewer such entries, one past the last index seen)."""
        if ties <= 0:
            return 0
        seen = 0
        last = 0
        for j in range(values.size):
            if values[j] == threshold:
                seen += 1
                last = indices[j] if indices.size else j
                if seen == ties:
                    break
        return last + 1

    @jit
    def count_around(values, threshold):
        """How many of `values` are below and above `threshold`."""
        less = 0
        greater = 0
        for j in range(values.size):
            less += values[j] < threshold
            greater += values[j] > threshold
        return less, greater

    @jit
    def block_ties(tensor, base, threshold, ties):
        """For a block of a tensor cut elsewhere: (tie limit, ties taken) keeping the first
        `ties` entries with |tensor - base| == threshold."""
        seen = 0
        for j in range(base.size):
            if abs(tensor[j] - base[j]) == threshold:
                seen += 1
                if seen == ties:
                    return j + 1, seen
        return base.size, seen

    @jit
    def kept_magnitudes(tensor, base, threshold, limit, out):
        for j in range(base.size):
            x = abs(tensor[j] - base[j])
            keep = (x > threshold) | ((x == threshold) & (j < limit))
            out[j] = x if keep else x - x  # +0 of x's dtype, as abs(delta * 0)

    @jit
    def drawn_magnitudes(tensor, base, draws, density, magnitudes, kept):
        for j in range(base.size):
            x = abs(tensor[j] - base[j])
            magnitudes[j] = x
            kept[j] = x if draws[j] < density else x - x

    @jit
    def merge(
        tensors, base, out, kinds, thresholds, limits, high_thresholds, high_limits, masks,
        draws, densities, scales, has_scale, weights, constants, sign_election, normalize,
        divisor, lam, has_lam,
    ):
        # Every scalar is of the compute dtype: a float64 literal would promote float32 math.
        # tensors, masks and draws are tuples, one entry per model. The entries go in chunks
        # that stay in cache, model by model inside a chunk, so that every inner loop is one
        # simple step over plain arrays (which LLVM vectorises), without branches on the
        # entries: a keep decision or an elected sign is a coin flip to the branch predictor.
        n = len(tensors)
        zero = constants[0]
        one = constants[1]
        chunk = _CHUNK
        scratch = np.empty(n * chunk, dtype=base.dtype)
        sign = np.empty(chunk, dtype=base.dtype)
        contributing = np.empty(chunk, dtype=base.dtype)
        for start in range(0, base.size, chunk):
            stop = min(start + chunk, base.size)
            size = stop - start
            b = base[start:stop]
            merged = out[start:stop]
            for i in range(n):
                t = tensors[i][start:stop]
                d = scratch[i * chunk : i * chunk + size]
                for j in range(size):
                    d[j] = t[j] - b[j]
                kind = kinds[i]
                if kind == 1:  # ZERO: zero_() writes +0
                    for j in range(size):
                        d[j] = zero
                elif kind == 2:  # CUT
                    threshold = thresholds[i]
                    limit = limits[i] - start
                    for j in range(size):
                        x = abs(d[j])
                        keep = (x > threshold) | ((x == threshold) & (j < limit))
                        d[j] = d[j] * (one if keep else zero)
                elif kind == 3:  # MASK
                    mask = masks[i][start:stop]
                    for j in range(size):
                        d[j] = d[j] * (one if mask[j] else zero)
                elif kind == 4:  # DRAW: uniform < density, compared in float32
                    drawn = draws[i][start:stop]
                    density = densities[i]
                    for j in range(size):
                        d[j] = d[j] * (one if drawn[j] < density else zero)
                elif kind == 5:  # WINDOW: among the `high` smallest, not the `low` smallest
                    low, high = thresholds[i], high_thresholds[i]
                    low_limit, high_limit = limits[i] - start, high_limits[i] - start
                    for j in range(size):
                        x = abs(d[j])
                        below_high = (x < high) | ((x == high) & (j < high_limit))
                        below_low = (x < low) | ((x == low) & (j < low_limit))
                        d[j] = d[j] * (one if below_high & ~below_low else zero)
                if has_scale[i]:
                    factor = scales[i]
                    for j in range(size):
                        d[j] = d[j] * factor
                weight = weights[i]
                for j in range(size):
                    d[j] = d[j] * weight
                # the sum of the weighted task vectors, in model order
                if i == 0:
                    for j in range(size):
                        merged[j] = d[j]
                else:
                    for j in range(size):
                        merged[j] = merged[j] + d[j]
            if sign_election:
                for j in range(size):
                    sign[j] = one if merged[j] >= zero else -one
                # agreeing magnitudes (delta * sign).clamp(min=0), which keeps -0 as -0, summed
                # in model order; the divisor adds weight * sign(agreeing) in model order:
                # agreeing >= 0, so that product is exact, and adding +0 is a no-op
                for j in range(size):
                    contributing[j] = zero
                for i in range(n):
                    d = scratch[i * chunk : i * chunk + size]
                    weight = weights[i]
                    for j in range(size):
                        a = d[j] * sign[j]
                        a = zero if a < zero else a
                        merged[j] = a if i == 0 else merged[j] + a
                        contributing[j] = contributing[j] + (weight if a > zero else zero)
                for j in range(size):
                    merged[j] = merged[j] * sign[j]
                if normalize:
                    for j in range(size):
                        c = contributing[j]
                        merged[j] = merged[j] / (c + one if c == zero else c)
            elif normalize:
                for j in range(size):
                    merged[j] = merged[j] / divisor
            if has_lam:
                for j in range(size):
                    merged[j] = merged[j] * lam
            for j in range(size):
                merged[j] = merged[j] + b[j]

    return {
        "magnitudes": magnitudes,
        "count_bracket": count_bracket,
        "collect_bracket": collect_bracket,
        "kth_smallest": kth_smallest,
        "tie_limit": tie_limit,
        "count_around": count_around,
        "block_ties": block_ties,
        "kept_magnitudes": kept_magnitudes,
        "drawn_magnitudes": drawn_magnitudes,
        "merge": merge,
    }


def available(tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> bool:
    """Whether the fused kernels can merge these tensors: numba installed, CPU, one float32 or
    float64 dtype, no autograd, not empty, and `MERGELAB_KERNELS` not set to `torch`."""
    if base is None or not tensors or os.environ.get("MERGELAB_KERNELS", "") == "torch":
        return False
    if base.device.type != "cpu" or base.dtype not in (torch.float32, torch.float64):
        return False
    if base.numel() == 0 or base.requires_grad:
        return False
    if any(
        t.device != base.device or t.dtype != base.dtype or t.requires_grad for t in tensors
    ):
        return False
    return _numba_kernels() is not None


def warm_up() -> None:
    """Import numba and load the compiled kernels (from numba's on-disk cache after the first
    run), so that the first merge does not wait for it; a no-op when numba is missing or the
    reference is forced. Safe to call from any thread, any number of times."""
    if os.environ.get("MERGELAB_KERNELS", "") == "torch":
        return
    kernels = _numba_kernels()
    if kernels is not None:
        tiny = np.zeros(1, dtype=np.float32)
        kernels["magnitudes"](tiny, tiny, tiny)  # the first call initialises numba's compiler


def _flat(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().reshape(-1).contiguous().numpy()


# --- keep rules -----------------------------------------------------------------------------------


def magnitude_rule(
    tensor: torch.Tensor, base: torch.Tensor, density: float, rescale: bool
) -> KeepRule:
    """The rule of `sparsify.magnitude_prune_` on tensor - base: the same entries kept (the
    top max(1, int(density * numel)) magnitudes, ties by lowest flat index), the same scale."""
    if density >= 1:
        return KeepRule(KEEP_ALL)
    numel = base.numel()
    if density <= 0:
        return KeepRule(ZERO)
    kernels = _numba_kernels()
    keep = max(1, int(density * numel))
    t, b = _flat(tensor), _flat(base)
    if keep >= numel:
        rule = KeepRule(CUT, threshold=-np.inf, tie_limit=0)
    else:
        k = numel - keep + 1  # the threshold is the k-th smallest magnitude
        rule = _cut(kernels, t, b, k, keep)
    if rescale:
        # the reference's magnitudes, summed by torch as the reference sums them
        kept = torch.empty(base.shape, dtype=base.dtype)
        threshold = b.dtype.type(rule.threshold)
        kernels["kept_magnitudes"](t, b, threshold, rule.tie_limit, kept.view(-1).numpy())
        rule.scale = l1_scale(torch.sub(tensor, base).abs_().sum(), kept.sum())
    return rule


def bracket_candidates(
    tensor: torch.Tensor, base: torch.Tensor, low: float, high: float
) -> tuple[int, torch.Tensor]:
    """For `sparsify.MagnitudeCutSearch.add`: how many magnitudes |tensor - base| lie below
    `low`, and those in [low, high] (float64, flat order), in two passes without a buffer."""
    kernels = _numba_kernels()
    t, b = _flat(tensor), _flat(base)
    low_value, high_value = b.dtype.type(low), b.dtype.type(high)
    below, inside = kernels["count_bracket"](t, b, low_value, high_value)
    values = np.empty(inside + 1, dtype=b.dtype)
    indices = np.empty(inside + 1, dtype=np.int64)
    kernels["collect_bracket"](t, b, low_value, high_value, values, indices)
    return int(below), torch.from_numpy(values[:inside]).double()


def random_l1_norms(
    tensor: torch.Tensor, base: torch.Tensor, density: float, generator: torch.Generator | None
) -> tuple[float, float]:
    """The L1 norms (float64 sums, as torch takes them) of tensor - base before and after
    `sparsify.random_prune_` (without rescale), drawing the same numbers from `generator`."""
    magnitudes = torch.empty(base.shape, dtype=base.dtype)
    kernels = _numba_kernels()
    kernels["magnitudes"](_flat(tensor), _flat(base), magnitudes.view(-1).numpy())
    before = float(magnitudes.sum(dtype=torch.float64))
    if density >= 1:
        return before, before
    if density <= 0:
        return before, 0.0
    rule = random_rule(tensor, base, density, False, generator)
    if rule.kind != DRAW:
        return before, float((magnitudes * rule.mask).sum(dtype=torch.float64))
    kept = torch.empty_like(magnitudes)
    kernels["drawn_magnitudes"](
        _flat(tensor), _flat(base), _flat(rule.draws), np.float32(density),
        magnitudes.view(-1).numpy(), kept.view(-1).numpy(),
    )
    return before, float(kept.sum(dtype=torch.float64))


def _cut(kernels, t: np.ndarray, b: np.ndarray, k: int, keep: int) -> KeepRule:
    """The CUT rule keeping the `keep` largest magnitudes |t - b| (k = numel - keep + 1)."""
    threshold, _less, greater, values, indices = _kth_smallest(kernels, t, b, k)
    limit = kernels["tie_limit"](values, indices, threshold, keep - greater)
    return KeepRule(CUT, threshold=float(threshold), tie_limit=int(limit))


def _smallest(kernels, t: np.ndarray, b: np.ndarray, count: int) -> tuple[float, int]:
    """`sparsify.smallest_mask(|t - b|, count)` as (threshold, tie limit): the entries below the
    threshold, and those equal to it at flat indices below the limit."""
    if count <= 0:
        return -np.inf, 0
    if count >= b.size:
        return np.inf, 0
    threshold, less, _greater, values, indices = _kth_smallest(kernels, t, b, count)
    return float(threshold), int(kernels["tie_limit"](values, indices, threshold, count - less))


def _kth_smallest(kernels, t: np.ndarray, b: np.ndarray, k: int):
    """The k-th smallest magnitude |t - b| (1-based), the numbers of magnitudes below and above
    it, and the candidates it was selected from with their flat indices (indices empty: the
    candidates are every magnitude, in flat order), for `tie_limit`. Inside a sampled bracket
    (one counting pass, one collecting pass) or, for small tensors and missed brackets, over
    every entry."""
    numel = b.size
    bounds = None
    if numel > 4 * (1 << 14):
        stride = (numel // (1 << 14)) | 1
        sample = np.sort(np.abs(t[::stride] - b[::stride]))
        bounds = bracket_bounds(sample, k, numel)
    if bounds is not None:
        low, high = (b.dtype.type(v) for v in bounds)
        below, inside = kernels["count_bracket"](t, b, low, high)
        if below < k <= below + inside:
            values = np.empty(inside + 1, dtype=b.dtype)
            indices = np.empty(inside + 1, dtype=np.int64)
            kernels["collect_bracket"](t, b, low, high, values, indices)
            values, indices = values[:inside], indices[:inside]
            threshold = kernels["kth_smallest"](values, k - below)
            less, greater = kernels["count_around"](values, threshold)
            return threshold, below + less, numel - below - inside + greater, values, indices
    magnitudes = np.empty(numel, dtype=b.dtype)
    kernels["magnitudes"](t, b, magnitudes)
    threshold = kernels["kth_smallest"](magnitudes, k)
    less, greater = kernels["count_around"](magnitudes, threshold)
    return threshold, less, greater, magnitudes, np.empty(0, dtype=np.int64)


def breadcrumbs_rule(
    tensor: torch.Tensor, base: torch.Tensor, density: float, gamma: float
) -> KeepRule:
    """The rule of `sparsify.breadcrumbs_prune_` (without rescale) on tensor - base: the
    entries whose stable ascending magnitude rank lies in [small, small + kept)."""
    if density >= 1:
        return KeepRule(KEEP_ALL)
    kernels = _numba_kernels()
    numel = base.numel()
    kept = int(density * numel)
    small = max(0, numel - kept - int(gamma * numel))
    t, b = _flat(tensor), _flat(base)
    high_threshold, high_limit = _smallest(kernels, t, b, small + kept)
    low_threshold, low_limit = _smallest(kernels, t, b, small) if small > 0 else (-np.inf, 0)
    return KeepRule(
        WINDOW, threshold=low_threshold, tie_limit=low_limit, high_threshold=high_threshold,
        high_limit=high_limit,
    )


def l1_scale(l1_before: torch.Tensor, l1_after: torch.Tensor) -> float | None:
    """`sparsify.rescale_l1_`'s factor from the L1 norms (0-d tensors) before and after pruning,
    or None where it leaves the tensor unscaled."""
    if l1_before < _RESCALE_EPS or l1_after < _RESCALE_EPS:
        return None
    return float(l1_before / l1_after)


def random_rule(
    tensor: torch.Tensor,
    base: torch.Tensor,
    density: float,
    rescale: bool,
    generator: torch.Generator | None,
) -> KeepRule:
    """The rule of `sparsify.random_prune_` on tensor - base: the same uniform draws from
    `generator` (one per entry, only when 0 < density < 1), the same entries kept and scale."""
    if density >= 1:
        return KeepRule(KEEP_ALL)
    if density <= 0:
        return KeepRule(ZERO)
    # The reference's call: draws in the default dtype (float32), compared with the density
    # in that dtype, whatever the merge dtype.
    draws = torch.rand(base.shape, generator=generator, device=base.device)
    if draws.dtype != torch.float32:
        delta = torch.sub(tensor, base)
        keep = draws < density
        scale = None
        if rescale:
            scale = l1_scale(delta.abs().sum(), delta.mul_(keep).abs_().sum())
        return mask_rule(keep, scale)
    rule = KeepRule(DRAW, threshold=density, draws=draws)
    if rescale:
        magnitudes = torch.empty(base.numel(), dtype=base.dtype)
        kept = torch.empty_like(magnitudes)
        _numba_kernels()["drawn_magnitudes"](
            _flat(tensor), _flat(base), _flat(draws), np.float32(density), magnitudes.numpy(),
            kept.numpy(),
        )
        rule.scale = l1_scale(magnitudes.sum(), kept.sum())
    return rule


def mask_rule(keep: torch.Tensor, scale: float | None) -> KeepRule:
    """The rule "delta * keep" (a bool tensor shaped like delta), then * `scale` if given."""
    return KeepRule(MASK, mask=keep, scale=scale)


def cut_block_rule(cut, tensor: torch.Tensor, base: torch.Tensor) -> KeepRule:
    """The rule of `sparsify.MagnitudeCut.apply_` on one block (spends its tie budget the same
    way: blocks must come in row order)."""
    if cut.keep_all_ties:
        limit = base.numel()
    elif cut.ties_to_keep > 0:
        limit, taken = _numba_kernels()["block_ties"](
            _flat(tensor), _flat(base), _flat(base).dtype.type(cut.threshold), cut.ties_to_keep
        )
        cut.ties_to_keep -= taken
    else:
        limit = 0
    return KeepRule(CUT, threshold=cut.threshold, tie_limit=int(limit), scale=cut.scale)


# --- the merge pass -------------------------------------------------------------------------------


def merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    rules: Sequence[KeepRule],
    weights: Sequence[float],
    *,
    sign_election: bool,
    normalize: bool,
    scale: float,
) -> torch.Tensor:
    """`task_arithmetic.combine_task_vectors` of the sparsified task vectors tensors[i] - base,
    in one pass: returns a new tensor shaped like `base`, equal to the reference bit for bit.

    weights: each model's `weight`; normalize: divide by the (contributing) weights; scale:
    `lambda`. Inputs are not modified.
    """
    kernels = _numba_kernels()
    dtype = base.dtype
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    arrays = tuple(_flat(tensor) for tensor in tensors)
    no_mask = np.empty(0, dtype=np.bool_)
    no_draws = np.empty(0, dtype=np.float32)
    masks = tuple(_flat(r.mask) if r.kind == MASK else no_mask for r in rules)
    draws = tuple(_flat(r.draws) if r.kind == DRAW else no_draws for r in rules)
    divisor = 1.0
    if normalize and not sign_election:
        # As the reference: summed as a tensor in the merge dtype, ~0 divides by 1.
        total = torch.tensor([float(w) for w in weights], dtype=dtype).sum()
        divisor = 1.0 if total.abs() < 1e-8 else total.item()
    out = torch.empty_like(base, memory_format=torch.contiguous_format)
    kernels["merge"](
        arrays,
        _flat(base),
        out.view(-1).numpy(),
        np.array([r.kind for r in rules], dtype=np.int64),
        np.array([r.threshold for r in rules], dtype=np_dtype),
        np.array([r.tie_limit for r in rules], dtype=np.int64),
        np.array([r.high_threshold for r in rules], dtype=np_dtype),
        np.array([r.high_limit for r in rules], dtype=np.int64),
        masks,
        draws,
        np.array([r.threshold if r.kind == DRAW else 0.0 for r in rules], dtype=np.float32),
        np.array([r.scale or 0.0 for r in rules], dtype=np_dtype),
        np.array([r.scale is not None for r in rules], dtype=np.bool_),
        np.array([float(w) for w in weights], dtype=np_dtype),
        np.array([0.0, 1.0], dtype=np_dtype),
        bool(sign_election),
        bool(normalize),
        np_dtype(divisor),
        np_dtype(scale),
        scale != 1,
    )
    return out
