"""Recipe search on the text zoo (Akiba et al.'s parameter, data-flow and hybrid spaces) against
the benchmark table's hand-tuned merges, with 95% bootstrap intervals over test examples.

    .venv/bin/python benchmarks/search_text.py --recipes lpft,joint --seeds 0,1 --trials 48

For every recipe and seed of the text zoo (five MiniLM fine-tunes, one head per task):
- baselines and the hand-tuned data-free rows (task arithmetic, TIES, TSV-M, with their grid
  point picked on validation) come from the benchmark runner (`mergelab_bench.bench.run_seed`);
- **parameter space**: TIES with a weight and a density per fine-tune and a global lambda,
  CMA-ES through `mergelab.search.run_search` (each trial merged in memory), fitness the mean
  validation accuracy of the tasks (each with its own head);
- **data-flow space**: which of the five fine-tunes' layers run in which order (one
  repetition, no scaling matrix at this budget), the first fine-tune's embeddings, the same
  fitness;
- **hybrid**: the parameter-space merge as the host (model A) plus the five fine-tunes.
Each search's best trial on validation is then scored once on the test split. The studies
live in benchmarks/_work/search_text/ (a killed run resumes); results go to docs/benchmarks.md
between this script's markers.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

import torch

from mergelab.cliutil import parse_seeds

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work" / "search_text"
HAND_TUNED = ("task_arithmetic", "ties", "tsv")
MARKER = "search-text"


class Timer:
    """Seconds spent building candidates and evaluating them, over the completed trials of a
    study (recorded per trial in the study, so a resumed run counts every trial)."""

    def __init__(self, result):
        done = [t for t in result.trials if t.value is not None and t.merge_seconds + t.eval_seconds > 0]
        self.build = sum(t.merge_seconds for t in done)
        self.evaluate = sum(t.eval_seconds for t in done)
        self.trials = len(done)


def validation_scores(built, candidate) -> dict[str, float]:
    """Validation accuracy per task (the search's fitness) of a merged state dict or an encoder
    module, each task with its own head."""
    from mergelab.eval.harness import evaluate_model

    return evaluate_model(built.evaluator, candidate, built.heads, tasks=built.tasks, split="validation")


def run_one(args, built, label: str, space, sources, depends_on: dict | None = None):
    """One search's study (resumed where it stopped). depends_on: what the sources were built
    from (the hybrid's host is the parameter search's best recipe): part of the study's name,
    so another host never resumes this study."""
    import hashlib
    import json

    from mergelab.search import run_search

    WORK.mkdir(parents=True, exist_ok=True)
    tag = ""
    if depends_on is not None:
        tag = "-" + hashlib.sha256(json.dumps(depends_on, sort_keys=True).encode()).hexdigest()[:8]
    if args.validation_examples is not None:  # another fitness: a study of its own
        tag += f"-val{args.validation_examples}"
    storage = f"sqlite:///{WORK / f'{label}-{built.recipe}-{built.seed}{tag}.db'}"
    result = run_search(space, sources, lambda c: validation_scores(built, c), storage=storage,
                        trials=args.trials if label.startswith("parameters") else args.dataflow_trials,
                        sampler="cmaes", seed=built.seed, evaluator_name="text-zoo-validation")
    print(f"  {label}: best validation {100 * result.best_value:.1f}% after {result.completed} "
          f"trials ({result.failed} failed)", flush=True)
    return result


def run(args) -> str:
    import mergelab
    from mergelab.eval.harness import (
        aggregate_rows,
        correctness_from_bits,
        default_result_cache,
        evaluate_model,
        markdown_table,
        summarise,
    )
    from mergelab.search.dataflow import DataflowSpace
    from mergelab.search.space import build_space
    from mergelab_bench.bench import (
        BASE_NAME,
        CELLS_NOTE,
        FINETUNED_ROW,
        PROBE_ROW,
        GridPoint,
        grid_for,
        machine_note,
        merge_config,
        run_seed,
        test_size_note,
        update_docs,
    )
    from mergelab_bench.zoo.registry import get_zoo, test_examples_option

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    zoo = get_zoo("text", **test_examples_option(args.test_examples),
                  **({} if args.validation_examples is None
                     else {"validation_examples": args.validation_examples}))
    validation_size = args.validation_examples or zoo.settings.sizes.validation
    sections, sizes_seen, cost_lines = [], [], []
    cache = default_result_cache()
    for recipe in args.recipes.split(","):
        per_seed_rows, per_seed_examples = [], []
        starts_from: dict[str, list[str]] = {}  # row -> the grid point each seed started from
        for seed in parse_seeds(args.seeds):
            print(f"text zoo, recipe {recipe}, seed {seed}", flush=True)
            built = zoo.build(recipe=recipe, seed=seed, progress=False)
            seed_result = run_seed(built, list(HAND_TUNED), log=print, cache=cache, repair=False)
            results = dict(seed_result.results)
            outcomes = {row: {t: correctness_from_bits(b) for t, b in by_task.items()}
                        for row, by_task in seed_result.examples.items()}
            tasks = list(built.tasks)

            def score(row, candidate, results=results, outcomes=outcomes, built=built, tasks=tasks):
                outcomes[row] = {}  # a state dict goes through the result cache, a module not
                results[row] = evaluate_model(built.evaluator, candidate, built.heads,
                                              tasks=tasks, cache=cache, examples=outcomes[row])
                print(f"  {row}: test {100 * sum(results[row].values()) / len(tasks):.1f}%", flush=True)

            # data-flow space over the fine-tunes
            modules = [built.evaluator.module(built.finetuned[t]) for t in tasks]
            layers = modules[0].config.num_hidden_layers
            flow = DataflowSpace(tuple(tasks), layers, 1, False, 0.5, 1.5, 0, "host")
            if not args.skip_dataflow:
                routed = run_one(args, built, "dataflow", flow, modules)
                score("search: data-flow, fine-tunes", flow.build(routed.best_config, modules))
                cost_lines.append(("data-flow", recipe, seed, routed.completed, Timer(routed)))

            # parameter space: TIES, a weight and a density per fine-tune, lambda; from the
            # cube's centre (the paper) and/or from the hand-tuned grid point; then the hybrid
            # with that search's merge as host
            section = {"parameters": {"weight": {}, "density": {"low": 0.1, "high": 1.0},
                                      "lambda": {"low": 0.5, "high": 2.0}}}  # fmt: skip
            sources = {BASE_NAME: built.pretrained, **{t: built.finetuned[t] for t in tasks}}
            for start in args.starts.split(","):
                if start == "config":
                    chosen = seed_result.outcomes["ties"].chosen
                    point = next(p for p in grid_for("ties") if p.label == chosen)
                    space = build_space(merge_config("ties", point, tasks), {**section, "start": "config"})
                    label, suffix = "parameters-from-hand-tuned", ", from the hand-tuned point"
                    starts_from.setdefault("search: TIES, parameter space" + suffix, []).append(chosen)
                else:
                    config = merge_config("ties", GridPoint(), tasks)
                    config["models"] = [{"model": t} for t in tasks]
                    space = build_space(config, section)
                    label, suffix = "parameters", ""
                found = run_one(args, built, label, space, sources)
                merged = mergelab.merge_state_dicts(found.best_config, sources, seed=seed)
                score("search: TIES, parameter space" + suffix, merged)
                cost_lines.append(("parameter space" + suffix, recipe, seed, found.completed, Timer(found)))
                if args.skip_hybrid:
                    continue
                hybrid_sources = [built.evaluator.module(merged), *modules]
                hybrid = DataflowSpace(("merge", *tasks), layers, 1, False, 0.5, 1.5, 0, "host")
                combined = run_one(args, built, "hybrid", hybrid, hybrid_sources,
                                   depends_on=found.best_config)
                score("search: hybrid (merge + fine-tunes)" + suffix,
                      hybrid.build(combined.best_config, hybrid_sources))
                cost_lines.append(("hybrid" + suffix, recipe, seed, combined.completed, Timer(combined)))
            for t in tasks:  # every single source, scored with every head
                score(f"single source: {t} fine-tune", built.finetuned[t])
            per_seed_rows.append(summarise(results, finetuned=results[FINETUNED_ROW],
                                           probe=results[PROBE_ROW]))
            per_seed_examples.append(outcomes)
            sizes_seen.append(outcomes[FINETUNED_ROW])
        notes = {row: "started from " + "; ".join(points) for row, points in starts_from.items()}
        rows = aggregate_rows(per_seed_rows, notes, per_seed_examples)
        sections += [f"### recipe `{recipe}`", "", markdown_table(rows), ""]
    wall = time.perf_counter() - started
    costs = ["| search | recipe | seed | trials | build s / trial | evaluate s / trial | build share | trials / hour |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, recipe, seed, completed, timer in cost_lines:
        if not timer.trials:  # a study finished before trials recorded their seconds
            costs.append(f"| {name} | {recipe} | {seed} | {completed} | - | - | - | - |")
            continue
        total = timer.build + timer.evaluate
        costs.append(f"| {name} | {recipe} | {seed} | {completed} | {timer.build / timer.trials:.2f} | "
                     f"{timer.evaluate / timer.trials:.2f} | {100 * timer.build / total:.0f}% | "
                     f"{3600 * timer.trials / total:.0f} |")
    body = "\n".join([
        "## Recipe search: text zoo" + ("" if args.starts == "centre" else
                                         ", parameter space from the hand-tuned point")
        + ("" if args.validation_examples is None else
           f", validation {args.validation_examples} per task"),
        "",
        f"Reproduce: `{args.command}`",
        "",
        f"Wall time {wall / 60:.1f} min, {machine_note(load_at_start)}. " + CELLS_NOTE + " "
        + test_size_note(sizes_seen),
        "",
        "Searches (CMA-ES, optuna's defaults: sigma 1/6, start at the centre"
        + ("; the rows 'from the hand-tuned point' start the parameter space at the TIES grid "
           "point chosen on validation instead (`start: config`: its first trial, CMA-ES's mean), "
           "and their hybrid uses that search's merge" if "config" in args.starts else "")
        + "): parameter space = "
        f"TIES with a weight in [0, 1] and a density in [0.1, 1] per fine-tune and lambda in "
        f"[0.5, 2] ({args.trials} trials); data-flow = which of the fine-tunes' 6 x 5 layers run, "
        f"in layout order, one repetition, no scaling matrix, the first fine-tune's embeddings "
        f"({args.dataflow_trials} trials, the first being that fine-tune's own stack); hybrid = "
        f"the same over the parameter-space merge (host) and the five fine-tunes"
        + (" (not run here)" if args.skip_hybrid else "") + ". Fitness: the "
        f"mean validation accuracy ({validation_size} examples per task, each task's own head, "
        f"the same split the hand-tuned grid points are picked on); the rows show "
        f"each search's best trial on the test split. 'single source' rows: one fine-tune's "
        f"encoder with every task's head. Hand-tuned rows: grid point picked on validation "
        f"(mergelab_bench.bench.GRIDS).",
        "",
        *sections,
        "Cost per trial (build: the in-memory merge or routing; trials per hour counts build and "
        "evaluation only):",
        "",
        *costs,
        "",
    ])
    if args.docs:
        # a run of other searches than the default ones keeps its own section
        marker = MARKER if args.starts == "centre" and not args.skip_dataflow else (
            f"{MARKER}-{args.starts.replace(',', '-')}" + ("-no-dataflow" if args.skip_dataflow else ""))
        if args.skip_hybrid:
            marker += "-no-hybrid"
        if args.validation_examples is not None:
            marker += f"-val{args.validation_examples}"
        update_docs(args.docs, marker, body)
    return body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="lpft,joint")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--trials", type=int, default=48, help="parameter-space trials")
    parser.add_argument("--skip-dataflow", action="store_true",
                        help="no data-flow search over the fine-tunes (the hybrid still runs)")
    parser.add_argument("--skip-hybrid", action="store_true",
                        help="no hybrid search (over the parameter-space merge and the fine-tunes)")
    parser.add_argument("--starts", default="centre",
                        help="parameter-space starts, comma-separated: centre (CMA-ES from the "
                        "cube's centre, the paper), config (from the hand-tuned TIES grid point)")
    parser.add_argument("--dataflow-trials", type=int, default=32, help="data-flow and hybrid trials")
    parser.add_argument("--test-examples", type=int, default=None)
    parser.add_argument("--validation-examples", type=int, default=None,
                        help="validation examples per task, the fitness and the hand-tuned "
                        "rows' choice (default: the zoo's 100), drawn from the validation groups")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)
    if not args.starts or set(args.starts.split(",")) - {"centre", "config"}:
        parser.error(f"--starts: centre and/or config, comma-separated; got {args.starts!r}")
    args.command = "python benchmarks/search_text.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    print(run(args))


if __name__ == "__main__":
    main()
