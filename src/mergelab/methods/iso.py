"""Iso-C and Iso-CTS: isotropic merging in common (and task-specific) subspaces.

Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer. "No Task Left Behind:
Isotropic Model Merging with Common and Task-Specific Subspaces". ICML 2025.
https://arxiv.org/abs/2502.04959

Task arithmetic's summed task matrix has a spectrum dominated by a few directions, so tasks
whose updates live in the weak directions are drowned out. Iso-C keeps the singular vectors
of the sum but flattens its spectrum to the mean singular value. Iso-CTS first replaces the
least significant directions of the sum by each task's own top directions orthogonal to the
kept common subspace, orthonormalises the union (Procrustes), then flattens the spectrum.

Following the official code (github.com/danielm1405/iso-merging, `iso_c` / `iso_cts`):

- the common subspace is the SVD of the *sum* of task vectors;
- Iso-CTS keeps int(rank * common_space_fraction) common directions, then rounds the
  task-specific remainder to a multiple of the number of tasks (the common part absorbs the
  difference); the isotropic value is the mean of all kept singular values (common ones from
  the sum, task-specific ones from each task's residual);
- tensors that are not matrices and CLIP's `text_projection` take the *mean* of the task
  vectors;
- the result is added to the base scaled by `alpha`. The paper selects alpha on held-out
  validation data; 1.0 (also the FusionBench port's default) is a neutral starting point.

Choices of ours, not in the paper: if rounding would give the tasks more directions than
the matrix has, each task gets floor(rank / num_tasks) instead (the official code would index
out of range); vocabulary tables (embedding-like name, more rows than columns) take the mean
unless `svd_embeddings` is true (the paper merged vision encoders only).
"""

from __future__ import annotations

import torch

from mergelab.methods._lowrank import (
    nearest_orthonormal,
    stacked_task_vectors,
    svd,
    uses_spectral_path,
)
from mergelab.methods.registry import MergeMethod, Param, TensorMerge, register

_URL = "https://arxiv.org/abs/2502.04959"
_TITLE = "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces"
_AUTHORS = "Marczak, Magistri, Cygert, Twardowski, Bagdanov, van de Weijer, ICML 2025"


def iso_c_matrix(task_vectors: torch.Tensor, name: str = "") -> torch.Tensor:
    """Iso-C of stacked task matrices (num_tasks, rows, cols), unscaled.

    sum = U diag(s) V^T  ->  mean(s) * U V^T: same singular vectors, flat spectrum.
    """
    u, s, vh = svd(task_vectors.sum(dim=0), name)
    return (u * s.mean()) @ vh


def split_rank(full_rank: int, num_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(common directions, directions per task) for Iso-CTS, as the official code splits them.

    Example: rank 10, 3 tasks, fraction 0.8 -> 8 common, round(2 / 3) = 1 per task, so the
    common part becomes 10 - 3 = 7.
    """
    common = int(full_rank * common_space_fraction)
    per_task = round((full_rank - common) / num_tasks)  # Python's round, as in the paper's code
    if per_task * num_tasks > full_rank:
        per_task = full_rank // num_tasks
    return full_rank - per_task * num_tasks, per_task


def iso_cts_matrix(
    task_vectors: torch.Tensor, common_space_fraction: float = 0.8, name: str = ""
) -> torch.Tensor:
    """Iso-CTS of stacked task matrices (num_tasks, rows, cols), unscaled (`name` labels errors)."""
    num_tasks, rows, cols = task_vectors.shape
    u, s, vh = svd(task_vectors.sum(dim=0), name)
    common, per_task = split_rank(s.shape[0], num_tasks, common_space_fraction)
    u_common, s_common, vh_common = u[:, :common], s[:common], vh[:common]
    if per_task == 0:  # no room for task-specific directions: Iso-C
        return (u * s.mean()) @ vh

    # Each task's update with the common column space projected out, and its top directions.
    residual = task_vectors - u_common @ (u_common.T @ task_vectors)
    u_task, s_task, vh_task = svd(residual, name)
    u_specific = u_task[:, :, :per_task].permute(1, 0, 2).reshape(rows, num_tasks * per_task)
    s_specific = s_task[:, :per_task].reshape(num_tasks * per_task)
    vh_specific = vh_task[:, :per_task, :].reshape(num_tasks * per_task, cols)

    u_all = torch.cat([u_specific, u_common], dim=1)
    s_all = torch.cat([s_specific, s_common])
    vh_all = torch.cat([vh_specific, vh_common], dim=0)
    # The task-specific left vectors are orthogonal to the common ones but not to each other;
    # Procrustes makes the whole set orthonormal while moving it as little as possible.
    return (nearest_orthonormal(u_all, name) * s_all.mean()) @ nearest_orthonormal(vh_all, name)


def _iso_kernel(m: TensorMerge, method: str, cts: bool) -> torch.Tensor:
    base, task_vectors = stacked_task_vectors(m, method)
    alpha = float(m.params["alpha"])
    if not uses_spectral_path(m.name, base.shape, bool(m.params["svd_embeddings"])):
        merged = task_vectors.mean(dim=0)
    elif cts:
        merged = iso_cts_matrix(task_vectors, float(m.params["common_space_fraction"]), m.name)
    else:
        merged = iso_c_matrix(task_vectors, m.name)
    return base + alpha * merged


def iso_c_kernel(m: TensorMerge) -> torch.Tensor:
    """Iso-C for one tensor: base + alpha * isotropic(sum of task vectors)."""
    return _iso_kernel(m, "iso_c", cts=False)


def iso_cts_kernel(m: TensorMerge) -> torch.Tensor:
    """Iso-CTS for one tensor: base + alpha * isotropic(common + task-specific subspaces)."""
    return _iso_kernel(m, "iso_cts", cts=True)


def _alpha() -> Param:
    return Param(
        "alpha",
        float,
        1.0,
        "scale of the isotropic merged task vector (tuned on validation data in the paper)",
        low=0.0,
        high=10.0,
    )


def _svd_embeddings() -> Param:
    return Param(
        "svd_embeddings",
        bool,
        False,
        "also merge vocabulary tables (token embeddings, LM head) through SVD instead of "
        "the mean of task vectors",
    )


ISO_C = register(
    MergeMethod(
        name="iso_c",
        title=_TITLE,
        paper=_AUTHORS,
        url=_URL,
        kernel=iso_c_kernel,
        params=(_alpha(), _svd_embeddings()),
        base="required",
        min_models=1,
    )
)

ISO_CTS = register(
    MergeMethod(
        name="iso_cts",
        title=_TITLE,
        paper=_AUTHORS,
        url=_URL,
        kernel=iso_cts_kernel,
        params=(
            _alpha(),
            Param(
                "common_space_fraction",
                float,
                0.8,
                "share of each matrix's rank given to the common subspace of the summed task "
                "vectors; the rest is split evenly among the tasks",
                low=0.0,
                high=1.0,
            ),
            _svd_embeddings(),
        ),
        base="required",
        min_models=1,
    )
)
