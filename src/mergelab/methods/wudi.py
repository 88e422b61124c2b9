"""WUDI merging: the merged task vector that least disturbs each task on its own inputs.

Cheng, Xiong, Wei, Zhu, Yuan. "Whoever Started the Interference Should End It:
Guiding Data-Free Model Merging via Task Vectors". ICML 2025. https://arxiv.org/abs/2503.08099

For a linear layer y = W x, merging W_0 + tau instead of task i's W_0 + tau_i changes task i's
output by (tau - tau_i) x. The paper shows that a task vector's rows span (approximately) the
subspace of the inputs that task's fine-tuning saw, so the rows of tau_i stand in for task i's
inputs, and the merged task vector minimises the interference measured on them:

    L(tau) = sum_i ||(tau - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2.

Following the implementation in FusionBench (github.com/tanganke/fusion_bench,
`fusion_bench/method/wudi/wudi.py`): 2-D weights are optimised with Adam (learning rate 1e-5,
no weight decay; 300 iterations by the function's default, 400 in FusionBench's CLIP config)
starting from the sum of the task vectors; every other tensor
(biases, norms) takes the mean of the task vectors; the result is added to the base unscaled.

Choices of ours, not in the paper:
- the gradient is computed in closed form, 2 (tau M - N) with M = sum_i w_i tau_i^T tau_i
  ([in, in]) and N = sum_i w_i tau_i tau_i^T tau_i, w_i = 1 / ||tau_i||^2, so each iteration is
  one matrix product and needs no autograd; Adam's update is torch.optim.Adam's;
- `closed_form: true` returns the exact minimiser tau = N M^+ (the pseudo-inverse over M's
  range, so no component outside the task vectors' row spaces is invented); the paper's
  300 Adam steps stop well short of it and act as a pull towards the sum;
- a task vector of all zeros has no inputs to protect: it is left out of the loss;
- vocabulary tables (token embeddings, LM heads; see `_lowrank.is_vocabulary_table`) are
  looked up, not multiplied with an input in the task's subspace: they take the mean unless
  `solve_embeddings` is true (the official code optimises every 2-D tensor).
Orientation: weights are [out, in] as torch.nn.Linear stores them; GPT-2's Conv1D stores
[in, out], for which the loss protects the output space instead.
Memory: M is [in, in] in float32, beside the task vectors and Adam's two moments; a solved
matrix is merged whole, the averaged tensors (vocabulary tables above all) block by block.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mergelab.methods._lowrank import stacked_task_vectors, uses_spectral_path
from mergelab.methods.registry import (
    Blockwise,
    MergeMethod,
    Param,
    ParamValue,
    TensorMerge,
    register,
)

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def interference_terms(task_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, N) of the WUDI loss for stacked task matrices (num_tasks, out, in).

    L(tau) = trace(tau M tau^T) - 2 trace(tau N^T) + const, so its gradient is 2 (tau M - N).
    Zero task vectors carry weight 0.
    """
    norms = task_vectors.square().sum(dim=(1, 2))
    weights = torch.where(norms > 0, 1.0 / norms.clamp_min(1e-30), torch.zeros_like(norms))
    grams = task_vectors.transpose(1, 2) @ task_vectors  # (T, in, in): tau_i^T tau_i
    m = (weights[:, None, None] * grams).sum(dim=0)
    n = (weights[:, None, None] * (task_vectors @ grams)).sum(dim=0)
    return m, n


def wudi_loss(merged: torch.Tensor, task_vectors: torch.Tensor) -> torch.Tensor:
    """The paper's loss, sum_i ||(tau - tau_i) tau_i^T||^2 / ||tau_i||^2 (zero tasks skipped)."""
    total = merged.new_zeros(())
    for tau_i in task_vectors:
        norm = tau_i.square().sum()
        if norm > 0:
            total = total + ((merged - tau_i) @ tau_i.T).square().sum() / norm
    return total


def wudi_adam(
    task_vectors: torch.Tensor, iterations: int = 300, learning_rate: float = 1e-5
) -> torch.Tensor:
    """The paper's solver: Adam on the WUDI loss from the sum of the task vectors."""
    m, n = interference_terms(task_vectors)
    merged = task_vectors.sum(dim=0)
    first = torch.zeros_like(merged)
    second = torch.zeros_like(merged)
    beta1, beta2 = ADAM_BETAS
    for step in range(1, iterations + 1):
        grad = 2.0 * (merged @ m - n)
        first.mul_(beta1).add_(grad, alpha=1.0 - beta1)
        second.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        corrected = first / (1.0 - beta1**step)
        denom = (second / (1.0 - beta2**step)).sqrt_().add_(ADAM_EPS)
        merged.addcdiv_(corrected, denom, value=-learning_rate)
    return merged


def wudi_closed_form(task_vectors: torch.Tensor) -> torch.Tensor:
    """The exact minimiser N M^+ of the WUDI loss (pseudo-inverse over M's range, float64)."""
    m, n = interference_terms(task_vectors.double())
    eigenvalues, eigenvectors = torch.linalg.eigh(m)
    cutoff = eigenvalues.abs().max() * m.shape[0] * torch.finfo(m.dtype).eps
    inverse = torch.where(
        eigenvalues > cutoff, 1.0 / eigenvalues.clamp_min(1e-300), torch.zeros_like(eigenvalues)
    )
    pinv = (eigenvectors * inverse) @ eigenvectors.T
    return (n @ pinv).to(task_vectors.dtype)


def averaged(name: str, shape: tuple[int, ...], params: Mapping[str, ParamValue]) -> bool:
    """Whether WUDI takes the mean of this tensor's task vectors (it solves the others)."""
    return not uses_spectral_path(name, torch.Size(shape), bool(params["solve_embeddings"]))


def averaged_kernel(m: TensorMerge) -> torch.Tensor:
    """base + lambda * mean of the task vectors: WUDI's rule for the tensors it does not
    solve (applied to blocks of rows, whose shape no longer says which tensor they are from)."""
    base, task_vectors = stacked_task_vectors(m, "wudi")
    return base + float(m.params["lambda"]) * task_vectors.mean(dim=0)


def wudi_kernel(m: TensorMerge) -> torch.Tensor:
    """WUDI merging for one tensor: base + lambda * (solved task vector, or the mean)."""
    base, task_vectors = stacked_task_vectors(m, "wudi")
    if not averaged(m.name, tuple(base.shape), m.params):
        if m.params["closed_form"]:
            merged = wudi_closed_form(task_vectors)
        else:
            merged = wudi_adam(
                task_vectors, int(m.params["iterations"]), float(m.params["learning_rate"])
            )
    else:
        merged = task_vectors.mean(dim=0)
    return base + float(m.params["lambda"]) * merged


WUDI = register(
    MergeMethod(
        name="wudi",
        title="Whoever Started the Interference Should End It: Guiding Data-Free Model "
        "Merging via Task Vectors",
        paper="Cheng, Xiong, Wei, Zhu, Yuan, ICML 2025",
        url="https://arxiv.org/abs/2503.08099",
        kernel=wudi_kernel,
        # The averaged tensors (vocabulary tables above all) stream block by block.
        blockwise=Blockwise.entrywise(averaged_kernel, applies=averaged),
        params=(
            Param(
                "lambda",
                float,
                1.0,
                "scale of the solved task vector (1.0 in the reference code)",
                low=0.0,
                high=10.0,
            ),
            Param(
                "iterations",
                int,
                300,
                "Adam steps per weight matrix (300; FusionBench's CLIP config uses 400)",
                low=0,
                high=100_000,
            ),
            Param(
                "learning_rate",
                float,
                1e-5,
                "Adam's learning rate (1e-5 in the reference code)",
                low=0.0,
                high=1.0,
            ),
            Param(
                "closed_form",
                bool,
                False,
                "solve the loss exactly (N M^+) instead of the paper's Adam steps",
            ),
            Param(
                "solve_embeddings",
                bool,
                False,
                "also solve vocabulary tables (token embeddings, LM head) instead of taking "
                "the mean of their task vectors",
            ),
        ),
        base="required",
        min_models=1,
    )
)
