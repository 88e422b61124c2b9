"""`mergelab diagnose study`: does a weight metric predict the merge outcome (on a zoo)?

The verb joins the library's `diagnose` group (beside `diagnose report`)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import typer

from mergelab.cliutil import command_group, console, fail, parse_names

DIAGNOSE_HELP = "Weight-space diagnostics of task vectors: reports and studies."


def register(app: typer.Typer) -> None:
    """Add `study` to the `mergelab diagnose` group."""
    group = command_group(app, "diagnose", DIAGNOSE_HELP)

    @group.command("study")
    def study(
        zoo: str = typer.Option("mlp", help="Zoo name (mlp, text, vision...)."),
        recipe: str = typer.Option(
            "lpft",
            help="The zoo's fine-tuning recipe; several, comma-separated, also pool their merges "
            "(raw, and ranked within each recipe).",
        ),
        seed: int = typer.Option(0, help="The zoo's fine-tuning seed."),
        methods: str = typer.Option(
            "task_arithmetic,ties", help="Comma-separated merge methods of the registry."
        ),
        top_k: float = typer.Option(0.2, "--top-k", help="TSSD's kept fraction, in (0, 1]."),
        out: Path = typer.Option(None, "--out", "-o", help="Write the study as markdown to this file."),
        docs: Path = typer.Option(None, "--docs", help="Markdown file whose section for this study gets it (e.g. docs/benchmarks.md)."),
        progress: bool = typer.Option(True, help="Show progress bars."),
        test_examples: int | None = typer.Option(None, help="Text zoo: test examples scored per task, a seeded subset of its test groups (default 1000; 0: all)."),
        threads: int = typer.Option(0, help="torch CPU threads (0: torch's default, one per core)."),
    ) -> None:
        """Does a metric predict the merge outcome? Merge every pair of a zoo's tasks and
        rank-correlate each metric with the drop in normalised accuracy (Spearman)."""
        import time

        from mergelab.errors import MergeLabError
        from mergelab_bench.metric_study import pairwise_study, pooled_summary
        from mergelab_bench.zoo.registry import get_zoo, test_examples_option

        if threads:
            import torch

            torch.set_num_threads(threads)
        recipes = parse_names(recipe) or []
        studies = {}
        try:
            options = test_examples_option(test_examples)
            if not recipes:
                raise MergeLabError("give at least one recipe")
            zoo_object = get_zoo(zoo, **options)
            for name in recipes:
                tick = time.perf_counter()
                built = zoo_object.build(recipe=name, seed=seed, progress=progress)
                studies[name] = (
                    pairwise_study(
                        built,
                        parse_names(methods) or [],
                        top_k=top_k,
                        progress=progress,
                    ),
                    time.perf_counter() - tick,
                )
        except MergeLabError as exc:
            fail(exc)
        command = shlex.join(["mergelab", *sys.argv[1:]])
        # Each recipe's section says its own seconds (a rerun of one recipe replaces only it).
        sections: dict[str, tuple[str, str]] = {}
        for name, (study, seconds) in studies.items():
            text = (
                f"Zoo `{zoo}`, recipe `{name}`, seed {seed}; `{command}` "
                f"({seconds:.0f} s for this recipe).\n\n" + study.markdown()
            )
            heading = f"## Does a metric predict the merge outcome? {zoo} zoo, recipe `{name}`\n\n"
            sections[f"study:{zoo}:{name}:{seed}"] = (heading, text)
            console.print(f"recipe {name}:", markup=False, highlight=False)
            console.print(study.summary, markup=False, highlight=False)
        if len(studies) > 1:
            pooled = pooled_summary({name: study.records for name, (study, _) in studies.items()})
            heading = f"## Does a metric predict the merge outcome? {zoo} zoo, recipes pooled\n\n"
            text = f"Zoo `{zoo}`, seed {seed}; `{command}`.\n\n" + pooled
            sections[f"study:{zoo}:{'+'.join(recipes)}:{seed}"] = (heading, text)
            console.print(pooled, markup=False, highlight=False)
        if out is not None:
            from mergelab.fileio import write_text_atomic

            # One file; a reader never sees half of it.
            write_text_atomic(out, "\n".join(heading + text for heading, text in sections.values()))
            console.print(f"study: {out}")
        if docs is not None:
            from mergelab_bench.bench import update_docs

            for key, (heading, text) in sections.items():
                update_docs(docs, key, heading + text)
            console.print(f"study: {len(sections)} section(s) of {docs}")
