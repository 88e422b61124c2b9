"""TSV-M: merging through Task Singular Vectors.

Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà. "Task Singular Vectors:
Reducing Task Interference in Model Merging". CVPR 2025. https://arxiv.org/abs/2412.00081

Per 2-D weight, each task matrix is compressed to its top singular triplets; the kept left
(and right) singular vectors of all tasks are concatenated and replaced by the nearest
orthonormal set (orthogonal Procrustes, "whitening"), which removes the overlap between tasks'
subspaces; the singular values are kept. Following the official code
(github.com/AntoAndGar/task_singular_vectors, `compute_and_sum_svd_mem_reduction`):

- each task keeps floor(rank / num_tasks) triplets (`rank_fraction`, default 1/num_tasks);
- tensors that are not matrices (biases, norms, convolutions) and CLIP's `text_projection`
  take the *mean* of the task vectors;
- the merged task vector is added to the base scaled by `lambda` (1.0 in the paper: TSV-M
  needs no tuned coefficient).

Choices of ours, not in the paper: every task keeps at least one triplet (the official code
silently drops all tasks of a matrix whose rank is below the number of tasks); vocabulary
tables (token / position embeddings, LM heads: an embedding-like name and more rows than
columns) take the mean as well unless `svd_embeddings` is true, since the paper only merged
vision encoders, whose only embedding matrix (ViT positional, wider than tall) still gets SVD.
"""

from __future__ import annotations

import math

import torch

from mergelab.methods._lowrank import (
    nearest_orthonormal,
    stacked_task_vectors,
    svd,
    uses_spectral_path,
)
from mergelab.methods.registry import MergeMethod, Param, TensorMerge, register


def kept_rank(full_rank: int, num_tasks: int, rank_fraction: float) -> int:
    """Singular triplets each task keeps: floor(full_rank * fraction), at least 1.

    fraction 0 means 1/num_tasks, computed with integer division as the official code does
    (full_rank // num_tasks) so no float rounding can lose a component.
    """
    if rank_fraction <= 0.0:
        kept = full_rank // num_tasks
    else:
        # The epsilon keeps e.g. 0.1 * 30 = 3 from flooring to 2 through float error.
        kept = math.floor(full_rank * rank_fraction + 1e-9)
    return max(1, min(full_rank, kept))


def tsv_merge_matrix(
    task_vectors: torch.Tensor, rank_fraction: float = 0.0, name: str = ""
) -> torch.Tensor:
    """TSV-M of stacked task matrices (num_tasks, rows, cols) -> merged (rows, cols), unscaled.

    With k kept triplets per task: U_hat = [U_1[:, :k], ..., U_T[:, :k]],
    S_hat = [s_1[:k], ..., s_T[:k]], V_hat likewise; result =
    procrustes(U_hat) diag(S_hat) procrustes(V_hat^T). If the tasks' kept subspaces are
    already mutually orthogonal, this is exactly the sum of the rank-k approximations.
    `name` only labels errors.
    """
    num_tasks, rows, cols = task_vectors.shape
    u, s, vh = svd(task_vectors, name)
    k = kept_rank(s.shape[-1], num_tasks, rank_fraction)
    # Concatenate the tasks' blocks side by side: (rows, T*k), (T*k,), (T*k, cols).
    u_hat = u[:, :, :k].permute(1, 0, 2).reshape(rows, num_tasks * k)
    s_hat = s[:, :k].reshape(num_tasks * k)
    vh_hat = vh[:, :k, :].reshape(num_tasks * k, cols)
    u_orth = nearest_orthonormal(u_hat, name)
    vh_orth = nearest_orthonormal(vh_hat, name)
    return (u_orth * s_hat) @ vh_orth


def tsv_kernel(m: TensorMerge) -> torch.Tensor:
    """TSV-M for one tensor: base + lambda * merged task vector (mean for non-matrices)."""
    base, task_vectors = stacked_task_vectors(m, "tsv")
    scale = float(m.params["lambda"])
    if uses_spectral_path(m.name, base.shape, bool(m.params["svd_embeddings"])):
        merged = tsv_merge_matrix(task_vectors, float(m.params["rank_fraction"]), m.name)
    else:
        merged = task_vectors.mean(dim=0)
    return base + scale * merged


TSV = register(
    MergeMethod(
        name="tsv",
        title="Task Singular Vectors: Reducing Task Interference in Model Merging",
        paper="Gargiulo, Crisostomi, Bucarelli, Scardapane, Silvestri, Rodolà, CVPR 2025",
        url="https://arxiv.org/abs/2412.00081",
        kernel=tsv_kernel,
        params=(
            Param(
                "lambda",
                float,
                1.0,
                "scale of the merged task vector (the paper uses 1.0, untuned)",
                low=0.0,
                high=10.0,
            ),
            Param(
                "rank_fraction",
                float,
                0.0,
                "fraction of each task matrix's singular triplets kept; "
                "0 means 1/num_models as in the paper",
                low=0.0,
                high=1.0,
            ),
            Param(
                "svd_embeddings",
                bool,
                False,
                "also merge vocabulary tables (token embeddings, LM head) through SVD "
                "instead of the mean of task vectors",
            ),
        ),
        base="required",
        min_models=1,
    )
)
