"""Permutation specs: which axes of which tensors share a permutation of hidden units.

Models trained from different initialisations compute the same kind of function with their hidden
units in a different order (Ainsworth et al., "Git Re-Basin", ICLR 2023,
https://arxiv.org/abs/2209.04836). A *space* is one such set of interchangeable units (the output
channels of a conv and its BatchNorm, a residual stream, the key/query dimensions of the heads of
an attention layer). The spec records, for every tensor of the state dict, which space each axis
(or each segment of an axis, for packed projections such as `in_proj_weight`) belongs to, and
whether the axis *produces* the space's features (role "out": rows of a weight, a bias, BatchNorm
parameters) or *consumes* them (role "in": columns of the next weight).

Specs are derived automatically by tracing the model (`mergelab.align.derive_spec`) or declared by
hand with `PermutationSpec.build` for anything the tracer does not know.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch

from mergelab.errors import MergeLabError

Role = Literal["out", "in"]


class AlignError(MergeLabError):
    """Models cannot be aligned or zipped (unknown architecture, different shapes, too little data)."""


@dataclass(frozen=True)
class Segment:
    """`length` consecutive entries of one tensor axis that belong to `space` (None: not permuted)."""

    space: str | None
    length: int
    role: Role = "out"


@dataclass(frozen=True)
class Probe:
    """Where a space's features can be observed: the input of module `module`.

    The input's axis `dim` holds the features. With `weight` set (a parameter name inside that
    module), the observed features are `input @ weight[rows].T (+ bias[rows])`: the projected
    queries, keys or values of an attention layer, which have no module input of their own.
    """

    module: str
    dim: int = -1
    weight: str | None = None
    bias: str | None = None
    rows: tuple[int, int] | None = None


@dataclass(frozen=True)
class Space:
    """A set of `size` interchangeable hidden units.

    head_size: when set, units may only be permuted within consecutive blocks of this size (the
        dimensions of one attention head); heads themselves keep their order.
    """

    name: str
    size: int
    head_size: int | None = None
    probes: tuple[Probe, ...] = ()


@dataclass(frozen=True)
class PermutationSpec:
    """Spaces plus, for each state-dict tensor, one tuple of segments per axis.

    A tensor absent from `axes` (or an axis given as an empty tuple) is not permuted at all.
    """

    spaces: Mapping[str, Space]
    axes: Mapping[str, tuple[tuple[Segment, ...], ...]]
    # Derived specs also carry the traced graph and each node's space (a TraceInfo), which
    # partial zipping needs to cut the model; hand-declared specs have None.
    graph: object | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def build(
        spaces: Mapping[str, int | tuple[int, int | None]],
        axes: Mapping[str, Iterable[str | None | Iterable[tuple[str | None, int, Role]]]],
        *,
        roles: Mapping[str, Iterable[Role]] | None = None,
        probes: Mapping[str, Iterable[Probe]] | None = None,
    ) -> PermutationSpec:
        """Declare a spec by hand.

        spaces: name -> size, or name -> (size, head_size).
        axes: tensor name -> one entry per axis: a space name, None (not permuted), or a list of
            (space or None, length, role) segments for packed axes.
        roles: tensor name -> role per axis for plain entries; default: axis 0 "out", others "in"
            (the convention of nn.Linear/nn.Conv weights; 1-D tensors are "out").
        probes: space -> where its features can be observed (needed by activation matching,
            ZipIt! and REPAIR, not by weight matching).

        Example, a two-layer MLP:
            PermutationSpec.build({"h": 64}, {"fc1.weight": ["h", None], "fc1.bias": ["h"],
                                              "fc2.weight": [None, "h"]},
                                  probes={"h": [Probe("fc2")]})
        """
        space_objs: dict[str, Space] = {}
        probes = dict(probes or {})
        for name, size in spaces.items():
            head = None
            if isinstance(size, tuple):
                size, head = size
            space_objs[name] = Space(name, int(size), head, tuple(probes.pop(name, ())))
        if probes:
            raise AlignError(f"probes given for unknown space(s): {sorted(probes)}")
        built: dict[str, tuple[tuple[Segment, ...], ...]] = {}
        for tensor, entries in axes.items():
            entries = list(entries)
            axis_roles = list((roles or {}).get(tensor, ["out"] + ["in"] * (len(entries) - 1)))
            per_axis = []
            for i, entry in enumerate(entries):
                if entry is None:
                    per_axis.append(())
                elif isinstance(entry, str):
                    if entry not in space_objs:
                        raise AlignError(
                            f"tensor `{tensor}` axis {i} names unknown space {entry!r}"
                        )
                    size = space_objs[entry].size
                    per_axis.append((Segment(entry, size, axis_roles[i]),))
                else:
                    per_axis.append(tuple(Segment(s, int(n), r) for s, n, r in entry))
            built[tensor] = tuple(per_axis)
        return PermutationSpec(space_objs, built)

    # ------------------------------------------------------------------ queries

    def occurrences(self, space: str) -> list[tuple[str, int, int, Role]]:
        """Every (tensor, axis, offset, role) where `space` appears, in a stable order."""
        found = []
        for tensor, per_axis in self.axes.items():
            for axis, segments in enumerate(per_axis):
                offset = 0
                for seg in segments:
                    if seg.space == space:
                        found.append((tensor, axis, offset, seg.role))
                    offset += seg.length
        return found

    def check(self, state_dict: Mapping[str, torch.Tensor], what: str = "model") -> None:
        """Raise AlignError listing every tensor whose shape disagrees with the spec."""
        problems = []
        for tensor, per_axis in self.axes.items():
            if tensor not in state_dict:
                problems.append(f"`{tensor}` is in the spec but not in the {what}")
                continue
            shape = tuple(state_dict[tensor].shape)
            for axis, segments in enumerate(per_axis):
                if not segments:
                    continue
                if axis >= len(shape):
                    problems.append(f"`{tensor}` has {len(shape)} axes; spec names axis {axis}")
                    continue
                total = sum(s.length for s in segments)
                if total != shape[axis]:
                    problems.append(
                        f"`{tensor}` axis {axis} has {shape[axis]} entries; spec: {total}"
                    )
                for seg in segments:
                    if seg.space is not None and seg.length != self.spaces[seg.space].size:
                        problems.append(
                            f"`{tensor}` axis {axis}: segment of space `{seg.space}` has "
                            f"{seg.length} entries; the space has {self.spaces[seg.space].size}"
                        )
        if problems:
            raise AlignError(
                f"{what} does not fit the permutation spec:\n  - " + "\n  - ".join(problems)
            )


def check_same_shapes(state_dicts: list[Mapping[str, torch.Tensor]]) -> None:
    """Raise AlignError listing every key or shape that differs from the first model."""
    first = state_dicts[0]
    problems = []
    for i, sd in enumerate(state_dicts[1:], start=1):
        missing = sorted(set(first) - set(sd))
        extra = sorted(set(sd) - set(first))
        if missing:
            problems.append(f"model {i} lacks {missing}")
        if extra:
            problems.append(f"model {i} has unexpected {extra}")
        for key in sorted(set(first) & set(sd)):
            if tuple(first[key].shape) != tuple(sd[key].shape):
                problems.append(
                    f"`{key}`: model 0 has shape {tuple(first[key].shape)}, model {i} has "
                    f"{tuple(sd[key].shape)}"
                )
    if problems:
        raise AlignError("models have different shapes:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------------- applying permutations


def _index_axis(tensor: torch.Tensor, axis: int, offset: int, perm: torch.Tensor) -> torch.Tensor:
    """Reorder entries [offset, offset + len(perm)) of `axis` so that new[i] = old[perm[i]]."""
    index = torch.arange(tensor.shape[axis], device=tensor.device)
    index[offset : offset + len(perm)] = perm.to(tensor.device) + offset
    return tensor.index_select(axis, index)


def permute_state_dict(
    spec: PermutationSpec,
    state_dict: Mapping[str, torch.Tensor],
    perms: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Apply one permutation per space: unit i of space s becomes old unit perms[s][i].

    The permuted model computes the same function (that is what the spec promises). Spaces
    missing from `perms` are left as they are.
    """
    out = dict(state_dict)
    for tensor, per_axis in spec.axes.items():
        value = out[tensor]
        for axis, segments in enumerate(per_axis):
            offset = 0
            for seg in segments:
                if seg.space is not None and seg.space in perms:
                    value = _index_axis(value, axis, offset, perms[seg.space])
                offset += seg.length
        out[tensor] = value
    return out


def random_permutations(
    spec: PermutationSpec, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """One random permutation per space, respecting head blocks (within-head only)."""
    perms = {}
    for name, space in spec.spaces.items():
        block = space.head_size or space.size
        parts = [
            torch.randperm(block, generator=generator) + start
            for start in range(0, space.size, block)
        ]
        perms[name] = torch.cat(parts)
    return perms


def invert(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: invert(p)[p[i]] = i."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm), device=perm.device)
    return inverse
