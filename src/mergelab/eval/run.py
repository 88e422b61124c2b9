"""Score a model folder on task specs with baselines: what `mergelab eval` runs.

The baselines are the pretrained model the folder was fine-tuned from (`--base`, else the base
recorded in its recipe.json, else the packaged all-MiniLM-L6-v2) with a linear probe fit on the
task's training split; for perplexity tasks, the pretrained language model itself.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from mergelab.checkpoint.heads import choose_head, folder_heads
from mergelab.errors import CheckpointError, MergeLabError
from mergelab.eval.bootstrap import CONFIDENCE, RESAMPLES
from mergelab.eval.evaluator import DEFAULT_LIMIT, ModelEvaluator, TaskResult
from mergelab.eval.models import (
    RECIPE_BASE_KEY,
    Classifier,
    LanguageModel,
    load_base_encoder,
    load_model,
    packaged_minilm_path,
    read_head,
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
    modulators: str | None = None,
) -> EvalReport:
    """Score the model folder `model` on every task of `task_specs` (see
    `mergelab.eval.sources`), plus the baselines; every spec and head is checked before any
    compute.

    head: a head file, or the name of one of the folder's heads; default: per task, the head the
        folder holds for it (a fine-tune's `head.safetensors`, or a merged folder's `heads/`
        by task name; see `mergelab.checkpoint.heads`). A head's rows are matched to the task's
        classes by label name; a task label the head lacks is an error.
    seed: of splits, subsets and bootstrap; default: the seed the head's fine-tune recorded
        (the split `mergelab finetune` trained on), else 0.
    max_length: tokens per text (default: the fine-tune's recorded max_length, else 128).
    say: called with a short message before each step (progress for the CLI).
    modulators: for a merge output with per-task modulators (TALL masks, EMR; see
        mergelab.modulators), the task whose modulators to apply; default: each task's own
        (the modulator task named like the eval task). The modulators' base is the one their
        manifest records, else `base`.
    Raises MergeLabError for a bad spec, a folder that is not a model, a missing head, or a
    model that does not fit a task.
    """
    folder = Path(model)
    recipe = read_recipe(folder)
    notes: list[str] = []
    if not task_specs or not all(spec.strip() for spec in task_specs):
        raise MergeLabError("give at least one task spec, and no empty one")
    tasks = [load_task(spec) for spec in task_specs]
    task_names = [t.name for t in tasks]
    twice = sorted({n for n in task_names if task_names.count(n) > 1})
    if twice:
        raise MergeLabError(f"task name(s) {twice} given twice; each task is scored once")
    scored = load_model(folder, head=None)
    heads = _task_heads(folder, recipe, scored, tasks, head)
    facts = [_reading_facts(recipe, chosen) for chosen in heads]
    seeds = []
    for task, fact in zip(tasks, facts, strict=True):
        recorded = fact.get("split_seed")
        if seed is not None and isinstance(recorded, int) and recorded != seed:
            notes.append(
                f"the {task.name!r} head was fine-tuned on the split of seed {recorded}; with "
                f"--seed {seed} the test split may hold examples it trained on"
            )
        seeds.append(seed if seed is not None else (recorded if isinstance(recorded, int) else 0))
    evaluators: dict[tuple[int, int], ModelEvaluator] = {}

    def evaluator_for(i: int) -> ModelEvaluator:
        length = max_length if max_length is not None else int(facts[i].get("max_length", 128))
        key = (seeds[i], length)
        if key not in evaluators:
            evaluators[key] = ModelEvaluator(limit=limit, seed=seeds[i], max_length=length)
        return evaluators[key]

    say = say or (lambda _message: None)
    modulated, chosen = _task_modulators(folder, tasks, modulators, base)
    results = []
    try:
        for i, task in enumerate(tasks):
            model_for_task = scored
            if modulated is not None:
                modulator = chosen[task.name]
                say(f"applying the modulators of {modulator}")
                model_for_task = _with_weights(
                    scored, modulated.state_dict(modulator), f"{scored.name} [{modulator}]"
                )
            say(f"scoring {model_for_task.name} on {task.name}")
            with_head = (replace(model_for_task, head=heads[i][1]) if heads[i] is not None
                         else model_for_task)  # fmt: skip
            result = evaluator_for(i).evaluate(with_head, task, split)
            _count_truncated(result, evaluator_for(i), with_head, task, split, notes)
            results.append(result)
            del model_for_task, with_head
    finally:
        if modulated is not None:
            modulated.close()
    recorded_bases = {f["base_model"]: None for f in facts if f.get("base_model")}
    base_recipe = {**recipe, RECIPE_BASE_KEY: next(iter(recorded_bases), None)}
    modalities = {f.get("modality") for f in facts} - {None}
    if "modality" not in base_recipe and len(modalities) == 1:
        base_recipe["modality"] = modalities.pop()
    if len(recorded_bases) > 1 and base is None:
        notes.append(f"the heads' fine-tunes record several bases {list(recorded_bases)}; the "
                     "baselines use the first (pass --base to choose)")  # fmt: skip
    base_folder = _base_folder(base_recipe, Path(base) if base is not None else None, notes)
    input_size = next((f["input_size"] for f in facts if f.get("input_size")), None)
    used_base = None
    if baselines:
        used_base, baseline_results = _baselines(
            [evaluator_for(i) for i in range(len(tasks))], scored, tasks, split, base_folder,
            notes, say, input_size,
        )  # fmt: skip
        by_task: dict[str, list[TaskResult]] = {}
        for result in baseline_results:
            by_task.setdefault(result.task, []).append(result)
        results = [r for own in results for r in (own, *by_task.get(own.task, []))]
    if len(set(seeds)) > 1:
        notes.append(f"tasks are split by their fine-tunes' seeds: "
                     f"{dict(zip(task_names, seeds, strict=True))}")  # fmt: skip
    return EvalReport(str(folder), used_base, split, seeds[0], limit, results, notes)


def _count_truncated(result: TaskResult, evaluator: ModelEvaluator, model, task, split: str,
                     notes: list[str]) -> None:  # fmt: skip
    """Record in `result` how many scored texts were cut at the evaluator's max_length (and
    say so when any was)."""
    tokenizer = getattr(model, "tokenizer", None)
    if task.modality != "text" or tokenizer is None:
        return
    if getattr(task, "is_user_data", False):
        splits = task.splits(evaluator.seed)
        sizes = {s: len(splits.get(s)) for s in ("train", "validation", "test")}
        read = len(task.load())
        result.facts["rows"] = {"read": read, **sizes}
        notes.append(f"{task.name}: {read} rows read; split {sizes['train']}/{sizes['validation']}/"
                     f"{sizes['test']} (train/validation/test, seed {evaluator.seed}); "
                     f"{read - sum(sizes.values())} in no split")  # fmt: skip
    texts = evaluator.examples(task, split).texts
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=False)["input_ids"]]
    cut = sum(1 for n in lengths if n > evaluator.max_length)
    result.facts.update({"max_length": evaluator.max_length, "truncated": cut})
    if cut:
        notes.append(f"{task.name}: {cut} of {len(texts)} {split} texts ({cut / len(texts):.0%}) are "
                     f"longer than {evaluator.max_length} tokens and were truncated (--max-length)")  # fmt: skip


def _reading_facts(recipe: dict, chosen) -> dict:
    """How a task's inputs were read when its head was trained: the head's recorded facts (a
    merged folder's heads.json), else the folder's recipe.json."""
    if chosen is not None and chosen[0] is not None and chosen[0].facts:
        return dict(chosen[0].facts)
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    settings = recipe.get("settings") if isinstance(recipe.get("settings"), dict) else {}
    facts = {k: data[k] for k in ("max_length", "split_seed", "input_size") if k in data}
    if "split_seed" not in facts and isinstance(recipe.get("seed"), int):
        facts["split_seed"] = recipe["seed"]  # older folders
    if "max_length" not in facts and "max_length" in settings:
        facts["max_length"] = settings["max_length"]
    if recipe.get(RECIPE_BASE_KEY):
        facts["base_model"] = recipe[RECIPE_BASE_KEY]
    return facts


def _task_heads(folder: Path, recipe: dict, scored, tasks, head) -> list:
    """Per task: (its TaskHead or None, the head module with rows in the task's class order),
    or None for a model scored without a head (a language model, an encoder outputting logits).
    Every task's head is found and checked before any compute."""
    if not isinstance(scored, Classifier):
        if head is not None:
            raise MergeLabError(f"{folder} is a causal language model; --head is for encoders")
        return [None] * len(tasks)
    try:
        heads = folder_heads(folder)
    except CheckpointError as error:
        raise MergeLabError(str(error)) from None
    chosen = []
    for task in tasks:
        if head is not None and Path(head).is_file():
            found = _described_head(Path(head))
            module = read_head(head)
            names = found.label_names if found is not None else ()
        elif head is not None or heads:
            try:
                if head is None and len(heads) == 1:
                    found = heads[0]  # a fine-tune's one head: the label names decide if it fits
                else:
                    found = choose_head(heads, str(head) if head is not None else task.name, folder)
            except CheckpointError as error:
                if head is not None and not heads:
                    raise MergeLabError(f"no classifier head at {head}") from None
                raise MergeLabError(str(error)) from None
            module, names = read_head(found.path), found.label_names
        else:
            raise MergeLabError(
                f"{folder} has no head.safetensors nor heads.json: pass --head PATH (for an "
                "encoder merged from `mergelab finetune` folders, the merge carries their heads)"
            )
        described = f"the head {found.name!r} (from {found.source})" if found else f"the head {head}"
        chosen.append((found, _match_classes(module, names, task, described)))
    return chosen


def _described_head(path: Path):
    """The TaskHead (label names, recorded facts) of a head file inside a fine-tuned or merged
    folder, or None for a bare head file."""
    try:
        return next((h for h in folder_heads(path.parent) if h.path.resolve() == path.resolve()),
                    None)  # fmt: skip
    except CheckpointError:
        return None


def _match_classes(module, names: tuple[str, ...], task, described: str):
    """`module` with its rows in `task`'s class order, matched by label name; unnamed heads are
    taken as they are (the evaluator checks the class count)."""
    if not names:
        return module
    lacking = [n for n in task.label_names if n not in names]
    if lacking:
        raise MergeLabError(
            f"task {task.name!r} has label(s) {lacking} that {described} lacks; its classes are "
            f"{list(names)}"
        )
    if len(names) != len(task.label_names):
        raise MergeLabError(
            f"task {task.name!r} has {len(task.label_names)} classes {list(task.label_names)}; "
            f"{described} was trained on {len(names)} {list(names)}: score it on data that holds "
            "every class it predicts"
        )
    order = [names.index(n) for n in task.label_names]
    if order == list(range(len(order))):
        return module
    import torch

    permuted = torch.nn.Linear(module.in_features, module.out_features)
    with torch.no_grad():
        permuted.weight.copy_(module.weight[order])
        permuted.bias.copy_(module.bias[order])
    return permuted.requires_grad_(False)


def _task_modulators(folder: Path, tasks, modulators, base):
    """(the open ModulatedFolder, {eval task: modulator task}) for a folder with per-task
    modulators, else (None, {}). Every task's modulators are found, and the folder checked
    against them, before any scoring."""
    from mergelab.modulators import ModulatedFolder, has_modulators

    if not has_modulators(folder):
        if modulators is not None:
            raise MergeLabError(f"--modulators {modulators}: {folder} holds no modulators")
        return None, {}
    from mergelab.modulators.format import read_manifest

    recorded = read_manifest(folder).base_path
    modulated = ModulatedFolder(folder, recorded if recorded and Path(recorded).exists() else base)
    chosen = {t.name: modulators or t.name for t in tasks}
    missing = sorted({name for name in chosen.values() if name not in modulated.tasks})
    if missing:
        modulated.close()
        raise MergeLabError(
            f"{folder} holds modulators for task(s) {', '.join(modulated.tasks)}; none is named "
            f"{', '.join(map(repr, missing))} (choose one with --modulators TASK)"
        )
    return modulated, chosen


def _with_weights(scored, state_dict, name: str):
    """A copy of `scored` whose module holds `state_dict` (every key must be one of its)."""
    import copy

    attribute = "encoder" if isinstance(scored, Classifier) else "model"
    module = copy.deepcopy(getattr(scored, attribute))
    result = module.load_state_dict(dict(state_dict), strict=False)
    if result.unexpected_keys:
        raise MergeLabError(
            f"the modulated weights do not fit the model: unexpected "
            f"{sorted(result.unexpected_keys)[:5]}"
        )
    return replace(scored, **{attribute: module.eval(), "name": name})


def _baselines(evaluators, scored, tasks, split, base_folder, notes, say, input_size=None):
    if isinstance(scored, LanguageModel):
        if base_folder is None:
            notes.append("no pretrained baseline for a language model without --base")
            return None, []
        pretrained = load_base_encoder(base_folder, name=PRETRAINED_ROW)
        if not isinstance(pretrained, LanguageModel):
            raise MergeLabError(f"--base {base_folder} is not a causal language model")
        results = []
        for evaluator, task in zip(evaluators, tasks, strict=True):
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
    results = []
    for evaluator, task in zip(evaluators, tasks, strict=True):
        if base_folder is None and task.modality != "text":
            continue
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


CARD_START, CARD_END = "<!-- mergelab eval -->", "<!-- /mergelab eval -->"


def results_markdown(report: EvalReport) -> str:
    """The results as a Markdown section (one row per model, one column per task, each cell the
    score and its interval), between markers so that a later run replaces it."""
    tasks = list(dict.fromkeys(r.task for r in report.results))
    counts = {r.task: r.score.examples for r in report.results}
    cells: dict[str, dict[str, str]] = {}
    for result in report.results:
        cells.setdefault(result.model, {})[result.task] = result.score.format()
    header = " | ".join(f"{t} (n={counts[t]:,})" for t in tasks)
    lines = [CARD_START, "## Evaluation", "",
             f"`mergelab eval`, {report.split} split, seed {report.seed}; "
             f"[low, high]: {report.confidence:.0%} percentile-bootstrap interval "
             f"({report.resamples:,} resamples).", "",
             f"| model | {header} |", "|---|" + "---|" * len(tasks)]  # fmt: skip
    lines += [f"| {m} | " + " | ".join(row.get(t, "-") for t in tasks) + " |" for m, row in cells.items()]
    return "\n".join([*lines, CARD_END, ""])


def write_results_to_card(folder: str | os.PathLike, report: EvalReport) -> Path:
    """Put the results section into `folder`'s model card (README.md), replacing the one a
    previous run wrote; a folder without a card gets one holding the section only."""
    from mergelab.fileio import write_text_atomic

    card = Path(folder) / "README.md"
    section = results_markdown(report)
    text = card.read_text(encoding="utf-8") if card.is_file() else ""
    if CARD_START in text and CARD_END in text:
        before, _, rest = text.partition(CARD_START)
        _, _, after = rest.partition(CARD_END)
        text = before + section.rstrip("\n") + after
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section
    return write_text_atomic(card, text)
