"""Model Stock: interpolate the average of fine-tuned models towards their base by geometry.

Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned models" (ECCV 2024,
arXiv:2403.19522). Fine-tuned weights w_1..w_k of one base w_0 lie (approximately) on a thin
shell around a centre; from the angle theta between their offsets w_i - w_0 the paper derives
the interpolation ratio t = k cos(theta) / (1 + (k - 1) cos(theta)) and returns
t * mean(w_i) + (1 - t) * w_0. Follows mergekit 0.1.5 (names, defaults, edge cases).
"""

from __future__ import annotations

import torch

from mergelab.errors import MergeError
from mergelab.methods.registry import MergeMethod, Param, TensorMerge, register

# mergekit clamps the product of offset norms to this, so a zero offset gives cos = 0.
_NORM_PRODUCT_MIN = 1e-6
# Where 1 + (k - 1) cos is this close to 0 the ratio has no finite value; the base is kept.
_SINGULAR = 1e-6


def model_stock(
    base: torch.Tensor, tensors: list[torch.Tensor], *, filter_wise: bool = False
) -> torch.Tensor:
    """Model Stock merge of `tensors` (k >= 2 fine-tuned models) around `base`.

    cos(theta) is the mean of the pairwise cosines between offsets `w_i - base` (each clamped to
    [-1, 1]), computed over the flattened tensor, or per row (last dimension) when
    `filter_wise`; a 1-D tensor is a single row either way.

    Edge case (as mergekit 0.1.5): where |1 + (k - 1) cos| < 1e-6 (opposing updates) t is 0,
    i.e. the base is kept, instead of amplifying the updates without bound.
    """
    if len(tensors) < 2:
        raise ValueError("model_stock needs at least two fine-tuned models besides the base")
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    shape = base.shape
    if filter_wise and base.ndim >= 2:
        w0 = base.to(dtype)
        ws = [w.to(dtype) for w in tensors]
    else:
        w0 = base.to(dtype).reshape(1, -1)
        ws = [w.to(dtype).reshape(1, -1) for w in tensors]

    offsets = [w - w0 for w in ws]
    offset_norms = [torch.linalg.vector_norm(o, dim=-1) for o in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            dot = torch.linalg.vecdot(offsets[i], offsets[j], dim=-1)
            norm_product = (offset_norms[i] * offset_norms[j]).clamp(min=_NORM_PRODUCT_MIN)
            cosines.append((dot / norm_product).clamp(-1, 1))
    del offsets
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)

    k = len(ws)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < _SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    ratio = torch.where(singular, torch.zeros_like(cos), k * cos / safe)

    average = ws[0].clone()
    for w in ws[1:]:
        average.add_(w)
    average.div_(k)
    return (ratio * average + (1 - ratio) * w0).reshape(shape)


def _model_stock_kernel(m: TensorMerge) -> torch.Tensor:
    if m.base is None:
        raise MergeError(f"model_stock needs a base model for tensor {m.name!r}")
    return model_stock(m.base, m.tensors, filter_wise=bool(m.params["filter_wise"]))


register(
    MergeMethod(
        name="model_stock",
        mergekit=True,
        title="Model Stock",
        paper="Jang et al., Model Stock: All we need is just a few fine-tuned models (ECCV 2024)",
        url="https://arxiv.org/abs/2403.19522",
        kernel=_model_stock_kernel,
        params=(
            Param(
                "filter_wise",
                bool,
                False,
                "compute the angle and ratio per row (last dimension) instead of per tensor",
            ),
        ),
        base="required",
        min_models=2,
    )
)
