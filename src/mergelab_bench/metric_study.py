"""Does a weight-space metric predict how well a merge works?

Sung et al. (2023, https://arxiv.org/abs/2304.14933) propose SSD and truncated SSD between task
vectors as predictors of the merge outcome. This module tests such claims on a zoo: merge every
pair of tasks, measure the drop in normalised accuracy (1 - mean over the two tasks of merged /
individual fine-tuned accuracy), and rank-correlate it with each metric of the pair (Spearman's
rho: only the ordering matters, and the relation need not be linear).

With 10 pairs a correlation is noisy: |rho| must exceed about 0.65 to reach p < 0.05, and the
summary says so instead of calling every positive rho a predictor.
"""

from __future__ import annotations

import glob
import itertools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import torch

from mergelab.diagnostics.metrics import METRICS, DiagnosticsResult, diagnose
from mergelab.errors import ConfigError
from mergelab.eval.bootstrap import Interval, bootstrap_interval, stratified_bootstrap_interval
from mergelab.progress import track

# +1: a larger value should mean the task vectors interfere more, so a larger drop; -1: cosine.
EXPECTED_SIGN: dict[str, int] = {"cosine": -1, "l2": 1, "sign_conflict": 1, "ssd": 1, "tssd": 1}
_TITLES = {
    "cosine": "cosine",
    "l2": "L2",
    "sign_conflict": "sign conflict",
    "ssd": "SSD",
    "tssd": "TSSD",
}
# Fewer merges than this give no usable rank correlation.
_MIN_RECORDS = 5
_SIGNIFICANCE = 0.05
_STRONG, _MODERATE = 0.7, 0.4


@dataclass(frozen=True)
class MergeRecord:
    """One merge: the metric values of the merged task vectors and what the merge scored.

    outcome: larger means a worse merge (e.g. the drop in normalised accuracy).
    details: anything for reports (per-task accuracies, the hyperparameters chosen...).
    """

    tasks: tuple[str, ...]
    method: str
    metrics: Mapping[str, float]
    outcome: float
    details: Mapping = field(default_factory=dict)


@dataclass(frozen=True)
class Correlation:
    """Spearman's rho between one metric and the outcome over the merges of one method."""

    metric: str
    method: str
    rho: float
    p_value: float
    n: int

    @property
    def expected_sign(self) -> int:
        return EXPECTED_SIGN.get(self.metric, 1)

    def verdict(self) -> str:
        """A plain-words judgement that does not overstate a small sample."""
        if self.n < _MIN_RECORDS:
            return f"too few merges to tell (n={self.n})"
        if math.isnan(self.rho):
            return "undefined (the metric or the outcome is constant)"
        strength = abs(self.rho)
        expected = self.rho * self.expected_sign > 0
        significant = self.p_value < _SIGNIFICANCE
        if strength < _MODERATE:
            return "does not predict"
        if not expected:
            return "correlates against the expected direction" + (
                "" if significant else " (not significant)"
            )
        if significant:
            return "predicts (strong)" if strength >= _STRONG else "predicts (moderate)"
        return f"suggestive only (not significant at p < {_SIGNIFICANCE})"

    def line(self) -> str:
        return (
            f"{_TITLES.get(self.metric, self.metric)}: rho={self.rho:+.2f} "
            f"(p={self.p_value:.3f}, n={self.n}): {self.verdict()}"
        )


def correlations(
    records: Iterable[MergeRecord],
    metrics: Sequence[str] | None = None,
    *,
    pooled: bool = False,
) -> list[Correlation]:
    """Spearman's rho (scipy.stats.spearmanr) between each metric and the outcome, per method.

    Records whose metric or outcome is NaN are left out of that metric's correlation. With
    `pooled`, a method "all" pools every record as well. A constant input gives rho NaN.
    """
    from scipy.stats import spearmanr

    records = list(records)
    if metrics is None:
        seen = dict.fromkeys(k for r in records for k in r.metrics)
        metrics = [m for m in METRICS if m in seen] + [m for m in seen if m not in METRICS]
    by_method: dict[str, list[MergeRecord]] = {}
    for record in records:
        by_method.setdefault(record.method, []).append(record)
    if pooled and len(by_method) > 1:
        by_method["all"] = records
    out = []
    for method, group in by_method.items():
        for metric in metrics:
            points = [
                (float(r.metrics[metric]), float(r.outcome))
                for r in group
                if metric in r.metrics
                and not math.isnan(float(r.metrics[metric]))
                and not math.isnan(float(r.outcome))
            ]
            rho = p_value = math.nan
            if len(points) >= 3:
                xs, ys = zip(*points)
                with warnings.catch_warnings():
                    # A constant input is reported as rho NaN, which verdict() explains.
                    warnings.simplefilter("ignore")
                    result = spearmanr(xs, ys)
                rho, p_value = float(result.statistic), float(result.pvalue)
            out.append(Correlation(metric, method, rho, p_value, len(points)))
    return out


def summarize(
    found: Sequence[Correlation], outcome: str = "the drop in normalised accuracy"
) -> str:
    """Markdown: per method, each metric's rho against the outcome and a plain verdict, and
    which metric (if any) predicts best."""
    lines = [
        "Merges that share a task are not independent, so these p-values are optimistic; "
        "read rho as a ranking of the metrics more than as a test.",
        "",
    ]
    by_method: dict[str, list[Correlation]] = {}
    for c in found:
        by_method.setdefault(c.method, []).append(c)
    for method, group in by_method.items():
        n = max((c.n for c in group), default=0)
        lines.append(f"**{method}** ({n} merges; Spearman rho against {outcome}):")
        lines += [f"- {c.line()}" for c in group]
        usable = [c for c in group if c.verdict().startswith("predicts")]
        if usable:
            best = max(usable, key=lambda c: abs(c.rho))
            lines.append(
                f"- best predictor: {_TITLES.get(best.metric, best.metric)} (rho={best.rho:+.2f})"
            )
        else:
            lines.append("- no metric predicts the outcome significantly here.")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _within_group_ranks(values: Sequence[float]) -> list[float]:
    """Ranks centred on 0 and scaled to [-1, 1] within one group (ties share a rank)."""
    from scipy.stats import rankdata

    if len(values) < 2:
        return [0.0] * len(values)
    ranks = rankdata(values)
    middle, half = (len(values) + 1) / 2, (len(values) - 1) / 2
    return [float((r - middle) / half) for r in ranks]


def stratified_records(groups: Mapping[str, Sequence[MergeRecord]]) -> list[MergeRecord]:
    """The records of every group with each metric and the outcome replaced by their centred
    rank *within the group* (per method).

    Pooling merges of several zoos or recipes mixes two effects: a metric that only tells the
    groups apart (one recipe's task vectors are larger and its merges worse) correlates with
    the outcome without ranking the merges of any one group. Ranking inside each group first
    removes the group effect, so a Spearman rho on these records asks only "within a group,
    do the merges with a larger metric lose more?", over all groups' merges at once.
    """
    out: list[MergeRecord] = []
    for group in groups.values():
        by_method: dict[str, list[MergeRecord]] = {}
        for record in group:
            by_method.setdefault(record.method, []).append(record)
        for records in by_method.values():
            outcome = _within_group_ranks([r.outcome for r in records])
            metric_names = [m for m in records[0].metrics if all(m in r.metrics for r in records)]
            ranked = {m: _within_group_ranks([float(r.metrics[m]) for r in records]) for m in metric_names}
            for i, r in enumerate(records):
                out.append(replace(r, metrics={m: ranked[m][i] for m in metric_names}, outcome=outcome[i]))
    return out


def pooled_summary(groups: Mapping[str, Sequence[MergeRecord]], what: str = "recipe") -> str:
    """Markdown: the correlations over every group's merges, raw and within-group (stratified),
    with each group's mean metric and outcome so the reader sees the group effect."""
    names = list(groups)
    records = [r for g in groups.values() for r in g]
    metrics = [m for m in METRICS if all(m in r.metrics for r in records)]
    lines = [f"Merges of the {what}s {', '.join(f'`{n}`' for n in names)} taken together.", ""]
    header = [what, "merges"] + [_TITLES[m] for m in metrics] + ["mean drop"]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, group in groups.items():
        group = list(group)
        means = [sum(float(r.metrics[m]) for r in group) / len(group) for m in metrics]
        drop = sum(r.outcome for r in group) / len(group)
        lines.append(
            f"| {name} | {len(group)} | " + " | ".join(f"{v:.4f}" for v in means) + f" | {drop:.4f} |"
        )
    lines += [
        "",
        "### Pooled (raw values)",
        "",
        f"A metric that only tells the {what}s apart correlates here without ranking the merges "
        f"of any one {what}: compare with the within-{what} figures below.",
        "",
        summarize(correlations(records, metrics)),
        f"### Within each {what} (ranks taken inside each {what}, then pooled)",
        "",
        summarize(correlations(stratified_records(groups), metrics)),
    ]
    return "\n".join(lines).rstrip() + "\n"


# --- the pairwise study on a zoo ------------------------------------------------------------------

DEFAULT_CANDIDATES: dict[str, list[dict[str, float]]] = {
    # Ilharco et al. pick lambda on validation; with two task vectors 0.5 is their mean.
    "task_arithmetic": [{"weight": 1.0, "lambda": v} for v in (0.3, 0.5, 0.7, 1.0)],
    # TIES's paper setting: keep the top 20%, disjoint mean, lambda picked on validation.
    "ties": [{"weight": 1.0, "density": 0.2, "lambda": v} for v in (0.7, 1.0, 1.3)],
}
_PRETRAINED_KEY = "__pretrained__"


@dataclass
class PairwiseStudy:
    """The records (one per pair and method), their correlations and a summary in words."""

    records: list[MergeRecord]
    correlations: list[Correlation]
    summary: str
    individual: dict[str, float]
    diagnostics: DiagnosticsResult
    # task -> 95% bootstrap interval over test examples of `individual`
    individual_intervals: dict[str, Interval] = field(default_factory=dict)

    def markdown(self) -> str:
        """A report section: the merges with their metrics and outcome, then the verdicts."""
        individual = ", ".join(
            f"{t} {a:.3f}" + _interval(self.individual_intervals.get(t))
            for t, a in self.individual.items()
        )
        return (
            f"Individual fine-tuned accuracy (95% bootstrap interval over test examples): "
            f"{individual}. The normalised accuracy of a merge carries the stratified bootstrap "
            "interval over its test examples, each task's own accuracy held fixed.\n\n"
            + self.table()
            + "\n"
            + self.summary
        )

    def table(self) -> str:
        """Markdown: one row per merge with its metrics and outcome."""
        metrics = [m for m in METRICS]
        header = ["pair", "method"] + [_TITLES[m] for m in metrics]
        header += ["normalised acc.", "drop", "parameters"]
        rows = [
            "| " + " | ".join(header) + " |",
            "|" + "---|" * 2 + "---:|" * (len(header) - 3) + "---|",
        ]
        for r in self.records:
            cells = [" + ".join(r.tasks), r.method]
            cells += [f"{r.metrics[m]:.4f}" for m in metrics]
            cells += [
                f"{r.details.get('normalised', math.nan):.4f}"
                + _interval(r.details.get("normalised_interval"), scale=1.0, digits=4),
                f"{r.outcome:.4f}",
            ]
            cells.append(
                ", ".join(f"{k}={v:g}" for k, v in r.details.get("parameters", {}).items())
            )
            rows.append("| " + " | ".join(cells) + " |")
        return "\n".join(rows) + "\n"


def _interval(interval, scale: float = 1.0, digits: int = 3) -> str:
    """` [low, high]` of an Interval or a [low, high] pair; "" for None."""
    if interval is None:
        return ""
    low, high = (interval.low, interval.high) if isinstance(interval, Interval) else interval
    return f" [{scale * low:.{digits}f}, {scale * high:.{digits}f}]"


def _merge_config(method: str, tasks: Sequence[str], candidate: Mapping[str, float]) -> dict:
    from mergelab.methods import get_method

    declared = {p.name: p for p in get_method(method).params}
    unknown = sorted(set(candidate) - set(declared))
    if unknown:
        raise ConfigError(f"method `{method}` has no parameter(s) {', '.join(unknown)}")
    per_model = {k: v for k, v in candidate.items() if declared[k].per_model}
    shared = {k: v for k, v in candidate.items() if not declared[k].per_model}
    return {
        "merge_method": method,
        "base_model": _PRETRAINED_KEY,
        "models": [{"model": t, "parameters": dict(per_model)} for t in tasks],
        "parameters": shared,
    }


def pairwise_study(
    built_zoo,
    methods: Sequence[str] = ("task_arithmetic", "ties"),
    *,
    candidates: Mapping[str, Sequence[Mapping[str, float]]] | None = None,
    split: str = "test",
    select_split: str = "validation",
    top_k: float = 0.2,
    exclude_unchanged: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> PairwiseStudy:
    """Merge every pair of a zoo's tasks with each method and correlate metrics with the drop.

    Args:
        built_zoo: a `mergelab_bench.zoo.base.BuiltZoo` (fine-tuned encoders, heads, evaluator).
        methods: registry names of the merge methods.
        candidates: method -> hyperparameter settings ({"weight", "density", "lambda"...}, per
            model and global mixed; the registry says which is which). With several, the one with
            the best mean normalised accuracy on `select_split` is used. Default:
            `DEFAULT_CANDIDATES` (a method missing there merges with weight 1).
        split: the split whose accuracy is reported and correlated.
        top_k: TSSD's kept fraction; the metrics are computed once over all fine-tuned encoders.
        exclude_unchanged: leave out of the metrics the tensors no fine-tune changed (e.g. a
            frozen word-embedding table): their zero task vectors carry no signal, and would make
            TSSD's top-K% a larger share of the weights that were trained.
        seed: the merge seed (randomised methods).

    Each merged encoder is scored with each task's own head; normalised accuracy is merged /
    individual fine-tuned accuracy on the same split, averaged over the pair; the outcome is the
    drop, 1 - normalised accuracy. Returns a `PairwiseStudy`.
    """
    from mergelab import merge_state_dicts

    tasks = list(built_zoo.tasks)
    if len(tasks) < 2:
        raise ConfigError(f"a pairwise study needs at least two tasks; the zoo has {tasks}")
    candidates = dict(DEFAULT_CANDIDATES if candidates is None else candidates)
    evaluator = built_zoo.evaluator

    unchanged = []
    if exclude_unchanged:
        unchanged = [
            glob.escape(name)
            for name, value in built_zoo.pretrained.items()
            if all(
                name in built_zoo.finetuned[t] and torch.equal(built_zoo.finetuned[t][name], value)
                for t in tasks
            )
        ]
    diagnostics = diagnose(
        [built_zoo.finetuned[t] for t in tasks],
        built_zoo.pretrained,
        names=tasks,
        top_k=top_k,
        exclude=unchanged,
    )

    individual: dict[tuple[str, str], torch.Tensor] = {}

    def own_correct(task: str, which: str) -> torch.Tensor:
        if (task, which) not in individual:
            individual[task, which] = evaluator.correct(
                built_zoo.finetuned[task], built_zoo.heads[task], task, which
            )
        return individual[task, which]

    def own_accuracy(task: str, which: str) -> float:
        return own_correct(task, which).double().mean().item()

    def normalised(encoder, pair: Sequence[str], which: str) -> tuple[float, dict, Interval]:
        """Mean over the pair of merged / own accuracy, the per-task accuracies, and the
        stratified 95% bootstrap interval of the former over the merged model's examples (each
        task's own accuracy held fixed)."""
        correct = {t: evaluator.correct(encoder, built_zoo.heads[t], t, which) for t in pair}
        ratios = [correct[t].double() / own_accuracy(t, which) for t in pair]
        score = sum(r.mean().item() for r in ratios) / len(ratios)
        accuracies = {t: c.double().mean().item() for t, c in correct.items()}
        return score, accuracies, stratified_bootstrap_interval(ratios)

    pair_list = list(itertools.combinations(range(len(tasks)), 2))
    records = []
    for i, j in track(pair_list, "merging task pairs", progress):
        pair = (tasks[i], tasks[j])
        sources = {
            _PRETRAINED_KEY: built_zoo.pretrained,
            **{t: built_zoo.finetuned[t] for t in pair},
        }
        values = {m: diagnostics.total.pair(m, i, j) for m in METRICS}
        for method in methods:
            settings = list(candidates.get(method, [{"weight": 1.0}]))
            if not settings:
                raise ConfigError(f"no hyperparameter setting given for method `{method}`")
            chosen, selection = settings[0], None
            if len(settings) > 1:
                scored = []
                for setting in settings:
                    merged = merge_state_dicts(
                        _merge_config(method, pair, setting), sources, seed=seed
                    )
                    scored.append((normalised(merged, pair, select_split)[0], setting))
                best = max(range(len(scored)), key=lambda k: scored[k][0])
                selection, chosen = scored[best]
            merged = merge_state_dicts(_merge_config(method, pair, chosen), sources, seed=seed)
            score, accuracies, interval = normalised(merged, pair, split)
            records.append(
                MergeRecord(
                    tasks=pair,
                    method=method,
                    metrics=values,
                    outcome=1.0 - score,
                    details={
                        "normalised": score,
                        "normalised_interval": [interval.low, interval.high],
                        "accuracy": accuracies,
                        "individual": {t: own_accuracy(t, split) for t in pair},
                        "parameters": dict(chosen),
                        "selection_normalised": selection,
                    },
                )
            )
    found = correlations(records)
    return PairwiseStudy(
        records=records,
        correlations=found,
        summary=summarize(found),
        individual={t: own_accuracy(t, split) for t in tasks},
        diagnostics=diagnostics,
        individual_intervals={t: bootstrap_interval(own_correct(t, split)) for t in tasks},
    )
