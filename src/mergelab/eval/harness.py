"""Evaluate encoders on text tasks and summarise several models over several tasks.

An encoder here is any Hugging Face encoder (e.g. `BertModel`) whose sentence embedding is the
mean of its last hidden states over real (non-padding) tokens, as in Sentence-BERT
(Reimers & Gurevych 2019, https://arxiv.org/abs/1908.10084). A task's classifier is a linear
head on that embedding, so a merged encoder can be scored with each task's own head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mergelab.eval.bootstrap import Interval

Progress = Callable[[int], None]  # called with the number of items just finished


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average `hidden` [batch, tokens, dim] over the tokens where `attention_mask` is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    # clamp: a row with no real token (cannot come from a tokenizer) would divide by zero.
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def pooled_features(
    encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The mean-pooled last hidden states of `encoder` for one tokenised batch."""
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return mean_pool(hidden, attention_mask)


@torch.no_grad()
def embed_texts(
    encoder: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 64,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Mean-pooled embeddings [len(texts), dim] of `texts`, in input order, in eval mode.

    Texts are batched by length (then put back in order) so that padding, which costs as much
    compute as real tokens, stays small.
    """
    was_training = encoder.training
    encoder.eval()
    lengths = [
        len(ids)
        for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    ]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    chunks: list[torch.Tensor] = []
    try:
        for start in range(0, len(order), batch_size):
            batch = [texts[i] for i in order[start : start + batch_size]]
            tokens = tokenizer(
                batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            chunks.append(pooled_features(encoder, tokens["input_ids"], tokens["attention_mask"]))
            if progress is not None:
                progress(len(batch))
    finally:
        encoder.train(was_training)
    if not chunks:
        return torch.empty(0, 0)
    sorted_features = torch.cat(chunks)
    features = torch.empty_like(sorted_features)
    features[torch.tensor(order)] = sorted_features
    return features


def accuracy(logits: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Share of rows of `logits` whose arg-max equals the label."""
    labels = torch.as_tensor(labels)
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} predictions for {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return (logits.argmax(dim=-1) == labels).float().mean().item()


@torch.no_grad()
def head_accuracy(head: nn.Module, features: torch.Tensor, labels: Sequence[int]) -> float:
    """Accuracy of a linear `head` on precomputed `features`."""
    return accuracy(head(features), labels)


# --- multi-task tables ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRow:
    """One model's accuracy on each task, and its derived figures (None where undefined);
    `intervals`: the 95% bootstrap interval of each task's accuracy, where measured."""

    name: str
    accuracy: dict[str, float]
    average: float
    normalised: float | None
    retained_gain: float | None
    intervals: dict[str, Interval] = field(default_factory=dict)


def summarise(
    results: Mapping[str, Mapping[str, float]],
    *,
    finetuned: Mapping[str, float] | None = None,
    probe: Mapping[str, float] | None = None,
    intervals: Mapping[str, Mapping[str, Interval]] | None = None,
) -> list[ModelRow]:
    """Per-model averages of a {model: {task: accuracy}} table.

    normalised: the mean over tasks of accuracy / the task's own fine-tuned accuracy (Ilharco et
        al. 2023, https://arxiv.org/abs/2212.04089, report merges this way).
    retained_gain: the mean over tasks of (accuracy - probe) / (fine-tuned - probe): the share of
        what fine-tuning gained over the linear probe that a model keeps (1 = all of it, 0 = no
        better than the probe, negative = worse). Tasks where fine-tuning did not beat the probe
        are left out, since the ratio means nothing there.
    intervals: {model: {task: Interval}}, carried into the rows (and printed by the tables).
    Every model must report every task of the first model.
    """
    rows: list[ModelRow] = []
    tasks = list(next(iter(results.values()), {}))
    for name, by_task in results.items():
        missing = [t for t in tasks if t not in by_task]
        if missing:
            raise ValueError(f"model {name!r} has no result for task(s) {missing}")
        average = sum(by_task[t] for t in tasks) / len(tasks)
        normalised = None
        if finetuned is not None and all(finetuned.get(t, 0) > 0 for t in tasks):
            normalised = sum(by_task[t] / finetuned[t] for t in tasks) / len(tasks)
        retained = None
        if finetuned is not None and probe is not None:
            gains = [
                (by_task[t] - probe[t]) / (finetuned[t] - probe[t])
                for t in tasks
                if finetuned[t] > probe[t]
            ]
            retained = sum(gains) / len(gains) if gains else None
        measured = {t: i for t, i in (intervals or {}).get(name, {}).items() if t in tasks}
        rows.append(
            ModelRow(name, {t: by_task[t] for t in tasks}, average, normalised, retained, measured)
        )
    return rows


def interval_text(interval: Interval | None) -> str:
    """` [82.1, 87.9]` (percent) or "" without an interval."""
    if interval is None:
        return ""
    return f" [{100 * interval.low:.1f}, {100 * interval.high:.1f}]"


def render_table(rows: Sequence[ModelRow], title: str = "Test accuracy"):
    """A rich Table of `rows`: one column per task (accuracy and, where measured, its 95%
    bootstrap interval), then average, normalised, retained gain (the last two only when some
    row has them)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("model", style="bold")
    tasks = list(rows[0].accuracy) if rows else []
    derived = any(r.normalised is not None or r.retained_gain is not None for r in rows)
    for task in tasks:
        table.add_column(task, justify="right")
    if len(tasks) > 1 or derived:
        table.add_column("average", justify="right", style="bold")
    if derived:
        table.add_column("normalised", justify="right")
        table.add_column("gain kept", justify="right")

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    for row in rows:
        cells = [pct(row.accuracy[t]) + interval_text(row.intervals.get(t)) for t in tasks]
        if len(tasks) > 1 or derived:
            cells.append(pct(row.average))
        if derived:
            cells += [pct(row.normalised), pct(row.retained_gain)]
        table.add_row(row.name, *cells)
    return table


# --- evaluating an encoder with per-task heads ------------------------------------------------------


def head_classes(head: nn.Module) -> int | None:
    """The number of classes a head outputs: `out_features` of a Linear (or of its last Linear)."""
    if isinstance(head, nn.Linear):
        return head.out_features
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def check_head(head: nn.Module, num_classes: int, task: str) -> None:
    """Raise MergeLabError when `head` does not output one logit per class of `task`."""
    from mergelab.errors import MergeLabError

    found = head_classes(head)
    if found is not None and found != num_classes:
        raise MergeLabError(
            f"the head given for task {task!r} outputs {found} classes; the task has {num_classes}"
        )


def state_dict_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of a state dict (order-independent)."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class ResultCache:
    """Accuracies on disk, one small JSON file per key, written atomically.

    The key hashes the encoder's weights, the head's weights, the task, the split and the
    evaluator's fingerprint (its data and settings), so a result is reused only for the very
    same model on the very same examples.
    """

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def key(*parts: str) -> str:
        import hashlib

        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> tuple[float, torch.Tensor | None] | None:
        """(accuracy, per-example correctness or None where it was not recorded), or None."""
        import json

        path = self._path(key)
        try:
            entry = json.loads(path.read_text())
            bits = entry.get("correct")
            correct = None if bits is None else torch.tensor([c == "1" for c in bits])
            return float(entry["accuracy"]), correct
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            # Absent, or unreadable (a crash mid-write cannot cause this: writes are atomic).
            return None

    def put(self, key: str, value: float, correct: torch.Tensor | None = None, **facts) -> None:
        import json

        from mergelab.fileio import write_text_atomic

        entry = {"accuracy": value, **facts}
        if correct is not None:
            entry["correct"] = correctness_bits(correct)
        write_text_atomic(self._path(key), json.dumps(entry))


def correctness_bits(correct: torch.Tensor) -> str:
    """Per-example correctness as a string of 0s and 1s (compact, JSON-friendly)."""
    return "".join("1" if c else "0" for c in correct.reshape(-1).tolist())


def correctness_from_bits(bits: str) -> torch.Tensor:
    return torch.tensor([c == "1" for c in bits], dtype=torch.bool)


def default_result_cache() -> ResultCache:
    import os

    env = os.environ.get("MERGELAB_CACHE")
    return ResultCache((Path(env) if env else Path.home() / ".cache" / "mergelab") / "eval")


def evaluate_model(
    evaluator,
    encoder: Mapping[str, torch.Tensor] | nn.Module,
    heads: Mapping[str, nn.Module],
    *,
    tasks: Sequence[str] | None = None,
    split: str = "test",
    cache: ResultCache | None = None,
    examples: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Accuracy of `encoder` (a state dict, or a torch module such as an upscaled merge or a
    routed model) with each task's own head, per task.

    evaluator: anything with `correct(encoder, head, task, split)` (a bool per example of the
        split, see mergelab_bench.zoo.base) or, for a bare score, `accuracy(encoder, head, task,
        split)`; for an encoder given as a module, `correct_module(module, head, task, split)`
        (results for a module are not cached). Its optional `num_classes(task)` lets heads be
        checked before any compute, and its optional `fingerprint` (a string naming its data
        and settings) enables `cache`.
    tasks: the tasks to score (default: every task in `heads`); a task without a head, or a
        head whose class count does not match the task, raises MergeLabError.
    examples: a dict filled with each task's per-example correctness (for bootstrap intervals);
        needs an evaluator with `correct`.
    """
    from mergelab.errors import MergeLabError

    tasks = list(heads) if tasks is None else list(tasks)
    missing = [t for t in tasks if t not in heads]
    if missing:
        raise MergeLabError(f"no head for task(s) {missing}; heads given for {sorted(heads)}")
    is_module = isinstance(encoder, nn.Module)
    per_example = getattr(evaluator, "correct_module" if is_module else "correct", None)
    if is_module and per_example is None:
        raise MergeLabError(
            f"{type(evaluator).__name__} scores state dicts only (it has no `correct_module`), "
            "so a model given as a torch module cannot be scored with it"
        )
    if examples is not None and per_example is None:
        raise MergeLabError(
            f"{type(evaluator).__name__} scores no single examples (it has no `correct`), so "
            "no confidence interval can be computed"
        )
    num_classes = getattr(evaluator, "num_classes", None)
    if num_classes is not None:
        for task in tasks:
            check_head(heads[task], num_classes(task), task)
    fingerprint = getattr(evaluator, "fingerprint", None)
    use_cache = cache is not None and fingerprint is not None and not is_module
    weights = state_dict_hash(encoder) if use_cache else ""
    results: dict[str, float] = {}
    for task in tasks:
        key = ""
        if use_cache:
            key = cache.key(fingerprint, weights, state_dict_hash(heads[task].state_dict()), task, split)
            hit = cache.get(key)
            if hit is not None and (hit[1] is not None or per_example is None):
                results[task] = hit[0]
                if examples is not None:
                    examples[task] = hit[1]
                continue
        correct = None
        if per_example is not None:
            correct = torch.as_tensor(per_example(encoder, heads[task], task, split)).reshape(-1).bool()
            if correct.numel() == 0:
                raise MergeLabError(f"task {task!r} has no {split} examples to score")
            results[task] = correct.float().mean().item()
            if examples is not None:
                examples[task] = correct
        else:
            results[task] = float(evaluator.accuracy(encoder, heads[task], task, split))
        if use_cache:
            cache.put(key, results[task], correct, task=task, split=split)
    return results


# --- results over several seeds: tables, JSON, chart -------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation over seeds (std 0 for a single seed); `interval`: the
    95% bootstrap interval over test examples of the mean over seeds, where measured."""

    mean: float
    std: float
    n: int
    interval: Interval | None = None

    @classmethod
    def of(cls, values: Sequence[float], interval: Interval | None = None) -> Spread | None:
        if not values:
            return None
        mean = sum(values) / len(values)
        if len(values) < 2:
            return cls(mean, 0.0, 1, interval)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
        return cls(mean, var**0.5, len(values), interval)


@dataclass(frozen=True)
class AggregateRow:
    """One model over seeds: per-task accuracy, average, normalised and retained gain."""

    name: str
    accuracy: dict[str, Spread]
    average: Spread
    normalised: Spread | None
    retained_gain: Spread | None
    note: str = ""


def aggregate_rows(
    per_seed: Sequence[Sequence[ModelRow]],
    notes: Mapping[str, str] | None = None,
    examples: Sequence[Mapping[str, Mapping[str, torch.Tensor]]] | None = None,
) -> list[AggregateRow]:
    """Combine the `summarise` rows of several seeds, model by model (in first-seed order).

    A model missing from some seed is aggregated over the seeds that have it.
    examples: per seed, {model: {task: per-example correctness on the test split}}. Where every
        seed of a model has them for the same examples, each task's accuracy carries the 95%
        bootstrap interval over examples of its mean over seeds (each example's correctness
        averaged over seeds, then resampled), and the average over tasks carries the
        stratified bootstrap interval (examples resampled within each task). Without them, a
        single seed's measured interval from `summarise` is kept.
    """
    from mergelab.eval.bootstrap import bootstrap_interval, stratified_bootstrap_interval

    order: list[str] = []
    by_name: dict[str, list[ModelRow]] = {}
    outcomes: dict[str, list[Mapping[str, torch.Tensor] | None]] = {}
    for index, rows in enumerate(per_seed):
        for row in rows:
            if row.name not in by_name:
                order.append(row.name)
                by_name[row.name] = []
                outcomes[row.name] = []
            by_name[row.name].append(row)
            seed_examples = examples[index].get(row.name) if examples is not None else None
            outcomes[row.name].append(seed_examples)

    def seed_mean(name: str, task: str) -> torch.Tensor | None:
        vectors = [o.get(task) if o is not None else None for o in outcomes[name]]
        if any(v is None for v in vectors) or len({v.numel() for v in vectors}) != 1:
            return None
        return torch.stack([v.reshape(-1).double() for v in vectors]).mean(dim=0)

    out = []
    for name in order:
        rows = by_name[name]
        tasks = list(rows[0].accuracy)

        def optional(values):
            present = [v for v in values if v is not None]
            return Spread.of(present) if present else None

        means = {t: seed_mean(name, t) for t in tasks}
        intervals = {
            t: bootstrap_interval(m) if m is not None else rows[0].intervals.get(t)
            for t, m in means.items()
        }
        average_interval = None
        if tasks and all(m is not None for m in means.values()):
            average_interval = stratified_bootstrap_interval([means[t] for t in tasks])
        out.append(
            AggregateRow(
                name=name,
                accuracy={t: Spread.of([r.accuracy[t] for r in rows], intervals[t]) for t in tasks},
                average=Spread.of([r.average for r in rows], average_interval),
                normalised=optional([r.normalised for r in rows]),
                retained_gain=optional([r.retained_gain for r in rows]),
                note=(notes or {}).get(name, ""),
            )
        )
    return out


def _pct(spread: Spread | None, with_std: bool = True) -> str:
    if spread is None:
        return "-"
    text = f"{100 * spread.mean:.1f}"
    if with_std and spread.n > 1:
        text += f" ± {100 * spread.std:.1f}"
    return text + interval_text(spread.interval)


def markdown_table(
    rows: Sequence[AggregateRow], columns: Mapping[str, Mapping[str, str]] | None = None
) -> str:
    """A markdown table: model, each task, average, normalised, gain kept, note (percentages;
    `mean ± std` over seeds when there are several, then `[low, high]`, the 95% bootstrap
    interval over test examples, where measured).

    columns: more columns before the note, header -> {model name: cell} (a model without a
    cell gets an empty one), e.g. a benchmark's storage and inference cost per model."""
    columns = dict(columns or {})
    tasks = list(rows[0].accuracy) if rows else []
    header = ["model", *tasks, "average", "normalised", "gain kept", *columns, "chosen on validation"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 2) + "|---|"]
    for row in rows:
        cells = [
            row.name,
            *(_pct(row.accuracy[t]) for t in tasks),
            f"**{_pct(row.average)}**",
            _pct(row.normalised),
            _pct(row.retained_gain),
            *(cells_by_model.get(row.name, "") for cells_by_model in columns.values()),
            row.note or "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _spread_json(spread: Spread | None):
    if spread is None:
        return None
    out = {"mean": spread.mean, "std": spread.std, "n": spread.n}
    if spread.interval is not None:
        out["interval"] = [spread.interval.low, spread.interval.high]
    return out


def rows_to_json(rows: Sequence[AggregateRow]) -> list[dict]:
    return [
        {
            "model": r.name,
            "accuracy": {t: _spread_json(s) for t, s in r.accuracy.items()},
            "average": _spread_json(r.average),
            "normalised": _spread_json(r.normalised),
            "retained_gain": _spread_json(r.retained_gain),
            "note": r.note,
        }
        for r in rows
    ]


def bar_chart(rows: Sequence[AggregateRow], path: str | Path, title: str = "") -> Path:
    """A horizontal bar chart of average accuracy (error bars: std over seeds), written as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on CI or servers
    import matplotlib.pyplot as plt

    names = [r.name for r in rows]
    means = [100 * r.average.mean for r in rows]
    stds = [100 * r.average.std for r in rows]
    figure, axes = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    positions = list(range(len(rows)))[::-1]
    axes.barh(positions, means, xerr=stds, color="#4c72b0", ecolor="#333333", capsize=2)
    axes.set_yticks(positions, names, fontsize=8)
    axes.set_xlabel("average test accuracy (%)")
    axes.set_xlim(0, 100)
    if title:
        axes.set_title(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_report(
    rows: Sequence[AggregateRow], out_dir: str | Path, *, title: str, facts: Mapping | None = None,
    stem: str = "results", columns: Mapping[str, Mapping[str, str]] | None = None,
) -> dict[str, Path]:
    """Write `stem`.json, `stem`.md and `stem`.png into `out_dir` (each atomically replaced);
    `columns`: more columns of the table (`markdown_table`), also kept in the JSON."""
    import json

    from mergelab.fileio import write_atomic, write_text_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / f"{stem}.{kind}" for kind in ("json", "md", "png")}
    payload = {"title": title, "facts": dict(facts or {}), "rows": rows_to_json(rows)}
    if columns:
        payload["columns"] = {header: dict(cells) for header, cells in columns.items()}
    text = {
        "json": json.dumps(payload, indent=2, default=str) + "\n",
        "md": f"## {title}\n\n" + markdown_table(rows, columns),
    }
    for kind, content in text.items():
        write_text_atomic(paths[kind], content)
    write_atomic(paths["png"], lambda temporary: bar_chart(rows, temporary, title))
    return paths
