"""`mergelab eval`: score a user's model on a user's task, with baselines and intervals.
A thin adapter over `mergelab.eval.run`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from mergelab.cliutil import console, err_console, fail
from mergelab.errors import MergeLabError


def register(app: typer.Typer) -> None:
    """Evaluation commands of the `mergelab` app: `mergelab eval`."""

    @app.command("eval")
    def eval_command(
        model: Path = typer.Argument(
            ..., help="Model folder: what `mergelab finetune` writes (a Hugging Face encoder or "
            "an image encoder, + head.safetensors), a merged encoder (with --head), or a causal "
            "LM for perplexity tasks."
        ),
        task: list[str] = typer.Option(
            ..., "--task", help="Task spec, repeatable: a built-in text task (sentiment, "
            "subjectivity, fortune, supersense, pos) or image task (digits, mnist_5k, "
            "fashion_mnist), csv:PATH or PATH.csv (columns text,label), "
            "npz:PATH (arrays images, labels[, label_names]), images:DIR (a sub-folder per class) "
            "or perplexity:PATH (a text file, one example per line)."
        ),
        head: Path | None = typer.Option(
            None, help="Classifier head (safetensors weight+bias) to score the encoder with, "
            "e.g. one source's head.safetensors for a merged encoder."
        ),
        base: Path | None = typer.Option(
            None, help="Pretrained model for the baselines (default: the base recorded in the "
            "folder's recipe.json, else the packaged all-MiniLM-L6-v2)."
        ),
        split: str = typer.Option("test", help="Split to score: test or validation."),
        limit: int = typer.Option(
            2000, help="At most this many examples per split (a seeded subset); "
            "0: all."
        ),
        seed: int | None = typer.Option(
            None, help="Seed of the splits, the subset and the bootstrap (default: the seed "
            "recorded in recipe.json, so a fine-tune is scored on the rows it never trained on; "
            "else 0)."
        ),
        max_length: int | None = typer.Option(
            None, help="Tokens per text or line (default: the fine-tune's recorded max_length, "
            "else 128)."
        ),
        baselines: bool = typer.Option(
            True, help="Also score the pretrained model with a linear probe (fit on the "
            "training split, its strength chosen on validation)."
        ),
        modulators: str | None = typer.Option(
            None, help="For a TALL-masks or EMR merge (a folder with modulators/): the task "
            "whose modulators to apply (default: each --task's own, by name)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
        card: bool = typer.Option(
            False, "--card", help="Also write the results table into MODEL's model card "
            "(README.md, as `mergelab merge` writes it), replacing one a previous --card wrote."
        ),
    ) -> None:
        """Score MODEL on each --task: accuracy (or perplexity) with its 95% bootstrap interval."""
        from mergelab.eval.run import evaluate_folder, results_table

        if split not in ("test", "validation"):
            fail(MergeLabError(f"--split must be test or validation; got {split!r}"))
            return
        try:
            # A spinner on a terminal only: piped (or --json) output stays clean.
            with err_console.status("loading") as status:
                report = evaluate_folder(
                    model, task, head=head, base=base, split=split,
                    limit=limit or None, seed=seed, baselines=baselines, max_length=max_length,
                    say=lambda message: status.update(message), modulators=modulators,
                )  # fmt: skip
        except MergeLabError as exc:
            fail(exc)
            return
        if card:
            from mergelab.eval.run import write_results_to_card

            write_results_to_card(model, report)
        if as_json:
            typer.echo(json.dumps(report.to_json(), indent=2))
            return
        from rich.markup import escape

        for note in report.notes:
            console.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
        console.print(results_table(report))
        console.print(report.explanation(), highlight=False, markup=False)
