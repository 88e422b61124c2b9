"""Text data for data-aware merges of Hugging Face encoders (mean-pooled, as mergelab.eval)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mergelab.eval.harness import mean_pool


def text_batches(
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int] | None = None,
    *,
    batch_size: int = 16,
    max_length: int = 64,
) -> list[dict[str, torch.Tensor]]:
    """Tokenised batches (`input_ids`, `attention_mask`, and `labels` when given)."""
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = list(texts[start : start + batch_size])
        tokens = tokenizer(
            chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batch = {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}
        if labels is not None:
            batch["labels"] = torch.as_tensor(list(labels[start : start + batch_size]))
        out.append(batch)
    return out


def pooled_forward(module: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean-pooled last hidden states of a Hugging Face encoder: the zoo's sentence features.

    The padding mask is handed over already expanded to the 4D additive form
    [batch, 1, tokens, tokens], which transformers uses as given: its own mask preparation
    branches on the mask's values, which `torch.func.vmap` (per-example Fisher gradients)
    cannot trace. The features equal those of the 2D mask (to float rounding).
    """
    mask = inputs["attention_mask"]
    dtype = next(module.parameters()).dtype
    tokens = mask.shape[-1]
    additive = (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    additive = additive.expand(mask.shape[0], 1, tokens, tokens)
    hidden = module(input_ids=inputs["input_ids"], attention_mask=additive)
    return mean_pool(hidden.last_hidden_state, mask)
