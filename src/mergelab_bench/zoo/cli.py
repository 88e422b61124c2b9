"""`mergelab zoo build` and `mergelab finetune` ("fine-tune so that it merges")."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from mergelab.errors import MergeLabError

console = Console()
err_console = Console(stderr=True)


def _fail(exc: Exception) -> None:
    err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(code=1)


def register(app: typer.Typer) -> None:
    zoo_app = typer.Typer(help="Benchmark zoos: build and list.", no_args_is_help=True)
    app.add_typer(zoo_app, name="zoo")

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

        from mergelab.eval.cli import parse_seeds
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
            _fail(exc)
            return
        console.print(f"wall time {time.perf_counter() - started:.0f} s")

    @app.command()
    def finetune(
        task: str = typer.Option(
            ...,
            help="A built-in text task (sentiment, subjectivity, fortune, supersense, pos) or csv:PATH with columns text,label.",
        ),
        out_dir: Path = typer.Option(
            ..., help="Output folder: a Hugging Face encoder + head.safetensors."
        ),
        recipe: str = typer.Option(
            "lpft",
            help="lpft: probe first, then fine-tune under it (merges well); joint: head from random init.",
        ),
        model: Path | None = typer.Option(
            None, help="Hugging Face encoder folder (default: the packaged all-MiniLM-L6-v2)."
        ),
        steps: int = typer.Option(100, help="Fine-tuning steps."),
        learning_rate: float = typer.Option(5e-5, help="Encoder learning rate."),
        seed: int = typer.Option(0, help="Seed of the split and of fine-tuning."),
        threads: int = typer.Option(
            0, help="torch CPU threads (0: torch's default, one per core)."
        ),
    ) -> None:
        """Fine-tune a text encoder on one task with a recipe that keeps it mergeable."""
        import torch

        from mergelab_bench.zoo.text import finetune_to_folder

        if threads > 0:
            torch.set_num_threads(threads)
        try:
            summary = finetune_to_folder(
                task,
                out_dir,
                recipe=recipe,
                model_path=model,
                steps=steps,
                learning_rate=learning_rate,
                seed=seed,
            )
        except MergeLabError as exc:
            _fail(exc)
            return
        console.print_json(json.dumps(summary))
