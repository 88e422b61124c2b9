"""What every `mergelab` command shares: the consoles, the one error printer, `--seeds` parsing
and named command groups.

Only command-line adapters import this module (`mergelab.cli`, each concern's `cli.py` and the
harness's commands); the library never does (an import-linter contract in pyproject.toml).

Conventions every command follows (a test walks the command tree to check them):
- what a command writes is named by `--out` (`-o`), a folder or a file;
- `--seed N` is one integer, `--seeds 0,1` or `--seeds 0-2` is several (`parse_seeds`);
- a `MergeLabError` becomes `error: <message>` on stderr and exit status 1 (`fail`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from mergelab.errors import MergeLabError

# soft_wrap: a long line is never broken into several (a path stays whole when the output is a
# file or a pipe, where rich would otherwise wrap at 80 columns); a terminal wraps it visually.
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

OUT_FLAGS = ("--out", "-o")  # the one name of every command's output

# Library messages speak Python ("pass overwrite=True"); at the command line that is a flag.
_PASS_KEYWORD = re.compile(r"\bpass ([a-z][a-z0-9_]*)=(True|False)\b")


def cli_message(message: str) -> str:
    """Rewrite the keyword arguments a library message tells the user to pass as the flags
    that set them: "pass overwrite=True" -> "pass --overwrite", "pass progress=False" ->
    "pass --no-progress"."""

    def flag(match: re.Match) -> str:
        name = match.group(1).replace("_", "-")
        return f"pass --{name}" if match.group(2) == "True" else f"pass --no-{name}"

    return _PASS_KEYWORD.sub(flag, message)


def fail(exc: BaseException | str) -> NoReturn:
    """Print `error: <message>` on stderr and exit with status 1 (the one error printer)."""
    err_console.print(
        f"[bold red]error:[/] {escape(cli_message(str(exc)))}", highlight=False, markup=True, soft_wrap=True
    )
    raise typer.Exit(code=1)


def note(message: str) -> None:
    """Print `note: <message>` on stdout (something the user should know; not an error)."""
    console.print(f"[yellow]note:[/] {escape(message)}", highlight=False)


def parse_seeds(text: str) -> list[int]:
    """`--seeds`: "0,1" -> [0, 1], "0-2" -> [0, 1, 2], "0,3-4" -> [0, 3, 4].

    Raises MergeLabError (naming the part at fault) on anything else or on no seed at all.
    """
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            if "-" in part[1:]:
                low, high = part.split("-", 1) if not part.startswith("-") else (part, part)
                seeds.extend(range(int(low), int(high) + 1))
            elif part:
                seeds.append(int(part))
        except ValueError:
            raise MergeLabError(f"--seeds: {part!r} is not an integer or a range like 0-2") from None
    if not seeds:
        raise MergeLabError("--seeds: give at least one seed, e.g. 0,1")
    return seeds


def parse_names(text: str | None) -> list[str] | None:
    """A comma-separated option ("lpft,joint") as a list; None when not given."""
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


def command_group(app: typer.Typer, name: str, help: str) -> typer.Typer:
    """The group `mergelab NAME`, created on first use and returned as is afterwards.

    This is how two packages add verbs to one noun: the library registers `diagnose report`,
    the benchmark harness (above it) adds `diagnose study` to the same group. `help` is used by
    whichever caller creates the group.
    """
    for info in app.registered_groups:
        if info.name == name and info.typer_instance is not None:
            return info.typer_instance
    group = typer.Typer(name=name, help=help, no_args_is_help=True)
    app.add_typer(group, name=name, help=help)
    return group


def output_path(out: Path | None, legacy: Path | None = None, *, legacy_name: str = "OUT") -> Path:
    """The output a command was given: `--out`, or a hidden older spelling (`legacy`, e.g. the
    positional OUT of `mergelab merge CONFIG OUT`). Fails when both are given and differ, or
    when neither is."""
    if out is not None and legacy is not None and out != legacy:
        fail(f"give the output once: --out {out} or {legacy_name} {legacy}, not both")
    chosen = out if out is not None else legacy
    if chosen is None:
        fail("missing option --out: where to write the result")
    return chosen
