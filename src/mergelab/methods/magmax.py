"""MagMax: maximum-magnitude selection of task-vector entries.

Marczak, Twardowski, Trzciński, Cygert. "MagMax: Leveraging Model Merging for Seamless
Continual Learning". ECCV 2024. https://arxiv.org/abs/2407.06322

For every parameter entry, the merged task vector takes the entry (with its sign) of the task
vector whose magnitude is largest: the task that moved that weight the most wins it outright,
instead of being averaged away. The paper pairs this with sequential fine-tuning; the merge
itself is data-free and applies to any set of fine-tunes of one base.

Following the official code (github.com/danielm1405/magmax, `merge_max_abs`): every tensor
(matrices, biases, norms alike) is merged entry-wise; on a tie in magnitude the *later* model
in the list wins (the code updates with `>=`); the result is added to the base scaled by
`lambda`, which the code sets to 0.5 in all its merging scripts (our default too).
"""

from __future__ import annotations

import torch

from mergelab.methods._lowrank import stacked_task_vectors
from mergelab.methods.registry import Blockwise, MergeMethod, Param, TensorMerge, register


def max_magnitude(task_vectors: torch.Tensor) -> torch.Tensor:
    """Entry-wise pick of the largest-magnitude value along dim 0, sign included.

    Ties go to the highest index (the last model), as in the official code.
    """
    num_tasks = task_vectors.shape[0]
    # argmax returns the first maximum; search the flipped stack so the last one wins.
    last_first = torch.flip(task_vectors.abs(), dims=(0,)).argmax(dim=0, keepdim=True)
    winner = (num_tasks - 1) - last_first
    return torch.gather(task_vectors, 0, winner).squeeze(0)


def magmax_kernel(m: TensorMerge) -> torch.Tensor:
    """MagMax for one tensor: base + lambda * max-magnitude task vector."""
    base, task_vectors = stacked_task_vectors(m, "magmax")
    merged = max_magnitude(task_vectors)
    return base + float(m.params["lambda"]) * merged


MAGMAX = register(
    MergeMethod(
        name="magmax",
        title="MagMax: Leveraging Model Merging for Seamless Continual Learning",
        paper="Marczak, Twardowski, Trzciński, Cygert, ECCV 2024",
        url="https://arxiv.org/abs/2407.06322",
        kernel=magmax_kernel,
        blockwise=Blockwise.entrywise(magmax_kernel),
        params=(
            Param(
                "lambda",
                float,
                0.5,
                "scale of the merged task vector (0.5 in the paper's code)",
                low=0.0,
                high=10.0,
            ),
        ),
        base="required",
        min_models=1,
    )
)
