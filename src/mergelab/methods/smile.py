"""SMILE: a zero-shot sparse mixture of low-rank experts built from the task vectors.

Tang, Shen, Luo, Xie, Hu, Zhang, Du, Tao. "SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From
Pre-Trained Foundation Models". 2024. https://arxiv.org/abs/2408.10174

No weights are merged: every linear layer W_0 x + b_0 of the base becomes

    y = W_0 x + b_0 + sum_{i in top_k(x)} w_i(x) (U_i S_i V_i^T x + (b_i - b_0)),

where U_i S_i V_i^T is the rank-`k` truncated SVD of task i's weight task vector W_i - W_0 (its
low-rank expert) and the router needs no training: the logit of expert i is the norm of the
input's projection on the top `gate_k` right singular vectors of task i's task vector,
||V_i[:, :gate_k]^T x||, the weights w are the softmax of the logits over all experts,
restricted to the `top_k` largest and renormalised over them. An input that lies in the
subspace a task's fine-tuning moved is routed to that task's expert.

Following FusionBench's implementation (github.com/tanganke/fusion_bench,
`fusion_bench/models/smile_moe/linear_from_module.py`, config `smile_upscaling.yaml`): every
linear layer is upscaled (gate_k 1, k 128 and top_k 1 in its default config), tensors outside
linear layers keep the base's values, a layer whose task vectors are all zero stays the base
layer, a single expert is always chosen with weight 1, and the routing is per token.

In mergelab the output is the base checkpoint plus the experts in a side folder
(mergelab.upscale: `smile/experts.safetensors` and a manifest), which `mergelab.upscale.load`
and `mergelab eval` turn into a torch module (the base model with its linear layers wrapped).
Which tensors are linear layers is decided from the checkpoint alone: every 2-D `*.weight`
except embedding tables and LM heads (embedding-like names, `_lowrank.EMBEDDING_HINTS`), with
its `*.bias` when there is one; at load time those must be `torch.nn.Linear` modules (GPT-2's
Conv1D is refused). Choices of ours: `k` and `gate_k` larger than a matrix's rank are truncated to it (as
the reference's slicing does); `top_k` above the number of models is refused before merging.
A pointwise (1x1) convolution's `[out, in, 1, 1]` weight counts as a linear layer too (it is
one, applied at every pixel): its experts are those of the `[out, in]` matrix and each pixel is
routed as a token, so a convolutional network (the vision zoo's MobileNet) can be upscaled;
at load time such a weight must belong to a `torch.nn.Conv2d` with groups 1 and no padding (a
stride subsamples the pixels first, as the convolution does).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mergelab.methods._lowrank import EMBEDDING_HINTS, stacked_task_vectors, svd
from mergelab.methods.registry import (
    MergeMethod,
    Param,
    ParamValue,
    TensorMerge,
    Upscaled,
    Upscaling,
    register,
)


def is_linear_weight(name: str, shape: tuple[int, ...]) -> bool:
    """A tensor SMILE upscales: a linear map's `.weight`, 2-D (a linear layer's) or
    `[out, in, 1, 1]` (a pointwise convolution's), whose name is not an embedding's or LM
    head's (token, position or type tables of any shape)."""
    lowered = name.lower()
    pointwise = len(shape) == 4 and tuple(shape[2:]) == (1, 1)
    return (
        name.endswith(".weight")
        and (len(shape) == 2 or pointwise)
        and min(shape) > 0
        and not any(hint in lowered for hint in EMBEDDING_HINTS)
    )


def expert_ranks(shape: tuple[int, ...], k: int, gate_k: int) -> tuple[int, int]:
    """(k, gate_k) truncated to the rank the matrix of a weight of `shape` can have."""
    rank = min(shape[:2])
    return min(k, rank), min(gate_k, rank)


def pointwise_stride(layer: torch.nn.Module) -> int | None:
    """None for a linear layer; the stride of a pointwise convolution a linear-layer module
    can stand in for (groups 1, no padding). Raises CheckpointError for another convolution."""
    from mergelab.errors import CheckpointError

    if not isinstance(layer, torch.nn.Conv2d):
        return None
    if layer.groups != 1 or any(p != 0 for p in _pair(layer.padding)) or layer.kernel_size != (1, 1):
        raise CheckpointError(
            f"a {tuple(layer.kernel_size)} convolution with groups {layer.groups} and "
            f"padding {layer.padding} is no linear map of its pixels; only pointwise (1x1) "
            "convolutions with groups 1 and no padding are upscaled"
        )
    stride = _pair(layer.stride)
    if stride[0] != stride[1]:
        raise CheckpointError(f"a pointwise convolution with unequal strides {stride}")
    return int(stride[0])


def _pair(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def per_pixel(x: torch.Tensor, stride: int | None, linear) -> torch.Tensor:
    """`linear(x)` for a linear layer (stride None); for a pointwise convolution, `linear`
    applied to every pixel's channels of x [..., C, H, W] (subsampled by `stride`)."""
    if stride is None:
        return linear(x)
    if stride > 1:
        x = x[..., ::stride, ::stride]
    return linear(x.movedim(-3, -1)).movedim(-1, -3)


class RoutedLinear(torch.nn.Module):
    """A linear layer (or pointwise convolution) that an upscaled merge routes: it keeps the
    wrapped layer's weight and bias, and applies `routed(x)` (x [..., in]) to every token, or
    to every pixel's channels for a convolution (`per_pixel`). Subclasses define `routed` and
    the `extra_repr` fields after the sizes (`routing_repr`)."""

    def __init__(self, layer: torch.nn.Linear | torch.nn.Conv2d, num_experts: int):
        super().__init__()
        self.stride = pointwise_stride(layer)
        self.in_features, self.out_features = layer.weight.shape[1], layer.weight.shape[0]
        self.weight = layer.weight
        self.bias = layer.bias
        self.num_experts = int(num_experts)

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return per_pixel(x, self.stride, self.routed)

    def routing_repr(self) -> str:
        return ""

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, {self.routing_repr()}")  # fmt: skip


def smile_experts(
    task_vectors: torch.Tensor, k: int, gate_k: int, name: str = ""
) -> dict[str, torch.Tensor]:
    """SMILE's tensors for stacked weight task vectors (num_tasks, out, in):

    gate [num_tasks * gate_k, in]: each task's top right singular vectors, stacked;
    u [num_tasks, out, k] and svh [num_tasks, k, in]: each expert U_i and S_i V_i^T.
    """
    num_tasks, rows, cols = task_vectors.shape
    k, gate_k = expert_ranks((rows, cols), k, gate_k)
    u, s, vh = svd(task_vectors, name)
    return {
        "gate": vh[:, :gate_k, :].reshape(num_tasks * gate_k, cols).contiguous(),
        "u": u[:, :, :k].contiguous(),
        "svh": (s[:, :k, None] * vh[:, :k, :]).contiguous(),
    }


def smile_route(
    x: torch.Tensor, gate: torch.Tensor, num_experts: int, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [tokens, top_k], experts [tokens, top_k]) of inputs x [tokens, in]: softmax of
    the projection norms over all experts, the `top_k` largest, renormalised."""
    if num_experts == 1:
        ones = torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
        return ones, torch.zeros(x.shape[0], 1, dtype=torch.long, device=x.device)
    logits = (x @ gate.T).reshape(x.shape[0], num_experts, -1).norm(dim=2)
    weights, experts = torch.softmax(logits, dim=1).topk(top_k, dim=1)
    return weights / weights.sum(dim=1, keepdim=True), experts


def smile_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    experts: Mapping[str, torch.Tensor],
    top_k: int,
) -> torch.Tensor:
    """One SMILE linear layer on x [..., in]: the base layer plus the routed experts."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.nn.functional.linear(flat, weight, bias)
    u, svh = experts["u"], experts["svh"]
    num_experts = u.shape[0]
    weights, chosen = smile_route(flat, experts["gate"], num_experts, min(top_k, num_experts))
    bias_deltas = experts.get("bias")
    for e in range(num_experts):
        tokens, slot = torch.where(chosen == e)
        if tokens.numel() == 0:
            continue
        delta = (flat[tokens] @ svh[e].T) @ u[e].T
        if bias_deltas is not None:
            delta = delta + bias_deltas[e]
        out.index_add_(0, tokens, delta * weights[tokens, slot, None])
    return out.reshape(*x.shape[:-1], out.shape[-1])


def smile_shapes(
    name: str, shape: tuple[int, ...], num_models: int, params: Mapping[str, ParamValue]
) -> dict[str, tuple[int, ...]]:
    """The shapes of SMILE's extra tensors for one tensor ({} for tensors it leaves alone)."""
    if is_linear_weight(name, shape):
        rows, cols = shape[:2]
        k, gate_k = expert_ranks(shape, int(params["k"]), int(params["gate_k"]))
        return {"gate": (num_models * gate_k, cols), "u": (num_models, rows, k),
                "svh": (num_models, k, cols)}  # fmt: skip
    if name.endswith(".bias") and len(shape) == 1:
        return {"bias": (num_models, shape[0])}
    return {}


def smile_tensor(m: TensorMerge) -> Upscaled:
    """SMILE for one tensor: the base's values, plus the experts of a linear weight (or each
    task's bias delta for the bias of one). Task vectors that are all zero give zeros and
    `active` false: that layer stays the base's."""
    base, task_vectors = stacked_task_vectors(m, "smile")
    shapes = smile_shapes(m.name, tuple(base.shape), task_vectors.shape[0], m.params)
    if not shapes or not bool(task_vectors.any()):
        zeros = {key: base.new_zeros(shape) for key, shape in shapes.items()}
        return Upscaled(merged=base, extras=zeros, active=False)
    if "bias" in shapes:
        return Upscaled(merged=base, extras={"bias": task_vectors.contiguous()})
    matrices = task_vectors.reshape(task_vectors.shape[:3])  # a pointwise conv's [T, out, in]
    extras = smile_experts(matrices, int(m.params["k"]), int(m.params["gate_k"]), m.name)
    return Upscaled(merged=base, extras=extras)


def smile_kernel(m: TensorMerge) -> torch.Tensor:
    """SMILE's shared weights alone: the base model's."""
    base, _ = stacked_task_vectors(m, "smile")
    return base


class SmileLinear(RoutedLinear):
    """A base linear layer (or pointwise convolution) with SMILE's routed low-rank experts
    (see `smile_forward`).

    Holds the base layer's weight and bias and the experts' `gate`, `u`, `svh` (and `bias`
    deltas) as buffers; `top_k` experts per token (per pixel for a convolution)."""

    EXPERT_KEYS = ("gate", "u", "svh", "bias")

    def __init__(self, layer: torch.nn.Linear | torch.nn.Conv2d, experts: Mapping[str, torch.Tensor],
                 top_k: int):
        super().__init__(layer, experts["u"].shape[0])
        self.top_k = int(top_k)
        for key in self.EXPERT_KEYS:
            if key in experts:
                self.register_buffer(f"expert_{key}", experts[key].to(layer.weight.dtype))

    def experts(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, f"expert_{k}") for k in self.EXPERT_KEYS if hasattr(self, f"expert_{k}")}

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        return smile_forward(x, self.weight.flatten(1), self.bias, self.experts(), self.top_k)

    def routing_repr(self) -> str:
        return f"top_k={self.top_k}"


def smile_module(
    layer: torch.nn.Linear | torch.nn.Conv2d, extras: Mapping[str, torch.Tensor],
    params: Mapping[str, ParamValue],
) -> SmileLinear:
    return SmileLinear(layer, extras, int(params["top_k"]))


def smile_cost(
    shape: tuple[int, ...], extras: Mapping[str, tuple[int, ...]], params: Mapping[str, ParamValue]
) -> tuple[int, int]:
    """Multiply-adds per token of one SMILE layer (base + router + top_k experts) and of the
    base layer alone."""
    rows, cols = shape[:2]
    base = rows * cols
    if "u" not in extras:
        return base, base
    num_experts, _, k = extras["u"]
    top_k = min(int(params["top_k"]), num_experts)
    router = extras["gate"][0] * cols if num_experts > 1 else 0
    return base + router + top_k * k * (rows + cols), base


def _top_k_within_models(params: Mapping[str, ParamValue], num_models: int) -> str | None:
    top_k = params.get("top_k")
    if top_k is not None and int(top_k) > num_models:
        return f"`top_k` must be at most the number of models ({num_models}); got {top_k}"
    return None


SMILE = register(
    MergeMethod(
        name="smile",
        title="SMILE: Zero-Shot Sparse Mixture of Low-Rank Experts Construction From "
        "Pre-Trained Foundation Models",
        paper="Tang, Shen, Luo, Xie, Hu, Zhang, Du, Tao, 2024",
        url="https://arxiv.org/abs/2408.10174",
        kernel=smile_kernel,
        upscaling=Upscaling(
            kernel=smile_tensor,
            shapes=smile_shapes,
            wraps=(torch.nn.Linear, torch.nn.Conv2d),
            module=smile_module,
            cost=smile_cost,
            forward_params=("top_k",),
        ),
        params=(
            Param(
                "k",
                int,
                128,
                "rank of each task's expert (its task vector's top singular triplets; "
                "truncated to the matrix's rank)",
                low=1,
                high=65536,
            ),
            Param(
                "gate_k",
                int,
                1,
                "right singular vectors per task whose projection norm routes an input",
                low=1,
                high=65536,
            ),
            Param(
                "top_k",
                int,
                1,
                "experts each token uses (at most the number of models)",
                low=1,
                high=1024,
            ),
        ),
        base="required",
        min_models=1,
        check_sources=_top_k_within_models,
    )
)
