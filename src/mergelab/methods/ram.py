"""RAM and RAM+ (tensor-local): Reinforced Agent Merging (arXiv:2601.13572).

Task vectors d_i = w_i - base are sparse after RL fine-tuning. RAM keeps, per element, the one
contribution when a single model changed it (|d_i| > epsilon) and the mean of the contributions
when several did, instead of diluting unique updates by averaging them with zeros. RAM+
additionally rescales each model's unique updates by 1 + r * clamp(rho_i, 0, alpha), where rho_i
is the ratio of that model's shared to unique changed elements in this tensor. Follows
mergekit 0.1.5 (names, defaults, thresholds).
"""

from __future__ import annotations

import torch

from mergelab.errors import MergeError
from mergelab.methods.registry import MergeMethod, Param, TensorMerge, register


def _contributor_counts(
    tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float
) -> torch.Tensor:
    """How many models change each element by more than `epsilon` (int64, base's shape)."""
    counts = torch.zeros(base.shape, dtype=torch.int64, device=base.device)
    for w in tensors:
        counts += (w - base).abs() > epsilon
    return counts


def ram(
    base: torch.Tensor,
    tensors: list[torch.Tensor],
    *,
    epsilon: float = 1e-5,
    rescale_r: float | None = None,
    rescale_alpha: float = 0.2,
) -> torch.Tensor:
    """RAM merge of `tensors` around `base`; RAM+ (tensor-local) when `rescale_r` is given.

    Per element with c models changing it by more than `epsilon`: c = 0 keeps the base, c = 1
    adds that model's change (times lambda_i for RAM+), c > 1 adds the mean of the c changes.
    Changes of at most `epsilon` are dropped. For RAM+, with shared_i / unique_i the number of
    elements model i changes together with others / alone,
    lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha).
    """
    if not tensors:
        return base
    counts = _contributor_counts(tensors, base, epsilon)
    unique = counts == 1
    overlap = counts > 1
    divisor = counts.clamp(min=1)

    merged = torch.zeros_like(base)
    for w in tensors:
        delta = w - base
        changed = delta.abs() > epsilon
        delta = torch.where(changed, delta, torch.zeros_like(delta))
        if rescale_r is None:
            # Unique elements have divisor 1, so one division serves both cases.
            merged += delta / divisor
            continue
        shared_n = (changed & overlap).sum()
        unique_n = (changed & unique).sum()
        rho = shared_n / unique_n.clamp(min=epsilon)
        lam = 1 + rescale_r * rho.clamp(min=0, max=rescale_alpha)
        merged += torch.where(unique, delta * lam, delta / divisor)
    return base + merged


def _ram_kernel(m: TensorMerge) -> torch.Tensor:
    if m.base is None:
        raise MergeError(f"ram needs a base model for tensor {m.name!r}")
    return ram(m.base, m.tensors, epsilon=float(m.params["epsilon"]))


def _ramplus_tl_kernel(m: TensorMerge) -> torch.Tensor:
    if m.base is None:
        raise MergeError(f"ramplus_tl needs a base model for tensor {m.name!r}")
    return ram(
        m.base,
        m.tensors,
        epsilon=float(m.params["epsilon"]),
        rescale_r=float(m.params["r"]),
        rescale_alpha=float(m.params["alpha"]),
    )


_EPSILON = Param(
    "epsilon", float, 1e-5, "changes |w - base| at or below this count as unchanged", low=0.0
)

register(
    MergeMethod(
        name="ram",
        mergekit=True,
        title="Reinforced Agent Merging",
        paper="RAM: Reinforced Agent Merging (arXiv:2601.13572)",
        url="https://arxiv.org/abs/2601.13572",
        kernel=_ram_kernel,
        params=(_EPSILON,),
        base="required",
        min_models=1,
    )
)

register(
    MergeMethod(
        name="ramplus_tl",
        mergekit=True,
        title="Reinforced Agent Merging Plus (Tensor-Local)",
        paper="RAM+: Reinforced Agent Merging (arXiv:2601.13572), per-tensor statistics",
        url="https://arxiv.org/abs/2601.13572",
        kernel=_ramplus_tl_kernel,
        params=(
            Param("r", float, 0.1, "strength of the rescaling of unique updates", low=0.0),
            Param("alpha", float, 0.2, "upper clamp of the shared/unique ratio rho", low=0.0),
            _EPSILON,
        ),
        base="required",
        min_models=1,
    )
)
