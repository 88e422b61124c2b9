"""LiNeS: layer-increasing network scaling of the merged task vector.

Wang, Dimitriadis, Favero, Ortiz-Jimenez, Fleuret, Frossard. "LiNeS: Post-training Layer
Scaling Prevents Forgetting and Enhances Model Merging". ICLR 2025.
https://arxiv.org/abs/2410.17146

Shallow layers hold general features that every task shares; deep layers hold task-specific
ones. LiNeS therefore scales the merged task vector by a coefficient that grows linearly with
depth: for the block at position l of L (0-based),

    lambda(l) = alpha + beta * l / (L - 1),

so the first block keeps the smallest share of the task vectors (alpha) and the last the largest
(alpha + beta); tensors outside the blocks (embeddings, final norm, projection) take alpha.

Following the official code (github.com/wang-kee/LiNeS, `LiNeS_scaling` in `src/eval/eval.py`)
for multi-task merging with task arithmetic: the merged task vector is the *sum* of the task
vectors and alpha = (||sum||_1 / ||merged||_1) / num_tasks, which for the sum is exactly
1 / num_tasks. Our `alpha` parameter is that coefficient in units of 1 / num_tasks (default 1:
the paper's value; 0 keeps no task vector in the first layer, as the paper's single-task
sweeps do); beta is absolute and chosen on validation data in the paper (over 0.1-1.0); 0.5 is
our default, not the paper's.

The depth of a tensor is the plan's layer position `t` (`TensorMerge.depth`: `index / (L - 1)`
from the tensor's name, 0 outside the layer stack), the same position at which mergekit-style
per-layer gradients resolve. LiNeS with task arithmetic therefore equals `task_arithmetic` with
`lambda: [alpha, alpha + beta]`; the declaration spares computing alpha by hand and records the
paper. Choices of ours: a one-layer model's block takes alpha + beta (mergekit's `t = 1` for a
single layer); each entry depends only on the same entries of the inputs, so large tensors merge
blockwise.
"""

from __future__ import annotations

import torch

from mergelab.methods._lowrank import stacked_task_vectors
from mergelab.methods.registry import Blockwise, MergeMethod, Param, TensorMerge, register


def depth_scale(depth: float, alpha: float, beta: float) -> float:
    """The LiNeS coefficient at layer position `depth` in [0, 1]: alpha + beta * depth."""
    return alpha + beta * depth


def lines_kernel(m: TensorMerge) -> torch.Tensor:
    """LiNeS for one tensor: base + (alpha / T + beta * depth) * sum of the T task vectors."""
    base, task_vectors = stacked_task_vectors(m, "lines")
    alpha = float(m.params["alpha"]) / task_vectors.shape[0]
    scale = depth_scale(m.depth, alpha, float(m.params["beta"]))
    return base + scale * task_vectors.sum(dim=0)


LINES = register(
    MergeMethod(
        name="lines",
        title="LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging",
        paper="Wang, Dimitriadis, Favero, Ortiz-Jimenez, Fleuret, Frossard, ICLR 2025",
        url="https://arxiv.org/abs/2410.17146",
        kernel=lines_kernel,
        blockwise=Blockwise.entrywise(lines_kernel),
        params=(
            Param(
                "alpha",
                float,
                1.0,
                "scale of the summed task vectors in the first layer and outside the layer "
                "stack, in units of 1/num_models (1: the paper's 1/num_models)",
                low=0.0,
                high=10.0,
            ),
            Param(
                "beta",
                float,
                0.5,
                "extra scale gained from the first to the last layer (the paper tunes it on "
                "validation over 0.1-1.0)",
                low=0.0,
                high=10.0,
            ),
        ),
        base="required",
        min_models=1,
    )
)
