"""Merge study on the vision zoo: average, task arithmetic and TIES, with and without BatchNorm
re-estimation after the merge.

    .venv/bin/python benchmarks/vision_merge_study.py --recipes lpft,joint --seeds 0,1

Builds (or loads) the zoo, merges the per-task encoders with `mergelab.merge_state_dicts`, keeps
each task's own head, picks each method's hyperparameters on the validation split (average over
tasks) and reports test accuracy. Also reports the share of pooled features that are zero on
every validation image ("dead"), the symptom DATA.md's prototype found after merging.
Writes benchmarks/results/vision_merge_study.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mergelab import merge_state_dicts
from mergelab.cliutil import parse_seeds
from mergelab_bench.zoo.base import BuiltZoo, StateDict
from mergelab_bench.zoo.vision import VisionSettings, VisionZoo

RESULTS = Path(__file__).resolve().parent / "results"

# Small grids: the validation split picks one point per method.
GRIDS: dict[str, list[dict]] = {
    "average": [{}],
    "task_arithmetic": [{"lambda": lam} for lam in (0.3, 0.5, 1.0)],
    "ties": [
        {"density": 0.2, "lambda": 1.0},
        {"density": 0.2, "lambda": 1.5},
        {"density": 0.5, "lambda": 1.0},
    ],
}
# After the merge: nothing; BatchNorm statistics re-estimated (standardised) on the tasks'
# images; or REPAIR (the sources' normalised statistics restored).
REPAIRS = ("none", "reset", "repair")
SUFFIX = {"none": "", "reset": " + BN reset", "repair": " + BN REPAIR"}


def merge_config(method: str, tasks: list[str], params: dict) -> dict:
    """A mergekit-style config over the in-memory state dicts named `base` and each task."""
    if method == "average":
        return {
            "merge_method": "linear",
            "models": [{"model": t, "parameters": {"weight": 1.0}} for t in tasks],
            "dtype": "float32",
        }
    model_params = {"weight": 1.0}
    if "density" in params:
        model_params["density"] = params["density"]
    return {
        "merge_method": method,
        "base_model": "base",
        "models": [{"model": t, "parameters": dict(model_params)} for t in tasks],
        "parameters": {"lambda": params["lambda"]},
        "dtype": "float32",
    }


def score(built: BuiltZoo, encoders: dict[str, StateDict], split: str, heads) -> dict:
    """Accuracy per task of `encoders[task]` with `heads[task]`."""
    return {t: built.evaluator.accuracy(encoders[t], heads[t], t, split) for t in built.tasks}


def dead_share(built: BuiltZoo, encoder: StateDict) -> float:
    """Share of (task, feature) pairs whose pooled feature is 0 on every validation image."""
    dead = total = 0
    for task in built.tasks:
        features = built.evaluator.features(encoder, task, "validation")
        dead += int((features.abs().amax(dim=0) == 0).sum())
        total += features.shape[1]
    return dead / total


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def study(built: BuiltZoo, log) -> dict:
    ev = built.evaluator
    rows: dict[str, dict] = {}

    def add(name: str, encoder, heads, params=None, seconds=None):
        """`encoder`: one state dict for every task, or a dict task -> state dict."""
        shared = not isinstance(encoder.get(built.tasks[0]), dict)
        encoders = {t: encoder for t in built.tasks} if shared else encoder
        test = score(built, encoders, "test", heads)
        rows[name] = {
            "test": test,
            "average": mean(test.values()),
            "params": params,
            "dead_features": dead_share(built, encoder) if shared else None,
            "seconds": seconds,
        }
        log(f"  {name:44s} {rows[name]['average']:.4f}  {test}  {params or ''}")

    add("pretrained + fine-tuned heads", built.pretrained, built.heads)
    add("linear probe", built.pretrained, built.probe_heads)
    add("individual fine-tuned", built.finetuned, built.heads)
    # Does re-estimation alone (no merge) cost the fine-tuned models anything?
    reset = {t: ev.reestimate_batchnorm(sd) for t, sd in built.finetuned.items()}
    add("individual fine-tuned + BN reset", reset, built.heads)
    sources = [built.finetuned[t] for t in built.tasks]
    repaired = {t: ev.repair_batchnorm(sd, sources) for t, sd in built.finetuned.items()}
    add("individual fine-tuned + BN REPAIR", repaired, built.heads)
    state_dicts = {"base": built.pretrained, **built.finetuned}
    for method, grid in GRIDS.items():
        for repair in REPAIRS:
            started = time.perf_counter()
            best = None
            for params in grid:
                merged = merge_state_dicts(merge_config(method, built.tasks, params), state_dicts)
                if repair == "reset":
                    merged = ev.reestimate_batchnorm(merged)
                elif repair == "repair":
                    merged = ev.repair_batchnorm(merged, sources)
                encoders = {t: merged for t in built.tasks}
                val = mean(score(built, encoders, "validation", built.heads).values())
                if best is None or val > best[0]:
                    best = (val, params, merged)
            add(
                method + SUFFIX[repair],
                best[2],
                built.heads,
                {**best[1], "validation": round(best[0], 4)},
                round(time.perf_counter() - started, 1),
            )
    return rows


def markdown(results: dict) -> str:
    lines = []
    for recipe, by_seed in results["runs"].items():
        seeds = sorted(by_seed)
        tasks = list(next(iter(by_seed.values()))["rows"]["linear probe"]["test"])
        ft = {s: by_seed[s]["rows"]["individual fine-tuned"]["test"] for s in seeds}
        lines += [f"### recipe `{recipe}` (seeds {', '.join(seeds)}; mean ± spread)", ""]
        lines.append(
            "| model | "
            + " | ".join(tasks)
            + " | average | normalised | dead feat. | chosen (seed "
            + seeds[0]
            + ") |"
        )
        lines.append("|---" * (len(tasks) + 5) + "|")
        for name in by_seed[seeds[0]]["rows"]:

            def cell(values):
                if len(values) == 1:
                    return f"{100 * values[0]:.1f}"
                return f"{100 * statistics.mean(values):.1f} ± {100 * (max(values) - min(values)) / 2:.1f}"

            per_task = [cell([by_seed[s]["rows"][name]["test"][t] for s in seeds]) for t in tasks]
            avg = cell([by_seed[s]["rows"][name]["average"] for s in seeds])
            norm = cell([
                mean(by_seed[s]["rows"][name]["test"][t] / ft[s][t] for t in tasks) for s in seeds
            ])  # fmt: skip
            dead = by_seed[seeds[0]]["rows"][name]["dead_features"]
            params = by_seed[seeds[0]]["rows"][name]["params"] or ""
            dead_cell = f"{100 * dead:.0f}%" if dead is not None else "-"
            lines.append(
                f"| {name} | "
                + " | ".join(per_task)
                + f" | {avg} | {norm} | {dead_cell} | {params} |"
            )
        walls = {s: by_seed[s]["zoo_seconds"] for s in seeds}
        lines += ["", f"zoo build seconds per seed: {walls}", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default="lpft,joint")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--input-size", type=int, default=None)
    parser.add_argument("--out", default=str(RESULTS / "vision_merge_study"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = {}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.lr is not None:
        overrides["learning_rate"] = args.lr
    if args.input_size is not None:
        overrides["input_size"] = args.input_size
    settings = VisionSettings(**overrides)
    zoo = VisionZoo(settings=settings)
    results: dict = {"settings": settings.__dict__, "threads": args.threads, "runs": {}}
    started = time.perf_counter()
    for seed in parse_seeds(args.seeds):
        for recipe in args.recipes.split(","):
            print(f"== recipe {recipe} seed {seed}", flush=True)
            t0 = time.perf_counter()
            built = zoo.build(recipe=recipe, seed=seed, progress=False)
            zoo_seconds = round(time.perf_counter() - t0, 1)
            print(f"  zoo ready in {zoo_seconds} s", flush=True)
            rows = study(built, lambda m: print(m, flush=True))
            results["runs"].setdefault(recipe, {})[str(seed)] = {
                "zoo_seconds": zoo_seconds,
                "zoo_info": built.info,
                "rows": rows,
            }
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
            out.with_suffix(".md").write_text(markdown(results) + "\n")
    results["seconds"] = round(time.perf_counter() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    out.with_suffix(".md").write_text(markdown(results) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
