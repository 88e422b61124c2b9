"""LoRA math as pure torch functions: no files, no plans, no registry look-ups.

A LoRA adapter stores, for a weight W, two factors A (rank x fan_in) and B (fan_out x rank) and a
scale; the fine-tuned weight is ``W + scale * B @ A`` (Hu et al., 2021,
https://arxiv.org/abs/2106.09685). Three layouts share that formula:

- ``linear``: W is (out, in), or (out, in, kh, kw) for a convolution, whose A is
  (rank, in, kh, kw) and B (out, rank, 1, 1): the delta is ``B @ A`` with both flattened to
  matrices, reshaped to W's shape (what PEFT's Conv2d computes with a convolution);
- ``transposed``: W is stored (in, out): GPT-2's Conv1D (PEFT's ``fan_in_fan_out``) and
  embedding tables, whose A is (rank, num_embeddings) and B (dim, rank): the delta is
  ``(B @ A).T``.

Everything accumulates in float32 (float64 stays float64) and casts back at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Layout = Literal["linear", "transposed"]


def lora_scale(rank: int, alpha: float, use_rslora: bool = False) -> float:
    """PEFT's scaling of ``B @ A``: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rank-stabilised
    LoRA (Kalajdzievski, 2023, https://arxiv.org/abs/2312.03732)."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive; got {rank}")
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _work_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def delta_matrix(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * B @ A`` as a (fan_out, fan_in) matrix in float32 (conv factors flattened)."""
    work = _work_dtype(lora_A, lora_B)
    a = lora_A.flatten(1).to(work)
    b = lora_B.flatten(1).to(work)
    if b.shape[1] != a.shape[0]:
        raise ValueError(
            f"LoRA factors do not chain: B is {tuple(lora_B.shape)}, A is {tuple(lora_A.shape)}"
        )
    return (b @ a).mul_(scale)


def matrix_to_weight(
    matrix: torch.Tensor, weight_shape: tuple[int, ...], layout: Layout
) -> torch.Tensor:
    """A (fan_out, fan_in) delta in the stored weight's shape and orientation."""
    if layout == "transposed":
        return matrix.T.reshape(weight_shape)
    return matrix.reshape(weight_shape)


def weight_to_matrix(delta: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The stored-orientation delta of a weight as the (fan_out, fan_in) matrix B @ A factors."""
    if layout == "transposed":
        return delta.flatten(1).T
    return delta.flatten(1)


def lora_delta(
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    weight_shape: tuple[int, ...],
    layout: Layout = "linear",
) -> torch.Tensor:
    """The weight update ``scale * B @ A`` in the weight's shape and layout (float32)."""
    return matrix_to_weight(delta_matrix(lora_A, lora_B, scale), tuple(weight_shape), layout)


def fold(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    layout: Layout = "linear",
) -> torch.Tensor:
    """``weight + scale * B @ A`` in the weight's dtype (computed in float32)."""
    delta = lora_delta(lora_A, lora_B, scale, tuple(weight.shape), layout)
    return (weight.to(delta.dtype) + delta).to(weight.dtype)


def fold_rows(
    rows: torch.Tensor,
    row_start: int,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    layout: Layout = "linear",
) -> torch.Tensor:
    """Rows [row_start, row_start + len(rows)) of the folded weight, from those rows alone.

    Lets a blockwise merge read a large folded tensor block by block: only the matching rows of
    B (``linear``) or columns of A (``transposed``) take part.
    """
    stop = row_start + rows.shape[0]
    if layout == "transposed":
        part = lora_A.flatten(1)[:, row_start:stop]
        delta = delta_matrix(part, lora_B, scale).T
    else:
        delta = delta_matrix(lora_A, lora_B[row_start:stop], scale)
    delta = delta.reshape(rows.shape)
    return (rows.to(delta.dtype) + delta).to(rows.dtype)


# -- factorising a delta back into LoRA factors ---------------------------------------------------


@dataclass(frozen=True)
class Factors:
    """A rank-r factorisation ``B @ A`` of a (fan_out, fan_in) matrix, with the spectrum it came
    from. ``singular_values`` holds every value the SVD computed (not only the kept ones)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    singular_values: torch.Tensor

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]


def randomized_svd(
    matrix: torch.Tensor,
    rank: int,
    *,
    oversample: int = 8,
    power_iterations: int = 2,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD by random projection (Halko, Martinsson & Tropp, 2011,
    https://arxiv.org/abs/0909.4061): a Gaussian sketch of ``rank + oversample`` columns,
    `power_iterations` re-orthonormalised power steps, then an exact SVD of the small projection.

    Returns (U, S, Vh) with ``rank`` columns / values / rows (fewer when the matrix is smaller).
    The sketch draws from `generator`, so the result is reproducible from a seed.
    """
    rows, cols = matrix.shape
    width = min(rank + oversample, rows, cols)
    sketch = torch.randn(cols, width, generator=generator, dtype=matrix.dtype).to(matrix.device)
    basis, _ = torch.linalg.qr(matrix @ sketch)
    for _ in range(power_iterations):
        basis, _ = torch.linalg.qr(matrix.T @ basis)
        basis, _ = torch.linalg.qr(matrix @ basis)
    small_u, singular, vh = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    keep = min(rank, singular.shape[0])
    return (basis @ small_u)[:, :keep], singular[:keep], vh[:keep]


def factorize(
    matrix: torch.Tensor,
    rank: int,
    *,
    randomized: bool = False,
    generator: torch.Generator | None = None,
) -> Factors:
    """Best rank-`rank` factors of `matrix` (Eckart-Young): ``B = U_r sqrt(S_r)``,
    ``A = sqrt(S_r) Vh_r``, the singular values split evenly between the factors as
    mergekit-extract-lora does, so neither factor dwarfs the other.

    `rank` is capped at min(matrix.shape). With `randomized`, a randomised SVD (see
    `randomized_svd`) replaces the exact one; `singular_values` then holds only the kept values.
    Returned factors are float32 (float64 for a float64 matrix).
    """
    work = matrix.to(_work_dtype(matrix))
    rank = max(0, min(rank, *work.shape))
    if randomized and rank < min(work.shape):
        u, s, vh = randomized_svd(work, rank, generator=generator)
        spectrum = s
    else:
        u, spectrum, vh = torch.linalg.svd(work, full_matrices=False)
        u, s, vh = u[:, :rank], spectrum[:rank], vh[:rank]
    root = s.clamp_min(0).sqrt()
    return Factors(
        lora_A=(root[:, None] * vh).contiguous(),
        lora_B=(u * root[None, :]).contiguous(),
        singular_values=spectrum,
    )


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest rank whose singular values hold at least `energy` of the squared Frobenius norm
    (sum of squared singular values); at least 1, 0 only for a zero matrix."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"`energy` must be in (0, 1]; got {energy}")
    squared = singular_values.to(torch.float64).square()
    total = float(squared.sum())
    if total == 0.0:
        return 0
    cumulative = torch.cumsum(squared, 0) / total
    # A tolerance so that energy=1 does not ask for the round-off tail.
    reached = torch.nonzero(cumulative >= energy - 1e-12)
    return int(reached[0]) + 1 if len(reached) else int(singular_values.numel())


def relative_error(matrix: torch.Tensor, approximation: torch.Tensor) -> float:
    """``||matrix - approximation||_F / ||matrix||_F`` (0 for a zero matrix matched exactly)."""
    norm = float(torch.linalg.matrix_norm(matrix.to(torch.float64)))
    diff = float(torch.linalg.matrix_norm((matrix - approximation).to(torch.float64)))
    if norm == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / norm


def spectral_tail_error(singular_values: torch.Tensor, rank: int) -> float:
    """The relative Frobenius error of the best rank-`rank` approximation, from the spectrum:
    ``sqrt(sum_{i>=rank} s_i^2 / sum_i s_i^2)``."""
    squared = singular_values.to(torch.float64).square()
    total = float(squared.sum())
    return math.sqrt(float(squared[rank:].sum()) / total) if total else 0.0


# -- combining adapters ---------------------------------------------------------------------------


def concatenate(
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
    coefficients: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact concatenation: ``[B_1 ... B_n] @ [c_1 A_1; ...; c_n A_n] = sum_i c_i B_i A_i``.

    `coefficients` carry each adapter's merge weight times its scale; as in PEFT's ``cat``, they
    go into A, so the result has scale 1 (rank = alpha = sum of ranks). Factors keep their
    shapes beyond the rank axis (conv factors stay 4-D).
    """
    if not (len(lora_As) == len(lora_Bs) == len(coefficients)) or not lora_As:
        raise ValueError("concatenate needs as many A factors, B factors and coefficients, >= 1")
    work = _work_dtype(*lora_As, *lora_Bs)
    lora_A = torch.cat([a.to(work) * c for a, c in zip(lora_As, coefficients)], dim=0)
    lora_B = torch.cat([b.to(work) for b in lora_Bs], dim=1)
    return lora_A, lora_B


def factor_space_linear(
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
    coefficients: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``linear`` combination, reproduced for compatibility: A and B are averaged
    *separately*, ``A = sum_i sign(c_i) sqrt|c_i| A_i`` and ``B = sum_i sqrt|c_i| B_i``.

    Its product is not ``sum_i c_i B_i A_i``: it adds the cross terms
    ``sqrt|c_i c_j| B_i A_j`` (i != j). Needs equal ranks. Scale 1 (alpha = rank).
    """
    ranks = {a.shape[0] for a in lora_As}
    if len(ranks) != 1:
        raise ValueError(f"factor-space linear needs adapters of one rank; got {sorted(ranks)}")
    work = _work_dtype(*lora_As, *lora_Bs)
    lora_A = sum(
        a.to(work) * (math.copysign(math.sqrt(abs(c)), c)) for a, c in zip(lora_As, coefficients)
    )
    lora_B = sum(b.to(work) * math.sqrt(abs(c)) for b, c in zip(lora_Bs, coefficients))
    return lora_A, lora_B  # type: ignore[return-value]


@dataclass(frozen=True)
class SharedBasis:
    """KnOTS's alignment of n deltas (Stoica et al., ICLR 2025, https://arxiv.org/abs/2410.19735):
    one SVD of the column-concatenated deltas ``[D_1 ... D_n] = U S [V_1; ...; V_n]^T``, so that
    ``D_i = U S V_i^T``: every delta is expressed in the shared left basis ``U S``, and the
    per-task coefficients ``V_i^T`` (rank x fan_in) are what a merge method combines."""

    basis: torch.Tensor  # U S, (fan_out, k)
    coefficients: list[torch.Tensor]  # V_i^T, each (k, fan_in)


def shared_basis(deltas: list[torch.Tensor]) -> SharedBasis:
    """KnOTS step 1: the shared basis of (fan_out, fan_in) deltas, truncated to the numerical
    rank of their concatenation (at most the sum of the LoRA ranks for LoRA deltas)."""
    work = _work_dtype(*deltas)
    stacked = torch.cat([d.to(work) for d in deltas], dim=1)
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    tolerance = s.max() * max(stacked.shape) * torch.finfo(work).eps if s.numel() else 0.0
    keep = max(1, int((s > tolerance).sum()))
    u, s, vh = u[:, :keep], s[:keep], vh[:keep]
    fan_in = deltas[0].shape[1]
    coefficients = [vh[:, i * fan_in : (i + 1) * fan_in] for i in range(len(deltas))]
    return SharedBasis(basis=u * s[None, :], coefficients=coefficients)
