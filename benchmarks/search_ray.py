"""Recipe search on Ray against the same search in one process (text zoo): wall time, trials
per hour and whether the best recipe is the same.

    .venv/bin/python benchmarks/search_ray.py --trials 16 --samplers random,cmaes --write-docs

The search is the parameter-space one of benchmarks/search_text.py (TIES with a weight and a
density per fine-tune and lambda, fitness the mean validation accuracy of the five tasks, each
with its own head), on one recipe and seed of the text zoo. For every sampler it runs three
ways, each into a fresh study with the same seed and budget:

- `1 process, 1 thread` and `1 process, N threads`: `mergelab.search.run_search` with the
  trials evaluated in this process (torch threads set to 1, then to the core count);
- `Ray, W workers`: `mergelab.search.parallel.RayWorkers` on a local Ray of W one-CPU actors,
  each building the zoo's evaluator once (from the zoo cache) and evaluating one trial at a
  time with one torch thread; the driver asks and tells the study.

Wall time is the whole `run_search` call (for Ray also starting it and its actors, reported
apart as well, and the actors' loading of the zoo). The random sampler proposes the same points however trials
interleave, so its best recipe must be the same everywhere; CMA-ES proposes a generation from
the trials finished so far, so with trials in flight its points, and maybe its best recipe,
can differ (the table says whether they did).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
MARKER = "search-ray"


def _search_setup(recipe: str, seed: int):
    """(space, sources, evaluate) of the parameter-space search on the zoo's fine-tunes."""
    from mergelab.eval.harness import evaluate_model
    from mergelab.search.space import build_space
    from mergelab_bench.bench import BASE_NAME, GridPoint, merge_config
    from mergelab_bench.zoo.registry import get_zoo

    built = get_zoo("text").build(recipe=recipe, seed=seed, progress=False)
    tasks = list(built.tasks)
    config = merge_config("ties", GridPoint(), tasks)
    config["models"] = [{"model": t} for t in tasks]
    section = {"parameters": {"weight": {}, "density": {"low": 0.1, "high": 1.0},
                              "lambda": {"low": 0.5, "high": 2.0}}}  # fmt: skip
    space = build_space(config, section)
    sources = {BASE_NAME: built.pretrained, **{t: built.finetuned[t] for t in tasks}}

    def evaluate(candidate):
        return evaluate_model(built.evaluator, candidate, built.heads, tasks=tasks, split="validation")

    return space, sources, evaluate


def actor_evaluator(recipe: str, seed: int):
    """Built inside each Ray actor (one torch thread): the zoo's validation fitness."""
    torch.set_num_threads(1)
    return _search_setup(recipe, seed)[2]


def run(args) -> str:
    import functools

    from mergelab.search import run_search
    from mergelab.search.parallel import RayWorkers
    from mergelab_bench.bench import update_docs

    load_at_start = os.getloadavg()[0]
    cores = os.cpu_count() or 1
    space, sources, evaluate = _search_setup(args.recipe, args.seed)
    rows = ["| sampler | run | wall s | of which starting Ray s | trials | trials / hour | best validation % | best recipe as the 1-thread run's |",
            "|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="search-ray-") as work:
        for sampler in args.samplers.split(","):
            reference = None
            for label, threads, workers in (("1 process, 1 thread", 1, 0),
                                            (f"1 process, {cores} threads", cores, 0),
                                            (f"Ray, {args.workers} workers", 1, args.workers)):  # fmt: skip
                torch.set_num_threads(threads)
                storage = f"sqlite:///{Path(work) / f'{sampler}-{threads}-{workers}.db'}"
                started = time.perf_counter()
                pool = None
                if workers:
                    pool = RayWorkers(space, sources,
                                      functools.partial(actor_evaluator, args.recipe, args.seed),
                                      slots=workers, objective="mean", seed=args.seed)  # fmt: skip
                setup = time.perf_counter() - started
                # run_search closes the pool it is given
                result = run_search(space, sources, evaluate, storage=storage, trials=args.trials,
                                    sampler=sampler, seed=args.seed, evaluator_name="text-zoo-validation",
                                    workers=pool)  # fmt: skip
                wall = time.perf_counter() - started
                if reference is None:
                    reference = result.best_config
                same = "yes" if result.best_config == reference else "no"
                print(f"  {sampler}, {label}: {wall:.1f} s, best {100 * result.best_value:.2f}%", flush=True)
                rows.append(f"| {sampler} | {label} | {wall:.1f} | {setup:.1f} | {result.completed} | "
                            f"{3600 * result.completed / wall:.0f} | {100 * result.best_value:.2f} | {same} |")
    body = "\n".join([
        f"Reproduce: `{args.command}`",
        "",
        f"CPU ({cores} core(s), torch threads as each row says; 1-minute load average "
        f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end); text zoo, "
        f"recipe `{args.recipe}`, seed {args.seed}: the "
        "parameter-space search of the recipe-search section (TIES, a weight and a density per "
        "fine-tune, lambda; fitness the mean validation accuracy over the five tasks), "
        f"{args.trials} trials per run, each run a fresh study with the same seed. Ray: a local "
        f"cluster of {args.workers} one-CPU actors, each loading the zoo's evaluator once "
        "(inside the wall time; starting Ray and the actors is also given apart), one trial per "
        "actor at a time, one torch thread each; the driver alone asks and tells the study. The "
        "random sampler proposes the same points in any order of completion; CMA-ES builds a "
        "generation from the trials finished so far.",
        "",
        *rows,
        "",
    ])
    if args.write_docs:
        update_docs(args.docs, MARKER, "## Recipe search on Ray: text zoo\n\n" + body)
    return body


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="lpft")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--samplers", default="random,cmaes")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--write-docs", action="store_true")
    parser.add_argument("--docs", default=str(REPO / "docs" / "benchmarks.md"))
    args = parser.parse_args(argv)
    args.command = ".venv/bin/python benchmarks/search_ray.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    print(run(args))


if __name__ == "__main__":
    main()
