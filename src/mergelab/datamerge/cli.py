"""`mergelab regmean-stream`: RegMean of checkpoints too large for memory, from saved Grams."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("regmean-stream")
    def regmean_stream(
        checkpoints: list[Path] = typer.Argument(..., help="Checkpoint folders or files to merge."),
        stats: list[Path] = typer.Option(
            ..., "--stats", help="Gram statistics folder of each checkpoint, in the same order."
        ),
        out_dir: Path = typer.Option(..., "--out", help="Output folder (created atomically)."),
        alpha: float = typer.Option(0.9, help="Scale of the non-diagonal Gram entries, in [0, 1]."),
        overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
        out_shard_size: str = typer.Option("5GB", help="Maximum shard size."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Merge CHECKPOINTS with RegMean one tensor at a time, given Grams computed earlier
        (mergelab.stats.collect_grams(..., out_dir=...) or data_merge(..., stats_dir=...))."""
        from mergelab.cli import _fail, console
        from mergelab.datamerge.streaming import regmean_from_disk
        from mergelab.errors import MergeLabError

        if not 0.0 <= alpha <= 1.0:
            _fail(ValueError(f"`alpha` must be in [0, 1]; got {alpha}"))
        try:
            report = regmean_from_disk(
                checkpoints, stats, out_dir, alpha=alpha, overwrite=overwrite,
                out_shard_size=out_shard_size, progress=progress,
            )
        except MergeLabError as exc:
            _fail(exc)
            return
        console.print(
            f"merged {report.tensors} tensors ({report.regmean_tensors} by RegMean, the rest "
            f"averaged) into {report.out_dir} in {report.seconds:.2f} s; peak tensor memory "
            f"{report.peak_tensor_bytes / 1e6:.1f} MB"
        )
