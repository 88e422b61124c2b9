"""Modality merging: interpolation and modality arithmetic of Sung et al. 2023.

"An Empirical Study of Multimodal Model Merging" (Sung et al., EMNLP 2023 Findings,
https://arxiv.org/abs/2304.14933) merges the vision (V), language (L) and, in the top blocks,
vision-language (VL) copies of a modality-specific transformer's weights into one
modality-agnostic weight. The copies are usually held by one checkpoint (an `expert_groups:`
merge, mergelab.plan.expert_groups, makes each group of copies the models of one tensor), but the
kernels take any models, in order V, L[, VL]:

- `interpolation`: "a simple weighted average": alpha W_v + (1 - alpha) W_l; with a VL copy,
  2 alpha / 3 W_v + 2 (1 - alpha) / 3 W_l + 1 / 3 W_vl (the paper's weights, VL fixed at 1/3).
- `modality_arithmetic`: task arithmetic of the "modality vectors" from the seed checkpoint the
  copies started from: W_seed + lambda sum_m (W_m - W_seed).
"""

from __future__ import annotations

import torch

from mergelab.errors import MergeError
from mergelab.methods.linear import weighted_sum
from mergelab.methods.registry import Blockwise, MergeMethod, Param, TensorMerge, register
from mergelab.methods.task_arithmetic import task_vectors

PAPER = "An Empirical Study of Multimodal Model Merging (Sung et al., 2023)"
URL = "https://arxiv.org/abs/2304.14933"


def interpolation_weights(alpha: float, count: int) -> list[float]:
    """The paper's weights of `count` copies (V, L[, VL]): [a, 1-a] or [2a/3, 2(1-a)/3, 1/3]."""
    if count == 2:
        return [alpha, 1.0 - alpha]
    if count == 3:
        return [2 * alpha / 3, 2 * (1 - alpha) / 3, 1 / 3]
    raise MergeError(
        f"interpolation takes 2 or 3 models (vision, language[, vision-language]); got {count}: "
        "use `linear` with per-model weights instead"
    )


def interpolation(m: TensorMerge) -> torch.Tensor:
    """alpha-interpolation of the V and L copies (and the VL copy at 1/3) of one tensor."""
    weights = interpolation_weights(float(m.params["alpha"]), len(m.tensors))
    return weighted_sum(m.tensors, weights)


def modality_arithmetic(m: TensorMerge) -> torch.Tensor:
    """W_seed + lambda * sum_m (W_m - W_seed) for one tensor; `m.base` is the seed's."""
    if m.base is None:
        raise MergeError(f"tensor {m.name!r}: modality arithmetic needs the seed (base) tensor")
    vectors = task_vectors(m.tensors, m.base, m.name, in_place=m.writable)
    merged = vectors[0]
    for vector in vectors[1:]:
        merged.add_(vector)
    scale = float(m.params["lambda"])
    if scale != 1:
        merged.mul_(scale)
    return merged.add_(m.base)


register(
    MergeMethod(
        name="interpolation",
        title="Interpolation of modality copies (V, L and a VL copy at 1/3)",
        paper=PAPER,
        url=URL,
        kernel=interpolation,
        params=(
            Param(
                "alpha",
                float,
                0.5,
                "Weight of the first (vision) model; the second gets 1 - alpha (with a third, "
                "vision-language model: 2 alpha/3, 2 (1 - alpha)/3 and 1/3).",
                low=0.0,
                high=1.0,
            ),
        ),
        base="none",
        min_models=2,
        max_models=3,
        # Entry-wise: a block of rows merges exactly like the whole tensor.
        blockwise=Blockwise.entrywise(interpolation),
    )
)
register(
    MergeMethod(
        name="modality_arithmetic",
        title="Modality arithmetic: the seed plus lambda times the summed modality vectors",
        paper=PAPER,
        url=URL,
        kernel=modality_arithmetic,
        params=(
            Param(
                "lambda",
                float,
                1.0,
                "Scale of the summed modality vectors (copy - seed) before adding them to the seed.",
                low=0.0,
            ),
        ),
        base="required",
        min_models=1,
        blockwise=Blockwise.entrywise(modality_arithmetic),
    )
)
