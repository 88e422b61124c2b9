"""Weight-space metrics between task vectors, per tensor, per layer and over the whole model.

A task vector is a fine-tuned model minus its base (Ilharco et al., 2023,
https://arxiv.org/abs/2212.04089). Between N task vectors x_1..x_N this module measures:

- cosine similarity and L2 distance, pairwise;
- the sign-conflict rate: of the coordinates where at least two vectors are non-zero, the share
  where a positive and a negative entry meet (pairwise: both non-zero, opposite signs). This is
  the interference TIES-Merging resolves (Yadav et al., 2023, https://arxiv.org/abs/2306.01708);
- Soft Sign Dissimilarity, SSD = 1 - mean_c |sum_k x_k[c]| / sum_k |x_k[c]|, the mean over the
  coordinates c non-zero in some vector: 0 when all vectors agree in sign at every coordinate,
  1 when they cancel exactly (Sung et al., 2023, "An Empirical Study of Multimodal Model
  Merging", https://arxiv.org/abs/2304.14933, who propose it as a predictor of merge quality);
- Truncated SSD (TSSD): SSD after keeping each vector's top-K% magnitudes (zeroing the rest),
  so that the small, noisy entries that TIES would trim do not dominate the mean.

SSD, TSSD and the sign-conflict rate are given pairwise (N x N matrices) and N-way.

Every metric is a ratio of sums over coordinates (`MetricSums`), so a model is processed one
tensor at a time and the sums are added per tensor, per layer and for the whole model: peak
memory is about (N + 1) x the largest tensor in float32, the same bound as a merge.

TSSD's top-K% is taken over each task vector as a whole by default (``truncation="model"``, as
the paper defines it), which needs the K-th largest magnitude of a vector spread over many
tensors: it is found exactly with `MagnitudeCutSearch` (a sample of rows, then one pass that
brackets the threshold; a missed bracket is detected and widened), and ties at the threshold are
broken by flat index in tensor order, exactly as TIES's trim at density K would keep them.
``truncation="tensor"`` keeps the top-K% of every tensor separately (one pass fewer; per-tensor
values then do not depend on the other tensors).
"""

from __future__ import annotations

import copy
import fnmatch
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal, Protocol

import torch

from mergelab.checkpoint import open_checkpoint
from mergelab.checkpoint.memory import StateDictSource
from mergelab.errors import CheckpointError, ConfigError, MergeError
from mergelab.methods.sparsify import MagnitudeCut, MagnitudeCutSearch, magnitude_prune_
from mergelab.plan.planner import split_layer_name
from mergelab.progress import track

METRICS: tuple[str, ...] = ("cosine", "l2", "sign_conflict", "ssd", "tssd")
"""The pairwise metrics, in report order."""
NWAY_METRICS: tuple[str, ...] = ("sign_conflict", "ssd", "tssd")
"""The metrics that are also defined over all N task vectors at once."""

Truncation = Literal["model", "tensor"]

# Elements per block of the float64 accumulation: bounds the temporaries, whatever the tensor.
_CHUNK_ELEMENTS = 1 << 20
# Elements of the sample that brackets each task vector's global top-K% threshold. The pass
# after it keeps the entries inside the bracket (~2 x 4 sd of a binomial proportion, about 0.6%
# of the model at this size) as float64, so a larger sample means less memory in that pass.
_SAMPLE_ELEMENTS = 1 << 18
# Any positive |x_i| + |x_j| of float32 inputs is above this, so clamping a zero denominator to
# it turns 0/0 (a coordinate zero in every vector) into 0 without touching the other terms.
_TINY = 1e-300


# --- additive sums ------------------------------------------------------------------------------


@dataclass
class SignSums:
    """Sums behind SSD and the sign-conflict rate over some coordinates (all float64 tensors).

    agreement[i, j]: sum over coordinates non-zero in x_i or x_j of |x_i + x_j| / (|x_i| + |x_j|);
        union[i, j] counts those coordinates (the diagonal: x_i's non-zero count, agreement 1 each).
    conflicts[i, j]: coordinates where x_i and x_j are non-zero with opposite signs;
        both_nonzero[i, j] counts the coordinates where both are non-zero.
    all_agreement / all_union: the same over all N vectors at once.
    all_conflicts: coordinates holding a positive and a negative entry; all_multi: coordinates
        holding at least two non-zero entries.
    """

    agreement: torch.Tensor
    union: torch.Tensor
    conflicts: torch.Tensor
    both_nonzero: torch.Tensor
    all_agreement: torch.Tensor
    all_union: torch.Tensor
    all_conflicts: torch.Tensor
    all_multi: torch.Tensor

    @classmethod
    def zeros(cls, n: int) -> SignSums:
        def matrix() -> torch.Tensor:
            return torch.zeros(n, n, dtype=torch.float64)

        def scalar() -> torch.Tensor:
            return torch.zeros((), dtype=torch.float64)

        return cls(matrix(), matrix(), matrix(), matrix(), scalar(), scalar(), scalar(), scalar())

    def add_(self, other: SignSums) -> SignSums:
        for f in fields(self):
            getattr(self, f.name).add_(getattr(other, f.name))
        return self


@dataclass
class MetricSums:
    """Every sum the metrics are ratios of, for N task vectors over some coordinates.

    Sums add: the sums of a layer are the sums of its tensors. `metrics` turns them into values.
    """

    numel: torch.Tensor  # (): coordinates covered
    dot: torch.Tensor  # (N, N): <x_i, x_j>
    sq_dist: torch.Tensor  # (N, N): ||x_i - x_j||^2, summed directly (no cancellation)
    sign: SignSums  # over the task vectors
    truncated: SignSums  # over the task vectors after the top-K% truncation

    @classmethod
    def zeros(cls, n: int) -> MetricSums:
        return cls(
            torch.zeros((), dtype=torch.float64),
            torch.zeros(n, n, dtype=torch.float64),
            torch.zeros(n, n, dtype=torch.float64),
            SignSums.zeros(n),
            SignSums.zeros(n),
        )

    def add_(self, other: MetricSums) -> MetricSums:
        self.numel.add_(other.numel)
        self.dot.add_(other.dot)
        self.sq_dist.add_(other.sq_dist)
        self.sign.add_(other.sign)
        self.truncated.add_(other.truncated)
        return self

    def metrics(self) -> TaskVectorMetrics:
        """The metric values; NaN where a ratio is 0/0 (e.g. the cosine of a zero vector)."""
        norms = self.dot.diagonal().clamp_min(0).sqrt()
        cosine = _ratio(self.dot, torch.outer(norms, norms))
        return TaskVectorMetrics(
            numel=int(self.numel),
            norms=norms.tolist(),
            cosine=cosine.tolist(),
            l2=self.sq_dist.clamp_min(0).sqrt().tolist(),
            sign_conflict=_ratio(self.sign.conflicts, self.sign.both_nonzero).tolist(),
            ssd=(1 - _ratio(self.sign.agreement, self.sign.union)).tolist(),
            tssd=(1 - _ratio(self.truncated.agreement, self.truncated.union)).tolist(),
            all_sign_conflict=float(_ratio(self.sign.all_conflicts, self.sign.all_multi)),
            all_ssd=float(1 - _ratio(self.sign.all_agreement, self.sign.all_union)),
            all_tssd=float(1 - _ratio(self.truncated.all_agreement, self.truncated.all_union)),
        )


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    nan = torch.full_like(numerator, math.nan)
    return torch.where(denominator > 0, numerator / denominator.clamp_min(_TINY), nan)


@dataclass(frozen=True)
class TaskVectorMetrics:
    """Metric values of N task vectors over some coordinates (a tensor, a layer, the model).

    Pairwise metrics are N x N nested lists (symmetric; diagonal: cosine 1, L2 0, sign conflict
    0, SSD 0 for a non-zero vector). `all_*` are the N-way values (equal to the pairwise value
    when N = 2). `norms` are the task vectors' L2 norms. NaN marks a 0/0 ratio.
    """

    numel: int
    norms: list[float]
    cosine: list[list[float]]
    l2: list[list[float]]
    sign_conflict: list[list[float]]
    ssd: list[list[float]]
    tssd: list[list[float]]
    all_sign_conflict: float
    all_ssd: float
    all_tssd: float

    @property
    def size(self) -> int:
        """N, the number of task vectors."""
        return len(self.norms)

    def matrix(self, metric: str) -> list[list[float]]:
        """The N x N matrix of a pairwise metric (one of METRICS)."""
        if metric not in METRICS:
            raise KeyError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
        return getattr(self, metric)

    def pair(self, metric: str, i: int, j: int) -> float:
        """The value of `metric` between task vectors i and j."""
        return self.matrix(metric)[i][j]

    def nway(self, metric: str) -> float:
        """The N-way value of `metric` (one of NWAY_METRICS)."""
        if metric not in NWAY_METRICS:
            raise KeyError(f"no N-way value for {metric!r}; known: {', '.join(NWAY_METRICS)}")
        return getattr(self, f"all_{metric}")

    def mean_pair(self, metric: str) -> float:
        """The mean of `metric` over the N (N - 1) / 2 pairs (NaN pairs ignored; NaN if all)."""
        values = [self.pair(metric, i, j) for i, j in pairs(self.size)]
        finite = [v for v in values if not math.isnan(v)]
        return sum(finite) / len(finite) if finite else math.nan

    def as_dict(self) -> dict:
        return asdict(self)


def pairs(n: int) -> list[tuple[int, int]]:
    """The index pairs (i, j), i < j, in row order."""
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


# --- kernels ------------------------------------------------------------------------------------


def sign_sums(vectors: Sequence[torch.Tensor]) -> SignSums:
    """`SignSums` of N equally long vectors (any float dtype; accumulated in float64)."""
    n = len(vectors)
    out = SignSums.zeros(n)
    values = [v.reshape(-1).double() for v in vectors]
    magnitudes = [v.abs() for v in values]
    signs = [torch.sign(v) for v in values]
    for i in range(n):
        nonzero = torch.count_nonzero(values[i])
        for matrix in (out.agreement, out.union, out.both_nonzero):
            matrix[i, i] = nonzero
        for j in range(i + 1, n):
            denominator = magnitudes[i] + magnitudes[j]
            union = torch.count_nonzero(denominator)
            agreement = (values[i] + values[j]).abs_().div_(denominator.clamp_min_(_TINY)).sum()
            product = signs[i] * signs[j]
            conflicts = torch.count_nonzero(product < 0)
            both = torch.count_nonzero(product)
            for matrix, value in (
                (out.agreement, agreement),
                (out.union, union),
                (out.conflicts, conflicts),
                (out.both_nonzero, both),
            ):
                matrix[i, j] = matrix[j, i] = value
    total = torch.stack(values).sum(0)
    total_magnitude = torch.stack(magnitudes).sum(0)
    out.all_union.fill_(torch.count_nonzero(total_magnitude))
    out.all_agreement.fill_(total.abs_().div_(total_magnitude.clamp_min_(_TINY)).sum())
    positive = torch.stack([s > 0 for s in signs]).sum(0)
    negative = torch.stack([s < 0 for s in signs]).sum(0)
    out.all_conflicts.fill_(torch.count_nonzero((positive > 0) & (negative > 0)))
    out.all_multi.fill_(torch.count_nonzero(positive + negative >= 2))
    return out


def metric_sums(
    task_vectors: Sequence[torch.Tensor], truncated: Sequence[torch.Tensor] | None = None
) -> MetricSums:
    """`MetricSums` of N task vectors of one shape, and of their truncations (same shapes).

    `truncated` defaults to the task vectors themselves (no truncation). Works through the
    tensors in blocks of flat elements, so float64 temporaries stay small.
    """
    same = truncated is None or truncated is task_vectors
    if truncated is None:
        truncated = task_vectors
    n = len(task_vectors)
    if n == 0 or len(truncated) != n:
        raise ValueError(
            f"need as many truncated vectors as task vectors ({n}), got {len(truncated)}"
        )
    flat = [v.reshape(-1) for v in task_vectors]
    flat_truncated = [v.reshape(-1) for v in truncated]
    numel = flat[0].numel()
    for v in (*flat, *flat_truncated):
        if v.numel() != numel:
            raise ValueError(f"task vectors differ in size: {v.numel()} vs {numel} elements")
    out = MetricSums.zeros(n)
    out.numel.fill_(numel)
    for start in range(0, numel, _CHUNK_ELEMENTS):
        block = [v[start : start + _CHUNK_ELEMENTS].double() for v in flat]
        for i, j in [(a, b) for a in range(n) for b in range(a, n)]:
            out.dot[i, j] = out.dot[j, i] = out.dot[i, j] + torch.dot(block[i], block[j])
            if i != j:
                distance = (block[i] - block[j]).square_().sum()
                out.sq_dist[i, j] = out.sq_dist[j, i] = out.sq_dist[i, j] + distance
        signs = sign_sums(block)
        del block
        out.sign.add_(signs)
        # Without truncation (top_k = 1) the truncated sums are the same sums: no second pass.
        out.truncated.add_(
            signs
            if same
            else sign_sums([v[start : start + _CHUNK_ELEMENTS] for v in flat_truncated])
        )
    return out


def keep_top_magnitudes(vector: torch.Tensor, fraction: float) -> torch.Tensor:
    """A copy of `vector` keeping its `fraction` largest-magnitude entries, the rest zero.

    The same entries TIES's trim at density `fraction` keeps (`magnitude_prune_`): max(1,
    int(fraction * numel)) of them, ties at the threshold broken by flat index.
    """
    _check_top_k(fraction)
    return magnitude_prune_(vector.detach().float().clone(), fraction, rescale=False)


def _check_top_k(top_k: float) -> None:
    if not (isinstance(top_k, int | float) and 0 < top_k <= 1):
        raise ConfigError(f"`top_k` must be a fraction in (0, 1]; got {top_k!r}")


def compare_task_vectors(
    task_vectors: Sequence[torch.Tensor], top_k: float = 0.2
) -> TaskVectorMetrics:
    """All metrics between N task vectors given as tensors of one shape (top-K% over each)."""
    _check_top_k(top_k)
    truncated = [keep_top_magnitudes(v, top_k) for v in task_vectors]
    return metric_sums(task_vectors, truncated).metrics()


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> / (|a| |b|) over all entries; NaN when either is zero."""
    return metric_sums([a, b]).metrics().cosine[0][1]


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||_2 over all entries."""
    return metric_sums([a, b]).metrics().l2[0][1]


def sign_conflict_rate(vectors: Sequence[torch.Tensor]) -> float:
    """Of the coordinates where at least two vectors are non-zero, the share holding both a
    positive and a negative entry (two vectors: both non-zero with opposite signs). NaN when no
    coordinate has two non-zero entries."""
    return metric_sums(vectors).metrics().all_sign_conflict


def soft_sign_dissimilarity(vectors: Sequence[torch.Tensor]) -> float:
    """SSD (Sung et al., 2023): 1 - mean_c |sum_k x_k[c]| / sum_k |x_k[c]| over the coordinates
    non-zero in some vector. 0: signs agree everywhere; 1: the vectors cancel. NaN: all zero."""
    return metric_sums(vectors).metrics().all_ssd


def truncated_soft_sign_dissimilarity(vectors: Sequence[torch.Tensor], top_k: float) -> float:
    """TSSD (Sung et al., 2023): SSD after keeping each vector's `top_k` largest magnitudes."""
    return compare_task_vectors(vectors, top_k).all_tssd


# --- streaming over checkpoints -------------------------------------------------------------------


class _Source(Protocol):
    def keys(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> torch.Tensor: ...
    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor: ...


ModelLike = str | os.PathLike | Mapping[str, torch.Tensor]


@dataclass
class DiagnosticsResult:
    """Metrics between the task vectors of `models` relative to `base`.

    tensors: tensor name -> metrics over that tensor, in the base's tensor order.
    groups: layer group -> metrics (a layer's tensors, e.g. `encoder.layer.3`; tensors outside the
        layer stack are grouped by module, e.g. `embeddings.word_embeddings`), in model order.
    total: metrics over every compared tensor.
    skipped: reason -> tensor names left out of the comparison (not in every model, another
        shape, not floating point).
    """

    models: list[str]
    base: str
    top_k: float
    truncation: str
    tensors: dict[str, TaskVectorMetrics]
    groups: dict[str, TaskVectorMetrics]
    total: TaskVectorMetrics
    skipped: dict[str, list[str]]
    wall_seconds: float

    def as_dict(self) -> dict:
        return {
            "models": self.models,
            "base": self.base,
            "top_k": self.top_k,
            "truncation": self.truncation,
            "wall_seconds": self.wall_seconds,
            "total": self.total.as_dict(),
            "groups": {k: v.as_dict() for k, v in self.groups.items()},
            "tensors": {k: v.as_dict() for k, v in self.tensors.items()},
            "skipped": self.skipped,
        }


def layer_group(name: str) -> str:
    """The report row of tensor `name`: its layer (`encoder.layer.3`) or else its module."""
    parts = split_layer_name(name)
    if parts is not None:
        return f"{parts[0]}.{parts[1]}"
    return name.rsplit(".", 1)[0] if "." in name else name


def _group_order(names: Sequence[str]) -> list[str]:
    """Embeddings first, then layers by index, then the other modules in model order."""
    first: dict[str, int] = {}
    for position, name in enumerate(names):
        first.setdefault(layer_group(name), position)

    def key(group: str) -> tuple:
        parts = split_layer_name(group + ".x")
        if parts is not None:
            return (1, parts[0], parts[1])
        return (0 if "embed" in group else 2, "", first[group])

    return sorted(first, key=key)


def diagnose(
    models: Sequence[ModelLike],
    base: ModelLike,
    *,
    names: Sequence[str] | None = None,
    top_k: float = 0.2,
    truncation: Truncation = "model",
    exclude: Sequence[str] = (),
    progress: bool = False,
) -> DiagnosticsResult:
    """Compare the task vectors of `models` (each minus `base`), streaming one tensor at a time.

    Args:
        models: two or more checkpoints (paths `open_checkpoint` reads) or state dicts.
        base: the model they were fine-tuned from (a path or a state dict).
        names: labels of the models in reports (default: folder names, or model0, model1...).
        top_k: the fraction of each task vector TSSD keeps, in (0, 1].
        truncation: "model" (top-K% of each whole task vector, as Sung et al.) or "tensor".
        exclude: glob patterns of tensor names to leave out (e.g. a frozen embedding table,
            whose zero task vector would otherwise count in the top-K% denominator).
        progress: show a progress bar per pass.

    Tensors of the base that every model holds with the same shape and a floating dtype are
    compared; the others are listed in `DiagnosticsResult.skipped`.

    Raises:
        ConfigError: fewer than two models, bad names, top_k or truncation.
        CheckpointError: a model cannot be read, or no tensor is shared by all models and base.
        MergeError: a task vector holds NaN or Inf (named by model and tensor).
    """
    problems = []
    if isinstance(models, str | os.PathLike | Mapping):
        raise ConfigError("`models` must be a list of models (paths or state dicts), not one model")
    if len(models) < 2:
        problems.append(f"need at least two models to compare; got {len(models)}")
    if not (isinstance(top_k, int | float) and 0 < top_k <= 1):
        problems.append(f"`top_k` must be a fraction in (0, 1]; got {top_k!r}")
    if truncation not in ("model", "tensor"):
        problems.append(f"`truncation` must be 'model' or 'tensor'; got {truncation!r}")
    labels = list(names) if names is not None else _default_labels(models)
    if len(labels) != len(models):
        problems.append(f"got {len(labels)} names for {len(models)} models")
    elif len(set(labels)) != len(labels):
        problems.append(f"model names must be unique; got {labels}")
    if problems:
        raise ConfigError(problems)

    started = time.perf_counter()
    opened: list = []
    try:
        base_source = _open(base, "base", opened)
        sources = [_open(m, label, opened) for m, label in zip(models, labels)]
        selected, skipped = _select_tensors(base_source, sources, labels, exclude)
        cuts: list[MagnitudeCut | None] = [None] * len(sources)
        if truncation == "model" and top_k < 1:
            cuts = _global_cuts(base_source, sources, selected, top_k, progress)

        n = len(sources)
        per_tensor: dict[str, TaskVectorMetrics] = {}
        group_sums: dict[str, MetricSums] = {}
        total = MetricSums.zeros(n)
        cuts = copy.deepcopy(cuts)  # MagnitudeCut spends its tie budget as it applies
        for name in track(selected, "comparing task vectors", progress):
            deltas = _task_vectors(base_source, sources, labels, name)
            if top_k >= 1:
                truncated = deltas
            elif truncation == "tensor":
                truncated = [magnitude_prune_(d.clone(), top_k, rescale=False) for d in deltas]
            else:
                truncated = [cut.apply_(d.clone()) for cut, d in zip(cuts, deltas)]  # type: ignore[union-attr]
            sums = metric_sums(deltas, truncated)
            del deltas, truncated
            per_tensor[name] = sums.metrics()
            group_sums.setdefault(layer_group(name), MetricSums.zeros(n)).add_(sums)
            total.add_(sums)
    finally:
        for reader in opened:
            reader.close()

    groups = {g: group_sums[g].metrics() for g in _group_order(selected)}
    return DiagnosticsResult(
        models=labels,
        base=_label(base, "base"),
        top_k=float(top_k),
        truncation=truncation,
        tensors=per_tensor,
        groups=groups,
        total=total.metrics(),
        skipped=skipped,
        wall_seconds=time.perf_counter() - started,
    )


def _label(model: ModelLike, fallback: str) -> str:
    if isinstance(model, Mapping):
        return fallback
    path = Path(model)
    return path.name or str(path)


def _default_labels(models: Sequence[ModelLike]) -> list[str]:
    labels = [_label(m, f"model{i}") for i, m in enumerate(models)]
    if len(set(labels)) != len(labels):  # e.g. run1/checkpoint and run2/checkpoint
        labels = [f"{i}:{label}" for i, label in enumerate(labels)]
    return labels


def _open(model: ModelLike, label: str, opened: list) -> _Source:
    if isinstance(model, Mapping):
        return StateDictSource(label, model)
    reader = open_checkpoint(model)
    opened.append(reader)
    return reader


def _select_tensors(
    base: _Source, sources: Sequence[_Source], labels: Sequence[str], exclude: Sequence[str] = ()
) -> tuple[list[str], dict[str, list[str]]]:
    skipped: dict[str, list[str]] = {}
    selected = []
    key_sets = [set(s.keys()) for s in sources]
    for name in base.keys():
        shape = base.shape(name)
        reason = None
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude):
            reason = "excluded by pattern"
        elif not base.dtype(name).is_floating_point:
            reason = "not floating point"
        elif math.prod(shape) == 0:
            reason = "empty"
        else:
            missing = [label for label, keys in zip(labels, key_sets) if name not in keys]
            if missing:
                reason = f"missing in {', '.join(missing)}"
            else:
                other = [
                    f"{label} {list(s.shape(name))}"
                    for label, s in zip(labels, sources)
                    if s.shape(name) != shape or not s.dtype(name).is_floating_point
                ]
                if other:
                    reason = (
                        f"shape or dtype differs from the base {list(shape)}: {', '.join(other)}"
                    )
        if reason is None:
            selected.append(name)
        else:
            skipped.setdefault(reason, []).append(name)
    base_keys = set(base.keys())
    for label, keys in zip(labels, key_sets):
        extra = sorted(
            n for n in keys - base_keys if not any(fnmatch.fnmatchcase(n, p) for p in exclude)
        )
        if extra:
            skipped.setdefault(f"in {label} but not in the base", []).extend(extra)
    if not selected:
        raise CheckpointError(
            f"no floating-point tensor of the base is in every model with the same shape "
            f"(models: {', '.join(labels)}); are they fine-tunes of this base?"
        )
    return selected, skipped


def _task_vectors(
    base: _Source, sources: Sequence[_Source], labels: Sequence[str], name: str
) -> list[torch.Tensor]:
    base_tensor = base.get(name).float()
    deltas = []
    for label, source in zip(labels, sources):
        delta = source.get(name).float() - base_tensor
        if not bool(torch.isfinite(delta).all()):
            raise MergeError(f"task vector of {label} holds NaN or Inf in tensor `{name}`")
        deltas.append(delta)
    return deltas


def _sample_rows(shape: tuple[int, ...], numel: int, total: int) -> list[int]:
    """Evenly spread leading-dimension rows of a tensor, about its share of the sample."""
    rows = shape[0]
    per_row = max(1, numel // rows)
    wanted = max(1, round(_SAMPLE_ELEMENTS * numel / total))
    count = min(rows, max(1, math.ceil(wanted / per_row)))
    return sorted({int(i * rows / count) for i in range(count)})


def _global_cuts(
    base: _Source,
    sources: Sequence[_Source],
    selected: Sequence[str],
    top_k: float,
    progress: bool,
) -> list[MagnitudeCut | None]:
    """Each task vector's exact top-K% cut over all `selected` tensors, in their order."""
    total = sum(math.prod(base.shape(name)) for name in selected)
    samples: list[list[torch.Tensor]] = [[] for _ in sources]
    for name in selected:
        shape = base.shape(name)
        if not shape:  # a scalar: read whole
            reads: list[Callable[[_Source], torch.Tensor]] = [lambda s, n=name: s.get(n)]
        else:
            reads = [
                lambda s, n=name, r=row: s.get_rows(n, r, r + 1)
                for row in _sample_rows(shape, math.prod(shape), total)
            ]
        for read in reads:
            base_rows = read(base).float()
            for i, source in enumerate(sources):
                samples[i].append((read(source).float() - base_rows).abs_().reshape(-1))
    searches = {
        i: MagnitudeCutSearch(torch.cat(sample), total, top_k, rescale=False)
        for i, sample in enumerate(samples)
    }
    cuts: list[MagnitudeCut | None] = [None] * len(sources)
    attempt = 0
    while searches:
        attempt += 1
        label = "finding top-K% thresholds" + (f" (pass {attempt})" if attempt > 1 else "")
        for name in track(selected, label, progress):
            base_tensor = base.get(name).float()
            for i, search in searches.items():
                search.observe((sources[i].get(name).float() - base_tensor).abs_())
        for i in list(searches):
            cut = searches[i].result()
            if cut is None:
                searches[i].widen()
            else:
                cuts[i] = cut
                del searches[i]
    return cuts


