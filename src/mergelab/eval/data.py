"""Labelled examples and their three splits: the containers every task (text, image,
multimodal) hands to an evaluator.

A container holds examples and integer labels, knows its length and can return a subset; a
`Splits` holds one container per split. Containers are data only: where the examples come from
(a built-in corpus, a CSV file, an NPZ array, a folder of images) is the business of a task
source (`mergelab.eval.sources`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import torch

from mergelab.errors import MergeLabError

SPLIT_NAMES = ("train", "validation", "test")


@dataclass(frozen=True)
class LabelledTexts:
    """Texts with integer labels and a group id per text (texts of one group share a split)."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]
    groups: tuple[str, ...]

    def __post_init__(self) -> None:
        if not len(self.texts) == len(self.labels) == len(self.groups):
            raise ValueError(
                f"texts, labels and groups differ in length: "
                f"{len(self.texts)}, {len(self.labels)}, {len(self.groups)}"
            )

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> LabelledTexts:
        return LabelledTexts(
            texts=tuple(self.texts[i] for i in indices),
            labels=tuple(self.labels[i] for i in indices),
            groups=tuple(self.groups[i] for i in indices),
        )


@dataclass(frozen=True)
class LabelledImages:
    """Images (uint8 [N, H, W] grayscale, or [N, H, W, C] with C channels) with integer labels
    (int64 [N])."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dim() not in (3, 4) or self.images.dtype != torch.uint8:
            raise ValueError(
                "images must be uint8 [N, H, W] or [N, H, W, C]; "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"{self.images.shape[0]} images for labels of shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def channels(self) -> int:
        return 1 if self.images.dim() == 3 else self.images.shape[-1]

    def subset(self, indices) -> LabelledImages:
        return LabelledImages(self.images[indices], self.labels[indices])

    def pixels(self, indices=slice(None)) -> torch.Tensor:
        """float [n, C, H, W] in [0, 1] of the images at `indices` (the usual model input)."""
        x = self.images[indices].float() / 255.0
        return x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)


def seeded_subset(data, limit: int | None, seed: int):
    """At most `limit` examples of `data` (LabelledTexts or LabelledImages), a random subset
    drawn from `seed` and kept in `data`'s order; all of `data` when `limit` is None or not
    below its length. Splits hold examples in source order, which is often sorted by class:
    a prefix would be biased."""
    if limit is None or len(data) <= limit:
        return data
    chosen = seeded_indices(len(data), limit, seed)
    return data.subset(chosen if isinstance(data, LabelledImages) else chosen.tolist())


def seeded_indices(n: int, limit: int | None, seed: int) -> torch.Tensor:
    """The sorted indices of `seeded_subset` among `n` examples (every index when `limit` is
    None or not below `n`)."""
    if limit is None or n <= limit:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:limit].sort().values


D = TypeVar("D")


@dataclass(frozen=True, kw_only=True)
class Splits(Generic[D]):
    """The train, validation and test split of one task (disjoint).

    validation is None only for tasks scored without any model selection (the multimodal
    study's downstream tasks); asking for it then raises MergeLabError.
    """

    train: D
    validation: D | None = None
    test: D

    def get(self, split: str) -> D:
        if split not in SPLIT_NAMES:
            raise MergeLabError(f"unknown split {split!r}; use train, validation or test")
        data = getattr(self, split)
        if data is None:
            raise MergeLabError(f"this task has no {split} split")
        return data

