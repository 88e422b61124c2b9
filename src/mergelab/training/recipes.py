"""The two fine-tuning recipes of a classifier (encoder + linear head), over the one loop.

- "lpft": a linear probe fitted on the frozen encoder's features, then the encoder fine-tuned
  under that frozen probe (Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and
  Underperform Out-of-Distribution", https://arxiv.org/abs/2202.10054). Fine-tuning under a
  random head first moves the features to fit the head; starting from a fitted probe (and
  keeping it frozen) changes them less, and fine-tunes that stay close to the shared pretrained
  features merge far better (DATA.md: every merge beat the probe with LP-FT, none did with
  heads from random initialisation).
- "joint": a head from random initialisation trained together with the encoder (the usual
  recipe), at its own, larger learning rate.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from mergelab.training.examples import ClassificationExamples
from mergelab.training.loop import Progress, train
from mergelab.training.probe import fit_probe
from mergelab.training.settings import FinetuneSettings


@dataclass
class Finetuned:
    """A fine-tune's result: the encoder and head (both frozen, eval mode), the loss of every
    step, and for lpft the probe the head started from."""

    encoder: nn.Module
    head: nn.Linear
    losses: list[float]
    probe: nn.Linear | None = None


def random_head(dim: int, num_classes: int, generator: torch.Generator) -> nn.Linear:
    """nn.Linear's default initialisation (uniform +-1/sqrt(dim), weight then bias), drawn
    from `generator` instead of the global RNG."""
    head = nn.utils.skip_init(nn.Linear, dim, num_classes)  # no draw from the global RNG
    bound = dim**-0.5
    with torch.no_grad():
        head.weight.uniform_(-bound, bound, generator=generator)
        head.bias.uniform_(-bound, bound, generator=generator)
    return head


def finetune_classifier(
    encoder: nn.Module,
    examples: ClassificationExamples,
    num_classes: int,
    settings: FinetuneSettings,
    *,
    head: nn.Linear | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | bool | None = None,
    description: str = "fine-tuning",
) -> Finetuned:
    """Fine-tune a copy of `encoder` on `examples` by `settings.recipe`; `encoder` and `head`
    are left untouched.

    head: where the head starts. lpft: the probe (None: fitted here on `examples`' features
        under `encoder`, by `settings`' probe solver); joint: its initialisation (None:
        `random_head` drawn from `settings.seed`).
    generator: passed to `train` (the batch stream); by default seeded with `settings.seed`.
    """
    probe = None
    if head is None:
        if settings.recipe == "lpft":
            head = fit_probe(examples.features(encoder), examples.labels, num_classes, settings)
        else:
            dim = examples.features(encoder).shape[1]
            head = random_head(dim, num_classes, torch.Generator().manual_seed(settings.seed))
    if settings.recipe == "lpft":
        probe = head
    encoder, head = copy.deepcopy(encoder), copy.deepcopy(head)
    losses = train(
        encoder, examples, settings, head=head, generator=generator, progress=progress,
        description=description,
    )  # fmt: skip
    return Finetuned(encoder.eval(), head.eval(), losses, probe)
