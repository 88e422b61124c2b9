"""`mergelab modulators show | export`: the per-task modulators of a TALL-masks or EMR merge."""

from __future__ import annotations

from pathlib import Path

import typer

MODULATORS_HELP = (
    "Per-task modulators of a merge (TALL masks, EMR): list them, or write one task's dense "
    "weights."
)


def register(app: typer.Typer) -> None:
    """Add the `modulators` group to the `mergelab` app."""
    from mergelab.cliutil import command_group

    group = command_group(app, "modulators", MODULATORS_HELP)

    @group.command("show")
    def show(
        folder: Path = typer.Argument(..., help="A merge output with a modulators/ folder."),
    ) -> None:
        """List the tasks of FOLDER's modulators: rescaler, kept fraction, bytes on disk."""
        from rich.table import Table

        from mergelab.cliutil import console, fail
        from mergelab.errors import MergeLabError
        from mergelab.modulators.apply import ModulatedFolder, task_summary

        try:
            with ModulatedFolder(folder) as modulated:
                rows = task_summary(modulated)
                method, base = modulated.manifest.method, modulated.base_path
        except MergeLabError as exc:
            fail(exc)
        table = Table(title=f"{folder}: {method} modulators over base {base}")
        for column in ("task", "model", "rescaler", "kept", "mask bytes"):
            table.add_column(column, justify="left" if column in ("task", "model") else "right")
        for row in rows:
            table.add_row(row.name, row.model, f"{row.rescaler:.4f}", f"{row.kept:.1%}",
                          f"{row.nbytes:,}")  # fmt: skip
        console.print(table)

    @group.command("export")
    def export(
        folder: Path = typer.Argument(..., help="A merge output with a modulators/ folder."),
        task: str = typer.Option(..., "--task", help="The task whose weights to write."),
        out: Path = typer.Option(..., "--out", "-o", help="Checkpoint folder to create."),
        base: Path | None = typer.Option(
            None, help="The base checkpoint (default: the one recorded in the manifest)."
        ),
        overwrite: bool = typer.Option(False, help="Replace an existing output folder."),
        out_shard_size: str = typer.Option("5GB", help="Maximum shard size: bytes or e.g. 2GB."),
    ) -> None:
        """Write TASK's dense weights (base + rescaler * mask * (merged - base)) as a plain
        checkpoint, with FOLDER's config and tokenizer files."""
        from mergelab.cliutil import console, fail
        from mergelab.errors import MergeLabError
        from mergelab.modulators.apply import export_task

        try:
            written = export_task(folder, task, out, base=base, overwrite=overwrite,
                                  max_shard_size=out_shard_size)  # fmt: skip
        except MergeLabError as exc:
            fail(exc)
        console.print(f"wrote the dense weights of task {task!r} to {written}")
