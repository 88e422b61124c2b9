"""`mergelab bench run`: the merge benchmark on a zoo (see mergelab_bench.bench)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from mergelab.cliutil import command_group, console, fail, parse_names, parse_seeds
from mergelab.errors import MergeLabError


def register(app: typer.Typer) -> None:
    group = command_group(app, "bench", "The merge benchmark on a zoo's fine-tunes.")

    @group.command("run")
    def run(
        zoo: str = typer.Option(..., help="Zoo name: text, vision or mlp (the unit-test zoo)."),
        recipe: str | None = typer.Option(None, help="Fine-tuning recipe(s), comma-separated (default: all)."),
        seeds: str = typer.Option("0,1", help="Zoo fine-tuning seeds, e.g. 0,1 or 0-2."),
        methods: str | None = typer.Option(None, help="Merge methods, comma-separated (default: every applicable data-free one)."),
        out: Path = typer.Option(Path("bench-results"), "--out", "-o", help="Folder for the JSON, markdown and PNG results."),
        out_dir: Path | None = typer.Option(None, "--out-dir", hidden=True, help="Older spelling of --out."),
        docs: Path | None = typer.Option(None, help="Markdown file whose section for this zoo gets the tables (e.g. docs/benchmarks.md)."),
        threads: int = typer.Option(0, help="torch CPU threads (0: torch's default, one per core)."),
        cache: bool = typer.Option(True, help="Reuse evaluation results cached by a hash of the weights."),
        progress: bool = typer.Option(True, help="Show progress bars while fine-tuning."),
        test_examples: int | None = typer.Option(None, help="Text zoo: test examples scored per task, a seeded subset of its test groups (default 1000; 0: all)."),
        bn_repair: bool = typer.Option(True, help="Zoos with BatchNorm (vision): also score each merge after REPAIR of its BatchNorm statistics."),
    ) -> None:
        """Merge a zoo's fine-tunes with every method; report test accuracy per task."""
        import torch

        from mergelab.eval.harness import default_result_cache
        from mergelab_bench.bench import run_bench
        from mergelab_bench.zoo.registry import test_examples_option

        if threads > 0:
            torch.set_num_threads(threads)
        command = "mergelab " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        try:
            report = run_bench(
                zoo,
                recipes=parse_names(recipe),
                seeds=parse_seeds(seeds),
                methods=parse_names(methods),
                out_dir=out_dir if out_dir is not None else out,
                docs_path=docs,
                command=command,
                cache=default_result_cache() if cache else None,
                zoo_options=test_examples_option(test_examples),
                progress=progress,
                log=console.print,
                repair=bn_repair,
            )
        except MergeLabError as exc:
            fail(exc)
        # Plain echo: rich would wrap the markdown tables at the terminal width.
        typer.echo(report.markdown)
        for recipe_name, files in report.files.items():
            console.print(f"{recipe_name}: " + ", ".join(str(p) for p in files.values()))
