"""Command-line helpers of evaluation (`--seeds` parsing); `mergelab eval` lives here."""

from __future__ import annotations

import typer
from rich.console import Console

from mergelab.errors import MergeLabError

console = Console()
err_console = Console(stderr=True)


def parse_seeds(text: str) -> list[int]:
    """"0,1" or "0-2" -> [0, 1] / [0, 1, 2]; raises MergeLabError on anything else."""
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


def register(app: typer.Typer) -> None:
    """Evaluation commands of the `mergelab` app (none yet)."""
