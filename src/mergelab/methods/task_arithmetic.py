"""Generalised task arithmetic: task arithmetic, TIES, DARE, Model Breadcrumbs, DELLA, and SCE.

All of them (as in mergekit 0.1.5, whose names, parameters, defaults and numbers we keep) are one
recipe, configured differently:

1. task vectors: delta_i = model_i - base                                  (`task_vectors`)
2. sparsify each delta_i with its own `density` (and `gamma` / `epsilon`); with `rescale`,
   restore its L1 norm                                                      (sparsify.py)
3. weight: delta_i *= weight_i
4. TIES-style methods elect a sign per entry from the sum of weighted deltas (`elect_sign`)
   and keep only the deltas that agree with it                              (`agreement_mask`)
5. add up the (kept) weighted deltas; with `normalize`, divide by the sum of the weights of
   the models that contributed to each entry (`disjoint_sum`, `contributing_weight`)
6. scale by `lambda` and add to the base.

| method           | sparsify            | sign election | normalize | rescale |
|------------------|---------------------|---------------|-----------|---------|
| task_arithmetic  | -                   | -             | false     | false   |
| ties             | magnitude (top-k)   | sum           | true      | false   |
| dare_ties        | random (Bernoulli)  | sum           | false     | true    |
| dare_linear      | random (Bernoulli)  | -             | false     | true    |
| breadcrumbs      | magnitude outliers  | -             | false     | false   |
| breadcrumbs_ties | magnitude outliers  | sum           | false     | false   |
| della            | DELLA MagPrune      | sum           | true      | true    |
| della_linear     | DELLA MagPrune      | -             | false     | true    |

`sce` (FuseChat) replaces steps 3 and 5 by weights computed from the task vectors themselves.

Conventions and deliberate choices:
- The base model is required. If it is also listed under `models`, the engine removes it from
  the sources (its delta is zero) and its per-model parameters are ignored, as in mergekit.
  With no other source a tensor merges to the base.
- `int8_mask` is accepted for compatibility; in mergekit it only stores the sign mask as int8 to
  save memory. Our masks are boolean (1 byte) already, so it changes nothing.
- Tensors whose shape differs from the base's are an error (the engine reports them before
  merging; the kernels re-check). mergekit 0.1.5 also raises a size-mismatch error; resized
  embeddings must be aligned first (e.g. `tokenizer: {source: base}`).
- Ties at a magnitude threshold are broken by flat index (see sparsify.py). Random masks come
  from `TensorMerge.generator` only, so a seed reproduces them; mergekit draws from torch's
  global RNG, so random methods cannot reproduce mergekit's exact masks, only their statistics.
- The sign election is mergekit's "sum" consensus for every method (TIES paper); the "count"
  variant is available as a function but, as in mergekit, not as a config parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from mergelab.errors import ConfigError, MergeError
from mergelab.methods import fused
from mergelab.methods.fused import KeepRule
from mergelab.methods.registry import (
    BlockAccess,
    Blockwise,
    MergeMethod,
    Param,
    ParamValue,
    TensorMerge,
    register,
)
from mergelab.methods.sparsify import (
    _RESCALE_EPS,
    MagnitudeCut,
    MagnitudeCutSearch,
    breadcrumbs_prune_,
    della_params_problem,
    della_prune_,
    largest_mask,
    magnitude_prune_,
    random_prune_,
)

# mergekit treats a total weight below this as zero when normalising a merge without sign election.
_ZERO_WEIGHT_SUM = 1e-8
# SCE: model weights summing below this fall back to uniform; erased-weight sums are clamped to it.
_SCE_EPS = 1e-6


# --- pure steps ---------------------------------------------------------------------------------


def task_vectors(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    name: str = "",
    in_place: bool = False,
) -> list[torch.Tensor]:
    """The task vectors tensors[i] - base, one new tensor per model (or, with `in_place`, the
    given tensors overwritten: see `TensorMerge.writable`).

    Task arithmetic (Ilharco et al., 2023, https://arxiv.org/abs/2212.04089): "a task vector
    ... subtracting the weights of a pre-trained model from the weights of the same model after
    fine-tuning". Later steps modify the result in place; unless `in_place`, the inputs are
    never written to. Raises MergeError when a shape differs from the base's.
    """
    check_shapes(tensors, base, name)
    # One buffer per model, not one (N, ...) stack: buffers of a single tensor's size are
    # reused by the allocator from merge to merge, while a stack of several would be fresh
    # memory (page faults) every time. Every function below takes either form.
    if in_place:
        return [tensor.sub_(base) for tensor in tensors]
    return [torch.sub(tensor, base) for tensor in tensors]


def check_shapes(tensors: Sequence[torch.Tensor], base: torch.Tensor, name: str = "") -> None:
    """Raises MergeError when a tensor's shape differs from the base's (task vectors need equal
    shapes)."""
    for index, tensor in enumerate(tensors):
        if tensor.shape != base.shape:
            raise MergeError(
                f"tensor {name!r}: source {index} has shape {tuple(tensor.shape)} but the base "
                f"has {tuple(base.shape)}; task vectors need equal shapes (align resized "
                "embeddings before merging)"
            )


def _sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    total = tensors[0].clone()
    for tensor in tensors[1:]:
        total.add_(tensor)
    return total


def elect_sign(
    weighted_deltas: Sequence[torch.Tensor], consensus: Literal["sum", "count"] = "sum"
) -> torch.Tensor:
    """Per-entry majority sign (+1 or -1, never 0) over the leading model axis.

    TIES-Merging (https://arxiv.org/abs/2306.01708), section 3, "elect": "the sign with the
    highest total magnitude" ("sum": sign of the sum of the weighted deltas) or, for "count",
    the sign held by more models. A tie (sum exactly 0) elects +1, as in mergekit.
    """
    if consensus == "sum":
        total = _sum(weighted_deltas)
    elif consensus == "count":
        total = _sum([d.sign() for d in weighted_deltas])
    else:
        raise ValueError(f"`consensus` must be 'sum' or 'count'; got {consensus!r}")
    return (total >= 0).to(total.dtype).mul_(2).sub_(1)


def agreeing_magnitudes_(
    weighted_deltas: Sequence[torch.Tensor], sign: torch.Tensor
) -> Sequence[torch.Tensor]:
    """In place: |delta| where a delta has the elected `sign`, 0 elsewhere (the TIES mask).

    Zero entries (pruned, or weight 0) never agree, so they do not count in the normalisation.
    Keeping magnitudes instead of a separate boolean mask saves a pass and N x numel bytes;
    `agreement_mask` is the same information as booleans.
    """
    for delta in weighted_deltas:
        delta.mul_(sign).clamp_(min=0)
    return weighted_deltas


def agreement_mask(weighted_deltas: Sequence[torch.Tensor], sign: torch.Tensor) -> torch.Tensor:
    """Boolean (N, *shape) mask of the entries whose sign equals the elected `sign` (not 0)."""
    return torch.stack([(delta * sign) > 0 for delta in weighted_deltas])


def disjoint_sum(agreeing: Sequence[torch.Tensor], sign: torch.Tensor) -> torch.Tensor:
    """TIES "disjoint merge" numerator: the sum over models of the agreeing weighted deltas.

    `agreeing` is the output of `agreeing_magnitudes_`; the result has the elected sign.
    """
    return _sum(agreeing).mul_(sign)


def contributing_weight(
    weights: Sequence[float], agreeing: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Per-entry sum of the weights of the models that contribute (agreeing entry, nonzero).

    `agreeing` holds non-negative magnitudes (`agreeing_magnitudes_`), so sign() is its 0/1 mask.
    """
    total = torch.zeros_like(agreeing[0])
    for weight, row in zip(weights, agreeing):
        total.add_(torch.sign(row), alpha=weight)  # 0/1 here; faster than a bool mask
    return total


def sce_selection_mask(task_vectors: torch.Tensor, select_topk: float) -> torch.Tensor:
    """SCE "select": keep the entries where the task vectors vary most across models.

    FuseChat (Wan et al., 2024, https://arxiv.org/abs/2408.07990), section 3: select the
    `select_topk` fraction of entries with the largest variance over models. The fraction is of
    the entries with nonzero variance (mergekit). Returns a boolean mask shaped like one task
    vector; ties are broken by flat index.
    """
    shape = task_vectors.shape[1:]
    if select_topk <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=task_vectors.device)
    if select_topk >= 1:
        return torch.ones(shape, dtype=torch.bool, device=task_vectors.device)
    variance = torch.var(task_vectors, dim=0, correction=0)
    # mergekit multiplies the count as a tensor (float32 arithmetic); kept for identical counts.
    count = int(torch.count_nonzero(variance) * select_topk)
    return largest_mask(variance, count)


def sce_model_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """SCE "calculate": one weight per model, proportional to the mean square of its task vector.

    Weights sum to 1; when all task vectors are (nearly) zero they are uniform.
    """
    energy = torch.stack([row.square().mean() for row in task_vectors])
    total = energy.sum().item()
    if abs(total) < _SCE_EPS:
        return torch.full_like(energy, 1 / energy.numel())
    return energy / total


# --- kernels ------------------------------------------------------------------------------------

# Prunes one task vector in place, given its per-model params, `rescale` and the generator.
Pruner = Callable[[torch.Tensor, Mapping[str, ParamValue], bool, torch.Generator | None], None]
_Params = Mapping[str, ParamValue]
# The same decision for the fused kernels: (model tensor, base, params, rescale, generator) ->
# the rule that keeps exactly the entries the pruner keeps (drawing the same random numbers).
RuleMaker = Callable[
    [torch.Tensor, torch.Tensor, Mapping[str, ParamValue], bool, torch.Generator | None],
    KeepRule,
]


@dataclass(frozen=True)
class Sparsifier:
    """Step 2 of the module docstring in its two forms: the torch reference `prune` (in place
    on a task vector) and `keep_rule` for the fused kernels (mergelab.methods.fused)."""

    prune: Pruner
    keep_rule: RuleMaker


def _prune_magnitude(
    delta: torch.Tensor, params: _Params, rescale: bool, generator: torch.Generator | None
) -> None:
    magnitude_prune_(delta, float(params["density"]), rescale)


def _prune_random(
    delta: torch.Tensor, params: _Params, rescale: bool, generator: torch.Generator | None
) -> None:
    random_prune_(delta, float(params["density"]), rescale, generator)


def _prune_breadcrumbs(
    delta: torch.Tensor, params: _Params, rescale: bool, generator: torch.Generator | None
) -> None:
    breadcrumbs_prune_(delta, float(params["density"]), float(params["gamma"]), rescale)


def _prune_della(
    delta: torch.Tensor, params: _Params, rescale: bool, generator: torch.Generator | None
) -> None:
    problem = della_params_problem(float(params["density"]), float(params["epsilon"]))
    if problem:
        # The planner should have rejected this already (see `check_model_params`).
        raise ConfigError(problem)
    della_prune_(delta, float(params["density"]), float(params["epsilon"]), rescale, generator)


def _magnitude_rule(
    tensor: torch.Tensor, base: torch.Tensor, params: _Params, rescale: bool,
    generator: torch.Generator | None,
) -> KeepRule:
    return fused.magnitude_rule(tensor, base, float(params["density"]), rescale)


def _random_rule(
    tensor: torch.Tensor, base: torch.Tensor, params: _Params, rescale: bool,
    generator: torch.Generator | None,
) -> KeepRule:
    return fused.random_rule(tensor, base, float(params["density"]), rescale, generator)


def _masked_rule(prune: Pruner, zeroes_at_density_zero: bool) -> RuleMaker:
    """The rule of a pruner whose decision is a torch mask over ranks (breadcrumbs, DELLA): the
    reference prunes the task vector, what it kept becomes the mask. An entry it kept that is
    0 makes no difference: 0 * 1 and 0 * 0 are the same (signed) zero."""

    def rule(
        tensor: torch.Tensor, base: torch.Tensor, params: _Params, rescale: bool,
        generator: torch.Generator | None,
    ) -> KeepRule:
        density = float(params["density"])
        if density >= 1:
            return KeepRule(fused.KEEP_ALL)
        if density <= 0 and zeroes_at_density_zero:
            return KeepRule(fused.ZERO)  # the pruner zero_()es the vector (+0, no signed zeros)
        delta = torch.sub(tensor, base)
        l1_before = delta.abs().sum() if rescale else None
        prune(delta, params, False, generator)
        scale = None if l1_before is None else fused.l1_scale(l1_before, delta.abs().sum())
        return fused.mask_rule(delta != 0, scale)

    return rule


MAGNITUDE = Sparsifier(_prune_magnitude, _magnitude_rule)
RANDOM = Sparsifier(_prune_random, _random_rule)
def _breadcrumbs_rule(
    tensor: torch.Tensor, base: torch.Tensor, params: _Params, rescale: bool,
    generator: torch.Generator | None,
) -> KeepRule:
    if rescale:  # the L1 sums need the pruned values: the reference prunes, its mask is used
        return _masked_rule(_prune_breadcrumbs, False)(tensor, base, params, rescale, generator)
    return fused.breadcrumbs_rule(tensor, base, float(params["density"]), float(params["gamma"]))


BREADCRUMBS = Sparsifier(_prune_breadcrumbs, _breadcrumbs_rule)
DELLA = Sparsifier(_prune_della, _masked_rule(_prune_della, True))


def _base_of(m: TensorMerge) -> torch.Tensor:
    if m.base is None:
        raise MergeError(f"tensor {m.name!r}: this method needs a base model tensor")
    return m.base


def _generator_of(m: TensorMerge, randomized: bool) -> torch.Generator | None:
    if randomized and m.generator is None:
        # Never fall back to the global RNG: results must be reproducible from the seed.
        raise MergeError(f"tensor {m.name!r}: a random merge needs TensorMerge.generator")
    return m.generator


def generalized_task_arithmetic(
    m: TensorMerge,
    sparsifier: Sparsifier | None,
    sign_election: bool,
    randomized: bool = False,
    fused_kernels: bool | None = None,
) -> torch.Tensor:
    """Merge one tensor by steps 1-6 of the module docstring.

    Global params: `normalize`, `rescale`, `lambda` (and `int8_mask`, which changes nothing).
    Per-model params: `weight` and the sparsifier's (`density`, `gamma`, `epsilon`).
    `fused_kernels`: None uses the fused kernels (mergelab.methods.fused) wherever they apply
    (CPU float32/float64 with numba installed), False the torch reference; both give the same
    bits.
    """
    base = _base_of(m)
    if not m.tensors:
        return base.clone()
    generator = _generator_of(m, randomized)
    check_shapes(m.tensors, base, m.name)
    if fused_kernels is not False and fused.available(m.tensors, base):
        return _fused_merge(m, base, sparsifier, sign_election, generator)
    deltas = task_vectors(m.tensors, base, m.name, in_place=m.writable)
    if sparsifier is not None:
        rescale = bool(m.params["rescale"])
        for delta, params in zip(deltas, m.model_params):
            sparsifier.prune(delta, params, rescale, generator)

    return combine_task_vectors(deltas, base, m, sign_election)


def _fused_merge(
    m: TensorMerge,
    base: torch.Tensor,
    sparsifier: Sparsifier | None,
    sign_election: bool,
    generator: torch.Generator | None,
    rules: Sequence[KeepRule] | None = None,
) -> torch.Tensor:
    """Steps 1-6 in the fused kernels: each model's keep rule (in model order, so random draws
    come in the reference's order), then one pass merging every entry."""
    if rules is None:
        if sparsifier is None:
            rules = [KeepRule(fused.KEEP_ALL)] * len(m.tensors)
        else:
            rescale = bool(m.params["rescale"])
            rules = [
                sparsifier.keep_rule(tensor, base, params, rescale, generator)
                for tensor, params in zip(m.tensors, m.model_params)
            ]
    return fused.merge(
        m.tensors, base, rules, [float(w) for w in m.per_model("weight")],
        sign_election=sign_election, normalize=bool(m.params["normalize"]),
        scale=float(m.params["lambda"]),
    )


def combine_task_vectors(
    deltas: Sequence[torch.Tensor], base: torch.Tensor, m: TensorMerge, sign_election: bool
) -> torch.Tensor:
    """Steps 3-6 of the module docstring on already sparsified task vectors (consumed).

    Entry-wise, so it serves both the whole-tensor kernel and blocks of rows.
    """
    weights = [float(w) for w in m.per_model("weight")]
    for delta, weight in zip(deltas, weights):
        delta.mul_(weight)

    if sign_election:
        sign = elect_sign(deltas, "sum")
        agreeing = agreeing_magnitudes_(deltas, sign)
        merged = disjoint_sum(agreeing, sign)
        if m.params["normalize"]:
            divisor = contributing_weight(weights, agreeing)
            # Entries no model contributes to are 0 already; dividing them by 1 keeps them 0.
            # (add_ of the mask: several times faster than masked_fill_ on the CPU)
            divisor.add_(divisor == 0)
            merged.div_(divisor)
    else:
        merged = _sum(deltas)
        if m.params["normalize"]:
            # Summed as a tensor in the merge dtype, as mergekit does, for identical rounding.
            total = torch.tensor(weights, dtype=merged.dtype).sum()
            merged.div_(1.0 if total.abs() < _ZERO_WEIGHT_SUM else total.item())
    del deltas

    scale = float(m.params["lambda"])
    if scale != 1:
        merged.mul_(scale)
    return merged.add_(base)


# --- blockwise forms (large tensors, bounded memory; see mergelab.engine.blocks) -----------------

# Elements of the sample that brackets each task vector's magnitude threshold.
_SAMPLE_ELEMENTS = 1 << 16


def _sample_rows(access: BlockAccess) -> list[int]:
    rows = access.shape[0]
    per_row = max(1, access.numel // rows)
    count = min(rows, max(1, _SAMPLE_ELEMENTS // per_row))
    # Evenly spread rows (e.g. embedding rows of frequent and rare tokens alike).
    return sorted({int(i * rows / count) for i in range(count)})


def _magnitude_prepare(access: BlockAccess) -> list[MagnitudeCut | None]:
    """Find each task vector's TIES cut over the whole tensor: a sample, then 1+ passes."""
    meta = access.meta
    rescale = bool(meta.params["rescale"])
    densities = [float(p["density"]) for p in meta.model_params]
    cuts: list[MagnitudeCut | None] = [None] * len(densities)
    searches: dict[int, MagnitudeCutSearch] = {}
    sample = access.rows(_sample_rows(access))
    base = _base_of(sample)
    zero_in_sample = []
    for i, (density, tensor) in enumerate(zip(densities, sample.tensors)):
        if density >= 1:
            continue  # magnitude_prune_ keeps everything, unscaled
        if density <= 0:
            cuts[i] = MagnitudeCut(math.inf, 0, False)
            continue
        delta = (tensor - base).abs_()
        if not bool(delta.any()):
            zero_in_sample.append(i)
        searches[i] = MagnitudeCutSearch(delta, access.numel, density, rescale)
    for i in _zero_task_vectors(access, zero_in_sample):
        # A task vector that is exactly zero (a frozen table) keeps zeros whatever its cut: it
        # adds nothing and elects no sign, so keeping none of it merges the same bits, without
        # a search whose bracket can never split equal magnitudes.
        cuts[i] = MagnitudeCut(math.inf, 0, False)
        del searches[i]
    while searches:
        for block in access.blocks():
            block_base = _base_of(block)
            for i, search in searches.items():
                tensor = block.tensors[i]
                if not rescale and fused.available([tensor], block_base):
                    search.add(*fused.bracket_candidates(tensor, block_base, search.low, search.high))
                else:
                    search.observe((tensor - block_base).abs_())
        for i in list(searches):
            cut = searches[i].result()
            if cut is None:
                searches[i].widen()
            else:
                cuts[i] = cut
                del searches[i]
    return cuts


def _zero_task_vectors(access: BlockAccess, candidates: list[int]) -> list[int]:
    """Which of `candidates` (sources whose sampled task vector is zero) equal the base in
    every block: one pass, only when the sample suggested it."""
    zero = set(candidates)
    if not zero:
        return []
    for block in access.blocks():
        block_base = _base_of(block)
        for i in list(zero):
            if not _same_bits(block.tensors[i], block_base):
                zero.discard(i)
        if not zero:
            break
    return sorted(zero)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal (so -0.0 and +0.0 differ): then a - b is +0.0 everywhere."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def _random_prepare(access: BlockAccess) -> list[float | None]:
    """DARE's L1 rescale factors over the whole tensor (a pass drawing each block's masks)."""
    meta = access.meta
    if not meta.params["rescale"]:
        return [None] * len(meta.model_params)
    n = len(meta.model_params)
    before, after = [0.0] * n, [0.0] * n
    for block in access.blocks():
        base = _base_of(block)
        if fused.available(block.tensors, base):
            for i, (tensor, params) in enumerate(zip(block.tensors, block.model_params)):
                l1_before, l1_after = fused.random_l1_norms(
                    tensor, base, float(params["density"]), block.generator
                )
                before[i] += l1_before
                after[i] += l1_after
            continue
        deltas = task_vectors(block.tensors, base, block.name)
        for i, (delta, params) in enumerate(zip(deltas, block.model_params)):
            before[i] += float(delta.abs().sum(dtype=torch.float64))
            random_prune_(delta, float(params["density"]), False, block.generator)
            after[i] += float(delta.abs().sum(dtype=torch.float64))
    return [
        b / a if b >= _RESCALE_EPS and a >= _RESCALE_EPS else None
        for b, a in zip(before, after)
    ]


def _blockwise_apply(pruning: str, sign_election: bool):
    def apply(block: TensorMerge, state) -> torch.Tensor:
        base = _base_of(block)
        if not block.tensors:
            return base.clone()
        if fused.available(block.tensors, base):
            rules = [
                _block_rule(
                    pruning, tensor, base, params, block.generator,
                    None if state is None else state[i],
                )
                for i, (tensor, params) in enumerate(zip(block.tensors, block.model_params))
            ]
            return _fused_merge(block, base, None, sign_election, None, rules)
        deltas = task_vectors(block.tensors, base, block.name, in_place=block.writable)
        for i, (delta, params) in enumerate(zip(deltas, block.model_params)):
            if pruning == "magnitude" and state[i] is not None:
                state[i].apply_(delta)
            elif pruning == "random":
                random_prune_(delta, float(params["density"]), False, block.generator)
                if state[i] is not None and float(params["density"]) < 1:
                    delta.mul_(state[i])
        return combine_task_vectors(deltas, base, block, sign_election)

    return apply


def _block_rule(
    pruning: str,
    tensor: torch.Tensor,
    base: torch.Tensor,
    params: _Params,
    generator: torch.Generator | None,
    state: MagnitudeCut | float | None,
) -> KeepRule:
    """The fused form of one model's step in `_blockwise_apply`'s reference loop."""
    if pruning == "magnitude" and state is not None:
        return fused.cut_block_rule(state, tensor, base)
    if pruning == "random":
        density = float(params["density"])
        rule = fused.random_rule(tensor, base, density, False, generator)
        if state is not None and density < 1:
            rule.scale = state
        return rule
    return KeepRule(fused.KEEP_ALL)


def _blockwise(pruning: str | None, sign_election: bool) -> Blockwise | None:
    if pruning is None:
        return Blockwise(apply=_blockwise_apply("none", sign_election))
    if pruning == "magnitude":
        return Blockwise(apply=_blockwise_apply("magnitude", sign_election), prepare=_magnitude_prepare)
    if pruning == "random":
        return Blockwise(apply=_blockwise_apply("random", sign_election), prepare=_random_prepare)
    return None  # breadcrumbs, DELLA: merged whole


def sce(m: TensorMerge) -> torch.Tensor:
    """SCE merge (select, calculate, erase) of FuseChat (https://arxiv.org/abs/2408.07990).

    Task vectors are masked to the `select_topk` fraction of entries of highest variance across
    models, weighted by their mean square (normalised to sum 1), and merged TIES-style: entries
    disagreeing with the elected sign are erased and the rest averaged with those weights.
    """
    base = _base_of(m)
    if not m.tensors:
        return base.clone()
    deltas = torch.stack(task_vectors(m.tensors, base, m.name))
    select_topk = float(m.params["select_topk"])
    if select_topk < 1:
        deltas.mul_(sce_selection_mask(deltas, select_topk))

    weights = sce_model_weights(deltas)
    sign = elect_sign(deltas, "sum")
    agreeing = agreeing_magnitudes_(deltas, sign)
    # "erase": entries against the elected sign get weight 0, the rest their model's weight.
    denominator = contributing_weight(weights.tolist(), agreeing).clamp_(min=_SCE_EPS)
    merged = disjoint_sum(agreeing.mul_(weights.view(-1, *([1] * base.ndim))), sign)
    return merged.div_(denominator).add_(base)


# --- declarations -------------------------------------------------------------------------------

_WEIGHT = Param(
    "weight",
    float,
    None,
    "Scale of this model's task vector (required, any sign).",
    per_model=True,
)
_DENSITY = Param(
    "density",
    float,
    1.0,
    "Fraction of this model's task vector to keep when sparsifying (1 keeps all; 0, which "
    "keeps nothing, is refused).",
    per_model=True,
    low=0.0,
    high=1.0,
    low_exclusive=True,
)
_GAMMA = Param(
    "gamma",
    float,
    0.01,
    "Fraction of the largest-magnitude entries removed as outliers (Model Breadcrumbs).",
    per_model=True,
    low=0.0,
    high=1.0,
)
_EPSILON = Param(
    "epsilon",
    float,
    0.15,
    "Half-width of DELLA's keep probabilities, density +/- epsilon; both ends must lie in (0, 1).",
    per_model=True,
    low=0.0,
    high=1.0,
)
_INT8_MASK = Param(
    "int8_mask",
    bool,
    False,
    "Accepted for mergekit compatibility; saves memory there and has no effect here.",
)
_LAMBDA = Param(
    "lambda", float, 1.0, "Scale of the merged task vector before adding it to the base."
)


def _normalize(default: bool) -> Param:
    return Param(
        "normalize",
        bool,
        default,
        "Divide the summed task vectors by the sum of the (contributing) models' weights.",
    )


def _rescale(default: bool) -> Param:
    return Param(
        "rescale",
        bool,
        default,
        "After sparsifying, rescale each task vector to its original L1 norm.",
    )


def check_model_params(params: Mapping[str, ParamValue]) -> str | None:
    """Cross-parameter problem in one model's resolved params (DELLA's density/epsilon), or None.

    Single-parameter ranges are in each Param; this covers the one constraint between two.
    """
    if "epsilon" in params and "density" in params:
        return della_params_problem(float(params["density"]), float(params["epsilon"]))
    return None


def _declare(
    name: str,
    title: str,
    paper: str,
    url: str,
    sparsifier: Sparsifier | None,
    sign_election: bool,
    normalize: bool,
    rescale: bool,
    extra: tuple[Param, ...] = (),
    randomized: bool = False,
) -> MergeMethod:
    # Only DELLA has a constraint between two parameters (density and epsilon).
    check = check_model_params if _EPSILON in extra else None

    def kernel(m: TensorMerge) -> torch.Tensor:
        return generalized_task_arithmetic(m, sparsifier, sign_election, randomized)

    kernel.__name__ = f"{name}_kernel"
    kernel.__doc__ = f"{title} kernel: generalized_task_arithmetic configured for `{name}`."
    return register(
        MergeMethod(
            name=name,
            mergekit=True,
            title=title,
            paper=paper,
            url=url,
            kernel=kernel,
            params=(
                _WEIGHT,
                _DENSITY,
                *extra,
                _INT8_MASK,
                _normalize(normalize),
                _rescale(rescale),
                _LAMBDA,
            ),
            base="required",
            min_models=0,
            randomized=randomized,
            check_model_params=check,
            blockwise=_BLOCKWISE_BY_SPARSIFIER.get(sparsifier, lambda _: None)(sign_election),
            warm_up=fused.warm_up,
        )
    )


_BLOCKWISE_BY_SPARSIFIER: dict[Sparsifier | None, Callable[[bool], Blockwise | None]] = {
    None: lambda sign_election: _blockwise(None, sign_election),
    MAGNITUDE: lambda sign_election: _blockwise("magnitude", sign_election),
    RANDOM: lambda sign_election: _blockwise("random", sign_election),
}


_TASK_ARITHMETIC = "Editing Models with Task Arithmetic (Ilharco et al., 2023)"
_TIES = "TIES-Merging: Resolving Interference When Merging Models (Yadav et al., 2023)"
_DARE = (
    "Language Models are Super Mario: Absorbing Abilities from Homologous Models (Yu et al., 2024)"
)
_BREADCRUMBS = "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (Davari & Belilovsky, 2023)"
_DELLA = "DELLA-Merging: Reducing Interference in Model Merging through Magnitude-Based Sampling (Deep et al., 2024)"

_declare(
    "task_arithmetic", "Task Arithmetic", _TASK_ARITHMETIC, "https://arxiv.org/abs/2212.04089",
    None, sign_election=False, normalize=False, rescale=False,
)  # fmt: skip
_declare(
    "ties", "TIES", _TIES, "https://arxiv.org/abs/2306.01708",
    MAGNITUDE, sign_election=True, normalize=True, rescale=False,
)  # fmt: skip
_declare(
    "dare_ties", "DARE TIES", _DARE, "https://arxiv.org/abs/2311.03099",
    RANDOM, sign_election=True, normalize=False, rescale=True, randomized=True,
)  # fmt: skip
_declare(
    "dare_linear", "Linear DARE", _DARE, "https://arxiv.org/abs/2311.03099",
    RANDOM, sign_election=False, normalize=False, rescale=True, randomized=True,
)  # fmt: skip
_declare(
    "breadcrumbs", "Model Breadcrumbs", _BREADCRUMBS, "https://arxiv.org/abs/2312.06795",
    BREADCRUMBS, sign_election=False, normalize=False, rescale=False, extra=(_GAMMA,),
)  # fmt: skip
_declare(
    "breadcrumbs_ties", "Model Breadcrumbs with TIES", _BREADCRUMBS,
    "https://arxiv.org/abs/2312.06795",
    BREADCRUMBS, sign_election=True, normalize=False, rescale=False, extra=(_GAMMA,),
)  # fmt: skip
_declare(
    "della", "DELLA", _DELLA, "https://arxiv.org/abs/2406.11617",
    DELLA, sign_election=True, normalize=True, rescale=True, extra=(_EPSILON,),
    randomized=True,
)  # fmt: skip
_declare(
    "della_linear", "Linear DELLA", _DELLA, "https://arxiv.org/abs/2406.11617",
    DELLA, sign_election=False, normalize=False, rescale=True, extra=(_EPSILON,),
    randomized=True,
)  # fmt: skip

register(
    MergeMethod(
        name="sce",
        mergekit=True,
        title="SCE (select, calculate, erase)",
        paper="FuseChat: Knowledge Fusion of Chat Models (Wan et al., 2024)",
        url="https://arxiv.org/abs/2408.07990",
        kernel=sce,
        params=(
            Param(
                "select_topk",
                float,
                1.0,
                "Fraction of entries (of those varying across models) to keep, by variance.",
                low=0.0,
                high=1.0,
            ),
            _INT8_MASK,
        ),
        base="required",
        min_models=0,
    )
)
