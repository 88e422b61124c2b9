"""Linear merging: a weighted average of the source tensors ("model soups").

Same name, parameters and numbers as mergekit 0.1.5's `linear`: a required per-model `weight`
and a global `normalize` (default true) that divides by the sum of the weights. A `base_model`
takes no part (base="none"): it only supplies config and tokenizer files, and is averaged only
if it is also listed under `models`.

Deliberate difference: with `normalize` and weights summing to exactly 0, mergekit divides by
zero and writes inf/NaN; we raise a MergeError naming `weight` and the tensor instead.
Tensors of different shapes (e.g. resized embeddings) are an error, as in mergekit 0.1.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergelab.errors import MergeError
from mergelab.methods.registry import Blockwise, MergeMethod, Param, TensorMerge, register


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """sum_i weights[i] * tensors[i], accumulated in a new tensor of the first tensor's dtype."""
    out = torch.zeros_like(tensors[0])
    for tensor, weight in zip(tensors, weights):
        out.add_(tensor, alpha=weight)
    return out


def linear(m: TensorMerge) -> torch.Tensor:
    """Linear merge of one tensor.

    Model soups (Wortsman et al., 2022, https://arxiv.org/abs/2203.05482): "averaging the
    weights of multiple models fine-tuned with different hyperparameter configurations".
    Returns sum_i w_i * x_i, divided by sum_i w_i when `normalize` is true.
    Raises MergeError for mismatched shapes or, with `normalize`, weights summing to 0.
    """
    if not m.tensors:
        raise MergeError(f"tensor {m.name!r}: linear merge needs at least one source tensor")
    shape = m.tensors[0].shape
    for index, tensor in enumerate(m.tensors):
        if tensor.shape != shape:
            raise MergeError(
                f"tensor {m.name!r}: source {index} has shape {tuple(tensor.shape)}, source 0 "
                f"has {tuple(shape)}; resize (e.g. align embeddings) before merging"
            )
    weights = [float(w) for w in m.per_model("weight")]
    merged = weighted_sum(m.tensors, weights)
    if m.params["normalize"]:
        # Summed as a tensor in the merge dtype, as mergekit does, for identical rounding.
        total = torch.tensor(weights, dtype=merged.dtype).sum()
        if total == 0:
            raise MergeError(
                f"tensor {m.name!r}: the `weight`s of linear merge sum to 0, so `normalize` "
                "cannot divide by them; change the weights or set normalize: false"
            )
        merged.div_(total.item())
    return merged


register(
    MergeMethod(
        name="linear",
        mergekit=True,
        title="Linear (model soups)",
        paper=(
            "Model soups: averaging weights of multiple fine-tuned models improves accuracy "
            "without increasing inference time (Wortsman et al., 2022)"
        ),
        url="https://arxiv.org/abs/2203.05482",
        kernel=linear,
        params=(
            Param(
                "weight",
                float,
                None,
                "Weight of this model in the average (required, any sign).",
                per_model=True,
            ),
            Param(
                "normalize",
                bool,
                True,
                "Divide by the sum of the weights (a weighted mean rather than a weighted sum).",
            ),
        ),
        base="none",
        min_models=1,
        # Entry-wise: a block of rows merges exactly like the whole tensor.
        blockwise=Blockwise.entrywise(linear),
    )
)
