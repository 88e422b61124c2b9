"""PCB-merging: balancing the competition between parameters of several task vectors.

Du, Lee, Li, Jiang, Guo, Yu, Liu, Goh, Tang, He, Zhang. "Parameter Competition Balancing for
Model Merging". NeurIPS 2024. https://arxiv.org/abs/2410.02396

Each entry of each task vector gets a balanced score from two factors:

- intra-balancing: how large the entry is within its own task vector,
  exp(num_tasks * minmax(|tau_i|)^2) (the number of tasks acts as the temperature);
- inter-balancing: how much it agrees with the other tasks, tanh(tau_i * sum_j tau_j).

Per task, entries below the top `pcb_ratio` fraction of scores are dropped and the rest are
min-max rescaled to [0, 1]; the merged task vector is the score-weighted mean of the task
vectors, sum_i w_i tau_i / sum_i w_i, added to the base scaled by `lambda`.

This follows the official code (github.com/duguodong7/pcb-merging, `pcb-merging.py`), which
differs from the paper's text in three places: the intra factor squares the *normalised
magnitude* and takes an unnormalised exponential (the softmax denominator is a per-task
constant, which the later min-max rescaling cancels); the inter factor is tanh of the product
with the sum of all task vectors rather than a softmax over pairs; and magnitudes are first
clipped to their [clip_ratio, 1 - clip_ratio] quantiles per task (1e-4 in the code).
`pcb_ratio` is, as in the code, the fraction *kept* (0.1 by default; the scripts use 0.05-0.2),
and even at 1.0 the lowest-scoring entry of each task gets weight 0 (min-max rescaling).

Choices of ours, not in the paper:
- the official code flattens the whole model into one vector per task; here quantiles,
  normalisation and dropping are per tensor, as mergekit does for TIES;
- the exponent is shifted by -num_tasks (exp(n * (x^2 - 1))) so it cannot overflow for many
  tasks; min-max rescaling makes the result identical;
- the upper clipping index is ceil(d * (1 - clip_ratio)) - 1; the code's int(d * (1 - r) - 1)
  clips the largest entry even when d * r < 1, which per tensor would collapse small tensors;
- a task whose scores are all equal (a constant or all-zero task vector, a one-element
  tensor) has no ranking: its entries keep weight 1 if that score is positive, else 0
  (the code would divide 0 by 0).
"""

from __future__ import annotations

import math

import torch

from mergelab.methods._lowrank import stacked_task_vectors
from mergelab.methods.registry import MergeMethod, Param, TensorMerge, register


def _row_kth(values: torch.Tensor, index: int) -> torch.Tensor:
    """Per-row value at 0-based position `index` of the ascending sort, shape (rows, 1)."""
    return torch.kthvalue(values, index + 1, dim=1, keepdim=True).values


def clip_to_quantiles(magnitude: torch.Tensor, clip_ratio: float) -> torch.Tensor:
    """Clamp each row to its values at sorted positions floor(d*r) and ceil(d*(1-r)) - 1."""
    if clip_ratio <= 0.0:
        return magnitude
    d = magnitude.shape[1]
    low = _row_kth(magnitude, min(d - 1, math.floor(d * clip_ratio)))
    high = _row_kth(magnitude, max(0, math.ceil(d * (1.0 - clip_ratio)) - 1))
    return torch.minimum(torch.maximum(magnitude, low), high)


def minmax_rows(values: torch.Tensor) -> torch.Tensor:
    """Rescale each row to [0, 1]; constant rows become 0."""
    low = values.min(dim=1, keepdim=True).values
    span = values.max(dim=1, keepdim=True).values - low
    return torch.where(span > 0, (values - low) / span.clamp_min(1e-30), torch.zeros_like(values))


def balanced_scores(task_vectors: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Intra x inter balancing scores, both (num_tasks, d).

    magnitude: |task_vectors| after quantile clipping (the intra factor uses it, the inter
    factor uses the raw values, as in the official code).
    """
    num_tasks = task_vectors.shape[0]
    intra = torch.exp(num_tasks * (minmax_rows(magnitude).square() - 1.0))
    inter = torch.tanh(task_vectors * task_vectors.sum(dim=0, keepdim=True))
    return intra * inter


def drop_and_rescale(scores: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Per row: scores below the value at sorted position int(d * (1 - keep_ratio)) are
    dropped, the rest min-max rescaled to [0, 1] (so the threshold itself maps to 0)."""
    d = scores.shape[1]
    if keep_ratio <= 0.0:
        return torch.zeros_like(scores)
    threshold = _row_kth(scores, min(d - 1, int(d * (1.0 - keep_ratio))))
    top = scores.max(dim=1, keepdim=True).values
    span = top - threshold
    rescaled = (scores.clamp_min(threshold) - threshold) / span.clamp_min(1e-30)
    # A row with nothing above its threshold has no ranking to rescale (see module docstring).
    flat_row = ((scores >= threshold) & (scores > 0)).to(scores.dtype)
    return torch.where(span > 0, rescaled, flat_row)


def pcb_merge(
    task_vectors: torch.Tensor, keep_ratio: float = 0.1, clip_ratio: float = 1e-4
) -> torch.Tensor:
    """PCB-merged task vector of stacked task vectors (num_tasks, *shape), unscaled."""
    num_tasks = task_vectors.shape[0]
    flat = task_vectors.reshape(num_tasks, -1)
    magnitude = clip_to_quantiles(flat.abs(), clip_ratio)
    clipped = torch.sign(flat) * magnitude
    weights = drop_and_rescale(balanced_scores(flat, magnitude), keep_ratio)
    merged = (clipped * weights).sum(dim=0) / weights.sum(dim=0).clamp_min(1e-12)
    return merged.reshape(task_vectors.shape[1:])


def pcb_kernel(m: TensorMerge) -> torch.Tensor:
    """PCB-merging for one tensor: base + lambda * balanced weighted mean of task vectors."""
    base, task_vectors = stacked_task_vectors(m, "pcb")
    merged = pcb_merge(task_vectors, float(m.params["pcb_ratio"]), float(m.params["clip_ratio"]))
    return base + float(m.params["lambda"]) * merged


PCB = register(
    MergeMethod(
        name="pcb",
        title="Parameter Competition Balancing for Model Merging",
        paper="Du, Lee, Li, Jiang, Guo, Yu, Liu, Goh, Tang, He, Zhang, NeurIPS 2024",
        url="https://arxiv.org/abs/2410.02396",
        kernel=pcb_kernel,
        params=(
            Param(
                "lambda",
                float,
                1.0,
                "scale of the merged task vector (the paper searches about 0.8-2.2)",
                low=0.0,
                high=10.0,
            ),
            Param(
                "pcb_ratio",
                float,
                0.1,
                "fraction of each task vector's entries kept, by balanced score "
                "(the rest are dropped)",
                low=0.0,
                high=1.0,
            ),
            Param(
                "clip_ratio",
                float,
                1e-4,
                "magnitude outliers clipped at these per-task quantiles before scoring",
                low=0.0,
                high=0.25,
            ),
        ),
        base="required",
        min_models=1,
    )
)
