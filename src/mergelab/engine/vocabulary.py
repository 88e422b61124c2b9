"""Applying a vocabulary remap (mergelab.plan.tokenizer) to the inputs of an embedding or head."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.plan.tokenizer import VocabularyRemap


def remap_vocabulary(remap: VocabularyRemap, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each input's rows on the output vocabulary, in the inputs' dtype and device.

    Row `i` of input `k` is its own row `take[i]`, or a fill (rows of any inputs, summed or
    averaged: the originals, not the remapped ones); rows from `remap.tokens` on (padding) are
    the mean of that input's first `remap.tokens` rows.
    """
    out = []
    for spec, tensor in zip(remap.inputs, tensors, strict=True):
        rows = tensor.new_zeros((remap.rows, *tensor.shape[1:]))
        take = spec.take.to(tensor.device)
        own = torch.nonzero(take >= 0).squeeze(1)
        rows[own] = tensor[take[own]]
        for fill in spec.fills:
            if not fill.parts:
                continue  # a zero row
            total = torch.zeros_like(rows[0])
            for position, source_row in fill.parts:
                total = total + tensors[position][source_row]
            rows[fill.row] = total / len(fill.parts) if fill.mean else total
        if remap.rows > remap.tokens:
            # As mergekit (after Hewitt's vocabulary-expansion note): padding is the mean row.
            rows[remap.tokens:] = rows[: remap.tokens].mean(dim=0)
        out.append(rows)
    return out
