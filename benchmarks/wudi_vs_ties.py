"""Time and peak memory of WUDI merging against TIES on the Llama-shaped speed checkpoints.

Uses the cached bf16 families of `speed_vs_mergekit.py` (a base and two fine-tune-like
variants; `--size 100m` or `505m`), runs `mergelab merge` once per method in a child process
and reads its wall time, its own merge time and its peak RSS (GNU time's). WUDI runs with the
paper's Adam (300 iterations by default, `--iterations`) and with its closed form. Peak RSS
against the checkpoint size shows whether the merge streamed (a few tensors in memory) or held
a model.

    .venv/bin/python benchmarks/wudi_vs_ties.py --size 100m --docs docs/benchmarks.md

(`mergelab` runs as `python -m mergelab.cli` with this interpreter, so `PYTHONPATH=src` selects
a worktree's code.)

`mergelab` runs as `python -m mergelab.cli` under this interpreter, so `PYTHONPATH=src` selects
a worktree's code. Run it alone: two CPU-heavy jobs at once on 2 cores distort both.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_with_usage  # noqa: E402
from speed_vs_mergekit import build_family, configs, machine, merge_seconds  # noqa: E402


def wudi_configs(fam, iterations: int) -> dict[str, dict]:
    ties = configs(fam)["ties"]
    models = [{"model": m["model"]} for m in ties["models"]]
    common = {"base_model": ties["base_model"], "dtype": "bfloat16", "merge_method": "wudi",
              "models": models}  # fmt: skip
    return {
        "ties": ties,
        f"wudi (Adam, {iterations} it.)": {**common, "parameters": {"iterations": iterations}},
        "wudi (closed form)": {**common, "parameters": {"closed_form": True}},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="100m", choices=("100m", "505m"))
    parser.add_argument("--iterations", type=int, default=300)
    parser.add_argument("--only", action="append", help="run only methods whose label starts so")
    parser.add_argument("--docs", type=Path, help="markdown file whose wudi-speed section to replace")
    args = parser.parse_args()
    fam = build_family(args.size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="mergelab-wudi-") as scratch:
        for label, config in wudi_configs(fam, args.iterations).items():
            if args.only and not any(label.startswith(o) for o in args.only):
                continue
            path = Path(scratch) / "merge.json"
            path.write_text(json.dumps(config))  # YAML is a superset of JSON
            out = Path(scratch) / "out"
            cmd = [sys.executable, "-m", "mergelab.cli", "merge", str(path), "--out", str(out),
                   "--no-progress", "--overwrite"]  # fmt: skip
            usage = run_with_usage(cmd, env=dict(os.environ))
            wall, rss, stdout = usage.seconds, usage.peak_rss, usage.stdout
            rows.append((label, wall, merge_seconds(stdout), rss))
            print(f"{label}: wall {wall:.1f} s, merge {merge_seconds(stdout):.1f} s, "
                  f"peak RSS {rss / 1e6:.0f} MB", flush=True)
    table = [
        f"Llama-shaped {args.size} bf16 checkpoints ({fam.params / 1e6:.0f}M parameters, "
        f"{fam.bytes_per_model / 1e6:.0f} MB each), a base and two variants; one run each, "
        f"{machine()}; indicative only (shared machine).",
        "",
        "| method | wall s | merge s | peak RSS MB |",
        "|---|---|---|---|",
        *[f"| {label} | {wall:.1f} | {merge:.1f} | {rss / 1e6:.0f} |" for label, wall, merge, rss in rows],
    ]
    text = "\n".join(table)
    print(text)
    if args.docs is not None:
        from mergelab_bench.bench import update_docs

        update_docs(args.docs, "wudi-speed", "## WUDI against TIES: time and memory\n\n"
                    "Reproduce: `.venv/bin/python benchmarks/wudi_vs_ties.py --size "
                    f"{args.size}`\n\n" + text)


if __name__ == "__main__":
    main()
