"""A seconds-long zoo for unit tests: an MLP trunk on scikit-learn's 8x8 digits.

The trunk (two ReLU layers) is pretrained briefly on the ten-digit classification of the
training split, then fine-tuned separately on tasks that are functions of the digit (parity,
"is it < 5", digit mod 3, "has a closed loop"). Tasks are declarations: a name, a label
function, a number of classes. Both recipes of the text and vision zoos exist here:

- "lpft": a linear probe fitted on the frozen pretrained features, then the trunk fine-tuned
  under that frozen probe (Kumar et al. 2022, https://arxiv.org/abs/2202.10054);
- "joint": a head from random initialisation trained together with the trunk.

Everything is seeded: the split and the pretraining by `split_seed`, the fine-tuning by the
zoo seed; training uses only `torch.Generator`s. Built zoos are kept in memory, and on disk too
when a `cache_root` is given (through `mergelab_bench.zoo.cache`, verified when read).
Data: scikit-learn's copy of the UCI optical digits test set (Alpaydin & Kaynak 1998, CC BY 4.0).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from mergelab.errors import MergeLabError
from mergelab.training import (
    FinetuneSettings,
    TensorExamples,
    cache_key,
    finetune_classifier,
    train,
)
from mergelab_bench.zoo.base import BuiltZoo, Evaluator, StateDict
from mergelab_bench.zoo.cache import (
    cached_entry,
    linear_from_tensors,
    linear_tensors,
    state_dict_delta,
    with_base,
)

RECIPES = ("lpft", "joint")
DIGITS_SOURCE = (
    "scikit-learn `load_digits`: UCI optical recognition of handwritten digits "
    "(Alpaydin & Kaynak 1998, CC BY 4.0)"
)


@dataclass(frozen=True)
class DigitTask:
    """A task on the digits data: `label(digit)` gives the class in 0..num_classes-1."""

    name: str
    description: str
    num_classes: int
    label: Callable[[int], int]


DIGIT_TASKS: dict[str, DigitTask] = {
    t.name: t
    for t in (
        DigitTask("parity", "is the digit odd", 2, lambda d: d % 2),
        DigitTask("low_high", "is the digit 5 or more", 2, lambda d: int(d >= 5)),
        DigitTask("mod3", "the digit modulo 3", 3, lambda d: d % 3),
        DigitTask("loops", "does the digit have a closed loop (0, 6, 8, 9)", 2,
                  lambda d: int(d in (0, 6, 8, 9))),
    )
}


@dataclass(frozen=True)
class MLPZooSettings:
    """Everything that decides the zoo (all of it goes into the cache key)."""

    tasks: tuple[str, ...] = ("parity", "low_high", "mod3", "loops")
    hidden: int = 32
    train: int = 1000
    validation: int = 300
    split_seed: int = 0
    pretrain_steps: int = 40
    pretrain_learning_rate: float = 1e-2
    steps: int = 150
    batch_size: int = 64
    learning_rate: float = 3e-3
    head_learning_rate: float = 1e-2
    probe_steps: int = 300
    probe_weight_decay: float = 1e-3


@contextmanager
def one_thread():
    """Run torch on one CPU thread inside the block. The MLP's matrices are tiny: more threads
    only add synchronisation, and on a busy machine spinning threads make it 20x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class MLPEncoder(nn.Module):
    """64 pixels -> ReLU(fc1) -> ReLU(fc2): the trunk that gets merged."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc2(torch.relu(self.fc1(x))))


@lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    return x, torch.as_tensor(bunch.target, dtype=torch.long)


def digit_splits(train: int, validation: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(pixels, digit) per split from one seeded permutation; the test split is the rest."""
    x, y = _digits()
    if train + validation >= len(y):
        raise MergeLabError(f"train + validation = {train + validation} leave no test digits")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    parts = {"train": order[:train], "validation": order[train : train + validation],
             "test": order[train + validation :]}
    return {split: (x[idx], y[idx]) for split, idx in parts.items()}


def _init_linear(layer: nn.Linear, generator: torch.Generator) -> None:
    """nn.Linear's default uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) init, from `generator`."""
    bound = layer.in_features ** -0.5
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        layer.bias.uniform_(-bound, bound, generator=generator)


def _adam_settings(steps: int, batch_size: int, learning_rate: float, head_learning_rate: float,
          weight_decay: float = 0.0, recipe: str = "joint") -> FinetuneSettings:
    """The zoo's training settings: Adam at a constant rate on batches drawn with replacement
    from a generator the caller has already drawn initialisations from."""
    return FinetuneSettings.checked(
        recipe=recipe, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
        head_learning_rate=head_learning_rate, weight_decay=weight_decay, warmup_steps=0,
        schedule="constant", optimizer="adam", sampling="with_replacement",
        freeze_input_embeddings=False,
    )  # fmt: skip


class _FullBatch:
    """Examples whose loss is always that of the whole set (a probe's full-batch objective):
    the loop still draws its batches, so the generator advances as it always did."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return self.labels.shape[0]

    def loss(self, model: nn.Module, head: nn.Module | None, indices: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(model(self.features), self.labels)


class MLPEvaluator(Evaluator):
    """Accuracy of an MLP trunk (state dict) with a head on a task's split."""

    def __init__(self, settings: MLPZooSettings, splits, tasks: Mapping[str, DigitTask]):
        self.settings = settings
        self._splits = splits
        self._tasks = dict(tasks)
        self._module = MLPEncoder(settings.hidden)
        self.fingerprint = "mlp-" + cache_key(asdict(settings))

    def num_classes(self, task: str) -> int:
        return self._task(task).num_classes

    def _task(self, task: str) -> DigitTask:
        if task not in self._tasks:
            raise MergeLabError(f"unknown task {task!r}; this zoo has {sorted(self._tasks)}")
        return self._tasks[task]

    def data(self, task: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._splits:
            raise MergeLabError(f"unknown split {split!r}; splits: train, validation, test")
        x, digits = self._splits[split]
        label = self._task(task).label
        return x, torch.tensor([label(int(d)) for d in digits])

    @torch.no_grad()
    def features(self, encoder: StateDict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self._module, dict(encoder), (x,), strict=True)

    @torch.no_grad()
    def correct(self, encoder: StateDict, head: nn.Module, task: str, split: str) -> torch.Tensor:
        from mergelab.eval.harness import check_head

        check_head(head, self.num_classes(task), task)
        x, y = self.data(task, split)
        with one_thread():
            return head(self.features(encoder, x)).argmax(dim=-1) == y

    def module(self, encoder: StateDict) -> nn.Module:
        """An MLP trunk of its own holding `encoder`'s weights (strict), in eval mode."""
        module = MLPEncoder(self.settings.hidden)
        module.load_state_dict(dict(encoder), strict=True)
        return module.eval()

    @torch.no_grad()
    def correct_module(self, module: nn.Module, head: nn.Module, task: str, split: str) -> torch.Tensor:
        """As `correct`, for a trunk given as a torch module (e.g. an upscaled merge)."""
        from mergelab.eval.harness import check_head

        check_head(head, self.num_classes(task), task)
        x, y = self.data(task, split)
        with one_thread():
            return head(module(x)).argmax(dim=-1) == y


class MLPZoo:
    """The unit-test zoo (see the module docstring). `build` is memoised, and cached on disk
    under `cache_root` when one is given."""

    name = "mlp"
    recipes = RECIPES

    def __init__(self, settings: MLPZooSettings | None = None, cache_root: str | Path | None = None):
        self.settings = settings or MLPZooSettings()
        unknown = [t for t in self.settings.tasks if t not in DIGIT_TASKS]
        if unknown:
            raise MergeLabError(f"unknown task(s) {unknown}; digit tasks: {sorted(DIGIT_TASKS)}")
        self.cache_root = Path(cache_root) if cache_root is not None else None
        self._built: dict[tuple[str, int], BuiltZoo] = {}

    def tasks(self) -> list[str]:
        return list(self.settings.tasks)

    def _pretrained(self, splits) -> StateDict:
        s = self.settings
        generator = torch.Generator().manual_seed(s.split_seed)
        encoder, head = MLPEncoder(s.hidden), nn.Linear(s.hidden, 10)
        for layer in (encoder.fc1, encoder.fc2, head):
            _init_linear(layer, generator)
        x, y = splits["train"]
        lr = s.pretrain_learning_rate
        train(encoder, TensorExamples(x, y), _adam_settings(s.pretrain_steps, s.batch_size, lr, lr),
              head=head, generator=generator)  # fmt: skip
        return {k: v.detach().clone() for k, v in encoder.state_dict().items()}

    def _probe(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int, task: str) -> nn.Linear:
        """A linear probe by full-batch L2-regularised logistic regression (deterministic)."""
        s = self.settings
        generator = torch.Generator().manual_seed(int(cache_key({"probe": task})[:8], 16))
        head = nn.Linear(features.shape[1], num_classes)
        _init_linear(head, generator)
        settings = _adam_settings(s.probe_steps, len(labels), 0.05, 0.05, s.probe_weight_decay)
        train(head, _FullBatch(features, labels), settings, generator=generator)
        return head.requires_grad_(False)

    def _finetune(self, recipe: str, seed: int, task: str, pretrained: StateDict,
                  probe: nn.Linear, evaluator: MLPEvaluator) -> tuple[StateDict, nn.Linear]:
        s = self.settings
        generator = torch.Generator().manual_seed(seed * 1000 + sorted(DIGIT_TASKS).index(task))
        encoder = MLPEncoder(s.hidden)
        encoder.load_state_dict(pretrained)
        if recipe == "lpft":
            head = probe
        else:
            head = nn.Linear(s.hidden, probe.out_features)
            _init_linear(head, generator)
        x, y = evaluator.data(task, "train")
        settings = _adam_settings(s.steps, s.batch_size, s.learning_rate, s.head_learning_rate, recipe=recipe)
        result = finetune_classifier(encoder, TensorExamples(x, y), probe.out_features, settings,
                                     head=head, generator=generator)  # fmt: skip
        return ({k: v.detach().clone() for k, v in result.encoder.state_dict().items()},
                result.head)

    def build(self, *, recipe: str, seed: int, progress: bool = False, rebuild: bool = False) -> BuiltZoo:
        """The zoo for (`recipe`, `seed`): memoised; from `cache_root` when given and built."""
        if recipe not in RECIPES:
            raise MergeLabError(f"unknown recipe {recipe!r}; recipes: {', '.join(RECIPES)}")
        if not rebuild and (recipe, seed) in self._built:
            return self._built[(recipe, seed)]
        started = time.perf_counter()
        s = self.settings
        splits = digit_splits(s.train, s.validation, s.split_seed)
        evaluator = MLPEvaluator(s, splits, {t: DIGIT_TASKS[t] for t in s.tasks})
        key = cache_key({"mlp": asdict(s)})

        def build_all() -> tuple[dict, dict]:
            pretrained = self._pretrained(splits)
            files: dict[str, StateDict] = {"pretrained": pretrained}
            for task in s.tasks:
                x, y = evaluator.data(task, "train")
                probe = self._probe(evaluator.features(pretrained, x), y,
                                    DIGIT_TASKS[task].num_classes, task)
                encoder, head = self._finetune(recipe, seed, task, pretrained, probe, evaluator)
                files[f"{task}.encoder"] = state_dict_delta(encoder, pretrained)
                files[f"{task}.head"] = linear_tensors(head)
                files[f"{task}.probe"] = linear_tensors(probe)
            return files, {"recipe": recipe, "seed": seed, "settings": asdict(s)}

        with one_thread():
            if self.cache_root is None:
                files, meta = build_all()
            else:
                files, meta, _ = cached_entry(self.cache_root, f"mlp-{recipe}-s{seed}-{key}",
                                              build_all, rebuild=rebuild)
        missing = [f"{t}.{part}" for t in s.tasks for part in ("encoder", "head", "probe")
                   if f"{t}.{part}" not in files]
        if "pretrained" not in files or missing:
            from mergelab_bench.zoo.cache import ZooCacheError

            raise ZooCacheError(f"MLP zoo cache lacks {missing or ['pretrained']}")
        pretrained = files["pretrained"]
        built = BuiltZoo(
            zoo=self.name,
            recipe=recipe,
            seed=seed,
            tasks=list(s.tasks),
            pretrained=pretrained,
            finetuned={t: with_base(files[f"{t}.encoder"], pretrained) for t in s.tasks},
            heads={t: linear_from_tensors(files[f"{t}.head"]) for t in s.tasks},
            probe_heads={t: linear_from_tensors(files[f"{t}.probe"]) for t in s.tasks},
            evaluator=evaluator,
            info={**meta, "build_seconds": time.perf_counter() - started, "data": DIGITS_SOURCE},
        )
        self._built[(recipe, seed)] = built
        return built
