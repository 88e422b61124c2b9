"""Two-model methods that pick, element by element, how far to move from the base: NearSwap
and Arcee Fusion. Both follow mergekit 0.1.5 (names, defaults, thresholds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mergelab.errors import MergeError
from mergelab.methods.registry import Blockwise, MergeMethod, Param, TensorMerge, register

# NearSwap divides by |base - other|; differences below this count as this.
_NEARSWAP_MIN_DIFF = 1e-6
# Arcee Fusion: softmax probabilities are shifted by this before the log in the KL divergence.
_FUSION_KL_EPS = 1e-8
# Arcee Fusion estimates quantiles from at most this many elements (sampled with replacement).
FUSION_QUANTILE_SAMPLE = 1_000_000


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """NearSwap (alchemonaut, QuartetAnemoi): take `other` where it is close to `base`.

    Per element, weight = clamp(t / |base - other|, 0, 1) and the result is
    weight * other + (1 - weight) * base: elements that differ by at most t are swapped in
    completely, farther ones only by t / distance. t <= 0 returns the base.
    """
    distance = (base - other).abs().clamp(min=_NEARSWAP_MIN_DIFF)
    weight = (t / distance).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def fusion_importance(params: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion's importance: |params - base| times the KL divergence, per row, between
    softmax(params) and softmax(base) over the last dimension (broadcast along the row)."""
    p = F.softmax(params, dim=-1) + _FUSION_KL_EPS
    q = F.softmax(base, dim=-1) + _FUSION_KL_EPS
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (params - base).abs() * kl


def approximate_quantiles(
    values: torch.Tensor, q: list[float], generator: torch.Generator | None
) -> torch.Tensor:
    """Lower-index quantiles of `values` (index floor(q * (n - 1)) of the sorted values).

    Above FUSION_QUANTILE_SAMPLE elements, a sample of that size drawn with replacement from
    `generator` stands in for the tensor (as mergekit, which draws from the global RNG).
    """
    flat = values.reshape(-1)
    if flat.numel() > FUSION_QUANTILE_SAMPLE:
        gen_device = generator.device if generator is not None else torch.device("cpu")
        index = torch.randint(
            flat.numel(), (FUSION_QUANTILE_SAMPLE,), generator=generator, device=gen_device
        )
        flat = flat[index.to(flat.device)]
    ordered = torch.sort(flat).values
    positions = (torch.tensor(q, dtype=torch.float32) * (ordered.numel() - 1)).long()
    return ordered[positions.to(ordered.device)]


def arcee_fusion(
    base: torch.Tensor, other: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Arcee Fusion: keep only the outlying-important changes of `other` relative to `base`.

    Importance scores (see `fusion_importance`) at or above the Tukey-style fence
    median + 1.5 * (Q3 - Q1) take `other`'s value; every other element keeps `base`.
    """
    importance = fusion_importance(other, base)
    q1, median, q3 = approximate_quantiles(importance, [0.25, 0.5, 0.75], generator)
    threshold = median + 1.5 * (q3 - q1)
    mask = (importance >= threshold).to(base.dtype)
    return base + (other - base) * mask


def _nearswap_kernel(m: TensorMerge) -> torch.Tensor:
    if m.base is None:
        raise MergeError(f"nearswap needs a base model for tensor {m.name!r}")
    return nearswap(m.base, m.tensors[0], float(m.params["t"]))


def _arcee_fusion_kernel(m: TensorMerge) -> torch.Tensor:
    if m.base is None:
        raise MergeError(f"arcee_fusion needs a base model for tensor {m.name!r}")
    return arcee_fusion(m.base, m.tensors[0], m.generator)


register(
    MergeMethod(
        name="nearswap",
        mergekit=True,
        title="NearSwap",
        paper="alchemonaut, NearSwap (QuartetAnemoi-70B model card, 2024)",
        url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        kernel=_nearswap_kernel,
        blockwise=Blockwise.entrywise(_nearswap_kernel),
        params=(
            Param(
                "t",
                float,
                None,
                "distance below which the other model's value is taken completely",
            ),
        ),
        base="required",
        min_models=1,
        max_models=1,
    )
)

register(
    MergeMethod(
        name="arcee_fusion",
        mergekit=True,
        title="Arcee Fusion",
        paper="Arcee AI, Arcee Fusion (mergekit, 2025)",
        url="https://arcee.ai",
        kernel=_arcee_fusion_kernel,
        base="required",
        min_models=1,
        max_models=1,
        # Only tensors above FUSION_QUANTILE_SAMPLE elements use the generator.
        randomized=True,
    )
)
