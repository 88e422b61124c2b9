"""`mergelab diagnose report`: weight-space metrics between task vectors, written as a report.

The `diagnose` group is shared: the benchmark harness adds `diagnose study` to it."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

DIAGNOSE_HELP = "Weight-space diagnostics of task vectors: reports (and, with the harness, studies)."


def register(app: typer.Typer) -> None:
    """Add the `diagnose` group and its `report` verb to the `mergelab` app."""
    from mergelab.cliutil import command_group

    group = command_group(app, "diagnose", DIAGNOSE_HELP)

    @group.command("report")
    def report(
        models: list[Path] = typer.Argument(..., help="Two or more fine-tuned checkpoints."),
        base: Path = typer.Option(..., "--base", help="The checkpoint they were fine-tuned from."),
        out: Path = typer.Option(..., "--out", "-o", help="Report folder to create."),
        top_k: float = typer.Option(
            0.2, "--top-k", help="Fraction of each task vector TSSD keeps, in (0, 1]."
        ),
        truncation: str = typer.Option(
            "model",
            help="Where TSSD's top-K% is taken: over each whole task vector (model) or per tensor.",
        ),
        name: list[str] = typer.Option(
            None, "--name", help="Label of each model in the report (repeat, in model order)."
        ),
        exclude: list[str] = typer.Option(
            None, "--exclude", help="Glob of tensor names to leave out (repeatable)."
        ),
        html: bool = typer.Option(False, "--html", help="Also write report.html."),
        overwrite: bool = typer.Option(False, help="Replace an existing report folder."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Compare the task vectors of MODELS (each minus --base): cosine, L2, sign conflicts,
        SSD and TSSD, per layer and whole model, with heatmaps."""
        from mergelab.cliutil import console, fail
        from mergelab.diagnostics.metrics import diagnose as run_diagnose
        from mergelab.diagnostics.report import check_target, layer_columns, write_report
        from mergelab.errors import MergeLabError

        try:
            check_target(out, overwrite)  # fail before the (possibly long) passes
            result = run_diagnose(
                models,
                base,
                names=name or None,
                top_k=top_k,
                truncation=truncation,  # type: ignore[arg-type]
                exclude=exclude or (),
                progress=progress,
            )
            folder = write_report(
                result,
                out,
                html_report=html,
                overwrite=overwrite,
                command=shlex.join(["mergelab", *sys.argv[1:]]),
            )
        except MergeLabError as exc:
            fail(exc)
        total = result.total
        console.print(
            f"{len(result.tensors)} tensors ({total.numel:,} parameters) of {len(result.models)} "
            f"models compared in {result.wall_seconds:.1f} s"
        )
        for title, value in layer_columns(result):
            console.print(f"  {title}: {value(total):.4f}")
        console.print(f"report: {folder / 'report.md'}")
