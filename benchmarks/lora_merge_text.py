"""Merging adapters that were trained as adapters: LoRA fine-tunes of MiniLM on the text zoo's tasks.

    .venv/bin/python benchmarks/lora_merge_text.py --seed 0 --threads 1

For each task of the text zoo (mergelab_bench.zoo.text: MiniLM, five tasks, the same splits), a
LoRA adapter (PEFT's LoraConfig on every encoder layer's query, key, value and dense layers) is
trained with the project's one training loop, `mergelab.training.train`, LP-FT-like: under the
task's frozen linear probe (fitted on the pretrained encoder, the zoo's probe), only the LoRA
factors train (every other parameter is listed in `FinetuneSettings.freeze`). Adapters are
cached under benchmarks/_work/lora_merge (keyed by every setting).

The adapters are merged with `mergelab.lora.ops.merge_adapters` (`mergelab lora merge`):
- `cat`: exact concatenation, `sum_i lambda B_i A_i` (rank = the sum of the ranks);
- delta-space TIES: the deltas `B_i A_i` merged by the registry's TIES, re-factorised by SVD;
- KnOTS + TIES: TIES on the adapters' coefficients in the shared basis of one SVD of the
  concatenated deltas (Stoica et al., ICLR 2025), re-factorised;
each at the settings picked on the validation split from a small grid (`lambda` for cat; the
TIES grid of mergelab_bench.bench.GRIDS). The merged adapter is folded onto the pretrained
encoder and scored on every task's test split with that task's probe head (the head its
adapter was trained under), against the individual adapters and the linear probe, with 95%
bootstrap intervals over test examples. The table goes to docs/benchmarks.md between this
script's markers; raw figures to benchmarks/_work/lora_merge_text.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_roundtrip import fold_in_memory, save_encoder  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
WORK = REPO / "benchmarks" / "_work" / "lora_merge"
DOCS = REPO / "docs" / "benchmarks.md"
ADAPTER_ROW = "individual LoRA adapters"
FULL_ROW = "individual full fine-tunes (zoo, lpft)"
# Modules of each MiniLM layer that get a LoRA adapter (PEFT matches this regex in full).
TARGET_MODULES = (r"encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense"
                  r"|intermediate\.dense|output\.dense)")


@dataclass(frozen=True)
class LoraTraining:
    """The adapters' training (all in their cache key)."""

    rank: int = 8
    alpha: float = 16.0
    steps: int = 100
    batch_size: int = 16
    learning_rate: float = 1e-3
    warmup_steps: int = 10
    max_length: int = 64


@dataclass(frozen=True)
class MergeRow:
    """A merge to run: a `merge_adapters` combination and registry method, with its grid."""

    name: str
    combination: str
    method: str
    grid: list[dict] = field(default_factory=list)  # each: {"weight": w, "params": {...}}


def merge_rows() -> list[MergeRow]:
    from mergelab_bench.bench import GRIDS

    ties_grid = [{"weight": 1.0, "params": {**p.global_params, **p.model_params}} for p in GRIDS["ties"]]
    return [
        MergeRow("cat (exact sum)", "cat", "task_arithmetic",
                 [{"weight": w, "params": {}} for w in (0.3, 0.6, 1.0)]),
        MergeRow("delta-space TIES", "delta", "ties", ties_grid),
        MergeRow("KnOTS + TIES", "knots", "ties", ties_grid),
    ]


def point_label(point: dict) -> str:
    items = {**({"lambda": point["weight"]} if point["weight"] != 1.0 else {}), **point["params"]}
    return ", ".join(f"{k} {v:g}" for k, v in items.items()) or "defaults"


def train_adapter(folder: Path, model_path: Path, pretrained: dict, head, texts, labels,
                  training: LoraTraining, seed: int) -> list[float]:
    """Train one LoRA adapter of MiniLM under the frozen `head` and save it (PEFT format)."""
    from peft import LoraConfig, get_peft_model

    from mergelab.training import FinetuneSettings, TextExamples, train
    from mergelab.training.to_folder import load_text_encoder

    tokenizer, model = load_text_encoder(model_path)
    model.load_state_dict(pretrained, strict=False)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(
        r=training.rank, lora_alpha=training.alpha, lora_dropout=0.0, target_modules=TARGET_MODULES,
    ))
    # The loop trains every parameter `freeze` does not name: name all but the LoRA factors.
    frozen = tuple(n for n, _ in peft_model.named_parameters() if ".lora_" not in n)
    settings = FinetuneSettings.checked(
        recipe="lpft", steps=training.steps, batch_size=training.batch_size,
        learning_rate=training.learning_rate, warmup_steps=training.warmup_steps,
        schedule="linear", freeze=frozen, seed=seed,
    )
    examples = TextExamples(tokenizer, texts, labels, max_length=training.max_length)
    losses = train(peft_model, examples, settings, head=head, progress=False)
    peft_model.save_pretrained(folder)
    return losses


def run(args: argparse.Namespace) -> str:
    from dataclasses import asdict

    from mergelab.eval.harness import aggregate_rows, evaluate_model, markdown_table, summarise
    from mergelab.fileio import write_text_atomic
    from mergelab.lora.ops import merge_adapters
    from mergelab.training import cache_key, cached_folder
    from mergelab.training.to_folder import default_text_model
    from mergelab_bench.bench import PROBE_ROW, machine_note, test_size_note, update_docs
    from mergelab_bench.zoo.registry import get_zoo, test_examples_option

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    training = LoraTraining(rank=args.rank, steps=args.steps, learning_rate=args.lr)
    zoo = get_zoo("text", **test_examples_option(args.test_examples))
    built = zoo.build(recipe="lpft", seed=args.seed, progress=False)
    tasks = list(built.tasks)
    model_path = Path(zoo.model_path or default_text_model())
    base_dir = save_encoder(WORK / "pretrained", built.pretrained, model_path / "config.json")

    adapters: dict[str, Path] = {}
    train_facts: dict[str, dict] = {}
    for task in tasks:
        split = built.evaluator.split(task, "train")
        key = cache_key({"task": task, "seed": args.seed, "training": asdict(training),
                         "targets": TARGET_MODULES, "zoo": built.info["settings"]})
        box: dict = {}

        def build(folder: Path, task=task, split=split, box=box) -> None:
            tick = time.perf_counter()
            losses = train_adapter(folder, model_path, built.pretrained, built.probe_heads[task],
                                   split.texts, split.labels, training, args.seed)
            box.update(seconds=time.perf_counter() - tick, loss_first10=sum(losses[:10]) / 10,
                       loss_last10=sum(losses[-10:]) / 10)
            (folder / "training.json").write_text(json.dumps(box, indent=1))

        adapters[task], hit = cached_folder(WORK, f"adapter-{task}-s{args.seed}-{key}", build)
        train_facts[task] = json.loads((adapters[task] / "training.json").read_text())
        print(f"{task}: adapter {'cached' if hit else 'trained'} "
              f"({train_facts[task]['seconds']:.0f} s, loss {train_facts[task]['loss_first10']:.3f} -> "
              f"{train_facts[task]['loss_last10']:.3f})", flush=True)

    results: dict[str, dict[str, float]] = {}
    outcomes: dict[str, dict[str, torch.Tensor]] = {}

    def score(row: str, encoder, heads, only, split: str = "test") -> dict[str, float]:
        examples = outcomes.setdefault(row, {}) if split == "test" else None
        found = evaluate_model(built.evaluator, encoder, heads, tasks=only, split=split, examples=examples)
        if split == "test":
            results.setdefault(row, {}).update(found)
        return found

    score(PROBE_ROW, built.pretrained, built.probe_heads, tasks)
    for task in tasks:
        score(ADAPTER_ROW, fold_in_memory(base_dir, adapters[task]), {task: built.probe_heads[task]}, [task])
        if args.full_finetunes:
            score(FULL_ROW, built.finetuned[task], {task: built.heads[task]}, [task])
    print(f"probe {_mean(results[PROBE_ROW]):.3f}, adapters {_mean(results[ADAPTER_ROW]):.3f}", flush=True)

    merge_rank = args.merge_rank or training.rank * len(tasks)
    chosen: dict[str, str] = {}
    costs: dict[str, float] = {}
    for row in merge_rows():
        best = None
        for point in row.grid:
            out = WORK / "merged"
            shutil.rmtree(out, ignore_errors=True)
            tick = time.perf_counter()
            merge_adapters(
                [adapters[t] for t in tasks], out, weights=[point["weight"]] * len(tasks),
                combination=row.combination, method=row.method, params=point["params"],
                rank=None if row.combination == "cat" else merge_rank, seed=args.seed, progress=False,
            )
            seconds = time.perf_counter() - tick
            encoder = fold_in_memory(base_dir, out)
            validation = _mean(score(row.name, encoder, built.probe_heads, tasks, split="validation"))
            print(f"  {row.name} [{point_label(point)}]: validation {validation:.3f} ({seconds:.1f} s)",
                  flush=True)
            if best is None or validation > best[0]:
                best = (validation, point, encoder, seconds)
        _, point, encoder, seconds = best
        chosen[row.name] = point_label(point)
        costs[row.name] = seconds
        score(row.name, encoder, built.probe_heads, tasks)
        print(f"{row.name} [{chosen[row.name]}]: test {_mean(results[row.name]):.3f}", flush=True)
        shutil.rmtree(WORK / "merged", ignore_errors=True)

    wall = time.perf_counter() - started
    # Normalised and gain kept against the individual adapters (what merging should keep).
    rows = summarise(results, finetuned=results[ADAPTER_ROW], probe=results[PROBE_ROW])
    notes = {name: f"{label}; merge {costs[name]:.1f} s" for name, label in chosen.items()}
    table = markdown_table(aggregate_rows([rows], notes, [outcomes]))
    body = "\n".join([
        "## Merging LoRA adapters trained as adapters (text zoo, MiniLM)", "",
        f"Reproduce: `{args.command}`", "",
        f"Wall time {wall / 60:.1f} min (adapter training included unless cached), "
        f"{machine_note(load_at_start)}. One LoRA adapter per task (rank {training.rank}, alpha "
        f"{training.alpha:g}, on every layer's query, key, value and dense layers), trained with "
        f"`mergelab.training.train` (the project's loop) under the task's frozen linear probe "
        f"(LP-FT-like), {training.steps} steps of {training.batch_size}, learning rate "
        f"{training.learning_rate:g} with {training.warmup_steps} warm-up steps and linear decay, "
        f"seed {args.seed}; only the LoRA factors train (word embeddings, norms and biases frozen). "
        "Merged with `mergelab lora merge` (`merge_adapters`): `cat` is the exact sum "
        f"`lambda sum_i B_i A_i` (rank {training.rank * len(tasks)}); delta-space TIES and KnOTS + TIES re-factorise the "
        f"merged delta to rank {merge_rank} by exact SVD. Settings picked on the validation split "
        "(note column; TIES from mergelab_bench.bench.GRIDS, `cat`'s lambda from 0.3, 0.6, 1). "
        "Every task is scored with its probe head (the head its adapter trained under)"
        + ("; the full fine-tunes row uses the zoo's lpft fine-tunes and their heads, for "
           "reference. " if args.full_finetunes else ". ")
        +
        "`normalised` and `gain kept` are against the individual adapters. Cells: test accuracy "
        "[95% bootstrap interval over test examples]. " + test_size_note([outcomes[PROBE_ROW]]),
        "",
        table, "",
        "Adapter training: " + ", ".join(
            f"{t} {f['seconds']:.0f} s (loss {f['loss_first10']:.2f} -> {f['loss_last10']:.2f})"
            for t, f in train_facts.items()) + ".",
        "",
    ])
    update_docs(args.docs, "lora-merge-text", body)
    write_text_atomic(REPO / "benchmarks" / "_work" / "lora_merge_text.json", json.dumps(
        {"command": args.command, "results": results, "chosen": chosen, "merge_seconds": costs,
         "training": train_facts, "wall_seconds": wall}, indent=1) + "\n")
    return body


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=8, help="rank of every trained adapter")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--merge-rank", type=int, default=None,
                        help="rank of the delta-space / KnOTS merges (default: the sum of the ranks)")
    parser.add_argument("--test-examples", type=int, default=None,
                        help="test examples per task (default: the zoo's 1000; 0: all)")
    parser.add_argument("--full-finetunes", action="store_true",
                        help="also score the zoo's full lpft fine-tunes (a reference row)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: one per core)")
    parser.add_argument("--docs", default=str(DOCS), help="markdown file to update")
    args = parser.parse_args(argv)
    args.command = "python benchmarks/lora_merge_text.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    print(run(args))


if __name__ == "__main__":
    main()
