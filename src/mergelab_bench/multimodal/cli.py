"""`mergelab multimodal recipe`: Sung et al.'s multimodal merging study in miniature
(a thin adapter over `mergelab_bench.multimodal.recipe.run_recipe`)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer
from rich.console import Console

from mergelab.cliutil import command_group, fail, parse_seeds
from mergelab.errors import MergeLabError

log_console = Console(stderr=True, soft_wrap=True)  # progress messages: stdout carries the report
DOCS_SECTION = "multimodal-recipe"  # the marker name of the report's section in a docs file
MULTIMODAL_HELP = "Modality-specific -> modality-agnostic merging (Sung et al. 2023) in miniature."


def recipe(
    out: Path = typer.Option(Path("multimodal-results"), "--out", "-o", help="Folder for results.json and results.md."),
    out_dir: Path | None = typer.Option(None, "--out-dir", hidden=True, help="Older spelling of --out."),
    seeds: str = typer.Option("0,1", help="Seeds, e.g. 0,1 or 0-2: each pre-trains, merges and fine-tunes anew."),
    quick: bool = typer.Option(False, help="Seconds-long smoke run: tiny model, 2 steps per stage, sklearn digits."),
    threads: int = typer.Option(0, help="torch CPU threads (0: torch's default, one per core)."),
    progress: bool = typer.Option(True, help="Show a progress bar per stage."),
    cache: bool = typer.Option(True, help="Reuse pre-trained checkpoints and scores cached under $MERGELAB_CACHE/multimodal."),
    docs: Path | None = typer.Option(None, help="Markdown file whose recipe section gets the report (e.g. docs/multimodal.md)."),
) -> None:
    """Seed pre-training, modality-specific pre-training, merges, fine-tuning on four tasks and
    the weight metrics' correlation with merge quality; prints the markdown report."""
    import torch

    from mergelab_bench.multimodal.recipe import full_settings, quick_settings, run_recipe

    if threads > 0:
        torch.set_num_threads(threads)
    command = "mergelab " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        report = run_recipe(
            quick_settings() if quick else full_settings(),
            out_dir if out_dir is not None else out,
            seeds=parse_seeds(seeds),
            progress=progress,
            log=lambda message: log_console.print(f"[dim]{message}[/dim]", highlight=False),
            cache_root="default" if cache else None,
            command=command,
        )
    except MergeLabError as exc:
        fail(exc)
    if docs is not None:
        from mergelab_bench.bench import update_docs

        update_docs(docs, DOCS_SECTION, report["markdown"])
    # Plain echo: rich would wrap the markdown tables at the terminal width.
    typer.echo(report["markdown"])


def register(app: typer.Typer) -> None:
    """Add `multimodal recipe` to the `mergelab` app."""
    command_group(app, "multimodal", MULTIMODAL_HELP).command("recipe")(recipe)
