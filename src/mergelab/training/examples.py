"""What the training loop trains on: examples it draws index batches from.

The loop knows only how many examples there are and asks them for the loss of a batch of
indices; that keeps it task-agnostic. Two adapters cover classification:
- `TensorExamples`: inputs as one tensor (images, pixels, features), an optional transform per
  batch (resizing, normalisation), the model called on them;
- `TextExamples`: texts tokenised per batch, a Hugging Face encoder's last hidden states
  mean-pooled over real tokens.
A task with another objective (contrastive retrieval, a multi-input head) implements `loss`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from mergelab.eval.harness import embed_texts, pooled_features


@runtime_checkable
class Examples(Protocol):
    """Training examples: a count and the loss of a batch of them."""

    def __len__(self) -> int: ...

    def loss(self, model: nn.Module, head: nn.Module | None, indices: torch.Tensor) -> torch.Tensor:
        """The scalar training loss of `model` (and `head`) on the examples at `indices`."""
        ...


@runtime_checkable
class ClassificationExamples(Examples, Protocol):
    """Examples with integer labels whose features a linear head classifies."""

    labels: torch.Tensor

    def features(self, model: nn.Module) -> torch.Tensor:
        """[N, dim] features of every example under `model`, in eval mode, without gradients."""
        ...


class TensorExamples:
    """Classification examples held as tensors: `inputs` [N, ...] and `labels` [N].

    transform: applied to each batch of inputs before the model (e.g. resizing, normalisation);
        keeping raw inputs in memory and transforming per batch saves memory.
    """

    def __init__(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor | Sequence[int],
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.shape[0] != inputs.shape[0]:
            raise ValueError(f"{inputs.shape[0]} inputs for labels of shape {tuple(labels.shape)}")
        self.inputs, self.labels, self.transform = inputs, labels, transform

    def __len__(self) -> int:
        return self.labels.shape[0]

    def batch(self, indices: torch.Tensor | slice) -> torch.Tensor:
        x = self.inputs[indices]
        return self.transform(x) if self.transform is not None else x

    def loss(self, model: nn.Module, head: nn.Module | None, indices: torch.Tensor) -> torch.Tensor:
        return classification_loss(head, model(self.batch(indices)), self.labels[indices])

    @torch.no_grad()
    def features(self, model: nn.Module, batch_size: int = 256) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            chunks = [
                model(self.batch(slice(start, start + batch_size)))
                for start in range(0, len(self), batch_size)
            ]
        finally:
            model.train(was_training)
        return torch.cat(chunks)


class TextExamples:
    """Labelled texts for a Hugging Face encoder, tokenised per batch (padded to the batch's
    longest text, truncated at `max_length` tokens), features mean-pooled over real tokens."""

    def __init__(
        self,
        tokenizer,
        texts: Sequence[str],
        labels: torch.Tensor | Sequence[int],
        *,
        max_length: int = 64,
        feature_batch_size: int = 64,
    ):
        if len(texts) != len(labels):
            raise ValueError(f"{len(texts)} texts for {len(labels)} labels")
        self.tokenizer, self.texts = tokenizer, list(texts)
        self.labels = torch.as_tensor(labels)
        self.max_length, self.feature_batch_size = max_length, feature_batch_size

    def __len__(self) -> int:
        return len(self.texts)

    def loss(self, model: nn.Module, head: nn.Module | None, indices: torch.Tensor) -> torch.Tensor:
        tokens = self.tokenizer(
            [self.texts[i] for i in indices.tolist()],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        features = pooled_features(model, tokens["input_ids"], tokens["attention_mask"])
        return classification_loss(head, features, self.labels[indices])

    def features(self, model: nn.Module) -> torch.Tensor:
        return embed_texts(
            model,
            self.tokenizer,
            self.texts,
            max_length=self.max_length,
            batch_size=self.feature_batch_size,
        )


def classification_loss(
    head: nn.Module | None, features: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of `head(features)` (of `features` themselves when there is no head)."""
    logits = head(features) if head is not None else features
    return nn.functional.cross_entropy(logits, labels)
