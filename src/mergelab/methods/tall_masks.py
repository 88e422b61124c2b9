"""TALL masks and Consensus merging: which weights of the merged task vector each task uses.

Wang, Dimitriadis, Ortiz-Jimenez, Fleuret, Frossard. "Localizing Task Information for Improved
Model Merging and Compression". ICML 2024. https://arxiv.org/abs/2405.07813

A task's TALL mask ("TAsk-Localized sparse masks") marks the entries of the multi-task vector
tau_MTL that bring the merged model closer to that task's fine-tune than the base is:

    m_t = |tau_t| > mask_lambda * |tau_MTL - tau_t|     (|theta_0 - theta_t| vs |theta_MTL - theta_t|)

Consensus merging keeps the entries that at least `k` tasks' masks use, dropping "catastrophic"
weights (no task uses them) and, from k = 2, "selfish" ones (a single task uses them):

    merged = base + lambda * [sum_t m_t >= k] * tau_MTL.

Following the official code (github.com/nik-dim/tall_masks, `construct_tall_mask`,
`construct_consensus_mask`; the same in github.com/wang-kee/LiNeS): tau_MTL is the unscaled sum
of the task vectors (task arithmetic), the comparison is strict, k = 0 keeps every entry (task
arithmetic) and k = 2 is the paper's choice. The paper picks each task's `mask_lambda` from
{0.2, ..., 0.6} on its validation data and `lambda` on validation too; data-free, we take one
`mask_lambda` for all tasks (0.4, the middle of that grid) and a fixed `lambda` (0.3); both
defaults are ours. `k` above the number of models would keep nothing (the base): the plan
refuses it. Each entry depends only on the same entries of the inputs, so large tensors merge
blockwise.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mergelab.methods._lowrank import stacked_task_vectors
from mergelab.methods.registry import (
    Blockwise,
    MergeMethod,
    Param,
    ParamValue,
    TensorMerge,
    register,
)


def tall_masks(
    task_vectors: torch.Tensor, multi_task_vector: torch.Tensor, mask_lambda: float
) -> torch.Tensor:
    """Each task's TALL mask over `multi_task_vector`, boolean (num_tasks, *shape).

    Entry (t, j) is true when |tau_t[j]| > mask_lambda * |tau_MTL[j] - tau_t[j]|: the merged
    model is closer (scaled by mask_lambda) to task t's fine-tune at j than the base is.
    """
    distance_to_merged = (multi_task_vector.unsqueeze(0) - task_vectors).abs()
    return task_vectors.abs() > mask_lambda * distance_to_merged


def consensus_mask(masks: torch.Tensor, k: int) -> torch.Tensor:
    """Entries used by at least `k` of the tasks' masks (stacked on dim 0)."""
    return masks.sum(dim=0) >= k


def consensus_kernel(m: TensorMerge) -> torch.Tensor:
    """Consensus merging for one tensor: base + lambda * consensus mask * sum of task vectors."""
    base, task_vectors = stacked_task_vectors(m, "consensus")
    multi_task_vector = task_vectors.sum(dim=0)
    masks = tall_masks(task_vectors, multi_task_vector, float(m.params["mask_lambda"]))
    keep = consensus_mask(masks, int(m.params["k"]))
    return base + float(m.params["lambda"]) * torch.where(
        keep, multi_task_vector, torch.zeros_like(multi_task_vector)
    )


def _k_within_models(params: Mapping[str, ParamValue], num_models: int) -> str | None:
    k = params.get("k")
    if k is not None and int(k) > num_models:
        return (
            f"`k` must be at most the number of models ({num_models}); got {k} "
            "(no weight would be kept: the merge would be the base)"
        )
    return None


CONSENSUS = register(
    MergeMethod(
        name="consensus",
        title="Localizing Task Information for Improved Model Merging and Compression "
        "(Consensus merging)",
        paper="Wang, Dimitriadis, Ortiz-Jimenez, Fleuret, Frossard, ICML 2024",
        url="https://arxiv.org/abs/2405.07813",
        kernel=consensus_kernel,
        blockwise=Blockwise.entrywise(consensus_kernel),
        params=(
            Param(
                "lambda",
                float,
                0.3,
                "scale of the masked sum of task vectors (the paper tunes it on validation)",
                low=0.0,
                high=10.0,
            ),
            Param(
                "k",
                int,
                2,
                "keep the entries that at least k tasks' TALL masks use (2 in the paper: "
                "drops weights no task or a single task uses; 0: task arithmetic)",
                low=0,
                high=1024,
            ),
            Param(
                "mask_lambda",
                float,
                0.4,
                "TALL mask threshold: a task uses an entry when |tau_t| > mask_lambda * "
                "|tau_sum - tau_t| (the paper picks it per task from 0.2-0.6 on validation)",
                low=0.0,
                high=10.0,
            ),
        ),
        base="required",
        min_models=1,
        check_sources=_k_within_models,
    )
)
