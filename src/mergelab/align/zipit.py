"""ZipIt! (Stoica et al., "ZipIt! Merging Models from Different Tasks without Training",
ICLR 2024, arXiv:2305.03053).

Instead of permuting one model onto another, ZipIt! merges *features*: in each space it greedily
pairs the most correlated units, within a model as well as across models, and averages them
(Sec. 4.1). Every space gets, per model m, a merge matrix M_m (merged units x units of m) and an
unmerge matrix U_m (units of m x merged units) with sum_m M_m f_m the merged features and
U_m f_merged an approximation of f_m. A tensor is merged as sum_m M_m^{out} W_m U_m^{in}, with
M on the axes that produce a space and U on the axes that consume one (Sec. 4.2).

Partial zipping (Sec. 4.3) stops after a given module: the merged trunk feeds, through each
model's unmerge matrix, the untouched rest of every model; the result is a multi-head model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from mergelab.align.derive import TraceInfo, derive_spec
from mergelab.align.features import collect_moments
from mergelab.align.matching import solve_assignment
from mergelab.align.repair import repair_rescale, reset_batchnorm
from mergelab.align.spec import AlignError, PermutationSpec, check_same_shapes


@dataclass
class SpaceMerge:
    """How one space is merged: per model, merge (merged x n) and unmerge (n x merged) matrices."""

    merges: list[torch.Tensor]
    unmerges: list[torch.Tensor]


def _from_groups(groups: list[list[int]], num_models: int, size: int) -> SpaceMerge:
    unmerge = torch.zeros(num_models * size, len(groups), dtype=torch.float64)
    for col, members in enumerate(groups):
        unmerge[members, col] = 1.0
    merge = (unmerge / unmerge.sum(0, keepdim=True)).T
    return SpaceMerge(
        [merge[:, m * size : (m + 1) * size] for m in range(num_models)],
        [unmerge[m * size : (m + 1) * size] for m in range(num_models)],
    )


def zip_match(
    correlation: torch.Tensor, num_models: int, *, alpha: float = 0.3, beta: float = 0.125
) -> SpaceMerge:
    """The ZipIt! greedy matching (Stoica et al. 2024, Sec. 4.1 and 4.3).

    correlation: (N*n, N*n) correlations of the concatenated features of N models.
    Repeatedly merges the two most correlated current features (any models) until n remain. A
    merged feature's similarity to the others is the minimum over its members (complete
    linkage), times `alpha` towards features of models it already holds a unit of, which
    discourages piling up units of one model; `alpha` = 0 forbids that. (ZipIt!'s code scales
    every similarity of a merged feature; with two models the two rules coincide, with more
    ours still pairs identical copies of a model exactly.) `beta` is each
    model's budget of within-model merges (two features made only of that model's units), as a
    fraction of (merges needed / N); once spent, such merges are closed for that model. beta = 0
    forbids them from the start (ZipIt!'s code allows one). ZipIt!'s code labels a merged feature
    with the model of its first unit and closes all pairs with that label, which with three or
    more models can leave no allowed merge; counting real within-model merges cannot.
    """
    total = correlation.shape[0]
    if total % num_models:
        raise AlignError(f"correlation of size {total} does not split into {num_models} models")
    size = total // num_models
    sims = torch.nan_to_num(correlation.detach().to(torch.float64).clone(), nan=0.0)
    groups = [[i] for i in range(total)]
    # covers[c, m]: feature c holds a unit of model m
    covers = torch.nn.functional.one_hot(torch.arange(total) // size, num_models).bool()
    budget = [int((total - size) // num_models * beta + 1e-4)] * num_models
    while len(groups) > size:
        # What may merge now is a mask over the linkage similarities, so a forbidden pair
        # does not poison the similarities of the features it later joins.
        score = sims.clone()
        score.fill_diagonal_(-torch.inf)
        pure = covers.sum(1) == 1
        for m in range(num_models):
            if budget[m] <= 0:
                only_m = pure & covers[:, m]
                score[only_m[:, None] & only_m[None, :]] = -torch.inf
        if alpha <= 0:
            shared = (covers.double() @ covers.double().T) > 0
            score[shared] = -torch.inf
        i, j = divmod(int(torch.argmax(score)), score.shape[1])
        if not torch.isfinite(score[i, j]):
            raise AlignError(
                "ZipIt! ran out of allowed merges (alpha/beta forbid the remaining ones); "
                "raise `beta` or `alpha`"
            )
        i, j = min(i, j), max(i, j)  # the merged feature keeps the lower index
        # a within-model merge joins two features made of units of one and the same model
        within = bool(pure[i] and pure[j] and (covers[i] == covers[j]).all())
        row = torch.minimum(sims[i], sims[j])  # complete linkage
        keep = torch.ones(len(groups), dtype=torch.bool)
        keep[j] = False
        groups[i] = groups[i] + groups[j]
        del groups[j]
        covers[i] |= covers[j]
        sims, covers, row = sims[keep][:, keep], covers[keep], row[keep]
        # Only merges that would put a second unit of some model into this feature are
        # penalised; with two models that is every further merge, as in ZipIt!'s code.
        overlap = (covers & covers[i]).any(1)
        if alpha > 0:
            row = torch.where(overlap, row * alpha, row)
        sims[i, :] = row
        sims[:, i] = row
        if within:
            budget[int(covers[i].nonzero()[0])] -= 1
    return _from_groups(sorted(groups, key=min), num_models, size)


def permute_match(
    correlation: torch.Tensor, num_models: int, *, head_size: int | None = None
) -> SpaceMerge:
    """Permutation merge in ZipIt!'s form: every model matched to model 0 by a linear
    assignment on cross-correlations, matched units averaged (what Git Re-Basin does)."""
    size = correlation.shape[0] // num_models
    groups = [[i] for i in range(size)]
    for m in range(1, num_models):
        cross = correlation[:size, m * size : (m + 1) * size]
        perm = solve_assignment(torch.nan_to_num(cross), head_size)
        for i in range(size):
            groups[i].append(m * size + int(perm[i]))
    return _from_groups(groups, num_models, size)


# ---------------------------------------------------------------------- applying merges


def _mix(value: torch.Tensor, axis: int, matrix: torch.Tensor) -> torch.Tensor:
    """new[..., j, ...] = sum_i matrix[j, i] value[..., i, ...] along `axis`."""
    moved = value.movedim(axis, -1)
    return (moved @ matrix.T.to(moved.dtype)).movedim(-1, axis)


def zip_state_dicts(
    spec: PermutationSpec,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    merges: Mapping[str, SpaceMerge],
    *,
    tensors: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge state dicts tensor by tensor: sum_m M_m (out axes) W_m U_m (in axes).

    A tensor with no producing axis in a merged space (a classifier reading a merged space,
    unpermuted tensors) is averaged instead: its models' contributions would otherwise add up.
    Integer tensors (BatchNorm's counters) come from the first model. Spaces absent from
    `merges` are treated as already aligned (identity matrices).
    tensors: restrict to these names (partial zipping); the others are left out of the result.
    """
    n_models = len(state_dicts)
    names = list(tensors) if tensors is not None else list(state_dicts[0])
    out: dict[str, torch.Tensor] = {}
    for name in names:
        first = state_dicts[0][name]
        if not first.is_floating_point():
            out[name] = first.clone()
            continue
        per_axis = spec.axes.get(name, ())
        produces = any(
            seg.space in merges and seg.role == "out" for segs in per_axis for seg in segs
        )
        total = torch.zeros((), dtype=torch.float64)
        for m, sd in enumerate(state_dicts):
            value = sd[name].detach().to(torch.float64)
            for axis, segments in enumerate(per_axis):
                if not any(seg.space in merges for seg in segments):
                    continue
                pieces, offset = [], 0
                for seg in segments:
                    piece = value.narrow(axis, offset, seg.length)
                    offset += seg.length
                    if seg.space in merges:
                        sm = merges[seg.space]
                        matrix = sm.merges[m] if seg.role == "out" else sm.unmerges[m].T
                        piece = _mix(piece, axis, matrix)
                    pieces.append(piece)
                value = torch.cat(pieces, dim=axis)
            total = total + value
        if not produces:
            total = total / n_models
        out[name] = total.to(first.dtype)
    return out


# ---------------------------------------------------------------------- partial zipping


class MultiHeadModel(nn.Module):
    """A merged trunk and one head per source model (partial zipping).

    forward returns a tuple with one output per head. Head m sees the trunk's features mapped
    back into model m's units by its unmerge matrix (`unmerges[m]`, units x merged) on axis
    `feature_dim` of the trunk output.
    """

    def __init__(
        self,
        trunk: nn.Module,
        heads: Sequence[nn.Module],
        unmerges: Sequence[torch.Tensor] | None,
        feature_dim: int,
    ):
        super().__init__()
        self.trunk = trunk
        self.heads = nn.ModuleList(heads)
        self.feature_dim = feature_dim
        for m, mat in enumerate(unmerges or []):
            self.register_buffer(f"unmerge_{m}", mat.float())
        self.has_unmerge = unmerges is not None

    def forward(self, *inputs):
        shared = self.trunk(*inputs)
        outs = []
        for m, head in enumerate(self.heads):
            x = shared
            if self.has_unmerge:
                x = _mix(x, self.feature_dim, getattr(self, f"unmerge_{m}"))
            outs.append(head(x))
        return tuple(outs)


def _cut_index(nodes: list[fx.Node], stop_at: str) -> int:
    last = -1
    for i, node in enumerate(nodes):
        stack = node.meta.get("nn_module_stack") or {}
        target = str(node.target) if node.op == "call_module" else ""
        if target == stop_at or target.startswith(stop_at + ".") or stop_at in stack:
            last = i
    if last < 0:
        known = sorted({str(n.target) for n in nodes if n.op == "call_module"})
        raise AlignError(f"`stop_at`={stop_at!r} names no module of the model; modules: {known}")
    return last


def split_graph(info: TraceInfo, stop_at: str) -> tuple[fx.Graph, fx.Graph, fx.Node, set[str]]:
    """Cut the traced graph right after the last node of module `stop_at`.

    Returns (trunk graph, head graph, the cut node, names of modules and attributes in the
    trunk). AlignError if anything other than the cut node's output crosses the cut (e.g. a
    cut inside a block whose shortcut skips over it).
    """
    nodes = list(info.graph_module.graph.nodes)
    cut = _cut_index(nodes, stop_at)
    cut_node = nodes[cut]
    if cut_node.op == "output" or cut == len(nodes) - 2:
        raise AlignError(f"`stop_at`={stop_at!r} is the end of the model; use a full zip")
    before = set(nodes[: cut + 1])
    for node in nodes[cut + 1 :]:
        for arg in node.all_input_nodes:
            if arg in before and arg is not cut_node and arg.op not in ("get_attr",):
                raise AlignError(
                    f"cannot cut after `{stop_at}`: graph node `{arg.name}` before the cut is "
                    f"also used by `{node.name}` after it; cut at a block boundary"
                )
    trunk = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes[: cut + 1]:
        env[node] = trunk.node_copy(node, lambda n: env[n])
    trunk.output(env[cut_node])
    head = fx.Graph()
    henv: dict[fx.Node, fx.Node] = {cut_node: head.placeholder("features")}
    for node in nodes[: cut + 1]:
        if node.op == "get_attr":
            henv[node] = head.node_copy(node, lambda n: henv[n])
    for node in nodes[cut + 1 :]:
        henv[node] = head.node_copy(node, lambda n: henv[n])
    owned = {str(n.target) for n in nodes[: cut + 1] if n.op in ("call_module", "get_attr")}
    return trunk, head, cut_node, owned


# ---------------------------------------------------------------------- the entry point


def _trunk_tensors(state: Mapping[str, torch.Tensor], owned: set[str]) -> list[str]:
    return [k for k in state if k in owned or any(k.startswith(o + ".") for o in owned)]


def zip_models(
    models: Sequence[nn.Module],
    batches: Sequence,
    *,
    spec: PermutationSpec | None = None,
    example_input=None,
    alpha: float = 0.3,
    beta: float = 0.125,
    matcher: str = "zipit",
    stop_at: str | None = None,
    num_batches: int | None = None,
    repair: str | None = "reset",
    repair_batches: Sequence | None = None,
) -> nn.Module:
    """Zip N >= 2 models of the same architecture into one (Stoica et al. 2024).

    batches: model inputs (re-iterable: a list) for the feature correlations.
    spec: a permutation spec; derived with torch.fx from the first model when None (then
        `example_input` defaults to the first batch).
    alpha, beta: ZipIt!'s matching hyperparameters (see `zip_match`).
    matcher: "zipit" (the greedy within- and across-model matching) or "permute" (every model
        matched to the first by assignment, then averaged). Attention-head spaces always use
        "permute" restricted to heads: merging two units of one head would change every
        query-key product.
    stop_at: partial zipping: merge up to and including module `stop_at`, return a
        MultiHeadModel whose heads are the models' remaining layers. Needs a derived spec.
    repair: "reset" re-estimates BatchNorm statistics of the merged part, "rescale" applies
        REPAIR then resets BatchNorm, None does nothing; on `repair_batches` (default `batches`).
    Returns the merged model (a copy of the first model's class with merged weights) or the
    MultiHeadModel.
    """
    if len(models) < 2:
        raise AlignError(f"zipping needs at least 2 models; got {len(models)}")
    if matcher not in ("zipit", "permute"):
        raise AlignError(f"`matcher` must be 'zipit' or 'permute'; got {matcher!r}")
    if repair not in (None, "reset", "rescale"):
        raise AlignError(f"`repair` must be 'reset', 'rescale' or None; got {repair!r}")
    if not 0 <= alpha <= 1 or not 0 <= beta <= 1:
        raise AlignError(f"`alpha` and `beta` must be in [0, 1]; got {alpha}, {beta}")
    state_dicts = [m.state_dict() for m in models]
    check_same_shapes(state_dicts)
    batches = list(batches)
    if not batches:
        raise AlignError("ZipIt! needs `batches` of model inputs for its correlations; got none")
    if spec is None:
        first = batches[0]
        spec = derive_spec(models[0], example_input if example_input is not None else first)
    spec.check(state_dicts[0], "model 0")

    trunk_names: list[str] | None = None
    split = None
    if stop_at is not None:
        if not isinstance(spec.graph, TraceInfo):
            raise AlignError("partial zipping (`stop_at`) needs a spec derived by derive_spec")
        split = split_graph(spec.graph, stop_at)
        trunk_names = _trunk_tensors(state_dicts[0], split[3])
    tensors = trunk_names if trunk_names is not None else list(state_dicts[0])
    spaces = sorted({
        seg.space for t in tensors for segs in spec.axes.get(t, ()) for seg in segs
        if seg.space is not None
    })  # fmt: skip
    moments = collect_moments(models, spec, batches, spaces=spaces, num_batches=num_batches)
    merges: dict[str, SpaceMerge] = {}
    for name in spaces:
        corr = moments[name].correlation()
        head = spec.spaces[name].head_size
        if matcher == "permute" or head is not None:
            merges[name] = permute_match(corr, len(models), head_size=head)
        else:
            merges[name] = zip_match(corr, len(models), alpha=alpha, beta=beta)
    merged_sd = zip_state_dicts(spec, state_dicts, merges, tensors=tensors)
    merged = copy.deepcopy(models[0])
    merged.load_state_dict(merged_sd, strict=trunk_names is None)
    merged.eval()
    rep_batches = list(repair_batches) if repair_batches is not None else batches
    merge_mats = {k: v.merges for k, v in merges.items()}

    if split is None:
        _repair(repair, merged, models, spec, rep_batches, merge_mats)
        return merged

    trunk_graph, head_graph, cut_node, _owned = split
    trunk = fx.GraphModule(merged, trunk_graph)
    heads = [fx.GraphModule(copy.deepcopy(m), copy.deepcopy(head_graph)) for m in models]
    space, dim = spec.graph.node_space.get(cut_node.name, (None, 0))
    # unit j of model m = sum_i U_m[j, i] merged_i: exactly what _mix applies
    unmerges = merges[space].unmerges if space is not None and space in merges else None
    multi = MultiHeadModel(trunk, heads, unmerges, dim)
    # Only the trunk is repaired: the heads are the source models' own layers.
    _repair(repair, trunk, models, spec, rep_batches, merge_mats)
    return multi.eval()


def _repair(repair, merged, models, spec, batches, merge_mats) -> None:
    if repair == "reset":
        reset_batchnorm(merged, batches)
    elif repair == "rescale":
        repair_rescale(merged, models, spec, batches, merges=merge_mats)
