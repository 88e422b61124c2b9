"""`mergelab align run|validate`: weight matching, activation matching and ZipIt! from a
config's `align:` section (a thin adapter over mergelab.align.run)."""

from __future__ import annotations

from pathlib import Path

import typer

ALIGN_HELP = (
    "Merge models trained from different initialisations: weight matching, activation matching "
    "(Git Re-Basin) or ZipIt!, from a config's `align:` section."
)


def register(app: typer.Typer) -> None:
    """Add the `align` group (`run`, `validate`) to the `mergelab` app."""
    from mergelab.cliutil import command_group

    group = command_group(app, "align", ALIGN_HELP)

    @group.command("run")
    def run(
        config: Path = typer.Argument(..., help="YAML file with an `align:` section."),
        out: Path | None = typer.Option(
            None, "--out", "-o", help="Output folder (default: the config's `output`)."
        ),
        overwrite: bool = typer.Option(False, help="Replace an existing output folder atomically."),
        out_shard_size: str = typer.Option("5GB", help="Maximum shard size: bytes or e.g. 2GB."),
    ) -> None:
        """Align (or zip) the models CONFIG names and write the merged checkpoint."""
        from mergelab.align.run import align_merge
        from mergelab.cliutil import console, fail, note
        from mergelab.errors import MergeLabError

        try:
            report = align_merge(
                config, out, overwrite=overwrite, out_shard_size=out_shard_size
            )
        except MergeLabError as exc:
            fail(exc)
        for message in report.notes:
            note(message)
        console.print(
            f"{report.method}: merged {report.tensors} tensors into {report.out_dir} in "
            f"{report.seconds:.2f} s ({report.examples} input examples)"
        )

    @group.command("validate")
    def validate(
        config: Path = typer.Argument(..., help="YAML file with an `align:` section."),
    ) -> None:
        """Check an `align:` config (schema and paths) without loading any model."""
        from mergelab.align.config import load_align_config
        from mergelab.align.run import resolve_path
        from mergelab.cliutil import console, fail
        from mergelab.errors import ConfigError, MergeLabError

        try:
            section = load_align_config(config)
            missing = [
                f"align.models.{i}: no checkpoint at {path}"
                for i, path in enumerate(section.models)
                if not resolve_path(path, config.parent).exists()
            ]
            if missing:
                raise ConfigError(missing, str(config))
        except MergeLabError as exc:
            fail(exc)
        console.print(
            f"[green]ok[/]: `{section.method}` over {len(section.models)} models"
            + (f", partial zip at `{section.stop_at}`" if section.stop_at else "")
        )

