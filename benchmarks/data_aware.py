"""Data-aware merges (Fisher, RegMean, RegMean++, AdaMerging, ProDistill) beside task arithmetic
and TIES.

    .venv/bin/python benchmarks/data_aware.py --zoo mlp --seeds 0,1
    .venv/bin/python benchmarks/data_aware.py --zoo text --seeds 0,1 --examples 256
    .venv/bin/python benchmarks/data_aware.py --zoo text --methods prodistill --prodistill-examples 64

For every recipe and seed of the zoo: the baselines and the data-free rows come from the
benchmark runner (mergelab_bench.bench.run_seed: task arithmetic and TIES with their lambda and
density picked on validation); each data-aware method then runs once at the paper's settings
through `mergelab.data_merge`:

- RegMean, RegMean++, Fisher: statistics on `--examples` training inputs (a seeded random draw) of each task
  (Fisher: the gradient of the log-likelihood of labels sampled from each model's own
  predictions, as Matena & Raffel; a seeded generator);
- AdaMerging task-wise and layer-wise: entropy minimised on `--ada-examples` (a seeded random draw) unlabeled
  *test* inputs of each task, the paper's (transductive) protocol;
- ProDistill (only when named in `--methods`): coefficients distilled layer by layer from the
  `--prodistill-examples` (a seeded random draw) *training* inputs of each task (the paper: 64 per task),
  `--prodistill-steps` steps per layer at lr `--prodistill-lr`.

Reported: test accuracy per task (each task's own head on the merged encoder), normalised
accuracy and gain kept over the linear probe, examples per task, seconds (statistics or
optimisation plus the merge) and peak extra resident memory during the merge (sampled every
5 ms, above the level before it started). Results go to docs/benchmarks.md between this
script's own markers and to benchmarks/_work/data_aware-<zoo>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from mergelab.cliutil import parse_seeds

REPO = Path(__file__).resolve().parent.parent
DATA_AWARE = ("fisher", "regmean", "regmean_plusplus", "adamerging_taskwise", "adamerging_layerwise")
ON_REQUEST = ("prodistill",)  # run only when named in --methods
DATA_FREE = ("task_arithmetic", "ties")


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak resident memory above the level at entry, sampled by a thread every 5 ms."""

    def __enter__(self) -> PeakMemory:
        self.start = _rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def extra_mb(self) -> float:
        return (self.peak - self.start) / 1e6


@dataclass
class Cost:
    method: str
    examples: int
    seconds: float
    stats_seconds: float
    peak_mb: float


def regmean_on_validation(built, module, data, alphas, scalings):
    """RegMean with its settings picked on the validation split (Grams collected once, the
    closed form solved per setting), as the data-free rows pick lambda/density.

    Returns {row: (result, label)}: "regmean" is the paper's method (scaling 1, alpha picked
    from `alphas`); "regmean_scaled" also picks mergelab's `scaling` of the merged task vector
    from `scalings` (alpha 0.9).
    """
    import mergelab
    from mergelab.eval.harness import evaluate_model

    tasks = list(built.tasks)
    finetuned = {t: built.finetuned[t] for t in tasks}
    out = {}
    statistics = None  # collected by the first merge, reused by every other setting
    stats_seconds = 0.0
    settings = {"regmean": [(a, 1.0) for a in alphas],
                "regmean_scaled": [(0.9, s) for s in scalings]}
    for row, points in settings.items():
        tick = time.perf_counter()
        best = None
        for alpha, scaling in points:
            result = mergelab.data_merge(
                "regmean", module, finetuned, data, base_state_dict=built.pretrained,
                statistics=statistics, alpha=alpha, scaling=scaling,
            )
            if statistics is None:
                statistics, stats_seconds = result.statistics, result.stats_seconds
            merged = result.state_dict
            score = sum(evaluate_model(built.evaluator, {**built.pretrained, **merged}, built.heads,
                                       tasks=tasks, split="validation").values()) / len(tasks)
            if best is None or score > best[0]:
                best = (score, alpha, scaling, result)
        _, alpha, scaling, result = best
        label = f"alpha {alpha:g}" + (f", scaling {scaling:g}" if row == "regmean_scaled" else "")
        result.seconds = stats_seconds + time.perf_counter() - tick
        result.stats_seconds = stats_seconds
        out[row] = (result, label)
    return out


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def data_note(args: argparse.Namespace, methods: list[str]) -> str:
    """The docs' "Data:" paragraph, naming only the methods this run ran."""
    statistics = [m for m in ("regmean", "regmean_plusplus", "fisher") if m in methods]
    titles = {"regmean": "RegMean", "regmean_plusplus": "RegMean++", "fisher": "Fisher"}
    parts = []
    if statistics:
        parts.append(
            f"{_and([titles[m] for m in statistics])} {'sees' if len(statistics) == 1 else 'see'} "
            f"{args.examples} (a seeded random draw) *training* "
            "inputs of each task" + (" (Fisher: labels sampled from each model's predictions)" if "fisher" in statistics else "")
        )
    if "prodistill" in methods:
        parts.append(
            f"ProDistill distils each layer's per-task, per-tensor coefficients from "
            f"{args.prodistill_examples} (a seeded random draw) *training* inputs of each task (the examples it used are in "
            f"the cost table), {args.prodistill_steps} Adam steps per layer at lr "
            f"{args.prodistill_lr:g}, {args.batch_size} examples per step, coefficients initialised "
            "at 0.3"
        )
    if any(m.startswith("adamerging") for m in methods):
        parts.append(
            f"AdaMerging minimises prediction entropy on {args.ada_examples} (a seeded random draw) unlabeled "
            f"*test* inputs of each task (the paper's transductive protocol), {args.ada_steps} Adam "
            f"steps at lr {args.ada_lr:g}, coefficients initialised at 0.3 and kept in [0, 1]"
        )
    text = "Data: " + "; ".join(parts) + "." if parts else ""
    if "regmean" in methods:
        text += (
            f" RegMean: alpha (the scale of the non-diagonal Gram entries) picked on validation from "
            f"{args.regmean_alphas} with the Grams collected once; `regmean_scaled` (mergelab's "
            "extension, not in the paper) also multiplies the merged task vector by a scaling picked "
            f"on validation from {args.regmean_scalings} (alpha 0.9), from the same Grams. RegMean's "
            "seconds include its validation search."
        )
    if "regmean_plusplus" in methods:
        text += " RegMean++: alpha 0.9."
    if "regmean" in methods or "regmean_plusplus" in methods:
        text += " Biases and norms are averaged."
    text += " Task arithmetic and TIES have lambda/density picked on validation (mergelab_bench.bench.GRIDS)."
    at_paper = [t for m, t in (("fisher", "Fisher"), ("adamerging", "AdaMerging"))
                if any(x.startswith(m) for x in methods)]
    if at_paper:
        text += f" {_and(at_paper)} {'runs' if len(at_paper) == 1 else 'run'} at the papers' settings."
    return text.strip()


def run(args: argparse.Namespace) -> str:
    import mergelab
    from mergelab.eval.harness import (
        aggregate_rows,
        correctness_from_bits,
        default_result_cache,
        evaluate_model,
        markdown_table,
        summarise,
    )
    from mergelab.fileio import write_text_atomic
    from mergelab_bench.bench import (
        CELLS_NOTE,
        FINETUNED_ROW,
        FLOOR_ROW,
        PROBE_ROW,
        machine_note,
        post_merge_variants,
        run_seed,
        test_size_note,
        update_docs,
    )
    from mergelab_bench.data_aware_zoos import ZooData
    from mergelab_bench.zoo.registry import get_zoo, test_examples_option

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    # The same test subset as `mergelab bench run --test-examples`, so the rows compare.
    zoo = get_zoo(args.zoo, **test_examples_option(args.test_examples))
    recipes = args.recipes.split(",") if args.recipes else list(zoo.recipes)
    seeds = parse_seeds(args.seeds)
    methods = [m for m in args.methods.split(",") if m] if args.methods else list(DATA_AWARE)
    sections = []
    alphas = [float(a) for a in args.regmean_alphas.split(",") if a]
    scalings = [float(a) for a in args.regmean_scalings.split(",") if a]
    record: dict = {"zoo": args.zoo, "recipes": {}, "command": args.command}
    sizes_seen: list[dict] = []
    for recipe in recipes:
        per_seed_rows = []
        per_seed_examples = []
        costs: dict[str, list[Cost]] = {}
        choices: dict[str, list[str]] = {}
        for seed in seeds:
            print(f"{args.zoo} zoo, recipe {recipe}, seed {seed}", flush=True)
            built = zoo.build(recipe=recipe, seed=seed, progress=False)
            seed_result = run_seed(built, list(DATA_FREE), log=print, cache=default_result_cache())
            results = dict(seed_result.results)
            outcomes = {
                row: {t: correctness_from_bits(bits) for t, bits in by_task.items()}
                for row, by_task in seed_result.examples.items()
            }
            variants = post_merge_variants(built)

            def score(row: str, merged: dict, built=built, variants=variants, results=results,
                      outcomes=outcomes) -> None:
                """Test accuracy of `merged` as `row`, and of each post-merge variant of it
                ("+ BN REPAIR" on the vision zoo), with its per-example outcomes."""
                for suffix, transform in variants.items():
                    model = merged if transform is None else transform(merged)
                    outcomes[row + suffix] = {}
                    results[row + suffix] = evaluate_model(
                        built.evaluator, model, built.heads, tasks=list(built.tasks),
                        examples=outcomes[row + suffix],
                    )
            adapter = ZooData(built)
            module = adapter.module()
            tasks = list(built.tasks)
            chosen: dict[str, str] = {}
            for name, outcome in seed_result.outcomes.items():
                choices.setdefault(name, []).append(outcome.chosen)
            for method in methods:
                ada = method.startswith("adamerging")
                split, n = ("test", args.ada_examples) if ada else ("train", args.examples)
                params = {"steps": args.ada_steps, "lr": args.ada_lr} if ada else {}
                if method == "prodistill":
                    n = args.prodistill_examples
                    params = {"examples": n, "steps": args.prodistill_steps, "lr": args.prodistill_lr,
                              "batch_size": args.batch_size, "seed": seed}  # fmt: skip
                data = {t: adapter.task_data(t, split, n, args.batch_size) for t in tasks}
                with PeakMemory() as memory, warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    tick = time.perf_counter()
                    if method == "regmean":
                        picked = regmean_on_validation(built, module, data, alphas, scalings)
                        result, chosen[method] = picked["regmean"]
                        extra_rows = {"regmean_scaled": picked["regmean_scaled"]}
                    else:
                        extra_rows = {}
                        result = mergelab.data_merge(
                            method,
                            module,
                            {t: built.finetuned[t] for t in tasks},
                            data,
                            base_state_dict=built.pretrained,
                            fisher_target="sample",
                            generator=torch.Generator().manual_seed(seed),
                            **params,
                        )
                    seconds = time.perf_counter() - tick
                for message in sorted({str(w.message) for w in caught}):
                    print(f"    warning: {message}", flush=True)
                merged = {**built.pretrained, **result.state_dict}
                score(method, merged)
                examples = max(result.examples.values())
                costs.setdefault(method, []).append(Cost(method, examples, seconds, result.stats_seconds, memory.extra_mb))
                for row, (extra, label) in extra_rows.items():
                    chosen[row] = label
                    score(row, {**built.pretrained, **extra.state_dict})
                    print(f"  {row} ({label}): test "
                          f"{100 * sum(results[row].values()) / len(tasks):.1f}%", flush=True)
                avg = sum(results[method].values()) / len(tasks)
                extra = ""
                if result.coefficients is not None and result.coefficients.dim() == 1:
                    extra = " coefficients " + ", ".join(f"{c:.2f}" for c in result.coefficients.tolist())
                print(f"  {method}: test {100 * avg:.1f}% [{seconds:.1f} s, +{memory.extra_mb:.0f} MB,"
                      f" {examples} examples/task]{extra}", flush=True)
            for name, label in chosen.items():
                choices.setdefault(name, []).append(label)
            per_seed_rows.append(
                summarise(results, finetuned=results[FINETUNED_ROW], probe=results[PROBE_ROW])
            )
            per_seed_examples.append(outcomes)
            sizes_seen.append(outcomes.get(FLOOR_ROW, {}))
        rows = aggregate_rows(
            per_seed_rows, {k: " / ".join(v) for k, v in choices.items()}, per_seed_examples
        )
        cost_lines = [
            "| method | examples per task | statistics / optimisation (s) | merge (s) | total (s) "
            "| peak extra memory (MB) |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for method, cs in costs.items():
            total = sum(c.seconds for c in cs) / len(cs)
            stats = sum(c.stats_seconds for c in cs) / len(cs)
            cost_lines.append(
                f"| `{method}` | {cs[0].examples} | {stats:.2f} | {total - stats:.2f} | {total:.2f} | "
                f"{max(c.peak_mb for c in cs):.0f} |"
            )
        data_aware_rows = {*methods, "regmean_scaled"}
        best = max((r for r in rows if r.name.split(" + ")[0] in data_aware_rows),
                   key=lambda r: r.average.mean, default=None)
        ties = max((r for r in rows if r.name.split(" + ")[0] == "ties"), key=lambda r: r.average.mean, default=None)
        verdict = ""
        if best is not None and ties is not None:
            verdict = (
                f"Best data-aware merge: `{best.name}` at {100 * best.average.mean:.1f}% average "
                f"({'above' if best.average.mean > ties.average.mean else 'not above'} `{ties.name}` at "
                f"{100 * ties.average.mean:.1f}%)"
            )
            if best.normalised is not None:
                verdict += f", normalised {100 * best.normalised.mean:.1f}%"
            if best.retained_gain is not None:
                verdict += f", gain over the probe kept {100 * best.retained_gain.mean:.1f}%"
            verdict += "."
        sections += [f"### recipe `{recipe}`", "", markdown_table(rows), "", verdict, "",
                     "Cost (mean over seeds; peak: the largest over seeds):", "", *cost_lines, ""]
        record["recipes"][recipe] = {
            "rows": [
                {"name": r.name, "average": r.average.mean,
                 "normalised": None if r.normalised is None else r.normalised.mean,
                 "retained_gain": None if r.retained_gain is None else r.retained_gain.mean}
                for r in rows
            ],
            "costs": {m: [c.__dict__ for c in cs] for m, cs in costs.items()},
        }
    wall = time.perf_counter() - started
    header = [
        f"## Data-aware merges: {args.zoo} zoo" + (f" ({args.label})" if args.label else ""),
        "",
        f"Reproduce: `{args.command}`",
        "",
        f"Wall time {wall / 60:.1f} min, seeds {', '.join(map(str, seeds))}, {machine_note(load_at_start)}. "
        + CELLS_NOTE + " Each task is scored with its own head on the merged encoder; "
        + test_size_note(sizes_seen) + " Normalised and gain kept as in the data-free tables.",
        "",
        data_note(args, methods),
        "",
    ]
    body = "\n".join(header + sections)
    # A run limited to some recipes gets a docs section and JSON of its own, so runs can go in
    # parallel; so does a labelled variant (other settings beside the default run's table).
    suffix = (f"-{'-'.join(recipes)}" if args.recipes else "") + (f"-{args.label}" if args.label else "")
    if args.docs:
        update_docs(args.docs, f"data-aware-{args.zoo}{suffix}", body)
    record["wall_seconds"] = wall
    write_text_atomic(REPO / "benchmarks" / "_work" / f"data_aware-{args.zoo}{suffix}.json",
                      json.dumps(record, indent=1) + "\n")
    return body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="mlp", help="mlp, text or vision")
    parser.add_argument("--recipes", default="", help="comma-separated (default: all of the zoo)")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--methods", default="",
                        help=f"data-aware methods (default: the five of {', '.join(DATA_AWARE)}; "
                        f"also {', '.join(ON_REQUEST)})")
    parser.add_argument("--examples", type=int, default=256, help="examples per task for statistics")
    parser.add_argument("--ada-examples", type=int, default=256, help="unlabeled test inputs per task")
    parser.add_argument("--ada-steps", type=int, default=200)
    parser.add_argument("--ada-lr", type=float, default=5e-3)
    parser.add_argument("--prodistill-examples", type=int, default=64,
                        help="ProDistill: training inputs per task (the paper: 64)")
    parser.add_argument("--prodistill-steps", type=int, default=100, help="ProDistill: steps per layer")
    parser.add_argument("--prodistill-lr", type=float, default=0.01, help="ProDistill: Adam learning rate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--regmean-alphas", default="0.5,0.9,1.0",
                        help="RegMean's alpha picked on validation from these ('0.9': no search)")
    parser.add_argument("--regmean-scalings", default="1,1.5,2,2.5,3",
                        help="scalings of the merged task vector for the `regmean_scaled` row")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: one per core)")
    parser.add_argument("--test-examples", type=int, default=None,
                        help="text zoo: test examples scored per task (default 1000; 0: all; "
                             "as `mergelab bench run --test-examples`)")
    parser.add_argument("--label", default="",
                        help="a name for a run with other settings: its docs section (and JSON) "
                        "sits beside the default run's instead of replacing it")
    parser.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"),
                        help="markdown file to update ('' for none)")
    args = parser.parse_args(argv)
    args.command = "python benchmarks/data_aware.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
    )
    print(run(args))


if __name__ == "__main__":
    main()
