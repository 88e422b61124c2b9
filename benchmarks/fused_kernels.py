"""CPU time of the fused (numba) sparsifying kernels against the torch reference, same inputs.

Two measurements, each the minimum over `--repeats` interleaved runs (reference, fused,
reference, ...) of the CPU seconds the process spent (so other processes on a shared machine
distort them less than wall time would; they still share caches and memory bandwidth):

1. one tensor, each method's whole kernel (task vectors, sparsify, merge) on two models, one
   torch thread, as the engine runs it on each of its tensor workers;
2. a recipe-search trial's merge: `mergelab.merge_state_dicts` of a TIES config with per-model
   gradients of 4 anchors over the layers, on the text zoo's five MiniLM fine-tunes (recipe
   lpft, seed 0, from the zoo cache: `make zoo-text`; skipped, saying so, when absent).

Both paths give the same bits (tests/test_methods_fused.py); `MERGELAB_KERNELS=torch` selects
the reference.

    .venv/bin/python benchmarks/fused_kernels.py --repeats 5 --write-docs
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import replace_docs_section  # noqa: E402

from mergelab import merge_state_dicts  # noqa: E402
from mergelab.methods import get_method  # noqa: E402
from mergelab.methods.registry import TensorMerge  # noqa: E402

METHODS = ("ties", "dare_ties", "breadcrumbs_ties", "della")
TASKS = ("sentiment", "subjectivity", "fortune", "supersense", "pos")


@contextmanager
def kernels(name: str):
    before = os.environ.get("MERGELAB_KERNELS")
    os.environ["MERGELAB_KERNELS"] = name
    try:
        yield
    finally:
        if before is None:
            del os.environ["MERGELAB_KERNELS"]
        else:
            os.environ["MERGELAB_KERNELS"] = before


def interleaved(runs: dict, repeats: int) -> dict[str, float]:
    """Minimum CPU seconds of each callable over `repeats` rounds (after one warm-up each)."""
    for run in runs.values():
        run()
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.process_time()
            run()
            best[name] = min(best[name], time.process_time() - start)
    return best


def kernel_rows(shape: tuple[int, int], repeats: int) -> list[str]:
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g)
    sources = [base + 0.01 * torch.randn(shape, generator=g) for _ in range(2)]
    rows = []
    for name in METHODS:
        method = get_method(name)
        params = {p.name: p.default for p in method.global_params if p.default is not None}
        model_params = [{"weight": 0.5, "density": 0.5, "gamma": 0.01, "epsilon": 0.1}] * 2

        def run(method=method, params=params, model_params=model_params):
            job = TensorMerge(
                tensors=[s.clone() for s in sources], base=base, model_params=model_params,
                params=params, generator=torch.Generator().manual_seed(0), name="w",
                writable=True,
            )
            method.kernel(job)

        def with_kernels(kind, run=run):
            def timed():
                with kernels(kind):
                    run()
            return timed

        best = interleaved({"torch": with_kernels("torch"), "numba": with_kernels("numba")},
                           repeats)
        rows.append(
            f"| {name} | {best['torch'] * 1e3:.1f} | {best['numba'] * 1e3:.1f} | "
            f"{best['torch'] / best['numba']:.1f}x |"
        )
    return rows


def search_trial_row(repeats: int) -> str | None:
    from safetensors.torch import load_file

    from mergelab.training.to_folder import default_text_model, load_text_encoder
    from mergelab_bench.zoo.cache import default_cache_root

    root = default_cache_root() / "text"
    folders = {t: sorted(root.glob(f"lpft-{t}-s0-*")) for t in TASKS}
    if not all(folders.values()):
        print(f"search trial: skipped, no lpft seed-0 text zoo under {root} (`make zoo-text`)")
        return None
    torch.set_num_threads(torch.get_num_threads())
    _, model = load_text_encoder(default_text_model())
    sources = {t: load_file(str(found[0] / "encoder.safetensors")) for t, found in folders.items()}
    # the fine-tunes' tensors (the zoo keeps the word embeddings and pooler frozen, unsaved)
    pretrained = model.state_dict()
    base = {k: pretrained[k].detach().clone() for k in sources[TASKS[0]]}
    sources["base"] = base
    g = torch.Generator().manual_seed(0)

    def gradient(low, high):
        return [round(float(v), 3) for v in low + (high - low) * torch.rand(4, generator=g)]

    config = {
        "merge_method": "ties",
        "base_model": "base",
        "parameters": {"lambda": 1.0},
        "models": [
            {"model": t, "parameters": {"weight": gradient(0, 1), "density": gradient(0.1, 1)}}
            for t in TASKS
        ],
    }

    def trial(kind):
        def run():
            with kernels(kind):
                merge_state_dicts(config, sources, seed=0)
        return run

    best = interleaved({"torch": trial("torch"), "numba": trial("numba")}, repeats)
    params = sum(v.numel() for v in base.values())
    return (
        f"| search-trial merge: TIES of 5 MiniLM fine-tunes ({params / 1e6:.1f}M parameters "
        f"each, `merge_state_dicts`) | {best['torch'] * 1e3:.0f} | {best['numba'] * 1e3:.0f} | "
        f"{best['torch'] / best['numba']:.1f}x |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args()
    threads = torch.get_num_threads()
    rows = kernel_rows((args.rows, args.cols), args.repeats)
    torch.set_num_threads(threads)
    trial = search_trial_row(args.repeats)
    load = os.getloadavg()[0]
    lines = [
        "| kernel (two models, one thread) or merge | torch reference, CPU ms | fused, CPU ms "
        "| ratio |",
        "|---|---:|---:|---:|",
        *(row.replace("| ", f"| {args.rows}x{args.cols} float32: ", 1) for row in rows),
        *([trial] if trial else []),
    ]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        header = (
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch "
            f"{torch.__version__}, 1-minute load average {load:.1f} on {os.cpu_count()} cores "
            "(other jobs shared the machine: indicative figures). Reproduce with "
            f"`.venv/bin/python benchmarks/fused_kernels.py --repeats {args.repeats} "
            "--write-docs`: CPU milliseconds, the minimum of interleaved runs."
        )
        replace_docs_section("fused", f"{header}\n\n{table}")


if __name__ == "__main__":
    main()
