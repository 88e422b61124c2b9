"""LoRA round trip: extract an adapter from a full fine-tune, fold it back, score it.

    .venv/bin/python benchmarks/lora_roundtrip.py zoo --recipes lpft,joint --seed 0 --threads 1
    make bench-env && .venv/bin/python benchmarks/lora_roundtrip.py mergekit --size 505m --rank 32

`zoo`: for every task's fine-tune of the text zoo (MiniLM, see mergelab_bench.zoo.text), the
pretrained and fine-tuned encoders are written as checkpoint folders; `mergelab.lora.ops.
extract_adapter` (the Python API of `mergelab lora extract`) extracts an adapter at each fixed
rank of `--ranks` and at each energy threshold of `--energies` (per-module rank keeping that
share of the delta's squared norm); the adapter is folded back onto the pretrained encoder
(`mergelab.lora.source.open_folded`, the `model+lora` source of merge configs) and scored on the
task's test split with the task's own fine-tuned head. Reported: accuracy per task with its 95%
bootstrap interval over test examples, the smallest rank keeping 99% of the fine-tuned accuracy,
per setting the extraction wall time, peak extra resident memory (sampled every 5 ms), adapter
size and relative reconstruction error of the changed matrices, and a plot
(docs/lora_roundtrip.png).

`mergekit`: extraction time, peak memory (the command's maximum resident set, GNU time) and
reconstruction error of `mergelab lora extract` against `mergekit-extract-lora` (mergekit 0.1.5
in .bench-venv, run as a subprocess, never imported) on the synthetic 0.5B Llama checkpoints of
benchmarks/speed_vs_mergekit.py (a real Hugging Face architecture: config.json names
LlamaForCausalLM), both with one CPU thread, both extracting every matrix including the
embeddings (mergekit `--embed-lora`, mergelab `--embeddings`).

Tables go to docs/benchmarks.md between this script's markers; raw figures to
benchmarks/_work/lora_roundtrip-*.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OFFLINE_ENV, bench_tool, run_with_usage  # noqa: E402
from data_aware import PeakMemory  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work" / "lora_roundtrip"
DOCS = REPO / "docs" / "benchmarks.md"
FIGURE = REPO / "docs" / "lora_roundtrip.png"
KEEP = 0.99  # share of the fine-tuned accuracy a rank must keep


@dataclass(frozen=True)
class Setting:
    """One extraction request: a fixed rank, or an energy threshold (optionally capped)."""

    rank: int | None = None
    energy: float | None = None

    @property
    def label(self) -> str:
        if self.energy is None:
            return f"rank {self.rank}"
        return f"energy {self.energy:g}" + (f" (cap {self.rank})" if self.rank else "")

    @property
    def slug(self) -> str:
        return self.label.replace(" ", "-").replace("(", "").replace(")", "")


def settings_of(ranks: list[int], energies: list[float]) -> list[Setting]:
    return [Setting(rank=r) for r in ranks] + [Setting(energy=e) for e in energies]


def smallest_rank_keeping(accuracy_by_rank: dict[int, float], finetuned: float,
                          keep: float = KEEP) -> int | None:
    """The smallest rank whose accuracy is at least `keep` x the fine-tuned accuracy (None if
    no rank measured does)."""
    good = [r for r, acc in sorted(accuracy_by_rank.items()) if acc >= keep * finetuned]
    return good[0] if good else None


def weighted_relative_error(errors: dict[str, float], norms: dict[str, float]) -> float:
    """The relative Frobenius error of all modules' matrices together:
    sqrt(sum_m err_m^2 ||D_m||^2 / sum_m ||D_m||^2), from per-module relative errors."""
    total = sum(norms[m] ** 2 for m in errors)
    if total == 0:
        return 0.0
    return math.sqrt(sum((errors[m] * norms[m]) ** 2 for m in errors) / total)


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


# --------------------------------------------------------------------------- the text zoo


def save_encoder(folder: Path, state: dict[str, torch.Tensor], config_file: Path) -> Path:
    """Write an encoder state dict as a checkpoint folder (model.safetensors + config.json),
    atomically; an existing finished folder is kept (same zoo piece, same bytes)."""
    from safetensors.torch import save_file

    from mergelab.fileio import write_folder_atomic

    if (folder / "model.safetensors").is_file():
        return folder

    def fill(tmp: Path) -> None:
        shutil.copy(config_file, tmp / "config.json")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})

    return write_folder_atomic(folder, fill)


def fold_in_memory(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """The base with the adapter folded in, every tensor (the `model+lora` merge source)."""
    from mergelab.lora.source import open_folded

    source = open_folded(base, adapter)
    try:
        return {name: source.get(name) for name in source.keys()}
    finally:
        source.close()


def delta_norms(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> dict[str, float]:
    """||finetuned - base||_F of every changed floating-point weight matrix, by module name."""
    norms = {}
    for name, value in tuned.items():
        if not name.endswith(".weight") or value.dim() not in (2, 4) or not value.is_floating_point():
            continue
        delta = value.float() - base[name].float()
        if torch.any(delta != 0):
            norms[name[: -len(".weight")]] = float(torch.linalg.vector_norm(delta.double()))
    return norms


def run_recipe(zoo, recipe: str, seed: int, settings: list[Setting], log) -> dict:
    """Every task's round trips for one (recipe, seed): accuracies, per-example outcomes, costs."""
    from mergelab.eval.harness import evaluate_model
    from mergelab.lora.ops import extract_adapter
    from mergelab.training.to_folder import default_text_model
    from mergelab_bench.bench import FINETUNED_ROW, FLOOR_ROW, PROBE_ROW

    built = zoo.build(recipe=recipe, seed=seed, progress=False)
    tasks = list(built.tasks)
    config_file = Path(zoo.model_path or default_text_model()) / "config.json"
    work = WORK / f"{recipe}-s{seed}"
    base_dir = save_encoder(work / "pretrained", built.pretrained, config_file)
    results: dict[str, dict[str, float]] = {}
    outcomes: dict[str, dict[str, torch.Tensor]] = {}

    def score(row: str, encoder, heads, only: list[str]) -> None:
        outcomes.setdefault(row, {})
        results.setdefault(row, {}).update(
            evaluate_model(built.evaluator, encoder, heads, tasks=only, examples=outcomes[row])
        )

    score(FLOOR_ROW, built.pretrained, built.heads, tasks)
    score(PROBE_ROW, built.pretrained, built.probe_heads, tasks)
    for task in tasks:
        score(FINETUNED_ROW, built.finetuned[task], {task: built.heads[task]}, [task])
    log(f"{recipe} s{seed}: probe {_mean(results[PROBE_ROW]):.3f}, fine-tuned "
        f"{_mean(results[FINETUNED_ROW]):.3f}")
    costs: dict[str, list[dict]] = {}
    for task in tasks:
        tuned_dir = save_encoder(work / f"finetuned-{task}", built.finetuned[task], config_file)
        norms = delta_norms(built.pretrained, built.finetuned[task])
        for setting in settings:
            out = work / f"adapter-{task}-{setting.slug}"
            shutil.rmtree(out, ignore_errors=True)
            with PeakMemory() as memory:
                tick, cpu_tick = time.perf_counter(), time.process_time()
                report = extract_adapter(base_dir, tuned_dir, out, rank=setting.rank,
                                         energy=setting.energy, progress=False)
                seconds, cpu = time.perf_counter() - tick, time.process_time() - cpu_tick
            encoder = fold_in_memory(base_dir, out)
            score(setting.label, encoder, {task: built.heads[task]}, [task])
            ranks = [m["rank"] for m in report.modules.values()]
            errors = {name: float(m["relative_error"]) for name, m in report.modules.items()}
            cost = {
                "task": task,
                "seconds": seconds,
                "cpu_seconds": cpu,
                "peak_extra_mb": memory.extra_mb,
                "adapter_mb": _folder_bytes(out) / 1e6,
                "modules": len(ranks),
                "saved_tensors": len(report.saved),
                "rank_min": min(ranks), "rank_median": statistics.median(ranks), "rank_max": max(ranks),
                "relative_error": weighted_relative_error(errors, norms),
                "worst_module_error": max(errors.values()),
                "lora_parameters": _lora_parameters(out),
            }
            costs.setdefault(setting.label, []).append(cost)
            log(f"  {task} {setting.label}: acc {results[setting.label][task]:.3f} "
                f"(fine-tuned {results[FINETUNED_ROW][task]:.3f}), {seconds:.1f} s, "
                f"+{memory.extra_mb:.0f} MB, error {cost['relative_error']:.3f}")
            shutil.rmtree(out)
            del encoder
    return {"tasks": tasks, "results": results, "outcomes": outcomes, "costs": costs,
            "full_parameters": sum(v.numel() for v in built.pretrained.values())}


def _lora_parameters(adapter: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(adapter / "adapter_model.safetensors"), "pt") as handle:
        return sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys() if "lora_" in k)


def _mean(values) -> float:
    values = list(values.values()) if isinstance(values, dict) else list(values)
    return sum(values) / len(values)


def recipe_markdown(recipe: str, seed: int, run: dict, settings: list[Setting]) -> str:
    from mergelab.eval.harness import aggregate_rows, markdown_table, summarise
    from mergelab_bench.bench import FINETUNED_ROW, PROBE_ROW

    results, costs, tasks = run["results"], run["costs"], run["tasks"]
    energy_ranks = [
        f"{setting.label}: " + ", ".join(f"{c['task']} {c['rank_min']}-{c['rank_max']}"
                                         for c in costs[setting.label])
        for setting in settings if setting.energy is not None
    ]
    rows = summarise(results, finetuned=results[FINETUNED_ROW], probe=results[PROBE_ROW])
    table = markdown_table(aggregate_rows([rows], {}, [run["outcomes"]]))
    by_rank = {s.rank: s.label for s in settings if s.energy is None}
    smallest = []
    for task in tasks:
        found = smallest_rank_keeping({r: results[label][task] for r, label in by_rank.items()},
                                      results[FINETUNED_ROW][task])
        smallest.append(f"{task} {found if found is not None else f'> {max(by_rank)}'}")
    cost_lines = [
        "| setting | ranks (min-max over modules and tasks) | LoRA parameters (share of the encoder) "
        "| adapter file (MB) | relative reconstruction error (mean over tasks; worst module) "
        "| extraction wall (s, mean) | extraction CPU (s, mean) | peak extra memory (MB, max) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for setting in settings:
        cs = costs[setting.label]
        params = _mean([c["lora_parameters"] for c in cs])
        cost_lines.append(
            f"| {setting.label} | {min(c['rank_min'] for c in cs)}-{max(c['rank_max'] for c in cs)} "
            f"| {params / 1e6:.2f} M ({100 * params / run['full_parameters']:.1f}%) "
            f"| {_mean([c['adapter_mb'] for c in cs]):.1f} "
            f"| {_mean([c['relative_error'] for c in cs]):.3f}; {max(c['worst_module_error'] for c in cs):.3f} "
            f"| {_mean([c['seconds'] for c in cs]):.2f} | {_mean([c['cpu_seconds'] for c in cs]):.2f} "
            f"| {max(c['peak_extra_mb'] for c in cs):.0f} |"
        )
    return "\n".join([
        f"### recipe `{recipe}`, seed {seed}", "",
        table, "",
        *([f"Per-module ranks the energy thresholds chose (min-max per task): {'; '.join(energy_ranks)}.", ""]
          if energy_ranks else []),
        f"Smallest rank keeping {100 * KEEP:.0f}% of the fine-tuned accuracy (point estimates, "
        f"ranks {', '.join(str(r) for r in sorted(by_rank))}): " + ", ".join(smallest) + ".", "",
        *cost_lines, "",
    ])


def plot(runs: dict[str, dict], settings: list[Setting], path: Path) -> Path:
    """Accuracy against rank per task (95% intervals as bars), one panel per recipe; dotted:
    the fine-tune's own accuracy; crosses: the energy thresholds at their median rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mergelab.eval.bootstrap import bootstrap_interval
    from mergelab_bench.bench import FINETUNED_ROW

    fixed = [s for s in settings if s.energy is None]
    energies = [s for s in settings if s.energy is not None]
    fig, axes = plt.subplots(1, len(runs), figsize=(6.2 * len(runs), 4.4), squeeze=False, sharey=True)
    for ax, (label, run) in zip(axes[0], runs.items()):
        for index, task in enumerate(run["tasks"]):
            colour = f"C{index}"
            ranks = [s.rank for s in fixed]
            acc, low, high = [], [], []
            for s in fixed:
                interval = bootstrap_interval(run["outcomes"][s.label][task].double())
                value = run["results"][s.label][task]
                acc.append(100 * value)
                low.append(100 * (value - interval.low))
                high.append(100 * (interval.high - value))
            ax.errorbar(ranks, acc, yerr=[low, high], color=colour, marker="o", ms=3, capsize=2,
                        label=task)
            ax.axhline(100 * run["results"][FINETUNED_ROW][task], color=colour, ls=":", lw=1)
            for s in energies:
                median = statistics.median(c["rank_median"] for c in run["costs"][s.label]
                                           if c["task"] == task)
                ax.plot([median], [100 * run["results"][s.label][task]], marker="x", color=colour, ms=7)
        ax.set_xscale("log", base=2)
        ax.set_xticks([s.rank for s in fixed], [str(s.rank) for s in fixed])
        ax.set_xlabel("LoRA rank (x: energy thresholds at their median rank)")
        ax.set_title(f"MiniLM text zoo, {label}: extract, fold back, score")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy (%), dotted: the full fine-tune")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_zoo(args: argparse.Namespace) -> str:
    from mergelab.fileio import write_text_atomic
    from mergelab_bench.bench import machine_note, test_size_note, update_docs
    from mergelab_bench.zoo.registry import get_zoo, test_examples_option

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    settings = settings_of(_ints(args.ranks), _floats(args.energies))
    zoo = get_zoo("text", **test_examples_option(args.test_examples))
    runs: dict[str, dict] = {}
    sections: list[str] = []

    def publish() -> str:
        """The docs section and JSON of the recipes done so far (after every recipe, so an
        interrupted run leaves its finished recipes in the docs)."""
        wall = time.perf_counter() - started
        first = next(iter(runs.values()))
        done = ", ".join(runs)
        body = "\n".join([
            "## LoRA round trip: extract from a full fine-tune, fold back, score (text zoo)", "",
            f"Reproduce: `{args.command}`", "",
            f"Wall time {wall / 60:.1f} min ({done}), {machine_note(load_at_start)}. For every "
            "task's fine-tune of MiniLM, `mergelab.lora.ops.extract_adapter` (`mergelab lora "
            "extract`) extracts an adapter from the fine-tuned minus the pretrained encoder at "
            "each rank (every changed matrix at that rank, capped by the matrix's rank: 384 is "
            "MiniLM's full rank) and at each energy threshold (per module the smallest rank "
            "keeping that share of the delta's squared Frobenius norm); changed biases go to "
            "`lora_B.bias`, changed LayerNorms and position/type embeddings are saved whole "
            "(`modules_to_save`); the word embeddings stay frozen in the zoo. The adapter is folded "
            "back onto the pretrained encoder (the `model+lora` source) and scored on the task's "
            "test split with the task's own fine-tuned head. Each cell: test accuracy [95% "
            "bootstrap interval over test examples]; a row's average interval is stratified over "
            "tasks; `normalised` is the mean of accuracy / the fine-tune's accuracy; `gain kept` "
            "the share of the fine-tune's gain over the linear probe. "
            + test_size_note([first["outcomes"][next(iter(first["outcomes"]))]]),
            "",
            "Relative reconstruction error: `||D - BA||_F / ||D||_F` over every LoRA matrix of "
            "the adapter together (D: the fine-tune's change of the matrix), and the worst single "
            "module; extraction wall and CPU seconds (the process's user + system time: on a "
            "shared machine the wall time includes waiting for a core, the CPU time does not) and "
            "peak extra resident memory (above the level before the call, sampled every 5 ms) are "
            "per task's extraction (`extract_adapter`, which writes the adapter folder).",
            "",
            *sections,
            "![accuracy against LoRA rank](lora_roundtrip.png)", "",
        ])
        update_docs(args.docs, "lora-roundtrip", body)
        record = {"command": args.command, "wall_seconds": wall,
                  "settings": [asdict(s) for s in settings],
                  "runs": {k: {"results": v["results"], "costs": v["costs"]} for k, v in runs.items()}}
        write_text_atomic(WORK.parent / "lora_roundtrip-zoo.json", json.dumps(record, indent=1) + "\n")
        return body

    body = ""
    for recipe in [r for r in args.recipes.split(",") if r]:
        run = run_recipe(zoo, recipe, args.seed, settings, lambda m: print(m, flush=True))
        runs[f"{recipe} s{args.seed}"] = run
        sections.append(recipe_markdown(recipe, args.seed, run, settings))
        plot(runs, settings, FIGURE)
        body = publish()
    return body


# --------------------------------------------------------------------------- against mergekit


def reconstruction(base: Path, tuned: Path, adapter: Path) -> dict[str, float]:
    """Relative errors of an adapter's LoRA modules against finetuned - base, computed the same
    way for any writer's adapter: all modules together and the worst one."""
    from mergelab.checkpoint import open_checkpoint
    from mergelab.checkpoint.adapter import open_adapter
    from mergelab.lora import kernels

    squares, errors, worst = 0.0, 0.0, 0.0
    with open_checkpoint(base) as b, open_checkpoint(tuned) as t, open_adapter(adapter) as a:
        a.check_against(b, base)
        for weight, module in a.modules.items():
            delta = t.get(weight).float() - b.get(weight).float()
            matrix = kernels.weight_to_matrix(delta, module.layout)
            approx = kernels.delta_matrix(a.get(module.lora_A), a.get(module.lora_B), module.scale)
            norm = float(torch.linalg.matrix_norm(matrix.double()))
            diff = float(torch.linalg.matrix_norm((matrix - approx).double()))
            squares += norm**2
            errors += diff**2
            worst = max(worst, diff / norm if norm else 0.0)
        modules, saved = len(a.modules), len(a.saved)
    return {"relative_error": math.sqrt(errors / squares) if squares else 0.0,
            "worst_module_error": worst, "modules": modules, "saved_tensors": saved,
            "adapter_mb": _folder_bytes(adapter) / 1e6}


def run_mergekit(args: argparse.Namespace) -> str:
    from speed_vs_mergekit import SIZES, build_family, machine

    from mergelab.fileio import write_text_atomic
    from mergelab_bench.bench import update_docs

    fam = build_family(args.size)
    hidden, inter, layers, vocab = SIZES[args.size]
    base, tuned = fam.base, fam.variants[0]
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO / "src")}
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # both tools: torch's intra-op threads
        if args.threads > 0:
            env[name] = str(args.threads)
        else:
            env.pop(name, None)
    mergelab = [sys.executable, "-c", "from mergelab.cli import app; app()"]
    rows = []
    work = WORK / f"mergekit-{args.size}"
    load_at_start = os.getloadavg()[0]
    for rank in _ints(args.rank):
        tools = {
            "mergelab, exact SVD": mergelab + ["lora", "extract", str(base), str(tuned), "{out}",
                                               "--rank", str(rank), "--embeddings", "--no-progress"],
            "mergelab, randomised SVD": mergelab + ["lora", "extract", str(base), str(tuned), "{out}",
                                                    "--rank", str(rank), "--embeddings",
                                                    "--svd", "randomized", "--no-progress"],
            "mergekit-extract-lora 0.1.5": [str(bench_tool("mergekit-extract-lora")), "--model", str(tuned),
                                            "--base-model", str(base), "--out-path", "{out}",
                                            "--max-rank", str(rank), "--embed-lora"],
        }
        for label, template in tools.items():
            out = work / f"{label.split(',')[0].split()[0]}-{'rand' if 'random' in label else 'exact'}-r{rank}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [part.replace("{out}", str(out)) for part in template]
            print(f"rank {rank}: {label}: {shlex.join(cmd)}", flush=True)
            usage = run_with_usage(cmd, env)
            quality = reconstruction(base, tuned, out)
            row = {"tool": label, "rank": rank, "seconds": usage.seconds, "cpu_seconds": usage.cpu_seconds,
                   "peak_rss_mb": usage.peak_rss / 1e6, **quality}
            print(f"  {usage.seconds:.1f} s ({usage.cpu_seconds:.1f} s CPU), peak RSS {usage.peak_rss / 1e6:.0f} MB, error "
                  f"{quality['relative_error']:.4f}", flush=True)
            rows.append(row)
            shutil.rmtree(out)
    lines = [
        f"## LoRA extraction against mergekit-extract-lora ({args.size} checkpoints)", "",
        f"Reproduce: `{args.command}`", "",
        f"The synthetic bf16 Llama checkpoints of `benchmarks/speed_vs_mergekit.py` (`build_family"
        f"(\"{args.size}\")`: {fam.params / 1e6:.0f} M parameters, hidden {hidden}, MLP {inter}, "
        f"{layers} layers, vocabulary {vocab:,}, random weights; its config.json names `LlamaForCausalLM`, which "
        "mergekit-extract-lora needs and runs on); the fine-tune is `ft1` (every tensor moved by "
        "seeded noise, so the deltas are full-rank: the hardest case for a low rank). Both tools "
        "extract every matrix, embeddings included (mergekit `--embed-lora`, mergelab "
        "`--embeddings`); the norms are saved whole by both. "
        f"{_threads_text(args.threads)}, one run per cell, {machine()}; 1-minute load average "
        f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. Wall and CPU "
        "seconds (user + system: on a shared machine the wall time includes waiting for a core, "
        "the CPU time does not) of the whole command, interpreter start-up included; peak: the "
        "command's maximum resident set (GNU time's %M). Error: `||D - BA||_F / ||D||_F` over all LoRA matrices together, computed "
        "the same way for both outputs (mergelab's reader opens mergekit's adapter and checks it "
        "against the base).", "",
        "| tool | rank | wall (s) | CPU (s) | peak RSS (MB) | relative error (all; worst module) "
        "| LoRA modules | saved tensors | adapter (MB) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tool']} | {r['rank']} | {r['seconds']:.1f} | {r['cpu_seconds']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['relative_error']:.4f}; {r['worst_module_error']:.4f} | {r['modules']} | "
            f"{r['saved_tensors']} | {r['adapter_mb']:.0f} |"
        )
    body = "\n".join(lines) + "\n"
    update_docs(args.docs, f"lora-extract-mergekit-{args.size}", body)
    write_text_atomic(WORK.parent / f"lora_roundtrip-mergekit-{args.size}.json",
                      json.dumps({"command": args.command, "rows": rows}, indent=1) + "\n")
    return body


def _threads_text(threads: int) -> str:
    if threads <= 0:
        return "Each tool with the libraries' default threads"
    return f"{threads} CPU thread{'s' if threads > 1 else ''} each (OMP_NUM_THREADS={threads})"


# --------------------------------------------------------------------------- command line


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    zoo = sub.add_parser("zoo", help="round trip on the text zoo's fine-tunes")
    zoo.add_argument("--recipes", default="lpft,joint")
    zoo.add_argument("--seed", type=int, default=0)
    zoo.add_argument("--ranks", default="4,8,16,32,64,128,384",
                     help="fixed ranks (384: MiniLM's full rank, the exactness check)")
    zoo.add_argument("--energies", default="0.9,0.99")
    zoo.add_argument("--test-examples", type=int, default=None,
                     help="test examples per task (default: the zoo's 1000; 0: all)")
    zoo.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: one per core)")
    peer = sub.add_parser("mergekit", help="extraction against mergekit-extract-lora")
    peer.add_argument("--size", default="505m", help="a size of benchmarks/speed_vs_mergekit.py")
    peer.add_argument("--rank", default="32", help="rank(s), comma-separated")
    peer.add_argument("--threads", type=int, default=1,
                      help="CPU threads of each tool (OMP_NUM_THREADS; 0: the libraries' default)")
    for p in (zoo, peer):
        p.add_argument("--docs", default=str(DOCS), help="markdown file to update")
    args = parser.parse_args(argv)
    args.command = "python benchmarks/lora_roundtrip.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    print(run_zoo(args) if args.what == "zoo" else run_mergekit(args))


if __name__ == "__main__":
    main()
