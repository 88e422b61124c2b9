"""The one training loop: seeded mini-batch optimisation of an encoder and (optionally) a head.

Everything random is drawn from the settings' seed: the batch order from a `torch.Generator`,
dropout from the global RNG, forked and seeded for the duration (the only way to seed dropout)
and restored afterwards. Same settings, same seed, same examples: the same weights, bit for bit
(on one device and thread count).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from mergelab.align.batchnorm import frozen_batchnorm_statistics
from mergelab.errors import MergeLabError
from mergelab.progress import progress_bar
from mergelab.training.examples import Examples
from mergelab.training.settings import FinetuneSettings

Progress = Callable[[int], None]  # called with the number of steps just done


class TrainingError(MergeLabError, ValueError):
    """Training cannot start (too few examples, nothing to train) or diverged."""


def input_embedding_parameter(encoder: nn.Module) -> nn.Parameter | None:
    """The token embedding table of a Hugging Face encoder (None for other modules)."""
    get = getattr(encoder, "get_input_embeddings", None)
    embeddings = get() if get is not None else None
    return embeddings.weight if isinstance(embeddings, nn.Embedding) else None


def trainable_parameters(encoder: nn.Module, settings: FinetuneSettings) -> list[nn.Parameter]:
    """Set `requires_grad` on `encoder` as `settings` says; return the parameters to train.

    Raises TrainingError when a `freeze` pattern matches no parameter (a typo would otherwise
    silently train everything).
    """
    names = [name for name, _ in encoder.named_parameters()]
    unmatched = [p for p in settings.freeze if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched:
        raise TrainingError(f"`freeze` pattern(s) {unmatched} match no parameter of the encoder")
    frozen = {id(p) for name, p in encoder.named_parameters()
              if any(fnmatch.fnmatchcase(name, pattern) for pattern in settings.freeze)}
    table = input_embedding_parameter(encoder) if settings.freeze_input_embeddings else None
    if table is not None:
        frozen.add(id(table))
    for parameter in encoder.parameters():
        parameter.requires_grad_(id(parameter) not in frozen)
    return [p for p in encoder.parameters() if p.requires_grad]


def index_batches(
    n: int, settings: FinetuneSettings, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """`settings.steps` batches of indices into range(n), drawn from `generator`."""
    batch_size = settings.batch_size
    if settings.sampling == "with_replacement":
        for _ in range(settings.steps):
            yield torch.randint(n, (min(batch_size, n),), generator=generator)
        return
    if n < batch_size:
        raise TrainingError(f"{n} training examples are fewer than batch_size={batch_size}")
    produced = 0
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
            produced += 1
            if produced == settings.steps:
                return


def learning_rate_factor(step: int, settings: FinetuneSettings) -> float:
    """The multiplier of the peak learning rate at `step` (0-based): linear warm-up over
    `warmup_steps`, then the schedule's decay to zero at `steps`."""
    warmup, total = settings.warmup_steps, settings.steps
    if step < warmup:
        return (step + 1) / warmup
    if settings.schedule == "constant":
        return 1.0
    floor = settings.lr_floor
    if settings.schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    remaining = total - warmup
    return floor + (1 - floor) * max(0.0, (total - step) / remaining) if remaining > 0 else 1.0


_OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}


@contextmanager
def _training_mode(model: nn.Module, settings: FinetuneSettings):
    if settings.batchnorm_statistics == "frozen":
        with frozen_batchnorm_statistics(model):
            yield
        return
    modes = {module: module.training for module in model.modules()}
    model.train()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.train(mode)


def train(
    model: nn.Module,
    examples: Examples,
    settings: FinetuneSettings,
    *,
    head: nn.Module | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | bool | None = None,
    description: str = "fine-tuning",
    after_step: Callable[[int], None] | None = None,
) -> list[float]:
    """Train `model` (and `head`, with the joint recipe) in place on `examples`; return the loss
    of every step.

    The head trains at `head_learning_rate` with the joint recipe and stays frozen with lpft;
    either way it ends frozen (`requires_grad` False). `model`'s parameters are trained except
    those `settings` freezes; their `requires_grad` flags are restored at the end, as are the
    modules' train/eval modes.
    generator: the stream batches are drawn from; by default a fresh one seeded with
        `settings.seed`. Pass one to continue a stream (e.g. after a head's initialisation).
    progress: True draws a rich progress bar of the steps (named `description`); a callable
        is called with 1 after every step (to drive a bar of the caller's).
    after_step: called with the number of steps taken (1, 2, ...) after every update, e.g. to
        keep snapshots of the weights along the way.
    Raises TrainingError before the first step when there are fewer examples than a batch, and
    at the step where the loss stops being finite.
    """
    if isinstance(progress, bool):
        with progress_bar(description, settings.steps, progress) as advance:
            return train(model, examples, settings, head=head, generator=generator,
                         progress=advance, description=description,
                         after_step=after_step)  # fmt: skip
    flags = [p.requires_grad for p in model.parameters()]
    train_head = head is not None and settings.recipe == "joint"
    losses: list[float] = []
    try:
        groups = [{"params": trainable_parameters(model, settings), "lr": settings.learning_rate}]
        if head is not None:
            head.requires_grad_(train_head)
        if train_head:
            groups.append({"params": list(head.parameters()), "lr": settings.head_learning_rate})
        if not any(group["params"] for group in groups):
            raise TrainingError("nothing to train: every parameter is frozen")
        optimizer = _OPTIMIZERS[settings.optimizer](
            groups, lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: learning_rate_factor(step, settings)
        )
        if generator is None:
            generator = torch.Generator().manual_seed(settings.seed)
        batches = index_batches(len(examples), settings, generator)
        clipped = [p for p in model.parameters() if p.requires_grad]
        with _training_mode(model, settings), torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            for step, indices in enumerate(batches):
                loss = examples.loss(model, head, indices)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"{description} diverged at step {step + 1}: loss {float(loss.detach())}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if settings.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(clipped, settings.max_grad_norm)
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                if after_step is not None:
                    after_step(step + 1)
                if progress is not None:
                    progress(1)
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
        if head is not None:
            head.requires_grad_(False)
    return losses
