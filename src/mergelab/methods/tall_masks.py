"""TALL masks and Consensus merging: which weights of the merged task vector each task uses.

Two methods: `tall_masks` (a merged model plus one binary mask per task, which restores each
task's own model from it) and `consensus` (one model, keeping the weights masks agree on).

Wang, Dimitriadis, Ortiz-Jimenez, Fleuret, Frossard. "Localizing Task Information for Improved
Model Merging and Compression". ICML 2024. https://arxiv.org/abs/2405.07813

A task's TALL mask ("TAsk-Localized sparse masks") marks the entries of the multi-task vector
tau_MTL that bring the merged model closer to that task's fine-tune than the base is:

    m_t = |tau_t| > mask_lambda * |tau_MTL - tau_t|     (|theta_0 - theta_t| vs |theta_MTL - theta_t|)

Consensus merging keeps the entries that at least `k` tasks' masks use, dropping "catastrophic"
weights (no task uses them) and, from k = 2, "selfish" ones (a single task uses them):

    merged = base + lambda * [sum_t m_t >= k] * tau_MTL.

With `tall_masks`, task t's model is retrieved as base + m_t * (theta_MTL - base): the shared
weights written are theta_MTL = base + lambda * sum_t tau_t (lambda 1: the paper's unscaled
sum), each mask compares against them, and the masks are stored bit-packed beside them
(mergelab.modulators). The paper again picks each task's `mask_lambda` on validation; here one
value serves all tasks.

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
    ModulatedTensor,
    Modulation,
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


def tall_mask_tensor(m: TensorMerge) -> ModulatedTensor:
    """TALL masks for one tensor: shared weights base + lambda * sum, one mask per task."""
    base, task_vectors = stacked_task_vectors(m, "tall_masks")
    multi_task_vector = float(m.params["lambda"]) * task_vectors.sum(dim=0)
    masks = tall_masks(task_vectors, multi_task_vector, float(m.params["mask_lambda"]))
    return ModulatedTensor(merged=base + multi_task_vector, masks=list(masks))


def tall_masks_kernel(m: TensorMerge) -> torch.Tensor:
    """The shared weights of TALL masks alone (what an in-memory merge returns)."""
    return tall_mask_tensor(m).merged


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


TALL_MASKS = register(
    MergeMethod(
        name="tall_masks",
        title="Localizing Task Information for Improved Model Merging and Compression "
        "(TALL masks)",
        paper="Wang, Dimitriadis, Ortiz-Jimenez, Fleuret, Frossard, ICML 2024",
        url="https://arxiv.org/abs/2405.07813",
        kernel=tall_masks_kernel,
        modulation=Modulation(kernel=tall_mask_tensor),
        params=(
            Param(
                "lambda",
                float,
                1.0,
                "scale of the summed task vectors in the shared weights (1: the paper's "
                "unscaled sum, which only the masked task models use as is)",
                low=0.0,
                high=10.0,
            ),
            Param(
                "mask_lambda",
                float,
                0.4,
                "TALL mask threshold: task t keeps an entry when |tau_t| > mask_lambda * "
                "|tau_merged - tau_t| (the paper picks it per task from 0.2-0.6 on validation)",
                low=0.0,
                high=10.0,
            ),
        ),
        base="required",
        min_models=1,
    )
)
