"""`mergelab export`: one task of a fine-tuned or merged folder as a transformers
sequence-classification folder. A thin adapter over `mergelab.export.export_classifier`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mergelab.cliutil import console, fail
from mergelab.errors import MergeLabError


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_command(
        model: Path = typer.Argument(
            ..., help="A folder `mergelab finetune` wrote, or a merge of such folders (it "
            "carries their heads: heads.json)."
        ),
        task: str | None = typer.Option(
            None, help="The task (a head's name, as `mergelab eval` names tasks) whose head the "
            "export carries; optional when the folder holds one head."
        ),
        out: Path = typer.Option(..., "--out", "-o", help="The folder to write (must not exist)."),
        overwrite: bool = typer.Option(False, help="Replace an existing output folder atomically."),
    ) -> None:
        """Write MODEL with one task's head as a transformers sequence-classification folder
        (load it with AutoModelForSequenceClassification.from_pretrained(OUT, trust_remote_code=True))."""
        from mergelab.export import export_classifier

        try:
            summary = export_classifier(model, out, task=task, overwrite=overwrite)
        except MergeLabError as exc:
            fail(exc)
            return
        console.print_json(json.dumps(summary))
