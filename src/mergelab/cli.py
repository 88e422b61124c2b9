"""`mergelab <command>` and `mergelab <group> <verb>`: a thin adapter over the Python API.

The core's own verbs live here (merge, validate, methods, inspect); each concern adds its group
from its own `cli.py` (`register(app)`, listed in `_COMMAND_MODULES`), packages above the
library through the `mergelab.commands` entry points. Shared conventions (`--out`, `--seed` /
`--seeds`, the error printer) are in `mergelab.cliutil`.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import typer
from rich.table import Table

from mergelab.cliutil import console, fail, note, output_path
from mergelab.errors import MergeLabError

app = typer.Typer(
    name="mergelab",
    help="Merge neural networks' weights into one model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(nbytes) < 1000 or unit == "TB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


@app.command()
def merge(
    config: Path = typer.Argument(..., help="Merge config (mergekit-compatible YAML)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output folder (created atomically; must not exist)."
    ),
    out_positional: Path | None = typer.Argument(
        None, hidden=True, help="Older spelling of --out (mergekit's `CONFIG OUT`)."
    ),
    device: str = typer.Option("cpu", help="Device for the merge math: cpu, cuda, cuda:1..."),
    out_shard_size: str = typer.Option("5GB", help="Maximum shard size: bytes or e.g. 2GB."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder atomically."),
    seed: int = typer.Option(0, help="Seed for randomised methods (DARE, DELLA...)."),
    dry_run: bool = typer.Option(False, help="Validate and print the plan; write nothing."),
    allow_nonfinite: bool = typer.Option(False, help="Merge sources holding NaN/Inf anyway."),
    profile: bool = typer.Option(False, help="Print where the time went (read, merge, write)."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    strict: bool = typer.Option(
        False, help="Refuse parameters that mergekit accepts and ignores (default: a warning)."
    ),
    ray_address: str | None = typer.Option(
        None, help="Merge the output shards on a Ray cluster: `auto`, HOST:PORT, ray://HOST:PORT "
        "or `local` (a Ray started for this merge). Inputs and the output's folder must be on "
        "storage every node sees. Needs `pip install 'mergelab[ray]'`.",
    ),
) -> None:
    """Merge the models a CONFIG names into the folder --out."""
    from mergelab import api

    try:
        if dry_run:
            plan = api.plan_merge(config, strict=strict)
            try:
                _print_plan(plan)
            finally:
                api.close_plan(plan)
            return
        out_dir = output_path(out, out_positional)
        report = api.merge(
            config,
            out_dir,
            device=device,
            out_shard_size=out_shard_size,
            overwrite=overwrite,
            seed=seed,
            allow_nonfinite=allow_nonfinite,
            progress=progress,
            strict=strict,
            ray_address=ray_address,
        )
    except MergeLabError as exc:
        fail(exc)
    for message in report.notes:
        note(message)
    console.print(
        f"merged {report.tensors} tensors with `{report.method}` into {out_dir} in "
        f"{report.wall_seconds:.2f} s ({report.tensors_per_second:.1f} tensors/s, "
        f"{report.gb_per_second:.2f} GB/s read+written)"
    )
    if profile:
        table = Table(title="profile")
        table.add_column("phase")
        table.add_column("seconds", justify="right")
        for phase, seconds in report.profile_table():
            table.add_row(phase, f"{seconds:.3f}")
        console.print(table)


def _print_plan(plan) -> None:
    table = Table(title=f"plan: {plan.method.name}")
    table.add_column("what")
    table.add_column("value")
    for key, _source in plan.sources.items():
        table.add_row("source", f"{key}")
    table.add_row("output tensors", str(len(plan.tasks)))
    table.add_row("bytes read", _human(plan.total_in_bytes))
    table.add_row("bytes written", _human(plan.total_out_bytes))
    table.add_row("estimated peak tensor memory", _human(plan.estimate_peak_bytes()))
    console.print(table)
    for message in plan.notes:
        note(message)
    _print_data_stage(plan)
    preview = Table(title="first tensors")
    for col in ("tensor", "shape", "inputs", "out dtype"):
        preview.add_column(col)
    for task in plan.tasks[:12]:
        preview.add_row(
            task.name,
            "x".join(map(str, task.shape)) or "scalar",
            str(len(task.inputs)),
            str(task.out_dtype).replace("torch.", ""),
        )
    console.print(preview)


def _print_data_stage(plan) -> None:
    """What a data-aware method's data stage will run (nothing is run here). Plain lines, not
    a table: paths of folders and tasks are shown whole."""
    from mergelab.plan.stages import describe_data_stage

    stage = describe_data_stage(plan, plan.config_dir)
    if stage is None:
        return

    def line(text: str) -> None:
        console.print(text, soft_wrap=True, highlight=False, markup=False)

    line(f"data stage: {stage['stage']} for `{stage['method']}`")
    if stage["stage"] == "statistics":
        for kind in stage["statistics"]:
            line(f"  statistics: {kind['kind']}: {kind['what']} ({kind['per_example']} per example)")
        line(f"  collector: {stage['collector']}")
        line(f"  estimated statistics: {_human(stage['estimated_statistics_bytes'])}")
    else:
        line(f"  optimiser: {stage['optimiser']} {stage['options']}")
        line(f"  output: {stage['output']}")
    line(f"  estimated forward passes: {stage['estimated_forward_passes']:,} ({stage['cost']})")
    for source in stage["sources"]:
        where = (
            f"loaded from {source['statistics_folder']}" if source["loaded_from_folder"]
            else f"task {source['task']}, split {source['split']}, {source['examples']} examples"
            + (f", kept in {source['statistics_folder']}" if source["statistics_folder"] else "")
        )
        line(f"  model {source['model']}: {where}")


@app.command()
def moe(
    config: Path = typer.Argument(..., help="mergekit-moe config (YAML): base_model, experts, gate_mode."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Output folder (created atomically; must not exist)."
    ),
    out_positional: Path | None = typer.Argument(
        None, hidden=True, help="Older spelling of --out (mergekit-moe's `CONFIG OUT`)."
    ),
    device: str = typer.Option("cpu", help="Device for assembling the experts: cpu, cuda..."),
    out_shard_size: str = typer.Option("5GB", help="Maximum shard size: bytes or e.g. 2GB."),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder atomically."),
    seed: int = typer.Option(0, help="Seed of random routers and expert noise."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Build a Mixtral mixture of experts from dense models into the folder --out."""
    from mergelab import api

    out_dir = output_path(out, out_positional)
    try:
        report = api.moe(config, out_dir, device=device, out_shard_size=out_shard_size,
                         overwrite=overwrite, seed=seed, progress=progress)
    except MergeLabError as exc:
        fail(exc)
    for message in report.notes:
        note(message)
    console.print(f"wrote {report.tensors} tensors into {out_dir} in {report.wall_seconds:.2f} s")


@app.command()
def validate(
    config: Path = typer.Argument(..., help="Merge config to check."),
    strict: bool = typer.Option(
        False, help="Refuse parameters that mergekit accepts and ignores (default: a warning)."
    ),
) -> None:
    """Check a config and its sources completely without merging."""
    from mergelab import api

    try:
        plan = api.plan_merge(config, strict=strict)
    except MergeLabError as exc:
        fail(exc)
    api.close_plan(plan)
    console.print(
        f"[green]ok[/]: `{plan.method.name}` over {len(plan.sources)} model(s), "
        f"{len(plan.tasks)} output tensors"
    )
    for message in plan.notes:
        note(message)
    _print_data_stage(plan)


@app.command()
def methods(
    pattern: str | None = typer.Argument(None, help="Glob on method names, e.g. '*ties*'."),
    markdown: bool = typer.Option(False, help="Print the reference table as Markdown (docs)."),
) -> None:
    """List merge methods: name, paper and parameters (from the registry)."""
    from mergelab.methods import list_methods

    found = list_methods(pattern or "*")
    if pattern and not found:
        fail(f"no method matches {pattern!r}")
    if markdown:
        from mergelab.methods.docs import methods_markdown

        typer.echo(methods_markdown(found))
        return
    table = Table(show_lines=True)
    for col in ("method", "paper", "base", "needs", "parameters"):
        table.add_column(col)
    for m in found:
        params = []
        for p in m.params:
            rng = ""
            if p.low is not None or p.high is not None:
                rng = f" in {p.range_text(unbounded=('', ''))}"
            default = "required" if p.default is None else f"default {p.default}"
            scope = "per model" if p.per_model else "global"
            params.append(f"{p.name} ({p.kind.__name__}, {scope}, {default}{rng})")
        needs = ", ".join(m.needs) or "-"
        table.add_row(m.name, f"{m.paper}\n{m.url}", m.base, needs, "\n".join(params) or "-")
    console.print(table)


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="Checkpoint folder or file."),
    pattern: str = typer.Option("*", help="Glob on tensor names."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List a checkpoint's tensors, shapes, dtypes and parameter count."""
    from mergelab.checkpoint import open_checkpoint

    try:
        reader = open_checkpoint(path)
    except (MergeLabError, FileNotFoundError) as exc:
        fail(exc)
    with reader:
        rows = []
        total = 0
        for name in reader.keys():
            shape = reader.shape(name)
            numel = 1
            for s in shape:
                numel *= s
            total += numel
            if fnmatch.fnmatch(name, pattern):
                rows.append((name, list(shape), str(reader.dtype(name)).replace("torch.", ""), numel))
        if as_json:
            console.print_json(
                json.dumps(
                    {
                        "path": str(path),
                        "parameters": total,
                        "tensors": [
                            {"name": n, "shape": s, "dtype": d, "numel": c} for n, s, d, c in rows
                        ],
                    }
                )
            )
            return
        table = Table(title=str(path))
        for col in ("tensor", "shape", "dtype", "parameters"):
            table.add_column(col)
        for n, s, d, c in rows:
            table.add_row(n, "x".join(map(str, s)) or "scalar", d, f"{c:,}")
        console.print(table)
        console.print(f"{len(reader.keys())} tensors, {total:,} parameters")


# Commands of other concerns (evaluation, diagnostics, alignment...) live beside their code:
# each module here defines `register(app)`. Add a module to this tuple to add its commands; a
# group two packages share (`diagnose`) is reached with `mergelab.cliutil.command_group`.
_COMMAND_MODULES: tuple[str, ...] = (
    "mergelab.diagnostics.cli", "mergelab.eval.cli", "mergelab.training.cli",
    "mergelab.lora.cli", "mergelab.align.cli", "mergelab.search.cli", "mergelab.export.cli",
    "mergelab.modulators.cli", "mergelab.distill.cli",
)
# Packages above the library (the benchmark harness, plug-ins) add theirs through the
# `mergelab.commands` entry point group: the library never imports them.
COMMAND_ENTRY_POINTS = "mergelab.commands"


def _register_commands() -> None:
    import importlib
    from importlib.metadata import entry_points

    for module in _COMMAND_MODULES:
        importlib.import_module(module).register(app)
    for entry in sorted(entry_points(group=COMMAND_ENTRY_POINTS), key=lambda e: e.name):
        entry.load()(app)


_register_commands()


if __name__ == "__main__":
    app()
