"""Shared pieces of the task-vector methods in this folder (TSV, ISO, MagMax, PCB).

Small pure helpers: stacking task vectors, deciding which tensors get the spectral (SVD)
treatment, a robust SVD, and the orthogonal Procrustes projection used by TSV-M and ISO-CTS.
"""

from __future__ import annotations

import torch

from mergelab.errors import MergeError
from mergelab.methods.registry import TensorMerge

# Name fragments of vocabulary / position tables. Their rows are independent lookups rather
# than a linear map with low-rank structure, and a full SVD of a 150k-row table is costly, so
# the spectral methods treat them like non-matrix parameters unless asked otherwise.
EMBEDDING_HINTS = ("embed", "lm_head", "wte", "wpe", "word_embeddings", "shared.weight")
# The official TSV / ISO code keeps CLIP's `text_projection` out of the SVD path.
_PAPER_EXCLUDED = ("text_projection",)


def stacked_task_vectors(m: TensorMerge, method: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (base, task_vectors) where task_vectors[i] = tensors[i] - base, stacked on dim 0.

    Raises MergeError (naming the tensor) when the base is missing or a shape differs; the
    planner should have caught both, so this only guards against engine bugs.
    """
    if m.base is None:
        raise MergeError(f"method `{method}` needs a base model; tensor {m.name!r} has none")
    if not m.tensors:
        raise MergeError(f"method `{method}` got no source tensors for {m.name!r}")
    for i, t in enumerate(m.tensors):
        if t.shape != m.base.shape:
            raise MergeError(
                f"tensor {m.name!r}: source {i} has shape {tuple(t.shape)}, "
                f"base has {tuple(m.base.shape)}"
            )
    return m.base, torch.stack([t - m.base for t in m.tensors])


def is_vocabulary_table(name: str, shape: torch.Size) -> bool:
    """True for token/position embedding tables and LM heads: an embedding-like name and more
    rows than columns (so a ViT's 197x768 positional embedding still counts as a matrix, as
    in the papers' code)."""
    lowered = name.lower()
    return (
        len(shape) == 2
        and shape[0] > shape[1]
        and any(hint in lowered for hint in EMBEDDING_HINTS)
    )


def uses_spectral_path(name: str, shape: torch.Size, svd_embeddings: bool) -> bool:
    """Whether a tensor is merged through its SVD (2-D weights) or falls back to the mean."""
    if len(shape) != 2 or min(shape) == 0:
        return False
    if any(part in name for part in _PAPER_EXCLUDED):
        return False
    return svd_embeddings or not is_vocabulary_table(name, shape)


def svd(matrix: torch.Tensor, name: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD (batched over leading dims) in the input's precision, retried in float64.

    cuSOLVER occasionally fails to converge on ill-conditioned float32 input; float64 is slower
    but robust. The factors come back in the input's dtype. Raises MergeError (naming `name`,
    the tensor) if even float64 fails, e.g. on non-finite input.
    """
    try:
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        if torch.isfinite(s).all():
            return u, s, vh
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        pass
    try:
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    except RuntimeError as exc:
        raise MergeError(
            f"tensor {name!r}: SVD did not converge (non-finite or badly scaled values?)"
        ) from exc
    return u.to(matrix.dtype), s.to(matrix.dtype), vh.to(matrix.dtype)


def nearest_orthonormal(matrix: torch.Tensor, name: str = "") -> torch.Tensor:
    """The orthogonal Procrustes solution: the (semi-)orthogonal matrix closest to `matrix` in
    Frobenius norm, P @ Q^T for matrix = P diag(s) Q^T. Columns that were already orthonormal
    are returned unchanged."""
    p, _, qh = svd(matrix, name)
    return p @ qh
