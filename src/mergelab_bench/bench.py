"""The merge benchmark: every applicable data-free method of the registry on a zoo.

For each zoo seed, each method's hyperparameters are picked from a small grid by the average
validation accuracy over the zoo's tasks (each task scored with its own head), and the chosen
merge is reported on the test split. Baselines: the pretrained encoder with each task's
fine-tuned head (the floor), with a linear probe per task (the cheap alternative a user has),
and each task's own fine-tuned model. Rows are aggregated over seeds (mean and sample std).

Merges go through `mergelab.merge_state_dicts`, the same validation and kernels as
`mergelab merge`. Grids are data (`GRIDS`); a method without an entry runs at its registry
defaults (weight 1 per model). Methods that take fewer models than the zoo has tasks (SLERP,
NuSLERP, NearSwap...) or need data are listed as not applicable, except an upscaled method
that trains its extras on unlabelled inputs (WEMoE's routers: `Upscaling.trainer`): it gets the
`TRAINER_EXAMPLES` training inputs of every task (a seeded draw), whose labels its objective (the heads'
prediction entropy) never reads.

Two kinds of method are more than one merged encoder, told apart by their declarations:
modulated ones (`modulation`: TALL masks, EMR) give each task its own encoder, scored with that
task's head; upscaled ones (`upscaling`: SMILE, WEMoE) give one bigger routed model
(`mergelab.merge_upscaled`; `mergelab.data_merge` for WEMoE), scored as a torch module with
each task's head (the zoo's evaluator's `module` / `correct_module`). Their rows carry the
extra storage per task and the inference cost against one model (`MethodOutcome`).
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import MergeLabError
from mergelab.eval.harness import (
    AggregateRow,
    ResultCache,
    aggregate_rows,
    correctness_bits,
    correctness_from_bits,
    evaluate_model,
    markdown_table,
    summarise,
    write_report,
)
from mergelab.fileio import write_text_atomic
from mergelab_bench.zoo.base import BuiltZoo, StateDict

BASE_NAME = "pretrained"
FLOOR_ROW = "pretrained + fine-tuned heads"
PROBE_ROW = "pretrained + linear probe"
FINETUNED_ROW = "individual fine-tuned"
Log = Callable[[str], None]


@dataclass(frozen=True)
class GridPoint:
    """One setting of a method: global parameters and per-model parameters (same for all)."""

    global_params: Mapping[str, Any] = field(default_factory=dict)
    model_params: Mapping[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        items = {**self.model_params, **self.global_params}
        items.pop("weight", None)
        return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in items.items()) or "defaults"


def grid(global_axes: Mapping[str, Sequence] | None = None,
         model_axes: Mapping[str, Sequence] | None = None) -> list[GridPoint]:
    """The cartesian product of the axes (see `merge_config` for the models' `weight`)."""
    global_axes = dict(global_axes or {})
    model_axes = dict(model_axes or {})
    points = []
    for model_values in itertools.product(*model_axes.values()):
        for global_values in itertools.product(*global_axes.values()):
            points.append(GridPoint(dict(zip(global_axes, global_values)),
                                    dict(zip(model_axes, model_values))))
    return points


# Small grids (2-4 points), picked on validation. Methods that sum task vectors (normalize off)
# need lambda well under 1 for five tasks; methods that average them (normalize on, TIES'
# disjoint mean, TSV, ISO) want lambda/alpha around 1.
GRIDS: dict[str, list[GridPoint]] = {
    "linear": grid(),
    "task_arithmetic": grid({"lambda": [0.3, 0.6, 1.0]}),
    "ties": grid({"lambda": [1.0, 1.5]}, {"density": [0.2, 0.5]}),
    "dare_ties": grid({"lambda": [0.3, 0.6]}, {"density": [0.5]}),
    "dare_linear": grid({"lambda": [0.3, 0.6]}, {"density": [0.5]}),
    "breadcrumbs": grid({"lambda": [0.3, 0.6]}, {"density": [0.9], "gamma": [0.01]}),
    "breadcrumbs_ties": grid({"lambda": [0.3, 0.6]}, {"density": [0.9], "gamma": [0.01]}),
    "della": grid({"lambda": [1.0, 1.5]}, {"density": [0.5], "epsilon": [0.15]}),
    "della_linear": grid({"lambda": [0.3, 0.6]}, {"density": [0.5], "epsilon": [0.15]}),
    "sce": grid({"select_topk": [0.2, 1.0]}),
    "tsv": grid({"lambda": [0.5, 1.0]}),
    "iso_c": grid({"alpha": [0.7, 1.3]}),
    "iso_cts": grid({"alpha": [0.7, 1.3]}),
    "pcb": grid({"lambda": [0.7, 1.2]}),
    "magmax": grid({"lambda": [0.5, 1.0]}),
    "lines": grid({"beta": [0.2, 0.5, 1.0]}),
    "consensus": grid({"lambda": [0.3, 0.6]}),
    "wudi": grid({"closed_form": [False, True]}),
    "tall_masks": grid({"mask_lambda": [0.2, 0.4, 0.6]}),
    # The experts' rank: low against full for the MLP zoo's 32-wide layers (truncated to the
    # rank), about 4% and 17% of a 384-wide MiniLM layer's parameters per task.
    "smile": grid({"k": [8, 32]}),
    # wemoe: no entry, one run at the registry's defaults (lambda 0.3, the MLPs' linear layers,
    # 100 router steps): each point trains its routers.
}
# The unlabelled inputs of an upscaled method's trainer (WEMoE's routers): a seeded draw of
# each task's training split, in batches of this size (one step: a batch of every task).
TRAINER_EXAMPLES, TRAINER_BATCH_SIZE = 256, 16
# Methods of the registry that are not merges of several fine-tunes.
NOT_BENCHMARKED = {
    "passthrough": "copies one model",
}


def _method_objects():
    from mergelab.methods import list_methods

    return list_methods("*")


def applicable_methods(num_models: int) -> tuple[list[str], dict[str, str]]:
    """(methods to run, {method: why not}) for a zoo of `num_models` fine-tunes."""
    run, skipped = [], {}
    for method in _method_objects():
        needs = tuple(getattr(method, "needs", ()) or ())
        if needs == ("data",) and getattr(method, "trains_extras", False):
            needs = ()  # the runner gives it the tasks' unlabelled training inputs
        if method.name in NOT_BENCHMARKED:
            skipped[method.name] = NOT_BENCHMARKED[method.name]
        elif needs:
            skipped[method.name] = f"needs {', '.join(needs)}"
        elif num_models < method.min_models or (method.max_models is not None and num_models > method.max_models):
            most = "any number" if method.max_models is None else str(method.max_models)
            skipped[method.name] = f"takes {method.min_models}-{most} models, the zoo has {num_models}"
        else:
            run.append(method.name)
    return run, skipped


def grid_for(method_name: str, built: BuiltZoo | None = None) -> list[GridPoint]:
    """The method's grid, or one point at its registry defaults; on `built`, every point also
    gets the zoo's settings for the method (`BuiltZoo.method_settings`)."""
    points = GRIDS.get(method_name, [GridPoint()])
    fixed = built.method_settings.get(method_name) if built is not None else None
    if not fixed:
        return points
    return [GridPoint({**fixed, **p.global_params}, p.model_params) for p in points]


def merge_config(method_name: str, point: GridPoint, tasks: Sequence[str]) -> dict:
    """The mergekit-style config of one merge of the zoo's fine-tunes (names are state dicts).

    Methods with a per-model `weight` get weight 1 for every model unless the point sets it.
    """
    from mergelab.methods import get_method

    method = get_method(method_name)
    model_params = dict(point.model_params)
    if method.param("weight") is not None:
        model_params.setdefault("weight", 1.0)
    config: dict[str, Any] = {
        "merge_method": method_name,
        "models": [{"model": t, "parameters": dict(model_params)} for t in tasks],
        "parameters": dict(point.global_params),
        "dtype": "float32",
    }
    if method.base != "none":
        config["base_model"] = BASE_NAME
    return config


def merge_zoo_modulated(built: BuiltZoo, method_name: str, point: GridPoint):
    """A modulated method's merge of the zoo (`mergelab.merge_modulated`): shared weights plus
    each task's masks and rescaler; `.task_state_dict(task)` is that task's encoder."""
    import mergelab

    tasks = list(built.tasks)
    sources = {BASE_NAME: built.pretrained, **{t: built.finetuned[t] for t in tasks}}
    return mergelab.merge_modulated(merge_config(method_name, point, tasks), sources, seed=built.seed)


def merge_zoo_upscaled(built: BuiltZoo, method_name: str, point: GridPoint):
    """An upscaling method's merge of the zoo, a `mergelab.upscale.memory.UpscaledStateDicts`:
    the shared encoder weights plus every layer's extras; `.upscale(module)` wraps a module
    holding them. A method that trains extras (WEMoE) trains them with `mergelab.data_merge` on
    `TRAINER_EXAMPLES` training inputs of each task, a seeded draw (labels unused)."""
    import mergelab
    from mergelab.methods import get_method

    tasks = list(built.tasks)
    if get_method(method_name).trains_extras:
        from mergelab_bench.data_aware_zoos import ZooData

        adapter = ZooData(built)
        data = {t: adapter.task_data(t, "train", TRAINER_EXAMPLES, TRAINER_BATCH_SIZE) for t in tasks}
        model_params = {t: dict(point.model_params) for t in tasks} if point.model_params else None
        result = mergelab.data_merge(
            method_name, adapter.module(), {t: built.finetuned[t] for t in tasks}, data,
            base_state_dict=built.pretrained, model_params=model_params, merge_seed=built.seed,
            **point.global_params,
        )  # fmt: skip
        return result.upscaled
    sources = {BASE_NAME: built.pretrained, **{t: built.finetuned[t] for t in tasks}}
    return mergelab.merge_upscaled(merge_config(method_name, point, tasks), sources, seed=built.seed)


def merge_zoo(built: BuiltZoo, method_name: str, point: GridPoint,
              tasks: Sequence[str] | None = None) -> StateDict:
    """Merge the zoo's fine-tuned encoders (of `tasks`, default all) with one grid point."""
    import mergelab

    tasks = list(built.tasks if tasks is None else tasks)
    sources = {BASE_NAME: built.pretrained, **{t: built.finetuned[t] for t in tasks}}
    return mergelab.merge_state_dicts(merge_config(method_name, point, tasks), sources, seed=built.seed)


@dataclass
class MethodOutcome:
    method: str
    chosen: str
    validation: float | None
    test: dict[str, float]
    seconds: float
    grid_scores: list[tuple[str, float]]
    # beyond one merged model, per task: a modulated method's (TALL masks, EMR) modulators, an
    # upscaled one's (SMILE, WEMoE) extras divided by the tasks (nearly all are per task); 0: none
    extra_bytes_per_task: int = 0
    # upscaled methods: multiply-adds per token of the upscaled layers against the same layers
    # of one model (the merge's `cost`); 1.0: one model's
    macs_ratio: float = 1.0
    extra_parameters: int = 0  # upscaled methods: every extra (the cost's `extra_parameters`)
    base_parameters: int = 0  # upscaled methods: one model's (the cost's `base_parameters`)


@dataclass
class SeedResult:
    """One zoo seed: test accuracy per model row, and how each method was chosen."""

    zoo: str
    recipe: str
    seed: int
    results: dict[str, dict[str, float]]
    outcomes: dict[str, MethodOutcome]
    failures: dict[str, str]
    seconds: float
    # row -> task -> per-example test correctness as 0/1 characters (`correctness_bits`)
    examples: dict[str, dict[str, str]] = field(default_factory=dict)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


REPAIR_SUFFIX = " + BN REPAIR"


def post_merge_variants(built: BuiltZoo, repair: bool = True) -> dict[str, Callable[[StateDict], StateDict] | None]:
    """Row-name suffix -> what is done to a merged encoder before it is scored ("": nothing).

    With `repair` and an evaluator that offers `repair_batchnorm(merged, sources)` (the vision
    zoo), every method gets a second row whose BatchNorm statistics are set by REPAIR from the
    fine-tuned sources, its grid point picked on validation after the repair."""
    variants: dict[str, Callable[[StateDict], StateDict] | None] = {"": None}
    fix = getattr(built.evaluator, "repair_batchnorm", None) if repair else None
    if fix is not None:
        sources = [built.finetuned[t] for t in built.tasks]
        variants[REPAIR_SUFFIX] = lambda merged: fix(merged, sources)
    return variants


def run_seed(built: BuiltZoo, methods: Sequence[str], *, cache: ResultCache | None = None,
             log: Log = lambda _: None, repair: bool = True) -> SeedResult:
    """Baselines and every method of `methods` on one built zoo (see the module docstring);
    `repair`: also the "+ BN REPAIR" rows where the zoo supports them (`post_merge_variants`)."""
    started = time.perf_counter()
    ev, tasks = built.evaluator, list(built.tasks)
    examples: dict[str, dict[str, str]] = {}

    def test_scores(row: str, encoder: StateDict, heads, score_tasks=None) -> dict[str, float]:
        """Test accuracy per task; each task's per-example outcomes are kept under `row`."""
        outcomes: dict[str, torch.Tensor] = {}
        scores = evaluate_model(ev, encoder, heads, tasks=score_tasks, cache=cache, examples=outcomes)
        examples.setdefault(row, {}).update({t: correctness_bits(c) for t, c in outcomes.items()})
        return scores

    results: dict[str, dict[str, float]] = {
        FLOOR_ROW: test_scores(FLOOR_ROW, built.pretrained, built.heads, tasks),
        PROBE_ROW: test_scores(PROBE_ROW, built.pretrained, built.probe_heads, tasks),
        FINETUNED_ROW: {
            t: test_scores(FINETUNED_ROW, built.finetuned[t], {t: built.heads[t]})[t] for t in tasks
        },
    }
    log(f"  baselines: probe {100 * _mean(results[PROBE_ROW].values()):.1f}%, fine-tuned "
        f"{100 * _mean(results[FINETUNED_ROW].values()):.1f}%")
    variants = post_merge_variants(built, repair)
    outcomes: dict[str, MethodOutcome] = {}
    failures: dict[str, str] = {}
    from mergelab.methods import get_method

    for name in methods:
        tick = time.perf_counter()
        points = grid_for(name, built)
        declared = get_method(name)
        if declared.modulation is not None or declared.upscaling is not None:
            try:
                if declared.modulation is not None:
                    row, outcome = _run_modulated(built, name, points, test_scores, cache)
                else:
                    row, outcome = _run_upscaled(built, name, points, examples)
            except MergeLabError as exc:
                failures[name] = " ".join(str(exc).split())
                log(f"  {name}: failed: {failures[name]}")
                continue
            outcome.seconds = time.perf_counter() - tick
            results[row], outcomes[row] = outcome.test, outcome
            log(f"  {row} ({outcome.chosen}): test {100 * _mean(outcome.test.values()):.1f}% "
                f"[{outcome.seconds:.0f} s]")
            continue
        # suffix -> (validation score, grid index, scored encoder) of the best point so far
        best: dict[str, tuple[float, int, StateDict]] = {}
        scores: dict[str, list[tuple[str, float]]] = {suffix: [] for suffix in variants}
        try:
            for index, point in enumerate(points):
                merged = merge_zoo(built, name, point)
                for suffix, transform in variants.items():
                    model = merged if transform is None else transform(merged)
                    if len(points) == 1:
                        best[suffix] = (float("nan"), index, model)
                        continue
                    score = _mean(evaluate_model(ev, model, built.heads, tasks=tasks,
                                                 split="validation", cache=cache).values())
                    scores[suffix].append((point.label, score))
                    if suffix not in best or score > best[suffix][0]:
                        best[suffix] = (score, index, model)
                del merged
        except MergeLabError as exc:
            failures[name] = " ".join(str(exc).split())
            log(f"  {name}: failed: {failures[name]}")
            continue
        for suffix in variants:
            score, index, model = best[suffix]
            row = name + suffix
            test = test_scores(row, model, built.heads, tasks)
            results[row] = test
            outcomes[row] = MethodOutcome(name, points[index].label, None if len(points) == 1 else score,
                                          test, time.perf_counter() - tick, scores[suffix])
            log(f"  {row} ({points[index].label}): test {100 * _mean(test.values()):.1f}% "
                f"[{time.perf_counter() - tick:.0f} s]")
    return SeedResult(built.zoo, built.recipe, built.seed, results, outcomes, failures,
                      time.perf_counter() - started, examples)


def _run_modulated(built: BuiltZoo, name: str, points: Sequence[GridPoint], test_scores, cache):
    """A modulated method's row: every task scored with its own modulated encoder and head (as
    the fine-tuned row), the grid point picked on the mean validation score over tasks."""
    ev, tasks = built.evaluator, list(built.tasks)
    best: tuple[float, int, dict[str, StateDict], int] | None = None
    scores: list[tuple[str, float]] = []
    for index, point in enumerate(points):
        merged = merge_zoo_modulated(built, name, point)
        dense = {t: merged.task_state_dict(t) for t in tasks}
        score = float("nan")
        if len(points) > 1:
            score = _mean(
                evaluate_model(ev, dense[t], {t: built.heads[t]}, tasks=[t], split="validation",
                               cache=cache)[t]
                for t in tasks
            )  # fmt: skip
            scores.append((point.label, score))
        if best is None or score > best[0]:
            best = (score, index, dense, merged.extra_bytes_per_task())
        del merged
    assert best is not None
    score, index, dense, extra = best
    test = {t: test_scores(name, dense[t], {t: built.heads[t]})[t] for t in tasks}
    return name, MethodOutcome(name, points[index].label, None if len(points) == 1 else score,
                               test, 0.0, scores, extra)  # fmt: skip


def _run_upscaled(built: BuiltZoo, name: str, points: Sequence[GridPoint],
                  examples: dict[str, dict[str, str]]):
    """An upscaled method's row: one routed model (the shared weights with its layers
    wrapped) scored on every task with that task's head, the grid point picked on the mean
    validation score over tasks; the row's cost is its merge's (`UpscaledStateDicts.cost`)."""
    ev, tasks = built.evaluator, list(built.tasks)
    make = getattr(ev, "module", None)
    if make is None or getattr(ev, "correct_module", None) is None:
        raise MergeLabError(
            f"{type(ev).__name__} cannot build and score its encoder as a torch module (no "
            "`module` / `correct_module`), which an upscaled merge is"
        )
    best = None
    scores: list[tuple[str, float]] = []
    for index, point in enumerate(points):
        merged = merge_zoo_upscaled(built, name, point)
        if merged.upscaled_layers == 0:
            raise MergeLabError(
                f"`{name}` upscales no layer of this zoo's encoder (its declaration gives extras "
                "to none of the layers the fine-tunes changed), so the routed model would be "
                "the shared one"
            )
        module = merged.upscale(make(merged.state_dict))
        score = float("nan")
        if len(points) > 1:
            score = _mean(evaluate_model(ev, module, built.heads, tasks=tasks, split="validation").values())
            scores.append((point.label, score))
        if best is None or score > best[0]:
            best = (score, index, module, merged)
    assert best is not None
    score, index, module, merged = best
    outcomes: dict[str, torch.Tensor] = {}
    test = evaluate_model(ev, module, built.heads, tasks=tasks, examples=outcomes)
    examples.setdefault(name, {}).update({t: correctness_bits(c) for t, c in outcomes.items()})
    return name, MethodOutcome(
        name, points[index].label, None if len(points) == 1 else score, test, 0.0, scores,
        extra_bytes_per_task=merged.extra_bytes // len(tasks), macs_ratio=merged.macs_ratio,
        extra_parameters=merged.cost["extra_parameters"],
        base_parameters=merged.cost["base_parameters"],
    )  # fmt: skip


def machine_note(load_at_start: float) -> str:
    """How the run used the machine, for a docs line: threads, cores and the 1-minute load
    average at the start and now (this run's own threads count in the second figure), so a
    reader can tell an idle machine from a shared one instead of trusting a fixed phrase."""
    return (
        f"CPU ({torch.get_num_threads()} torch thread(s), {os.cpu_count()} core(s); 1-minute load "
        f"average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end)"
    )


def save_seed_result(result: SeedResult, path: Path) -> None:
    """Write one seed's test accuracies, choices and timings as JSON (atomically)."""
    import json
    from dataclasses import asdict

    write_text_atomic(path, json.dumps(asdict(result), indent=2, default=str) + "\n")


def aggregate(seed_results: Sequence[SeedResult]) -> list[AggregateRow]:
    """Rows over seeds; notes say which grid point each seed chose."""
    per_seed = [
        summarise(r.results, finetuned=r.results[FINETUNED_ROW], probe=r.results[PROBE_ROW])
        for r in seed_results
    ]
    chosen: dict[str, list[str]] = {}
    for r in seed_results:
        for name, outcome in r.outcomes.items():
            if len(grid_for(outcome.method)) > 1:
                chosen.setdefault(name, []).append(outcome.chosen)
    examples = [
        {row: {t: correctness_from_bits(b) for t, b in by_task.items()} for row, by_task in r.examples.items()}
        for r in seed_results
    ]
    return aggregate_rows(
        per_seed, {name: " / ".join(labels) for name, labels in chosen.items()}, examples
    )


def ordering_statement(rows: Sequence[AggregateRow]) -> str:
    """Whether the published ordering TIES >= task arithmetic >= simple average holds here."""
    by = {r.name: r.average.mean for r in rows}
    if not all(k in by for k in ("ties", "task_arithmetic", "linear")):
        return "ordering not checked (TIES, task arithmetic or the simple average was not run)"
    ties, ta, avg = by["ties"], by["task_arithmetic"], by["linear"]
    holds = ties >= ta >= avg
    parts = f"TIES {100 * ties:.1f}, task arithmetic {100 * ta:.1f}, simple average {100 * avg:.1f}"
    return f"published ordering TIES >= task arithmetic >= average {'holds' if holds else 'does NOT hold'} ({parts})"


# --- docs/benchmarks.md ------------------------------------------------------------------------------


def section_markers(zoo: str) -> tuple[str, str]:
    return f"<!-- mergelab-bench:{zoo}:start -->", f"<!-- mergelab-bench:{zoo}:end -->"


def replace_section(document: str, zoo: str, body: str) -> str:
    """`document` with the text between `zoo`'s markers replaced by `body` (appended if absent)."""
    start, end = section_markers(zoo)
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(document):
        return pattern.sub(lambda _: block, document, count=1)
    return document.rstrip() + "\n\n" + block + "\n"


def update_docs(path: str | Path, zoo: str, body: str) -> None:
    """Replace (or append) `zoo`'s section of the markdown file at `path`, atomically."""
    path = Path(path)
    document = path.read_text() if path.is_file() else "# Benchmarks\n"
    write_text_atomic(path, replace_section(document, zoo, body))


@dataclass
class BenchReport:
    zoo: str
    recipes: dict[str, list[AggregateRow]]
    seeds: list[int]
    seed_results: dict[str, list[SeedResult]]
    skipped: dict[str, str]
    wall_seconds: float
    build_seconds: float
    markdown: str
    files: dict[str, dict[str, Path]]


def run_bench(
    zoo_name: str,
    *,
    recipes: Sequence[str] | None = None,
    seeds: Sequence[int] = (0, 1),
    methods: Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    docs_path: str | Path | None = None,
    command: str = "",
    zoo_options: Mapping[str, Any] | None = None,
    cache: ResultCache | None = None,
    progress: bool = True,
    log: Log = print,
    repair: bool = True,
) -> BenchReport:
    """Build (or load) the zoo for every recipe and seed, run the methods, write the reports.

    methods: names to run (default: every applicable data-free method); an unknown or
        inapplicable name raises MergeLabError before anything is built.
    out_dir: where `<zoo>-<recipe>.json/.md/.png` go (default: no files).
    docs_path: a markdown file whose `<zoo>` section (between markers) gets the tables.
    repair: add "+ BN REPAIR" rows where the zoo supports it (`post_merge_variants`).
    """
    from mergelab_bench.zoo.registry import get_zoo

    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    zoo = get_zoo(zoo_name, **dict(zoo_options or {}))
    recipes = list(recipes or zoo.recipes)
    bad = [r for r in recipes if r not in zoo.recipes]
    if bad:
        raise MergeLabError(f"unknown recipe(s) {bad} for zoo {zoo_name!r}; recipes: {list(zoo.recipes)}")
    if not seeds:
        raise MergeLabError("give at least one seed")
    runnable, skipped = applicable_methods(len(zoo.tasks()))
    if methods:
        from mergelab.methods import get_method

        for name in methods:
            try:
                get_method(name)
            except KeyError as exc:
                raise MergeLabError(str(exc.args[0])) from None
            if name in skipped:
                raise MergeLabError(f"method {name!r} does not apply to this zoo: {skipped[name]}")
        runnable = [m for m in methods]
    results: dict[str, list[SeedResult]] = {}
    build_seconds = 0.0
    built = None
    for recipe in recipes:
        for seed in seeds:
            log(f"{zoo_name} zoo, recipe {recipe}, seed {seed}")
            tick = time.perf_counter()
            built = zoo.build(recipe=recipe, seed=seed, progress=progress)
            build_seconds += time.perf_counter() - tick
            seed_result = run_seed(built, runnable, cache=cache, log=log, repair=repair)
            results.setdefault(recipe, []).append(seed_result)
            if out_dir is not None:
                # Each seed's raw numbers as soon as they exist: a long run cut short keeps them.
                save_seed_result(seed_result, Path(out_dir) / f"{zoo_name}-{recipe}-seed{seed}.json")
    rows = {recipe: aggregate(seed_results) for recipe, seed_results in results.items()}
    wall = time.perf_counter() - started
    markdown = bench_markdown(
        zoo_name, rows, results, skipped, seeds, wall, build_seconds, command, built, load_at_start
    )
    files: dict[str, dict[str, Path]] = {}
    if out_dir is not None:
        for recipe, recipe_rows in rows.items():
            columns = None
            if built is not None:
                columns = cost_columns(recipe_rows, results[recipe], encoder_bytes(built))
            files[recipe] = write_report(
                recipe_rows, out_dir, title=f"{zoo_name} zoo, recipe {recipe}",
                facts={"seeds": list(seeds), "wall_seconds": wall, "command": command,
                       "failures": {str(r.seed): r.failures for r in results[recipe]}},
                stem=f"{zoo_name}-{recipe}", columns=columns,
            )
    if docs_path is not None:
        update_docs(docs_path, zoo_name, markdown)
    return BenchReport(zoo_name, rows, list(seeds), results, skipped, wall, build_seconds, markdown, files)


EXTRA_COLUMN = "extra storage per task"
COST_COLUMN = "inference cost"


def encoder_bytes(built: BuiltZoo) -> int:
    """Bytes of one float32 encoder of the zoo (what the extra-storage column is a share of)."""
    return sum(t.numel() * 4 for t in built.pretrained.values())


def cost_columns(rows: Sequence[AggregateRow], seed_results: Sequence[SeedResult],
                 one_model_bytes: int) -> dict[str, dict[str, str]]:
    """The table's cost columns, {header: {row: cell}}: the storage each task needs beyond one
    merged encoder, in % of one float32 encoder (modulators; an upscaled model's experts over
    its tasks; the individual fine-tunes: a whole model each), and the inference cost in
    multiply-adds per token against one model (upscaled rows: their linear layers'). A
    figure that differs between seeds (another grid point chosen) is given per seed, "a / b"."""
    extra: dict[str, str] = {}
    cost: dict[str, str] = {}
    for row in rows:
        outcomes = [r.outcomes[row.name] for r in seed_results if row.name in r.outcomes]
        if row.name == FINETUNED_ROW:
            extra[row.name], cost[row.name] = "100%", "1.00x"
            continue
        shares = [o.extra_bytes_per_task / one_model_bytes for o in outcomes] or [0.0]
        ratios = [o.macs_ratio for o in outcomes] or [1.0]
        extra[row.name] = _per_seed(f"{100 * v:.1f}%" if v else "0" for v in shares)
        cost[row.name] = _per_seed(f"{v:.2f}x" for v in ratios)
    return {EXTRA_COLUMN: extra, COST_COLUMN: cost}


def _per_seed(cells: Iterable[str]) -> str:
    cells = list(cells)
    return cells[0] if len(set(cells)) == 1 else " / ".join(cells)


CELLS_NOTE = (
    "Test accuracy in %, `mean ± std` over seeds, then `[low, high]`: the 95% bootstrap "
    "interval over test examples of the mean over seeds (1,000 resamples; for the average, "
    "examples resampled within each task). The std says how much fine-tuning seeds move a "
    "figure, the interval how much the choice of test examples does."
)


def test_size_note(outcomes: Iterable[Mapping[str, Sized]]) -> str:
    """"test examples per task: a 1000, b 939." from the per-example outcomes of one row per
    seed ({task: outcomes})."""
    sizes: dict[str, set[int]] = {}
    for by_task in outcomes:
        for task, values in by_task.items():
            sizes.setdefault(task, set()).add(len(values))
    if not sizes:
        return ""
    return "test examples per task: " + ", ".join(
        f"{t} {'/'.join(str(n) for n in sorted(ns))}" for t, ns in sizes.items()
    ) + "."


COSTS_NOTE = (
    "Extra storage per task: what each task needs beyond one merged encoder, in % of one "
    "float32 encoder (heads, which every row has, not counted): modulators (bit-packed masks "
    "and a rescaler), an upscaled model's extras divided by its tasks (each task's experts and "
    "router rows), a whole model for the individual fine-tunes; 0 for one merged model. "
    "Inference cost: multiply-adds per token against one model; for an upscaled model, those of "
    "its upscaled linear layers (router and chosen experts included) against the same layers "
    "(the merge's `cost`; attention's own products and the other layers, unchanged, not "
    "counted); 1.00x for one merged model and for a modulated one (each task runs a model of "
    "one model's size)."
)


def bench_markdown(
    zoo_name: str,
    rows: Mapping[str, Sequence[AggregateRow]],
    results: Mapping[str, Sequence[SeedResult]],
    skipped: Mapping[str, str],
    seeds: Sequence[int],
    wall: float,
    build_seconds: float,
    command: str,
    built_sample: BuiltZoo | None,
    load_at_start: float = 0.0,
) -> str:
    """The docs section: command, wall time, one table per recipe, the ordering check."""
    lines = [
        f"## Merge benchmark: {zoo_name} zoo",
        "",
        f"Reproduce: `{command or f'mergelab bench run --zoo {zoo_name}'}`",
        "",
        f"Wall time {wall / 60:.1f} min (of which building or loading the zoo {build_seconds / 60:.1f} min), "
        f"{len(seeds)} fine-tuning seed(s) ({', '.join(map(str, seeds))}), {machine_note(load_at_start)}.",
        "",
        CELLS_NOTE + " Each task is scored with its own head on the merged encoder; "
        + test_size_note(r.examples.get(FLOOR_ROW, {}) for rs in results.values() for r in rs)
        + " normalised = accuracy / the task's fine-tuned accuracy; gain kept = "
        "(accuracy - probe) / (fine-tuned - probe), both averaged over tasks. Hyperparameters "
        "were picked on the validation split from the grid in `mergelab_bench.bench.GRIDS` "
        "(last column: the choice per seed). "
        + (COSTS_NOTE if built_sample is not None else ""),
        "",
    ]
    for recipe, recipe_rows in rows.items():
        columns = None
        if built_sample is not None:
            columns = cost_columns(recipe_rows, results[recipe], encoder_bytes(built_sample))
        lines += [f"### recipe `{recipe}`", "", markdown_table(recipe_rows, columns),
                  ordering_statement(recipe_rows) + ".", ""]  # fmt: skip
        failures = {name: why for r in results[recipe] for name, why in r.failures.items()}
        if failures:
            lines += ["Failed merges: " + "; ".join(f"`{k}`: {v}" for k, v in failures.items()), ""]
        merge_seconds = {name: _mean(r.outcomes[name].seconds for r in results[recipe] if name in r.outcomes)
                         for name in results[recipe][0].outcomes}
        if merge_seconds:
            lines += ["Seconds per method (grid merges + evaluations, mean over seeds): "
                      + ", ".join(f"{k} {v:.0f}" for k, v in merge_seconds.items()), ""]
        from mergelab.methods import get_method

        first = results[recipe][0].outcomes
        modulated = {name: o for name, o in first.items() if get_method(o.method).modulation is not None}
        upscaled = {name: o for name, o in first.items() if get_method(o.method).upscaling is not None}
        if modulated and built_sample is not None:
            one_model = encoder_bytes(built_sample)
            lines += [
                "Per-task modulators (each task scored with its own modulated encoder, whose "
                "inference costs what one model does): extra storage per task "
                + ", ".join(f"`{k}` {o.extra_bytes_per_task / 1e6:.2f} MB "
                            f"({100 * o.extra_bytes_per_task / one_model:.1f}% of the float32 "
                            "encoder)" for k, o in modulated.items())
                + "; every other row is one merged model (0 extra).",
                "",
            ]
        if upscaled:
            lines += [
                "Upscaled (one routed model for every task, each task scored with its own head; "
                f"seed {results[recipe][0].seed}'s choice): "
                + ", ".join(f"`{k}` {o.extra_parameters:,} extra parameters in all "
                            f"({100 * o.extra_parameters / max(o.base_parameters, 1):.1f}% of the "
                            f"{o.base_parameters:,} of one encoder), {o.macs_ratio:.2f}x the "
                            "multiply-adds per token of its upscaled linear layers"
                            for k, o in upscaled.items())
                + ".",
                "",
            ]
    if skipped:
        lines += ["Not applicable: " + "; ".join(f"`{k}` ({v})" for k, v in sorted(skipped.items())), ""]
    sample = built_sample
    if sample is not None and sample.info.get("data"):
        data = sample.info["data"]
        lines += ["Data: " + ("; ".join(data) if isinstance(data, list) else str(data)) + ".", ""]
    if sample is not None and sample.info.get("model"):
        lines += [f"Model: {sample.info['model']}.", ""]
    settings = sample.info.get("settings") if sample is not None else None
    if isinstance(settings, Mapping):
        flat = []
        for key, value in settings.items():
            if isinstance(value, Mapping):
                flat.append(f"{key} " + "/".join(str(v) for v in value.values() if not isinstance(v, float) or v >= 1))
            elif isinstance(value, (list, tuple)):
                flat.append(f"{key} " + ",".join(map(str, value)))
            else:
                flat.append(f"{key} {value}")
        lines += ["Zoo settings: " + "; ".join(flat) + ".", ""]
    return "\n".join(lines)
