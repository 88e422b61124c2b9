"""`mergelab zoo build` and `mergelab zoo list` (`mergelab finetune` is the core's:
`mergelab.training.cli`)."""

from __future__ import annotations

import typer

from mergelab.cliutil import command_group, console, fail, parse_seeds
from mergelab.errors import MergeLabError


def register(app: typer.Typer) -> None:
    zoo_app = command_group(app, "zoo", "Benchmark zoos: build and list.")

    @zoo_app.command("list")
    def list_zoos() -> None:
        """List the registered zoos."""
        from mergelab_bench.zoo.registry import zoo_names

        for name in zoo_names():
            console.print(name)

    @zoo_app.command("build")
    def build(
        zoo: str = typer.Option(..., help="Zoo name: text, vision or mlp."),
        recipe: str | None = typer.Option(None, help="Recipe(s), comma-separated (default: all)."),
        seeds: str = typer.Option("0,1", help="Fine-tuning seeds, e.g. 0,1."),
        threads: int = typer.Option(
            0, help="torch CPU threads (0: torch's default, one per core)."
        ),
        rebuild: bool = typer.Option(False, help="Delete cached fine-tunes first and train again."),
    ) -> None:
        """Fine-tune (or verify the cache of) every task of a zoo, for each recipe and seed."""
        import time

        import torch

        from mergelab_bench.zoo.registry import get_zoo

        if threads > 0:
            torch.set_num_threads(threads)
        started = time.perf_counter()
        try:
            built_zoo = get_zoo(zoo)
            recipes = [r.strip() for r in recipe.split(",")] if recipe else list(built_zoo.recipes)
            for name in recipes:
                for seed in parse_seeds(seeds):
                    tick = time.perf_counter()
                    kwargs = {"rebuild": True} if rebuild else {}
                    built = built_zoo.build(recipe=name, seed=seed, progress=True, **kwargs)
                    console.print(
                        f"{zoo} zoo, recipe {name}, seed {seed}: {len(built.tasks)} tasks ready in "
                        f"{time.perf_counter() - tick:.0f} s"
                    )
        except MergeLabError as exc:
            fail(exc)
        console.print(f"wall time {time.perf_counter() - started:.0f} s")
