"""ExPO: model extrapolation past an aligned checkpoint, away from its weaker starting point.

Zheng, Wang, Ji, Huang, Peng. "Weak-to-Strong Extrapolation Expedites Alignment". 2024
(published at ACL 2025 as "Model Extrapolation Expedites Alignment").
https://arxiv.org/abs/2404.16792

An aligned model (e.g. after DPO/RLHF) sits between its SFT starting point and a better,
unreached optimum; ExPO continues along the update direction:

    theta = theta_model + alpha * (theta_model - theta_base)
          = theta_base + (1 + alpha) * (theta_model - theta_base),

where the base is the weaker model (the SFT checkpoint) and the single source is the stronger
one. alpha = 0 returns the model. The official code (github.com/chujiezheng/LLM-Extrapolation,
`code/extrapolate.py`) applies this to every parameter; its README recommends alpha 0.3 or 0.5
(our default: 0.3).
"""

from __future__ import annotations

import torch

from mergelab.methods._lowrank import stacked_task_vectors
from mergelab.methods.registry import Blockwise, MergeMethod, Param, TensorMerge, register


def extrapolate(model: torch.Tensor, base: torch.Tensor, alpha: float) -> torch.Tensor:
    """model + alpha * (model - base): alpha > 0 moves past the model, away from the base."""
    return model + alpha * (model - base)


def expo_kernel(m: TensorMerge) -> torch.Tensor:
    """ExPO for one tensor (exactly one source model; the base is the weaker checkpoint)."""
    base, _ = stacked_task_vectors(m, "expo")  # checks base presence and shapes
    return extrapolate(m.tensors[0], base, float(m.params["alpha"]))


EXPO = register(
    MergeMethod(
        name="expo",
        title="Weak-to-Strong Extrapolation Expedites Alignment",
        paper="Zheng, Wang, Ji, Huang, Peng, 2024 (ACL 2025)",
        url="https://arxiv.org/abs/2404.16792",
        kernel=expo_kernel,
        blockwise=Blockwise.entrywise(expo_kernel),
        params=(
            Param(
                "alpha",
                float,
                0.3,
                "extrapolation strength: 0 returns the model; the authors suggest 0.3 or 0.5",
                low=0.0,
                high=10.0,
            ),
        ),
        base="required",
        min_models=1,
        max_models=1,
    )
)
