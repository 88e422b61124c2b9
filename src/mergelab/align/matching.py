"""Permutation alignment: weight matching and activation matching (Ainsworth et al., "Git
Re-Basin: Merging Models modulo Permutation Symmetries", ICLR 2023, arXiv:2209.04836).

Both return, per space, a permutation `perm` such that `permute_state_dict(spec, other, perms)`
puts the other model's units in the reference model's order; the aligned state dicts can then be
merged by any core method (`mergelab.merge_state_dicts`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from mergelab.align.features import collect_moments
from mergelab.align.spec import (
    AlignError,
    PermutationSpec,
    _index_axis,
    check_same_shapes,
    invert,
    permute_state_dict,
)

Perms = dict[str, torch.Tensor]


def solve_assignment(similarity: torch.Tensor, head_size: int | None = None) -> torch.Tensor:
    """The permutation p maximising sum_i similarity[i, p[i]] (scipy's linear_sum_assignment).

    With head_size, units only move within consecutive blocks of that size.
    """
    # scipy.optimize costs ~0.9 s to import; every CLI command would pay it through
    # mergelab.training, so it is loaded only when an assignment is solved.
    from scipy.optimize import linear_sum_assignment

    sim = similarity.detach().to(torch.float64).cpu().numpy()
    if not np.isfinite(sim).all():
        raise AlignError("similarity matrix has non-finite entries (NaN or inf in the weights?)")
    n = sim.shape[0]
    block = head_size or n
    perm = np.empty(n, dtype=np.int64)
    for start in range(0, n, block):
        rows, cols = linear_sum_assignment(sim[start : start + block, start : start + block],
                                           maximize=True)  # fmt: skip
        perm[start + rows] = start + cols
    return torch.from_numpy(perm)


def _segment(tensor: torch.Tensor, axis: int, offset: int, size: int) -> torch.Tensor:
    """The entries of one space along `axis`, moved to the front and flattened: (size, -1)."""
    return tensor.narrow(axis, offset, size).movedim(axis, 0).reshape(size, -1)


def _permute_except(
    spec: PermutationSpec, name: str, value: torch.Tensor, perms: Perms, skip: str
) -> torch.Tensor:
    for axis, segments in enumerate(spec.axes[name]):
        offset = 0
        for seg in segments:
            if seg.space is not None and seg.space != skip and seg.space in perms:
                value = _index_axis(value, axis, offset, perms[seg.space])
            offset += seg.length
    return value


def weight_matching(
    spec: PermutationSpec,
    reference: Mapping[str, torch.Tensor],
    other: Mapping[str, torch.Tensor],
    *,
    max_iter: int = 100,
    generator: torch.Generator | None = None,
) -> Perms:
    """Git Re-Basin weight matching (Ainsworth et al. 2023, Algorithm 1).

    Coordinate descent: for one space at a time, with the other spaces' permutations fixed,
    maximise sum over tensors of <W_ref, P W_other> by a linear assignment; repeat over the
    spaces in random order until no permutation changes. Starts from the identity.
    generator: shuffles the order of spaces in each sweep (as in the paper); None: spec order.
    """
    check_same_shapes([reference, other])
    spec.check(reference, "reference model")
    sizes = {name: space.size for name, space in spec.spaces.items()}
    perms: Perms = {name: torch.arange(n) for name, n in sizes.items()}
    occurrences = {name: spec.occurrences(name) for name in sizes}
    names = list(sizes)
    ref = {k: v.detach().to(torch.float64) for k, v in reference.items() if k in spec.axes}
    oth = {k: v.detach().to(torch.float64) for k, v in other.items() if k in spec.axes}
    for _ in range(max_iter):
        changed = False
        # Without a generator the spaces go in spec order: never the global RNG.
        order = (
            torch.randperm(len(names), generator=generator).tolist()
            if generator is not None
            else list(range(len(names)))
        )
        for index in order:
            name = names[index]
            n = sizes[name]
            sim = torch.zeros(n, n, dtype=torch.float64)
            for tensor, axis, offset, _role in occurrences[name]:
                a = _segment(ref[tensor], axis, offset, n)
                b = _segment(_permute_except(spec, tensor, oth[tensor], perms, name), axis,
                             offset, n)  # fmt: skip
                sim += a @ b.T
            new = solve_assignment(sim, spec.spaces[name].head_size)
            old_score = sim[torch.arange(n), perms[name]].sum()
            new_score = sim[torch.arange(n), new].sum()
            # A strict improvement (beyond rounding) is required to move, so the loop ends.
            if new_score > old_score + 1e-12 * max(1.0, abs(float(old_score))):
                perms[name] = new
                changed = True
        if not changed:
            break
    return perms


def activation_matching(
    spec: PermutationSpec,
    reference: nn.Module,
    other: nn.Module,
    batches: Iterable,
    *,
    num_batches: int | None = None,
) -> Perms:
    """Git Re-Basin activation matching (Ainsworth et al. 2023, Sec. 3.1).

    For each space, the cross-correlation of the two models' unit activations on the same data
    (at the space's probes) is maximised by a linear assignment. Spaces are independent, so
    no iteration is needed.
    """
    check_same_shapes([reference.state_dict(), other.state_dict()])
    moments = collect_moments([reference, other], spec, batches, num_batches=num_batches)
    perms: Perms = {}
    for name, mom in moments.items():
        n = spec.spaces[name].size
        corr = mom.correlation()[:n, n:]
        perms[name] = solve_assignment(corr, spec.spaces[name].head_size)
    return perms


def align_to_reference(
    spec: PermutationSpec,
    models: Sequence[nn.Module],
    *,
    method: str = "weight",
    batches: Sequence | None = None,
    num_batches: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[list[dict[str, torch.Tensor]], list[Perms]]:
    """Permute every model into the first model's unit order.

    method: "weight" (weight matching, data-free) or "activation" (needs `batches`, which must
        be re-iterable, e.g. a list of input tensors).
    Returns the aligned state dicts (the first unchanged) and the permutations used.
    """
    if method not in ("weight", "activation"):
        raise AlignError(f"`method` must be 'weight' or 'activation'; got {method!r}")
    if len(models) < 2:
        raise AlignError(f"alignment needs at least 2 models; got {len(models)}")
    state_dicts = [m.state_dict() for m in models]
    check_same_shapes(state_dicts)
    aligned = [dict(state_dicts[0])]
    all_perms: list[Perms] = [{k: torch.arange(s.size) for k, s in spec.spaces.items()}]
    for model, sd in zip(models[1:], state_dicts[1:], strict=True):
        if method == "weight":
            perms = weight_matching(spec, state_dicts[0], sd, generator=generator)
        else:
            if batches is None:
                raise AlignError("activation matching needs `batches` (model inputs)")
            perms = activation_matching(spec, models[0], model, batches, num_batches=num_batches)
        all_perms.append(perms)
        aligned.append(permute_state_dict(spec, sd, perms))
    return aligned, all_perms


def weight_matching_many(
    spec: PermutationSpec,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    *,
    max_rounds: int = 20,
    generator: torch.Generator | None = None,
) -> tuple[list[dict[str, torch.Tensor]], list[Perms]]:
    """Weight matching for N models without a privileged one (Ainsworth et al. 2023, MergeMany,
    Algorithm 3): repeatedly weight-match each model to the mean of the others until no model
    moves. The first model keeps its unit order (the result is only defined up to one common
    permutation). Returns the aligned state dicts and each model's permutations.
    """
    if len(state_dicts) < 2:
        raise AlignError(f"alignment needs at least 2 models; got {len(state_dicts)}")
    check_same_shapes(list(state_dicts))
    n = len(state_dicts)
    identity = {k: torch.arange(s.size) for k, s in spec.spaces.items()}
    perms: list[Perms] = [dict(identity) for _ in range(n)]
    aligned = [dict(sd) for sd in state_dicts]
    keys = [k for k in state_dicts[0] if k in spec.axes and state_dicts[0][k].is_floating_point()]
    for _ in range(max_rounds):
        moved = False
        order = range(n) if generator is None else torch.randperm(n, generator=generator).tolist()
        for i in order:
            others = [aligned[j] for j in range(n) if j != i]
            mean = {k: sum(o[k].double() for o in others) / len(others) for k in keys}
            found = weight_matching(spec, mean, {k: state_dicts[i][k] for k in keys},
                                    generator=generator)  # fmt: skip
            if any(not torch.equal(found[k], perms[i][k]) for k in found):
                moved = True
                perms[i] = found
                aligned[i] = permute_state_dict(spec, state_dicts[i], found)
        if not moved:
            break
    # Express everything in model 0's unit order: compose with the inverse of model 0's perms.
    back = {k: invert(p) for k, p in perms[0].items()}
    out_perms = [{k: perm[k][back[k]] for k in perm} for perm in perms]
    out = [permute_state_dict(spec, sd, p) for sd, p in zip(state_dicts, out_perms, strict=True)]
    return out, out_perms
