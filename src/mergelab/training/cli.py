"""`mergelab finetune`: fine-tune an encoder on one task so that it merges (LP-FT by default).

Option defaults and help come from `FinetuneSettings`' fields; the settings are validated
before any model or data is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mergelab.cliutil import console, fail, output_path
from mergelab.errors import MergeLabError
from mergelab.training.settings import FinetuneSettings

_FIELDS = FinetuneSettings.model_fields


def _option(field: str, flag: str | None = None):
    """A typer option whose default and help are `FinetuneSettings.<field>`'s."""
    info = _FIELDS[field]
    names = [flag] if flag else []
    return typer.Option(info.default, *names, help=info.description)


def register(app: typer.Typer) -> None:
    @app.command()
    def finetune(
        task: str = typer.Option(
            ...,
            help="A text task (sentiment, subjectivity, fortune, supersense, pos, or csv:PATH with "
            "columns text,label) or an image task (digits, mnist_5k, fashion_mnist, or npz:PATH "
            "with arrays images [N,H,W] uint8 and labels).",
        ),
        out: Path | None = typer.Option(
            None, "--out", "-o",
            help="Output folder (must not exist): encoder + head.safetensors + recipe.json.",
        ),
        out_dir: Path | None = typer.Option(None, "--out-dir", hidden=True, help="Older spelling of --out."),
        model: str | None = typer.Option(
            None,
            help="Text: a Hugging Face encoder folder (default: the packaged all-MiniLM-L6-v2). "
            "Image (required): a module:function factory returning the encoder (e.g. "
            "mergelab_bench.zoo.mobilenet:pretrained_encoder), or a folder written by this "
            "command for an image task.",
        ),
        recipe: str = _option("recipe"),
        steps: int = _option("steps"),
        batch_size: int = _option("batch_size"),
        learning_rate: float = _option("learning_rate"),
        head_learning_rate: float = _option("head_learning_rate"),
        warmup_steps: int = _option("warmup_steps"),
        schedule: str = _option("schedule"),
        weight_decay: float = _option("weight_decay"),
        max_grad_norm: float | None = _option("max_grad_norm"),
        probe_c: float = _option("probe_c"),
        probe_solver: str = _option("probe_solver"),
        probe_steps: int = _option("probe_steps"),
        freeze_input_embeddings: bool = typer.Option(
            _FIELDS["freeze_input_embeddings"].default,
            "--freeze-input-embeddings/--train-input-embeddings",
            help=_FIELDS["freeze_input_embeddings"].description,
        ),
        freeze: list[str] = typer.Option(
            [], help=f"{_FIELDS['freeze'].description} Repeatable, e.g. --freeze 'encoder.layer.0.*'."
        ),
        seed: int = typer.Option(
            _FIELDS["seed"].default, help=f"{_FIELDS['seed'].description} Also seeds the split."
        ),
        max_length: int | None = typer.Option(
            None, help="Text: tokens per text; longer texts are truncated (how many is printed and "
            "recorded in recipe.json). Default: the 95th percentile of the training texts' token "
            "lengths, rounded up to a multiple of 8, capped by the model."
        ),
        input_size: int = typer.Option(32, help="Image: images are resized to this square side."),
        threads: int = typer.Option(0, help="torch CPU threads (0: torch's default, one per core)."),
        progress: bool = typer.Option(True, help="Show a progress bar."),
    ) -> None:
        """Fine-tune an encoder on one task with a recipe that keeps it mergeable."""
        from mergelab.training.to_folder import finetune_to_folder

        try:
            settings = FinetuneSettings.checked(
                recipe=recipe, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                head_learning_rate=head_learning_rate, warmup_steps=warmup_steps,
                schedule=schedule, weight_decay=weight_decay, max_grad_norm=max_grad_norm,
                probe_c=probe_c, probe_solver=probe_solver, probe_steps=probe_steps,
                freeze_input_embeddings=freeze_input_embeddings, freeze=tuple(freeze), seed=seed,
            )  # fmt: skip
            if threads > 0:
                import torch

                torch.set_num_threads(threads)
            summary = finetune_to_folder(
                task, output_path(out, out_dir, legacy_name="--out-dir"), settings, model=model, max_length=max_length,
                input_size=input_size, progress=progress,
            )  # fmt: skip
        except (MergeLabError, ValueError) as exc:
            fail(exc)
            return
        console.print_json(json.dumps(summary))
