"""The one progress bar of mergelab: a transient rich bar on stderr that costs nothing when
disabled.

Every long loop (merging tensors, collecting statistics, training steps, LoRA folding and
extraction, optimising coefficients, building zoos) shows the same columns: what is running,
the bar, done/total, an optional rate (`unit`/s, plus a note the caller updates, e.g. GB/s),
elapsed and remaining time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

Advance = Callable[..., None]
T = TypeVar("T")


@contextmanager
def progress_bar(
    description: str,
    total: int | None,
    enabled: bool = True,
    *,
    unit: str | None = None,
    transient: bool = True,
    console=None,
) -> Iterator[Advance]:
    """Yield `advance(n=1, note=None)`; draws the bar when `enabled` (else `advance` does
    nothing). `unit`: show the rate as "<x> <unit>/s"; `note`: a text shown after it."""
    if not enabled:
        yield lambda n=1, note=None: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit is not None:
        columns.append(TextColumn(f"{{task.fields[rate]}} {unit}/s"))
    columns += [TextColumn("{task.fields[note]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(
        *columns, console=console or Console(stderr=True), transient=transient
    ) as bar:
        task = bar.add_task(description, total=total, rate="0.0", note="")

        def advance(n: int = 1, note: str | None = None) -> None:
            bar.advance(task, n)
            speed = bar.tasks[0].speed or 0.0
            fields = {"rate": f"{speed:.1f}"}
            if note is not None:
                fields["note"] = note
            bar.update(task, **fields)

        yield advance


def track(items: Sequence[T], description: str, enabled: bool = True) -> Iterator[T]:
    """Iterate over `items` with the progress bar (one step per item)."""
    with progress_bar(description, len(items), enabled) as advance:
        for item in items:
            yield item
            advance()
