"""`mergelab distill CONFIG --out OUT`: several teachers into one student (see docs/distill.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from mergelab.cliutil import console, fail, output_path
from mergelab.errors import MergeLabError


def register(app: typer.Typer) -> None:
    @app.command()
    def distill(
        config: Path = typer.Argument(..., help="Distill config (YAML: student, teachers, replay, stages)."),
        out: Path | None = typer.Option(
            None, "--out", "-o",
            help="Output folder (written atomically): the student encoder, heads/ + heads.json "
            "(one head per teacher), distill_report.json.",
        ),
        overwrite: bool = typer.Option(False, help="Replace an existing output folder atomically."),
        restart: bool = typer.Option(
            False, help="Discard the checkpoints of an unfinished run of this output (by default "
            "it resumes after its last finished stage)."
        ),
        threads: int = typer.Option(0, help="torch CPU threads (0: torch's default)."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Distil the CONFIG's teachers into one student with a head per teacher."""
        from mergelab.distill.run import distill as run_distill

        try:
            if threads > 0:
                import torch

                torch.set_num_threads(threads)
            report = run_distill(config, output_path(out), overwrite=overwrite, restart=restart,
                                 progress=progress)  # fmt: skip
        except MergeLabError as exc:
            fail(exc)
            return
        _print_report(report, output_path(out))


def _print_report(report: dict, out: Path) -> None:
    from rich.table import Table

    table = Table(title=f"distilled into {out} (validation split)")
    for column in ("task", "teacher", "student", "agreement", "feature cosine"):
        table.add_column(column)
    for name, scores in report["student"].items():
        if not isinstance(scores, dict):
            continue
        table.add_row(name, _pct(scores["teacher_accuracy"]), _pct(scores["student_accuracy"]),
                      _pct(scores["agreement"]), f"{scores['feature_cosine']:.3f}")  # fmt: skip
    console.print(table)
    for stage in report["stages"]:
        resumed = " (resumed from its checkpoint)" if stage["resumed"] else ""
        console.print(f"stage {stage['name']}: {stage['steps']} steps, loss "
                      f"{stage['loss_first10']:.4f} -> {stage['loss_last10']:.4f}{resumed}")  # fmt: skip
    if "replay_cosine" in report["student"]:
        console.print(f"replay memory: cosine to the init's features {report['student']['replay_cosine']:.3f}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"
