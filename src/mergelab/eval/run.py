"""Score a model folder on task specs with baselines: what `mergelab eval` runs.

The baselines are the pretrained model the folder was fine-tuned from (`--base`, else the base
recorded in its recipe.json, else the packaged all-MiniLM-L6-v2) with a linear probe fit on the
task's training split; for perplexity tasks, the pretrained language model itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mergelab.errors import MergeLabError
from mergelab.eval.bootstrap import CONFIDENCE, RESAMPLES
from mergelab.eval.evaluator import DEFAULT_LIMIT, ModelEvaluator, TaskResult
from mergelab.eval.models import (
    RECIPE_BASE_KEY,
    Classifier,
    LanguageModel,
    load_base_encoder,
    load_model,
    packaged_minilm_path,
    read_recipe,
)
from mergelab.eval.sources import load_task

PROBE_ROW = "pretrained + linear probe"
PRETRAINED_ROW = "pretrained"


@dataclass
class EvalReport:
    """Every score of one `mergelab eval` run, in order: per task the model, then baselines."""

    model: str
    base: str | None
    split: str
    seed: int
    limit: int | None
    results: list[TaskResult]
    notes: list[str] = field(default_factory=list)
    resamples: int = RESAMPLES
    confidence: float = CONFIDENCE

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "base": self.base,
            "split": self.split,
            "seed": self.seed,
            "limit": self.limit,
            "interval": {"method": "percentile bootstrap over examples",
                         "confidence": self.confidence, "resamples": self.resamples},
            "results": [r.to_json() for r in self.results],
            "notes": list(self.notes),
        }  # fmt: skip

    def explanation(self) -> str:
        return (
            f"[low, high]: the {self.confidence:.0%} percentile-bootstrap interval over the scored "
            f"{self.split} examples ({self.resamples:,} resamples, seed {self.seed}): where the "
            "score would likely fall on another draw of as many examples; it does not cover "
            "training randomness (seeds)."
        )


def _base_folder(recipe: dict, base: Path | None, notes: list[str]) -> str | None:
    """The pretrained model of the baselines: `--base`, else the recorded base (a folder, or for
    an image fine-tune the encoder's `module:function` factory) when it exists here."""
    recorded = recipe.get(RECIPE_BASE_KEY)
    if base is not None:
        if recorded and Path(recorded) != Path(base):
            notes.append(f"--base {base} replaces the recorded base {recorded}")
        return str(base)
    if recorded:
        is_factory = recipe.get("modality") == "image" and ":" in str(recorded)
        if Path(recorded).is_dir() or (is_factory and not Path(recorded).exists()):
            return str(recorded)
        notes.append(f"the recorded base {recorded} does not exist here; using the default")
    return None


def evaluate_folder(
    model: str | os.PathLike,
    task_specs: list[str],
    *,
    head: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    split: str = "test",
    limit: int | None = DEFAULT_LIMIT,
    seed: int | None = None,
    baselines: bool = True,
    max_length: int | None = None,
    say: Callable[[str], None] | None = None,
) -> EvalReport:
    """Score the model folder `model` on every task of `task_specs` (see
    `mergelab.eval.sources`), plus the baselines; every spec is read before any compute.

    seed: of splits, subsets and bootstrap; default: the seed in the folder's recipe.json (the
        split `mergelab finetune` trained on), else 0.
    max_length: tokens per text (default: the fine-tune's recorded max_length, else 128).
    say: called with a short message before each step (progress for the CLI).
    Raises MergeLabError for a bad spec, a folder that is not a model, a missing head, or a
    model that does not fit a task.
    """
    folder = Path(model)
    recipe = read_recipe(folder)
    notes: list[str] = []
    data_facts = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    # `mergelab finetune` records the split's seed under data.split_seed (older folders: seed).
    recorded_seed = data_facts.get("split_seed", recipe.get("seed"))
    if seed is None:
        seed = int(recorded_seed) if isinstance(recorded_seed, int) else 0
    elif isinstance(recorded_seed, int) and recorded_seed != seed:
        notes.append(
            f"{folder} was fine-tuned on the split of seed {recorded_seed}; with --seed {seed} "
            "the test split may hold examples it trained on"
        )
    if not task_specs or not all(spec.strip() for spec in task_specs):
        raise MergeLabError("give at least one task spec, and no empty one")
    tasks = [load_task(spec) for spec in task_specs]
    task_names = [t.name for t in tasks]
    twice = sorted({n for n in task_names if task_names.count(n) > 1})
    if twice:
        raise MergeLabError(f"task name(s) {twice} given twice; each task is scored once")
    scored = load_model(folder, head=head)
    if isinstance(scored, Classifier) and scored.head is None:
        raise MergeLabError(
            f"{folder} has no head.safetensors: pass --head PATH (for a merged encoder, e.g. one "
            "source's head.safetensors)"
        )
    names = recipe.get("label_names")
    for task in tasks:
        if names and len(names) == len(task.label_names) and tuple(names) != task.label_names:
            notes.append(
                f"the head was trained with classes {names}; task {task.name!r} has "
                f"{list(task.label_names)}: check they are the same classes in the same order"
            )
    if max_length is None:
        settings = recipe.get("settings") if isinstance(recipe.get("settings"), dict) else {}
        max_length = data_facts.get("max_length", settings.get("max_length", 128))
    evaluator = ModelEvaluator(limit=limit, seed=seed, max_length=int(max_length))
    say = say or (lambda _message: None)
    results = []
    for task in tasks:
        say(f"scoring {scored.name} on {task.name}")
        results.append(evaluator.evaluate(scored, task, split))
    base_folder = _base_folder(recipe, Path(base) if base is not None else None, notes)
    input_size = data_facts.get("input_size")
    used_base = None
    if baselines:
        used_base, baseline_results = _baselines(
            evaluator, scored, tasks, split, base_folder, notes, say, input_size
        )
        by_task: dict[str, list[TaskResult]] = {}
        for result in baseline_results:
            by_task.setdefault(result.task, []).append(result)
        results = [r for own in results for r in (own, *by_task.get(own.task, []))]
    return EvalReport(str(folder), used_base, split, seed, limit, results, notes)


def _baselines(evaluator, scored, tasks, split, base_folder, notes, say, input_size=None):
    if isinstance(scored, LanguageModel):
        if base_folder is None:
            notes.append("no pretrained baseline for a language model without --base")
            return None, []
        pretrained = load_base_encoder(base_folder, name=PRETRAINED_ROW)
        if not isinstance(pretrained, LanguageModel):
            raise MergeLabError(f"--base {base_folder} is not a causal language model")
        results = []
        for task in tasks:
            say(f"scoring the pretrained model on {task.name}")
            results.append(evaluator.evaluate(pretrained, task, split))
        return str(base_folder), results
    text_tasks = [t for t in tasks if t.modality == "text"]
    other = [t for t in tasks if t.modality != "text"]
    if base_folder is None and other:
        notes.append(
            "no pretrained baseline for image tasks without --base (the packaged default is a "
            "text encoder)"
        )
    folder = base_folder
    if folder is None and text_tasks:
        try:
            folder = packaged_minilm_path()
        except MergeLabError as error:
            notes.append(f"no pretrained baseline: {error}")
    if folder is None:
        return None, []
    pretrained = load_base_encoder(folder, name=PRETRAINED_ROW, input_size=input_size)
    if not isinstance(pretrained, Classifier):
        raise MergeLabError(f"the base {folder} is a language model, not an encoder")
    chosen = tasks if base_folder is not None else text_tasks
    results = []
    for task in chosen:
        say(f"fitting and scoring a linear probe on the pretrained model, {task.name}")
        results.append(evaluator.evaluate_probe(pretrained, task, split, name=PROBE_ROW))
    return str(folder), results


def results_table(report: EvalReport):
    """A rich Table: one row per model (the scored one, then baselines), one column per task;
    each cell the score and its interval."""
    from rich.table import Table

    tasks: list[str] = []
    counts: dict[str, int] = {}
    cells: dict[str, dict[str, str]] = {}
    for result in report.results:
        if result.task not in counts:
            tasks.append(result.task)
            counts[result.task] = result.score.examples
        cells.setdefault(result.model, {})[result.task] = result.score.format()
    table = Table(title=f"{report.model}: {report.split} split")
    table.add_column("model", style="bold")
    for task in tasks:
        metric = next(r.score.metric for r in report.results if r.task == task)
        table.add_column(f"{task}\n{metric}, n={counts[task]:,}", justify="right")
    for name, by_task in cells.items():
        table.add_row(name, *(by_task.get(t, "-") for t in tasks))
    return table
