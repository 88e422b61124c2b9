"""A diagnostics report: markdown (and optionally HTML) with per-layer heatmaps, written atomically.

The folder holds report.md (report.html), metrics.json (every value, for scripts), tensors.csv
(per tensor), layers.png (layers x metric), pairs.png (model x model, whole model) and, for more
than two models, layers_<metric>.png (layers x model pair). It is written to a hidden folder
beside the target and renamed into place, so an interrupted run leaves no finished-looking report.

Plots use matplotlib's Agg canvas directly (no pyplot): headless, and no global figure state.
"""

from __future__ import annotations

import csv
import html
import json
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mergelab.diagnostics.metrics import (
    METRICS,
    DiagnosticsResult,
    TaskVectorMetrics,
    layer_group,
    pairs,
)
from mergelab.errors import CheckpointError
from mergelab.fileio import write_folder_atomic

_TITLES = {
    "cosine": "cosine similarity",
    "l2": "L2 distance",
    "sign_conflict": "sign-conflict rate",
    "ssd": "SSD",
    "tssd": "TSSD",
}
# Heatmap cells are annotated with their values up to this many rows (beyond, text is unreadable).
_ANNOTATE_ROWS = 40


@dataclass(frozen=True)
class _Table:
    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |"]
        lines.append(
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(self.header))) + "|"
        )
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
            for row in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "n/a"
    if value != 0 and (abs(value) >= 1e4 or abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.4f}"


def layer_columns(
    result: DiagnosticsResult,
) -> list[tuple[str, Callable[[TaskVectorMetrics], float]]]:
    """The per-layer columns: pairwise metrics averaged over pairs, sign metrics N-way."""
    n = len(result.models)
    over = "" if n == 2 else " (mean over pairs)"
    k = f" (top {result.top_k:.0%})"
    return [
        (f"cosine{over}", lambda m: m.mean_pair("cosine")),
        (f"L2{over}", lambda m: m.mean_pair("l2")),
        ("sign conflict" + ("" if n == 2 else f" ({n}-way)"), lambda m: m.all_sign_conflict),
        ("SSD" + ("" if n == 2 else f" ({n}-way)"), lambda m: m.all_ssd),
        ("TSSD" + k + ("" if n == 2 else f" ({n}-way)"), lambda m: m.all_tssd),
    ]


def write_report(
    result: DiagnosticsResult,
    out_dir: str | os.PathLike,
    *,
    html_report: bool = False,
    overwrite: bool = False,
    command: str | None = None,
) -> Path:
    """Write the report of `result` into the folder `out_dir` (created atomically).

    Args:
        html_report: also write report.html (same content, images inline by reference).
        overwrite: replace an existing `out_dir`; otherwise an existing one is an error.
        command: the command line that produced the result, quoted in the report.

    Returns the report folder. Raises CheckpointError when `out_dir` exists (without
    `overwrite`) or cannot be written.
    """
    out = Path(out_dir)
    check_target(out, overwrite)

    def fill(folder: Path) -> None:
        _write_figures(result, folder)
        (folder / "metrics.json").write_text(json.dumps(result.as_dict(), indent=1, allow_nan=True))
        _write_tensor_csv(result, folder / "tensors.csv")
        sections = _sections(result, command)
        (folder / "report.md").write_text(_markdown(sections))
        if html_report:
            (folder / "report.html").write_text(_html(sections))

    return _write_atomically(out, overwrite, fill)


def check_target(out: Path, overwrite: bool) -> None:
    """Raise CheckpointError now if `out` cannot become the report folder (before any work)."""
    if out.exists() and not overwrite:
        raise CheckpointError(
            f"report folder {out} already exists (--overwrite replaces it)"
        )
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"report target {out} exists and is not a folder")


def _write_atomically(out: Path, overwrite: bool, fill: Callable[[Path], None]) -> Path:
    try:
        return write_folder_atomic(out, fill, overwrite=overwrite)
    except CheckpointError as exc:
        raise CheckpointError(f"report folder {out} appeared while the report was written") from exc
    except OSError as exc:
        raise CheckpointError(f"cannot write report folder {out}: {exc}") from exc


# --- content ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Section:
    title: str
    text: str = ""
    table: _Table | None = None
    image: str | None = None


def _pair_label(result: DiagnosticsResult, i: int, j: int) -> str:
    return f"{result.models[i]} / {result.models[j]}"


def _sections(result: DiagnosticsResult, command: str | None) -> list[_Section]:
    total = result.total
    n = len(result.models)
    skipped_count = sum(len(v) for v in result.skipped.values())
    intro = (
        f"Task vectors of {n} models relative to the base `{result.base}`: "
        f"{', '.join(f'`{m}`' for m in result.models)}. {len(result.tensors)} tensors "
        f"({total.numel:,} parameters) compared, {skipped_count} skipped. "
        f"TSSD keeps each task vector's top {result.top_k:.0%} magnitudes, taken over "
        + ("the whole task vector." if result.truncation == "model" else "each tensor separately.")
        + f" Computed in {result.wall_seconds:.1f} s."
        + "\n\nSSD = 1 - mean over coordinates non-zero in some vector of |sum_k x_k| / sum_k |x_k| "
        "(0: signs agree everywhere, 1: the task vectors cancel; Sung et al., 2023). The "
        "sign-conflict rate is the share of coordinates with at least two non-zero entries where "
        "a positive and a negative entry meet."
    )
    unchanged = [name for name, m in result.tensors.items() if not any(m.norms)]
    if unchanged:
        shown = ", ".join(f"`{x}`" for x in unchanged[:6])
        more = f" and {len(unchanged) - 6} more" if len(unchanged) > 6 else ""
        share = sum(result.tensors[x].numel for x in unchanged) / max(1, total.numel)
        intro += (
            f"\n\n{len(unchanged)} tensor(s) ({share:.0%} of the parameters) are unchanged from "
            f"the base in every model (frozen while fine-tuning?): {shown}{more}. Their metrics "
            "are n/a, and they count in the top-K% of TSSD; leave them out with --exclude."
        )
    if command:
        intro += f"\n\nCommand: `{command}`"
    sections = [_Section("Merge diagnostics", intro)]

    nway = _Table(
        ["metric", "value"],
        [
            ["sign-conflict rate", _fmt(total.all_sign_conflict)],
            ["SSD", _fmt(total.all_ssd)],
            [f"TSSD (top {result.top_k:.0%})", _fmt(total.all_tssd)],
        ]
        + [[f"task vector norm, {m}", _fmt(v)] for m, v in zip(result.models, total.norms)],
    )
    sections.append(_Section("Whole model" + ("" if n == 2 else f" ({n}-way)"), table=nway))
    pair_table = _Table(
        ["pair"] + [_TITLES[m] for m in METRICS],
        [
            [_pair_label(result, i, j)] + [_fmt(total.pair(m, i, j)) for m in METRICS]
            for i, j in pairs(n)
        ],
    )
    sections.append(_Section("Whole model, pairwise", table=pair_table, image="pairs.png"))
    columns = layer_columns(result)
    layer_table = _Table(
        ["layer", "parameters"] + [title for title, _ in columns],
        [
            [group, f"{m.numel:,}"] + [_fmt(value(m)) for _, value in columns]
            for group, m in result.groups.items()
        ],
    )
    sections.append(
        _Section(
            "Per layer",
            "Colours are scaled per column (each metric has its own range).",
            table=layer_table,
            image="layers.png",
        )
    )
    if n > 2:
        for metric in METRICS:
            sections.append(
                _Section(f"Per layer and pair: {_TITLES[metric]}", image=f"layers_{metric}.png")
            )
    if result.skipped:
        lines = []
        for reason, names in result.skipped.items():
            shown = ", ".join(f"`{x}`" for x in names[:8])
            more = f" and {len(names) - 8} more" if len(names) > 8 else ""
            lines.append(f"- {reason} ({len(names)}): {shown}{more}")
        sections.append(_Section("Skipped tensors", "\n".join(lines)))
    return sections


def _markdown(sections: Sequence[_Section]) -> str:
    parts = []
    for depth, section in enumerate(sections):
        parts.append(("# " if depth == 0 else "## ") + section.title)
        if section.text:
            parts.append(section.text)
        if section.table is not None:
            parts.append(section.table.markdown())
        if section.image:
            parts.append(f"![{section.title}]({section.image})")
    return "\n\n".join(parts) + "\n"


def _html(sections: Sequence[_Section]) -> str:
    body = []
    for depth, section in enumerate(sections):
        tag = "h1" if depth == 0 else "h2"
        body.append(f"<{tag}>{html.escape(section.title)}</{tag}>")
        for paragraph in section.text.split("\n\n") if section.text else []:
            # The markdown's `code` spans become <code>; the rest is escaped text.
            text = re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(paragraph))
            body.append(f"<p>{text}</p>")
        if section.table is not None:
            body.append(section.table.html())
        if section.image:
            body.append(
                f'<img src="{html.escape(section.image)}" alt="{html.escape(section.title)}">'
            )
    style = (
        "body{font-family:sans-serif;max-width:70em;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>merge diagnostics</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )


def _write_tensor_csv(result: DiagnosticsResult, path: Path) -> None:
    columns = layer_columns(result)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tensor", "layer", "parameters"] + [title for title, _ in columns])
        for name, m in result.tensors.items():
            writer.writerow(
                [name, layer_group(name), m.numel] + [repr(value(m)) for _, value in columns]
            )


# --- figures ------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _heatmap(
    axes,
    values: list[list[float]],
    rows: list[str],
    cols: list[str],
    *,
    per_column: bool,
    blank_diagonal: bool = False,
):
    """Draw `values` (rows x cols) with row/column labels; colour scaled per column if asked.

    blank_diagonal: leave a model x model matrix's diagonal (cosine 1, distance 0) uncoloured,
    so that it does not stretch the colour scale over the pairs that matter.
    """
    import numpy as np

    data = np.array(values, dtype=float)
    shown = data.copy()
    if blank_diagonal:
        np.fill_diagonal(shown, np.nan)
    if per_column:
        for c in range(data.shape[1]):
            column = data[:, c]
            finite = column[np.isfinite(column)]
            low, high = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
            shown[:, c] = (column - low) / (high - low) if high > low else 0.5
    image = axes.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap="viridis")
    axes.set_xticks(range(len(cols)), labels=cols, rotation=30, ha="right", fontsize=8)
    axes.set_yticks(range(len(rows)), labels=rows, fontsize=8)
    if len(rows) <= _ANNOTATE_ROWS:
        finite_shown = shown[np.isfinite(shown)]
        middle = (finite_shown.min() + finite_shown.max()) / 2 if finite_shown.size else 0.0
        for r in range(data.shape[0]):
            for c in range(data.shape[1]):
                if blank_diagonal and r == c:
                    continue
                light = np.isfinite(shown[r, c]) and shown[r, c] < middle
                axes.text(
                    c,
                    r,
                    _fmt(float(data[r, c])),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if light else "black",
                )
    return image


def _write_figures(result: DiagnosticsResult, folder: Path) -> None:
    groups = list(result.groups)
    height = 1.5 + 0.28 * len(groups)
    columns = layer_columns(result)
    figure = _figure(2.0 + 1.4 * len(columns), height)
    axes = figure.add_subplot()
    _heatmap(
        axes,
        [[value(m) for _, value in columns] for m in result.groups.values()],
        groups,
        [title for title, _ in columns],
        per_column=True,
    )
    axes.set_title("per layer (colour scaled per column)", fontsize=10)
    figure.savefig(folder / "layers.png", dpi=110)

    n = len(result.models)
    figure = _figure(3.2 * len(METRICS), 0.9 + 0.45 * n + 1.2)
    for index, metric in enumerate(METRICS):
        axes = figure.add_subplot(1, len(METRICS), index + 1)
        image = _heatmap(
            axes,
            result.total.matrix(metric),
            result.models,
            result.models,
            per_column=False,
            blank_diagonal=True,
        )
        figure.colorbar(image, ax=axes, shrink=0.8)
        axes.set_title(
            _TITLES[metric] + (f" (top {result.top_k:.0%})" if metric == "tssd" else ""),
            fontsize=10,
        )
    figure.savefig(folder / "pairs.png", dpi=110)

    if n > 2:
        pair_list = pairs(n)
        labels = [_pair_label(result, i, j) for i, j in pair_list]
        for metric in METRICS:
            figure = _figure(2.0 + 1.2 * len(pair_list), height)
            axes = figure.add_subplot()
            image = _heatmap(
                axes,
                [[m.pair(metric, i, j) for i, j in pair_list] for m in result.groups.values()],
                groups,
                labels,
                per_column=False,
            )
            figure.colorbar(image, ax=axes)
            axes.set_title(f"{_TITLES[metric]} per layer and pair", fontsize=10)
            figure.savefig(folder / f"layers_{metric}.png", dpi=110)
