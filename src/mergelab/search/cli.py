"""`mergelab search run|validate`: evolutionary recipe search from a config's `search:`
section (a thin adapter over mergelab.search.run)."""

from __future__ import annotations

from pathlib import Path

import typer

SEARCH_HELP = (
    "Search a merge recipe (CMA-ES, TPE or random over a method's parameters per source and "
    "layer group), each trial merged in memory and scored; resumable from its study."
)


def register(app: typer.Typer) -> None:
    """Add the `search` group (`run`, `validate`) to the `mergelab` app."""
    from mergelab.cliutil import command_group

    group = command_group(app, "search", SEARCH_HELP)

    @group.command("run")
    def run(
        config: Path = typer.Argument(..., help="YAML merge config with a `search:` section."),
        out: Path = typer.Option(..., "--out", "-o", help="Folder for the study, best.yaml (or best_routing.yaml), trials.csv, plots."),
        trials: int | None = typer.Option(None, help="Completed trials to reach (default: the config's)."),
        storage: str | None = typer.Option(None, help="Study database URL (default: sqlite in --out)."),
        sampler: str | None = typer.Option(None, help="cmaes, tpe, random or nsga2 (default: the config's, else cmaes; nsga2 for objective: pareto)."),
        seed: int | None = typer.Option(None, help="Sampler and merge seed (default: the config's, else 0)."),
        workers: int = typer.Option(1, help="Trials at once; above 1 they run on Ray actors (a local Ray unless --ray-address)."),
        ray_address: str | None = typer.Option(None, help="Run the trials on this Ray cluster (`auto` or HOST:PORT)."),
    ) -> None:
        """Run (or resume) the search; write the best recipe as a plain merge config."""
        import time

        from mergelab.cliutil import console, fail, note
        from mergelab.errors import MergeLabError
        from mergelab.search.run import read_search_config, search_from_config

        started, before = time.perf_counter(), []  # trials completed before this run
        try:
            goal = trials if trials is not None else read_search_config(config)[1].get("trials", 100)
        except MergeLabError as exc:
            fail(exc)

        def show(outcome, completed, best):
            if not before:
                before.append(completed - (outcome.value is not None))
            value = "failed: " + outcome.error if outcome.value is None else f"{outcome.value:.6g}"
            best_text = "-" if best is None else f"{best:.6g}"
            eta = ""
            done_here = completed - before[0]
            if done_here > 0 and completed < goal:
                left = (time.perf_counter() - started) / done_here * (goal - completed)
                eta = f", about {left / 60:.1f} min left"
            console.print(f"trial {outcome.number}: {value} (build {outcome.merge_seconds:.2f} s, "
                          f"eval {outcome.eval_seconds:.2f} s) | {completed}/{goal} done, "
                          f"best {best_text}{eta}")

        try:
            result = search_from_config(config, out, trials=trials, storage=storage,
                                        sampler=sampler, seed=seed, workers=workers,
                                        ray_address=ray_address, on_trial=show)
        except MergeLabError as exc:
            fail(exc)
        if "routing" in result.best_config:
            where = f"routing: {out / 'best_routing.yaml'} (load it with `mergelab.search.load_routing`)"
            if (out / "best.yaml").is_file():
                where += f"; as a checkpoint: `mergelab merge {out / 'best.yaml'} OUT`"
        else:
            where = f"recipe: {out / 'best.yaml'} (run it with `mergelab merge`)"
        note(f"best score {result.best_value:.6g} over {result.completed} completed trial(s) "
             f"({result.failed} failed); {where}")

    @group.command("validate")
    def validate(
        config: Path = typer.Argument(..., help="YAML merge config with a `search:` section."),
    ) -> None:
        """Check the search config and print its space (no source is read)."""
        from mergelab.cliutil import console, fail
        from mergelab.errors import MergeLabError
        from mergelab.search.run import read_search_config

        try:
            _, section, space = read_search_config(config)
        except MergeLabError as exc:
            fail(exc)
        if hasattr(space, "slots"):
            console.print(
                f"data-flow space: {len(space.models)} source(s) x {space.layers} layers, "
                f"repeated {space.repeats} time(s): {space.slots} slots"
                + (f" and a {space.layout} x {space.layout} scaling matrix in "
                   f"[{space.scale_low:g}, {space.scale_high:g}]" if space.scaling else "")
                + f"; {space.size} searched coordinate(s)")
            return
        console.print(f"{space.size} searched coordinate(s), {space.layer_groups} layer group(s):")
        for d in space.dimensions:
            console.print(f"  {d.label}: [{d.low:g}, {d.high:g}]")
