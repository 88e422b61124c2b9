"""EMR merging: elect a unified task vector, then mask and rescale it for each task.

Huang, Ye, Chen, He, Yue, Ouyang. "EMR-Merging: Tuning-Free High-Performance Model Merging".
NeurIPS 2024 (spotlight). https://arxiv.org/abs/2405.17461

Per entry, the unified task vector takes the sign of the sum of the task vectors and the
largest magnitude among the task vectors that agree with that sign (Elect). Each task gets a
binary mask, the entries where its own task vector agrees with the unified sign (Mask), and one
scalar per model that restores its task vector's average magnitude (Rescale):

    gamma = sign(sum_t tau_t),   tau_uni = gamma * max_t |tau_t| [tau_t * gamma > 0],
    m_t = tau_t * gamma > 0,     r_t = sum_n mean|tau_t,n| / sum_n mean|m_t,n * tau_uni,n|

(n runs over the tensors), and task t's model is base + r_t * m_t * tau_uni. Following the
official code (github.com/harveyhuang18/EMR_Merging, and FusionBench's
`fusion_bench/method/emr_merging/utils.py`): a sum of exactly 0 elects the negative sign
(`(x > 0) * 2 - 1`), an entry no task agrees with is 0, and the rescaler sums per-tensor *means*
(every tensor counts alike, whatever its size).

The shared weights written to the checkpoint are base + tau_uni (their own quality is not the
point: the unified vector is as large as the largest task vector everywhere); the masks and
rescalers are stored beside them (mergelab.modulators). Choice of ours: a task whose masked
magnitude sums to 0 (it agrees with the unified sign nowhere) gets rescaler 0, not 0 / 0.
"""

from __future__ import annotations

import torch

from mergelab.methods._lowrank import stacked_task_vectors
from mergelab.methods.registry import (
    MergeMethod,
    ModulatedTensor,
    Modulation,
    TensorMerge,
    register,
)

_TASK = "task_magnitude"
_MASKED = "masked_magnitude"


def elect_unified(task_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau_uni, masks) of stacked task vectors (num_tasks, *shape): the elected unified task
    vector and each task's boolean agreement mask."""
    sign = torch.where(task_vectors.sum(dim=0) > 0, 1.0, -1.0).to(task_vectors.dtype)
    masks = task_vectors * sign > 0
    magnitude = torch.where(masks, task_vectors.abs(), torch.zeros_like(task_vectors))
    return sign * magnitude.max(dim=0).values, masks


def emr_tensor(m: TensorMerge) -> ModulatedTensor:
    """EMR for one tensor: shared weights base + tau_uni, masks, and the rescalers' terms."""
    base, task_vectors = stacked_task_vectors(m, "emr")
    unified, masks = elect_unified(task_vectors)
    sums = []
    for tau, mask in zip(task_vectors, masks, strict=True):
        masked = torch.where(mask, unified, torch.zeros_like(unified))
        sums.append({_TASK: float(tau.abs().mean()), _MASKED: float(masked.abs().mean())})
    return ModulatedTensor(merged=base + unified, masks=list(masks), sums=sums)


def emr_kernel(m: TensorMerge) -> torch.Tensor:
    """The shared weights of EMR alone (base + unified task vector)."""
    return emr_tensor(m).merged


def emr_rescalers(totals: list[dict[str, float]]) -> list[float]:
    """r_t = sum of mean |tau_t| over tensors / sum of mean |m_t * tau_uni| (0 when empty)."""
    return [
        total.get(_TASK, 0.0) / total[_MASKED] if total.get(_MASKED, 0.0) > 0 else 0.0
        for total in totals
    ]


EMR = register(
    MergeMethod(
        name="emr",
        title="EMR-Merging: Tuning-Free High-Performance Model Merging",
        paper="Huang, Ye, Chen, He, Yue, Ouyang, NeurIPS 2024",
        url="https://arxiv.org/abs/2405.17461",
        kernel=emr_kernel,
        modulation=Modulation(kernel=emr_tensor, rescalers=emr_rescalers),
        base="required",
        min_models=1,
    )
)
