"""`mergelab multimodal recipe`: Sung et al.'s multimodal merging study in miniature
(a thin adapter over `mergelab_bench.multimodal.recipe.run_recipe`)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer
from rich.console import Console

from mergelab.errors import MergeLabError

console = Console(stderr=True)
DOCS_SECTION = "multimodal-recipe"  # the marker name of the report's section in a docs file
app = typer.Typer(
    name="multimodal",
    help="Modality-specific -> modality-agnostic merging (Sung et al. 2023) in miniature.",
    no_args_is_help=True,
)


@app.callback()
def main() -> None:
    """Modality-specific -> modality-agnostic merging (Sung et al. 2023) in miniature."""


def _seeds(text: str) -> list[int]:
    from mergelab.eval.cli import parse_seeds

    return parse_seeds(text)


@app.command("recipe")
def recipe(
    out_dir: Path = typer.Option(Path("multimodal-results"), help="Folder for results.json and results.md."),
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
            out_dir,
            seeds=_seeds(seeds),
            progress=progress,
            log=lambda message: console.print(f"[dim]{message}[/dim]", highlight=False),
            cache_root="default" if cache else None,
            command=command,
        )
    except MergeLabError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise typer.Exit(code=1) from None
    if docs is not None:
        from mergelab_bench.bench import update_docs

        update_docs(docs, DOCS_SECTION, report["markdown"])
    # Plain echo: rich would wrap the markdown tables at the terminal width.
    typer.echo(report["markdown"])


def register(parent: typer.Typer) -> None:
    """Add `multimodal` to the `mergelab` command (see `_COMMAND_MODULES` in mergelab.cli)."""
    parent.add_typer(app, name="multimodal")


if __name__ == "__main__":
    app()
