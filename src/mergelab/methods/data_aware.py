"""Data-aware merges: their pure kernels and their registry declarations.

These methods need statistics of each model on data (Gram matrices, Fisher information) or an
optimisation on data. They are ordinary registry methods: a declaration naming the statistics
its kernel reads (`statistics=("gram",)`), or the optimisation stage whose output is a plan of
another method (AdaMerging -> task arithmetic). The statistics stage (mergelab.stats.stage)
collects the statistics before planning, the plan references them per tensor, and the engine
hands each kernel below its tensors and their statistics (`TensorMerge.statistics`), exactly as
it hands any other kernel its tensors. The kernels and closed forms here are pure.
An expert-group merge (mergelab.plan.expert_groups) plans RegMean the same way: each member's
Gram from a statistics folder is referenced per tensor and handed over by the engine.

- RegMean: Jin et al. 2023, https://arxiv.org/abs/2212.09849
- RegMean++: Nguyen et al. 2025, https://arxiv.org/abs/2508.03121
- Fisher merging: Matena & Raffel 2022, https://arxiv.org/abs/2111.09832
- AdaMerging: Yang et al. 2024, https://arxiv.org/abs/2310.02575
- ProDistill: Xu et al. 2025, https://arxiv.org/abs/2502.12706
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from mergelab.errors import MergeError
from mergelab.methods.registry import (
    InputGram,
    MergeMethod,
    Param,
    ParamValue,
    TensorMerge,
    register,
)


class SingularGramWarning(UserWarning):
    """A layer's summed Gram matrix was singular and was regularised (the layer is named)."""


# --- RegMean ---------------------------------------------------------------------------------------


def scale_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G + (1 - alpha) * diag(G): RegMean's shrinkage of the non-diagonal entries.

    With alpha = 1 the merge is the exact least-squares solution of the joint data; with
    alpha = 0 it is a per-input-feature weighted average (Jin et al., section 3.3). Works on a
    batch of Grams [..., d, d].
    """
    if alpha == 1.0:
        return gram
    diagonal = torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))
    return alpha * gram + (1.0 - alpha) * diagonal


_MAX_RIDGE_STEPS = 6  # regularization x 1 ... x 1e5


def regmean_solve(
    weights: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    *,
    alpha: float = 0.9,
    regularization: float = 1e-6,
    name: str = "",
) -> torch.Tensor:
    """RegMean's closed form for one linear map: W = (sum_i G_i)^-1 sum_i G_i W_i.

    weights: each model's weight [out, in], or [groups, out/groups, in/groups*kernel] for
        grouped convolutions (one system per group). W_i maps inputs x to W_i x, so the
        regression target of model i on its inputs X_i is X_i W_i^T and the merged W minimises
        sum_i ||X_i W^T - X_i W_i^T||^2 (Jin et al., eq. 2).
    grams: each model's input Gram X_i^T X_i, [in, in] or [groups, in, in] (float64 preferred).
    alpha: scales the non-diagonal entries of every Gram (see `scale_off_diagonal`).
    regularization: when sum_i G_i is singular (an input feature no model's data ever
        activates, collinear inputs), `regularization * mean(diag)` is added to its diagonal,
        pulling the undetermined directions to the simple average; the ridge grows tenfold
        (at most 1e5 times) until Cholesky succeeds; a SingularGramWarning names the layer and
        the strength used.
    Returns the merged weight in the first weight's dtype and shape.
    """
    if len(weights) != len(grams) or not weights:
        raise MergeError(f"`{name}`: RegMean needs one Gram per model; got {len(grams)} for {len(weights)}")
    work = torch.float64
    scaled = [scale_off_diagonal(g.to(work), alpha) for g in grams]
    gram_sum = torch.stack(scaled).sum(0)
    # rhs = sum_i G_i W_i^T: [..., in, out]
    rhs = sum(g @ w.to(work).transpose(-1, -2) for g, w in zip(scaled, weights, strict=True))
    factor, info = torch.linalg.cholesky_ex(gram_sum)
    if bool((info != 0).any()):
        # A ridge of `regularization` x mean(diag) first, growing tenfold while Cholesky still
        # fails: Grams accumulated in float32 over exactly collinear inputs (a grayscale image
        # repeated on three channels) carry rounding noise of about 1e-7 x their largest
        # eigenvalue, which can exceed the smallest ridge.
        mean_diag = torch.diagonal(gram_sum, dim1=-2, dim2=-1).mean(-1).clamp(min=1e-12)
        identity = torch.eye(gram_sum.shape[-1], dtype=work, device=gram_sum.device)
        average = torch.stack([w.to(work) for w in weights]).mean(0).transpose(-1, -2)
        strength = regularization
        for _ in range(_MAX_RIDGE_STEPS):
            ridge = (strength * mean_diag)[..., None, None] * identity
            factor, info = torch.linalg.cholesky_ex(gram_sum + ridge)
            if not bool((info != 0).any()):
                break
            strength *= 10.0
        else:
            raise MergeError(
                f"`{name}`: the summed Gram is not positive definite even with "
                f"{strength / 10:g} x mean(diag) on its diagonal (non-finite or negative statistics?)"
            )
        warnings.warn(
            f"RegMean: the summed Gram of layer `{name or '?'}` is singular; added "
            f"{strength:g} x mean(diag) to its diagonal (undetermined directions fall "
            "back to the average)",
            SingularGramWarning,
            stacklevel=2,
        )
        rhs = rhs + ridge @ average
    solution = torch.cholesky_solve(rhs, factor)
    merged = solution.transpose(-1, -2)
    if not torch.isfinite(merged).all():
        raise MergeError(f"`{name}`: RegMean produced non-finite values")
    return merged.to(weights[0].dtype)


def count_weighted_rows(weights: Sequence[torch.Tensor], counts: Sequence[torch.Tensor]) -> torch.Tensor:
    """RegMean for an embedding table: its input is a one-hot token, whose Gram is the diagonal
    of token counts, so the closed form is a per-row average weighted by how often each model's
    data used that token. Rows no data used take the plain average."""
    table = torch.stack([w.double() for w in weights])  # [models, vocab, dim]
    c = torch.stack([x.double() for x in counts])  # [models, vocab]
    total = c.sum(0)
    weighted = (c[..., None] * table).sum(0) / total.clamp(min=1e-300)[:, None]
    merged = torch.where(total[:, None] > 0, weighted, table.mean(0))
    return merged.to(weights[0].dtype)


def average(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean of float tensors (in float64, cast back); the first tensor for integer ones."""
    if not tensors[0].is_floating_point():
        return tensors[0].clone()
    return torch.stack([t.double() for t in tensors]).mean(0).to(tensors[0].dtype)


def regmean_tensor(
    name: str,
    tensors: Sequence[torch.Tensor],
    grams: Sequence[InputGram] | None,
    *,
    alpha: float,
    regularization: float,
    average_grams: bool,
) -> torch.Tensor:
    """RegMean's result for one tensor: the closed form for a weight with Grams, else the mean.

    name: the tensor's name; only a `...weight` is a linear map (biases and norms are averaged,
        as in the paper). grams: each model's Gram of the layer owning the tensor (None: no
        statistics, averaged); `kind` picks the closed form: `regmean_solve` for linear layers,
        one system per group for convolutions, `count_weighted_rows` for embeddings.
    average_grams: divide each Gram by its row count first (equal say per model).
    """
    owner, _, leaf = name.rpartition(".")
    if grams is None or leaf != "weight" or not tensors[0].is_floating_point():
        return average(tensors)
    if all(g.count == 0 for g in grams):
        return average(tensors)  # the layer never ran on any model's data
    stats = [g.mean() if average_grams else g.gram for g in grams]
    # Solve where the statistics live (the GPU when they were collected there).
    home = tensors[0].device
    tensors = [t.to(stats[0].device) for t in tensors]
    kind = grams[0].kind
    if kind == "embedding":
        merged = count_weighted_rows(tensors, stats)
    elif kind == "linear":
        merged = regmean_solve(tensors, stats, alpha=alpha, regularization=regularization, name=owner)
    else:
        # convolution [out, in/groups, *kernel] -> one system per group [groups, out/groups, d]
        groups, d, _ = stats[0].shape
        shape = tensors[0].shape
        per_group = [t.reshape(groups, shape[0] // groups, d) for t in tensors]
        merged = regmean_solve(
            per_group, stats, alpha=alpha, regularization=regularization, name=owner
        ).reshape(shape)
    return merged.to(home)


def regmean_with_grams(m: TensorMerge, grams: Sequence[InputGram] | None) -> torch.Tensor:
    """The registry `regmean` on one tensor, given each model's Gram of its layer.

    Reads the declaration's parameters: `alpha`, `regularization`, `average_grams`, and
    `scaling` (merged task vector times `scaling` on the base: needs `m.base` unless 1).
    """
    merged = regmean_tensor(
        m.name,
        m.tensors,
        grams,
        alpha=float(m.params["alpha"]),
        regularization=float(m.params["regularization"]),
        average_grams=bool(m.params["average_grams"]),
    )
    scaling = float(m.params["scaling"])
    if scaling != 1.0 and merged.is_floating_point():
        if m.base is None:
            raise MergeError(f"`{m.name}`: RegMean `scaling` {scaling:g} needs the base model")
        origin = m.base.to(merged)
        merged = origin + scaling * (merged - origin)
    return merged


def _scaling_needs_base(params: Mapping[str, ParamValue], has_base: bool) -> str | None:
    if float(params["scaling"]) != 1.0 and not has_base:
        return f"`scaling` {params['scaling']:g} needs the base model (set `base_model`), or set it to 1"
    return None


# --- Fisher merging -------------------------------------------------------------------------------


def fisher_average(
    tensors: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    *,
    model_weights: Sequence[float] | None = None,
    floor: float = 1e-6,
) -> torch.Tensor:
    """Matena & Raffel's merge of one tensor: sum_i w_i F_i theta_i / sum_i w_i F_i.

    floor: added to every Fisher entry, so an entry no model's data informs (all F = 0) becomes
        the weighted average instead of 0/0.
    """
    if len(tensors) != len(fishers) or not tensors:
        raise MergeError("Fisher merging needs one Fisher per model")
    weights = model_weights or [1.0] * len(tensors)
    num = torch.zeros_like(tensors[0], dtype=torch.float64)
    den = torch.zeros_like(tensors[0], dtype=torch.float64)
    for w, t, f in zip(weights, tensors, fishers, strict=True):
        weight = w * (f.double() + floor)
        num += weight * t.double()
        den += weight
    return (num / den).to(tensors[0].dtype)


# --- kernels ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatisticsGram:
    """An `InputGram` from one entry of `TensorMerge.statistics` ({"gram", "rows"}): the Gram's
    rank tells the layer ([vocab] token counts: embedding; [in, in]: linear; [groups, d, d]:
    convolution)."""

    gram: torch.Tensor
    count: int

    @property
    def kind(self) -> str:
        return {1: "embedding", 2: "linear"}.get(self.gram.dim(), "conv")

    def mean(self) -> torch.Tensor:
        return self.gram / max(self.count, 1)


def grams_of(statistics: Sequence[Mapping[str, torch.Tensor]] | None) -> list[StatisticsGram] | None:
    """Each source's Gram from a kernel's statistics (None: the tensor has none)."""
    if statistics is None or any(s is None for s in statistics):
        return None
    return [StatisticsGram(s["gram"], int(s["rows"])) for s in statistics]


def regmean_kernel(job: TensorMerge) -> torch.Tensor:
    """RegMean (and RegMean++: the same closed form, other Grams) for one tensor, from the
    statistics the engine hands it: `regmean_with_grams` on each source's Gram of the layer
    owning the tensor (biases, norms and tensors without statistics: the average).

    `scaling` (mergelab's extension, not in the paper) multiplies the merged task vector
    (merge - base) like task arithmetic's lambda; RegMean is linear in the weights, so this is
    RegMean of the task vectors, scaled. 1 is the paper's RegMean.
    """
    return regmean_with_grams(job, grams_of(job.statistics))


def fisher_kernel(job: TensorMerge) -> torch.Tensor:
    """Fisher merging of one tensor: `fisher_average` of each source's diagonal Fisher (divided
    by that source's mean Fisher entry over all parameters when `normalize`); the average for
    tensors without a Fisher (buffers, frozen parameters)."""
    if job.statistics is None or any(s is None for s in job.statistics):
        return average(job.tensors)
    fishers = [s["fisher"] for s in job.statistics]
    if bool(job.params["normalize"]):
        fishers = [f / float(s["fisher_mean"]) for f, s in zip(fishers, job.statistics, strict=True)]
    return fisher_average(
        job.tensors,
        [f.to(job.tensors[0].device) for f in fishers],
        model_weights=[float(w) for w in job.per_model("weight")],
        floor=float(job.params["fisher_floor"]),
    )


def _optimised(job: TensorMerge) -> torch.Tensor:
    raise MergeError(
        f"`{job.name}`: this method is an optimisation whose output is a plan of another method; "
        "run its optimiser first (mergelab.merge and mergelab.data_merge do)"
    )


# --- declarations ---------------------------------------------------------------------------------


_ALPHA = Param(
    "alpha",
    float,
    0.9,
    "Scale of the non-diagonal Gram entries (1: exact least squares; 0: diagonal, a "
    "per-feature weighted average). Jin et al. tune it in [0, 1]; 0.9 is their usual choice.",
    low=0.0,
    high=1.0,
)
_REGULARIZATION = Param(
    "regularization",
    float,
    1e-6,
    "Added to the diagonal of a singular summed Gram, relative to its mean diagonal "
    "(a warning names the layer).",
    low=0.0,
)
_AVERAGE_GRAMS = Param(
    "average_grams",
    bool,
    False,
    "Divide each model's Grams by its number of rows first (equal say per model whatever its "
    "amount of data); false sums them, the joint least-squares problem of the paper.",
)
_SCALING = Param(
    "scaling",
    float,
    1.0,
    "mergelab extension (not in the paper): multiply the merged task vector (merge - base) by "
    "this, as task arithmetic's lambda; 1 is the paper's RegMean. Other values need the base.",
    low=0.0,
)
_ADA = (
    Param("steps", int, 500, "Optimisation steps (the paper: 500).", low=1),
    Param("lr", float, 1e-3, "Adam learning rate of the coefficients (the paper: 1e-3).", low=0.0),
    Param("init", float, 0.3, "Initial coefficient of every task vector (the paper: 0.3).", low=0.0),
    Param("clamp", bool, True, "Keep coefficients in [0, 1] after every step, as the paper's code."),
)

register(
    MergeMethod(
        name="regmean",
        title="RegMean: regression mean of linear layers from input Gram matrices",
        paper="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models",
        url="https://arxiv.org/abs/2212.09849",
        kernel=regmean_kernel,
        params=(_ALPHA, _REGULARIZATION, _AVERAGE_GRAMS, _SCALING),
        base="optional",
        min_models=2,
        needs=("data",),
        statistics=("gram",),
        check_params=_scaling_needs_base,
    )
)
register(
    MergeMethod(
        name="regmean_plusplus",
        title="RegMean++: RegMean with Grams collected in the partially merged model",
        paper="Nguyen et al. 2025, RegMean++: Enhancing Effectiveness and Generalization of "
        "Regression Mean for Model Merging",
        url="https://arxiv.org/abs/2508.03121",
        kernel=regmean_kernel,
        params=(_ALPHA, _REGULARIZATION, _AVERAGE_GRAMS, _SCALING),
        base="optional",
        min_models=2,
        needs=("data",),
        statistics=("gram",),
        collector="progressive",
        check_params=_scaling_needs_base,
    )
)
register(
    MergeMethod(
        name="fisher",
        title="Fisher merging: parameters averaged with diagonal Fisher weights",
        paper="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging",
        url="https://arxiv.org/abs/2111.09832",
        kernel=fisher_kernel,
        params=(
            Param("weight", float, 1.0, "Scalar weight of the model.", per_model=True, low=0.0),
            Param(
                "fisher_floor",
                float,
                1e-6,
                "Added to every Fisher entry (entries no data informs are averaged).",
                low=0.0,
            ),
            Param(
                "normalize",
                bool,
                True,
                "Divide each model's Fisher by its mean over all parameters, so a model whose "
                "loss is flatter overall does not lose every coordinate.",
            ),
        ),
        base="none",
        min_models=2,
        needs=("data",),
        statistics=("fisher",),
    )
)
register(
    MergeMethod(
        name="adamerging_taskwise",
        title="AdaMerging (task-wise): one learned coefficient per task vector",
        paper="Yang et al. 2024, AdaMerging: Adaptive Model Merging for Multi-Task Learning",
        url="https://arxiv.org/abs/2310.02575",
        kernel=_optimised,
        params=_ADA,
        base="required",
        min_models=1,
        needs=("data",),
        optimiser="adamerging",
        optimiser_options=(("granularity", "task"),),
    )
)
register(
    MergeMethod(
        name="adamerging_layerwise",
        title="AdaMerging (layer-wise): one learned coefficient per task vector and tensor",
        paper="Yang et al. 2024, AdaMerging: Adaptive Model Merging for Multi-Task Learning",
        url="https://arxiv.org/abs/2310.02575",
        kernel=_optimised,
        params=_ADA,
        base="required",
        min_models=1,
        needs=("data",),
        optimiser="adamerging",
        optimiser_options=(("granularity", "layer"),),
    )
)

_PRODISTILL = (
    Param(
        "examples",
        int,
        64,
        "Examples per task (at most: the first ones of each task's data; the paper: 64).",
        low=1,
    ),
    Param("steps", int, 100, "Training steps per layer (block).", low=1),
    Param("batch_size", int, 32, "Examples per step, drawn from all tasks (at most all of them).", low=1),
    Param("lr", float, 0.01, "Adam learning rate of the coefficients (the paper: 0.01).", low=0.0,
          low_exclusive=True),
    Param("init", float, 0.3, "Initial coefficient of every task vector (the paper: 0.3).", low=0.0),
    Param("seed", int, 0, "Seed of the order in which examples are drawn.", low=0),
)
register(
    MergeMethod(
        name="prodistill",
        title="ProDistill: per-tensor coefficients learned layer by layer, distilling each "
        "fine-tune's layer outputs",
        paper="Xu et al. 2025, Scalable Model Merging with Progressive Layer-wise Distillation (ICML)",
        url="https://arxiv.org/abs/2502.12706",
        kernel=_optimised,
        params=_PRODISTILL,
        base="required",
        min_models=1,
        needs=("data",),
        optimiser="prodistill",
    )
)
