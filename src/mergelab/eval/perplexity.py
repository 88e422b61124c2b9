"""Perplexity of a causal language model on a user's text file.

Each non-empty line of the file is one example (a sentence, a paragraph, a document). A
model's perplexity on a set of lines is exp(summed negative log-likelihood of every predicted
token / number of predicted tokens): every token of a line but the first is predicted from the
ones before it. The bootstrap interval resamples lines, so it reflects how much the score
depends on which lines were drawn.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mergelab.errors import MergeLabError
from mergelab.eval.data import LabelledTexts, Splits
from mergelab.eval.tasks import read_utf8_file

VALIDATION_SHARE = 0.2


@dataclass(frozen=True)
class PerplexityTask:
    """Lines of a text file, scored by perplexity (the language-model variant of `Task`).

    Splits: the lines in a seeded random order, `VALIDATION_SHARE` of them to validation, the
    rest to test; train is empty (nothing is fit to the file).
    """

    name: str
    lines: tuple[str, ...]
    source: str
    description: str = ""
    label_names: tuple[str, ...] = ()
    modality: str = "language-model"
    metric: str = "perplexity"

    def splits(self, seed: int = 0) -> Splits[LabelledTexts]:
        def texts(indices: Sequence[int]) -> LabelledTexts:
            chosen = sorted(indices)
            return LabelledTexts(
                tuple(self.lines[i] for i in chosen), (0,) * len(chosen), tuple(map(str, chosen))
            )

        order = torch.randperm(len(self.lines), generator=torch.Generator().manual_seed(seed))
        n_validation = round(VALIDATION_SHARE * len(self.lines)) if len(self.lines) > 1 else 0
        order = order.tolist()
        return Splits(
            train=texts([]), validation=texts(order[:n_validation]), test=texts(order[n_validation:])
        )


def read_text_task(path: str | os.PathLike, name: str | None = None) -> PerplexityTask:
    """A perplexity task from a UTF-8 text file, one example per non-empty line.

    Raises MergeLabError naming the file (and line) for a missing file, text that is not UTF-8
    or a file without a non-empty line.
    """
    path = Path(path)
    content = read_utf8_file(path, "text file")
    lines = tuple(line.strip() for line in content.splitlines() if line.strip())
    if not lines:
        raise MergeLabError(f"text file {path} holds no non-empty line")
    return PerplexityTask(
        name=name or path.stem,
        lines=lines,
        source=f"user text from {path}",
        description=f"perplexity on the lines of {path}",
    )


@torch.no_grad()
def line_losses(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 512,
    batch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed negative log-likelihood [N], predicted tokens [N]) of each text under the causal
    language model `model` (a Hugging Face `...ForCausalLM`: called with input_ids and
    attention_mask, returns `.logits`). Texts are truncated to `max_length` tokens; a text of one
    token predicts nothing (0, 0). Runs in eval mode, in float32 sums."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = [
        list(row)
        for row in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    ]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    nll = torch.zeros(len(ids), dtype=torch.float64)
    tokens = torch.zeros(len(ids), dtype=torch.float64)
    try:
        for start in range(0, len(order), batch_size):
            batch = [i for i in order[start : start + batch_size] if len(ids[i]) > 1]
            if not batch:
                continue
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, : len(ids[i])] = torch.tensor(ids[i])
                mask[row, : len(ids[i])] = 1
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
            logits = logits[:, :-1].float()
            targets = input_ids[:, 1:].to(device)
            predicted = mask[:, 1:].to(device).bool()
            losses = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
            ).reshape(targets.shape)
            losses = torch.where(predicted, losses, torch.zeros_like(losses))
            nll[batch] = losses.sum(dim=1).double().cpu()
            tokens[batch] = predicted.sum(dim=1).double().cpu()
    finally:
        model.train(was_training)
    return nll, tokens
