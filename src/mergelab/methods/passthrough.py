"""Passthrough: copy one model's tensor, optionally scaled (mergekit 0.1.5's `passthrough`).

Used for frankenmerges: each output slice comes from exactly one source, and `scale` can damp a
tensor (e.g. `scale: 0` on an o_proj to turn a duplicated layer into an identity block).
"""

from __future__ import annotations

import torch

from mergelab.methods.registry import Blockwise, MergeMethod, Param, TensorMerge, register


def _passthrough_kernel(m: TensorMerge) -> torch.Tensor:
    (tensor,) = m.tensors
    scale = float(m.model_params[0]["scale"])
    # mergekit's default is "no scale"; 1.0 returns the input itself, with no copy.
    return tensor if scale == 1.0 else tensor * scale


register(
    MergeMethod(
        name="passthrough",
        mergekit=True,
        title="Passthrough",
        paper=(
            "Layer stacking as in SOLAR 10.7B: Scaling Large Language Models with Simple yet "
            "Effective Depth Up-Scaling (Kim et al., 2023); copies tensors, used with `slices`"
        ),
        url="https://arxiv.org/abs/2312.15166",
        kernel=_passthrough_kernel,
        blockwise=Blockwise.entrywise(_passthrough_kernel),
        params=(
            Param(
                "scale",
                float,
                1.0,
                "multiply the tensor by this factor (1 copies it unchanged)",
                per_model=True,
            ),
        ),
        base="none",
        min_models=1,
        max_models=1,
    )
)
