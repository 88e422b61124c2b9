"""Evaluate encoders on text tasks and summarise several models over several tasks.

An encoder here is any Hugging Face encoder (e.g. `BertModel`) whose sentence embedding is the
mean of its last hidden states over real (non-padding) tokens, as in Sentence-BERT
(Reimers & Gurevych 2019, https://arxiv.org/abs/1908.10084). A task's classifier is a linear
head on that embedding, so a merged encoder can be scored with each task's own head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

Progress = Callable[[int], None]  # called with the number of items just finished


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average `hidden` [batch, tokens, dim] over the tokens where `attention_mask` is 1."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    # clamp: a row with no real token (cannot come from a tokenizer) would divide by zero.
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def pooled_features(
    encoder: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The mean-pooled last hidden states of `encoder` for one tokenised batch."""
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return mean_pool(hidden, attention_mask)


@torch.no_grad()
def embed_texts(
    encoder: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 64,
    batch_size: int = 64,
    progress: Progress | None = None,
) -> torch.Tensor:
    """Mean-pooled embeddings [len(texts), dim] of `texts`, in input order, in eval mode.

    Texts are batched by length (then put back in order) so that padding, which costs as much
    compute as real tokens, stays small.
    """
    was_training = encoder.training
    encoder.eval()
    lengths = [
        len(ids)
        for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    ]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    chunks: list[torch.Tensor] = []
    try:
        for start in range(0, len(order), batch_size):
            batch = [texts[i] for i in order[start : start + batch_size]]
            tokens = tokenizer(
                batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            )
            chunks.append(pooled_features(encoder, tokens["input_ids"], tokens["attention_mask"]))
            if progress is not None:
                progress(len(batch))
    finally:
        encoder.train(was_training)
    if not chunks:
        return torch.empty(0, 0)
    sorted_features = torch.cat(chunks)
    features = torch.empty_like(sorted_features)
    features[torch.tensor(order)] = sorted_features
    return features


def accuracy(logits: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Share of rows of `logits` whose arg-max equals the label."""
    labels = torch.as_tensor(labels)
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"{logits.shape[0]} predictions for {labels.shape[0]} labels")
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return (logits.argmax(dim=-1) == labels).float().mean().item()


@torch.no_grad()
def head_accuracy(head: nn.Module, features: torch.Tensor, labels: Sequence[int]) -> float:
    """Accuracy of a linear `head` on precomputed `features`."""
    return accuracy(head(features), labels)


# --- multi-task tables ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelRow:
    """One model's accuracy on each task, and its derived figures (None where undefined)."""

    name: str
    accuracy: dict[str, float]
    average: float
    normalised: float | None
    retained_gain: float | None


def summarise(
    results: Mapping[str, Mapping[str, float]],
    *,
    finetuned: Mapping[str, float] | None = None,
    probe: Mapping[str, float] | None = None,
) -> list[ModelRow]:
    """Per-model averages of a {model: {task: accuracy}} table.

    normalised: the mean over tasks of accuracy / the task's own fine-tuned accuracy (Ilharco et
        al. 2023, https://arxiv.org/abs/2212.04089, report merges this way).
    retained_gain: the mean over tasks of (accuracy - probe) / (fine-tuned - probe): the share of
        what fine-tuning gained over the linear probe that a model keeps (1 = all of it, 0 = no
        better than the probe, negative = worse). Tasks where fine-tuning did not beat the probe
        are left out, since the ratio means nothing there.
    Every model must report every task of the first model.
    """
    rows: list[ModelRow] = []
    tasks = list(next(iter(results.values()), {}))
    for name, by_task in results.items():
        missing = [t for t in tasks if t not in by_task]
        if missing:
            raise ValueError(f"model {name!r} has no result for task(s) {missing}")
        average = sum(by_task[t] for t in tasks) / len(tasks)
        normalised = None
        if finetuned is not None and all(finetuned.get(t, 0) > 0 for t in tasks):
            normalised = sum(by_task[t] / finetuned[t] for t in tasks) / len(tasks)
        retained = None
        if finetuned is not None and probe is not None:
            gains = [
                (by_task[t] - probe[t]) / (finetuned[t] - probe[t])
                for t in tasks
                if finetuned[t] > probe[t]
            ]
            retained = sum(gains) / len(gains) if gains else None
        rows.append(ModelRow(name, {t: by_task[t] for t in tasks}, average, normalised, retained))
    return rows


def render_table(rows: Sequence[ModelRow], title: str = "Test accuracy"):
    """A rich Table of `rows`: one column per task, then average, normalised, retained gain."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("model", style="bold")
    tasks = list(rows[0].accuracy) if rows else []
    for task in tasks:
        table.add_column(task, justify="right")
    table.add_column("average", justify="right", style="bold")
    table.add_column("normalised", justify="right")
    table.add_column("gain kept", justify="right")

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    for row in rows:
        table.add_row(
            row.name,
            *(pct(row.accuracy[t]) for t in tasks),
            pct(row.average),
            pct(row.normalised),
            pct(row.retained_gain),
        )
    return table
