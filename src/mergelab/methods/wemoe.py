"""WEMoE: the MLPs of a transformer become a weight-ensembling mixture of the task vectors.

Tang, Shen, Luo, Yin, Zhang, Tao. "Merging Multi-Task Models via Weight-Ensembling Mixture of
Experts". ICML 2024. https://arxiv.org/abs/2402.00433

Every tensor outside the upscaled layers is the task-arithmetic merge theta_0 + lambda sum_i
tau_i. Each upscaled linear layer (by default those of the MLPs) keeps the task vectors
tau_i = W_i - W_0 of its weight (and bias) and gains a small router r: its weight for an input
token x is

    W(x) = W_0 + sum_i r_i(x) tau_i,   r(x) = W_2 relu(W_1 x + b_1) + b_2   (or W_2 x + b_2),

trained on unlabelled inputs of every task by minimising the Shannon entropy of each task
head's predictions (as AdaMerging does; mergelab.plan.adamerging.prediction_entropy), all
merged weights fixed. In mergelab the shared weights written to the checkpoint are the task
arithmetic merge everywhere (W_0 + lambda sum_i tau_i for the upscaled layers too), so the
layer computes

    y = W_ta x + b_ta + sum_i (r_i(x) - lambda) (tau_i x + beta_i)

with beta_i the bias task vectors: the same function, and a folder read without its
`upscaled/` extras is the task-arithmetic model.

Following FusionBench (github.com/tanganke/fusion_bench, `fusion_bench/models/we_moe.py`,
`method/we_moe/clip_we_moe.py`): the routers' last bias starts at `lambda` (the task-arithmetic
scale: FusionBench's init_lambda), their first layer from N(0, 0.01^2) with a zero bias, the routing
weights are not normalised (no softmax: any real coefficient per task vector), tensors outside
the MLPs are the task-arithmetic merge with the same `lambda`, and the training is Adam on the
sum over tasks of the mean entropy of a batch of each.

Choices of ours, and why:
- The routers' last weight starts at zero (FusionBench: N(0, 0.01^2)), so that an untrained
  WEMoE is exactly the task-arithmetic merge (r_i = lambda for every input: the routed term is
  exactly zero). Its gradient is not zero (the hidden features are), so training starts at once.
- Routing per token (FusionBench averages the router's outputs over a sequence's tokens and
  merges the weights once per sequence). A linear layer does not see the attention mask, so a
  mean over the sequence would average padding tokens in; and in the form above, routing per
  token costs no more than per sequence: (1 + T) times the layer's multiply-adds per token
  either way (FusionBench's merge-per-sequence costs T x out x in per sequence instead, cheaper
  for sequences longer than T tokens).
- One router per upscaled linear layer, on that layer's own input (FusionBench: one per MLP
  block on the block's input, shared by its two linear layers). The upscaled format and its
  loader stay per linear layer, as SMILE's; the router of the MLP's second layer sees the
  intermediate activations (wider: `router_hidden` x intermediate size more parameters).
- 100 router steps at lr 1e-3 by default (FusionBench's CLIP config: 1,000 steps at 1e-4,
  batch 16): a tenth of the steps at ten times the rate, so a benchmark point takes minutes on
  a CPU. On the vision zoo's joint recipe neither setting helps: the entropy objective drives
  the routers below the untrained (task-arithmetic) model (docs/benchmarks.md).
- Which layers are MLP layers is decided from the names alone (`is_mlp_linear`); `all_linear`
  upscales every linear layer (SMILE's choice) instead.
- A pointwise (1x1) convolution counts as a linear layer (as for SMILE: `[out, in, 1, 1]`
  weights, each pixel routed as a token), so `all_linear` also upscales a convolutional
  network's pointwise convolutions (the vision zoo's MobileNet has no MLP).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch

from mergelab.methods._lowrank import stacked_task_vectors
from mergelab.methods.registry import (
    MergeMethod,
    Param,
    ParamValue,
    TensorMerge,
    Upscaled,
    Upscaling,
    get_method,
    register,
)
from mergelab.methods.smile import RoutedLinear, is_linear_weight

# Names of the linear layers of a transformer's MLP (feed-forward) block, across families:
# CLIP/ViT-open_clip/Llama/Qwen `mlp.*`, BERT/ViT (HF) `intermediate.dense` and the block's
# `output.dense` (not `attention.output.dense`), DistilBERT `ffn.lin*`, T5 `DenseReluDense`,
# Mixtral-style `feed_forward`.
MLP_HINTS = (".mlp.", "intermediate.dense", ".ffn.", "densereludense", ".feed_forward.")
ROUTER_KEYS = ("router_in", "router_in_bias", "router_out", "router_out_bias")
ROUTER_INIT_STD = 0.01  # FusionBench's N(0, 0.01^2) for the routers' hidden layer


def is_mlp_linear(name: str, shape: tuple[int, ...]) -> bool:
    """A linear layer's weight inside a transformer's MLP block, from its name alone (see
    `MLP_HINTS`; BERT's block output `layer.N.output.dense`, not the attention's)."""
    if not is_linear_weight(name, shape):
        return False
    lowered = f".{name.lower()}"  # so that a leading `mlp.` matches `.mlp.`
    if any(hint in lowered for hint in MLP_HINTS):
        return True
    return lowered.endswith("output.dense.weight") and "attention" not in lowered


def upscales(name: str, shape: tuple[int, ...], params: Mapping[str, ParamValue]) -> bool:
    """Whether WEMoE upscales the weight `name` (MLP linear layers, or every linear layer with
    `all_linear`)."""
    return (is_linear_weight if params.get("all_linear") else is_mlp_linear)(name, shape)


def router_shapes(cols: int, num_tasks: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """The router's tensors for inputs of width `cols`: a two-layer MLP of width `hidden`
    (`hidden` 0: one linear layer, `router_in` and its bias then have no rows)."""
    width = hidden if hidden > 0 else cols
    return {"router_in": (hidden, cols), "router_in_bias": (hidden,),
            "router_out": (num_tasks, width), "router_out_bias": (num_tasks,)}  # fmt: skip


def wemoe_shapes(
    name: str, shape: tuple[int, ...], num_models: int, params: Mapping[str, ParamValue]
) -> dict[str, tuple[int, ...]]:
    """The shapes of WEMoE's extra tensors for one tensor ({} for tensors it merges only)."""
    if upscales(name, shape, params):
        rows, cols = shape[:2]
        return {"task_vectors": (num_models, rows, cols),
                **router_shapes(cols, num_models, int(params["router_hidden"]))}  # fmt: skip
    if name.endswith(".bias") and len(shape) == 1:
        return {"bias": (num_models, shape[0])}
    return {}


def initial_router(
    cols: int, num_tasks: int, hidden: int, scale: float, generator: torch.Generator | None,
    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:  # fmt: skip
    """A router whose output is `scale` for every input and task: the hidden layer from
    N(0, 0.01^2) drawn from `generator`, a zero last weight and `scale` as the last bias
    (shapes as `router_shapes`), in `dtype` on `device`."""
    shapes = router_shapes(cols, num_tasks, hidden)
    # Drawn on the generator's device (the engine's is on the merge device), so a CPU merge and
    # a CUDA merge draw from different streams: the seed reproduces a merge on one device.
    where = generator.device if generator is not None else "cpu"
    first = torch.randn(shapes["router_in"], generator=generator, dtype=torch.float32, device=where)
    return {
        "router_in": (ROUTER_INIT_STD * first).to(device, dtype),
        "router_in_bias": torch.zeros(shapes["router_in_bias"], dtype=dtype, device=device),
        "router_out": torch.zeros(shapes["router_out"], dtype=dtype, device=device),
        "router_out_bias": torch.full(shapes["router_out_bias"], scale, dtype=dtype, device=device),
    }


_TA_PARAMS = {"lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False}


def task_arithmetic_merge(m: TensorMerge) -> torch.Tensor:
    """theta_0 + lambda sum_i tau_i through the `task_arithmetic` kernel itself (so WEMoE's shared
    weights are that method's, bit for bit)."""
    job = dataclasses.replace(
        m, params={**_TA_PARAMS, "lambda": float(m.params["lambda"])},
        model_params=[{"weight": 1.0, "density": 1.0} for _ in m.tensors], writable=False,
    )  # fmt: skip
    return get_method("task_arithmetic").kernel(job)


def wemoe_kernel(m: TensorMerge) -> torch.Tensor:
    """WEMoE's shared weights: the task-arithmetic merge."""
    return task_arithmetic_merge(m)


def wemoe_tensor(m: TensorMerge) -> Upscaled:
    """WEMoE for one tensor: the task-arithmetic merge, plus, for an upscaled weight, its task
    vectors and an initial router (`initial_router`, from the tensor's generator), or each task's
    bias vector for the bias of one. Task vectors all zero: `active` false (the layer stays
    the merged one)."""
    base, task_vectors = stacked_task_vectors(m, "wemoe")
    merged = task_arithmetic_merge(m)
    shapes = wemoe_shapes(m.name, tuple(base.shape), task_vectors.shape[0], m.params)
    if not shapes or not bool(task_vectors.any()):
        zeros = {key: base.new_zeros(shape) for key, shape in shapes.items()}
        return Upscaled(merged=merged, extras=zeros, active=False)
    if "bias" in shapes:
        return Upscaled(merged=merged, extras={"bias": task_vectors.contiguous()})
    router = initial_router(base.shape[1], task_vectors.shape[0], int(m.params["router_hidden"]),
                            float(m.params["lambda"]), m.generator, base.dtype, base.device)  # fmt: skip
    matrices = task_vectors.reshape(task_vectors.shape[:3])  # a pointwise conv's [T, out, in]
    return Upscaled(merged=merged, extras={"task_vectors": matrices.contiguous(), **router})


class Router(torch.nn.Module):
    """r(x) = W_2 relu(W_1 x + b_1) + b_2 (without a hidden layer: W_2 x + b_2), one weight per
    task vector; trainable parameters."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        super().__init__()
        for key in ROUTER_KEYS:
            self.register_parameter(key, torch.nn.Parameter(tensors[key].detach().clone()))

    @property
    def hidden(self) -> int:
        return int(self.router_in.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hidden > 0:
            x = torch.relu(torch.nn.functional.linear(x, self.router_in, self.router_in_bias))
        return torch.nn.functional.linear(x, self.router_out, self.router_out_bias)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key).detach() for key in ROUTER_KEYS}


def wemoe_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    task_vectors: torch.Tensor,
    bias_vectors: torch.Tensor | None,
    routing: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One WEMoE linear layer on x [..., in] with routing weights [..., T]: the merged layer
    plus sum_i (routing_i - scale) (tau_i x + beta_i), token by token."""
    flat = x.reshape(-1, x.shape[-1])
    offset = (routing.reshape(-1, task_vectors.shape[0]) - scale).to(flat.dtype)
    out = torch.nn.functional.linear(flat, weight, bias)
    per_task = torch.einsum("ni,toi->nto", flat, task_vectors)
    out = out + torch.einsum("nt,nto->no", offset, per_task)
    if bias_vectors is not None:
        out = out + offset @ bias_vectors
    return out.reshape(*x.shape[:-1], out.shape[-1])


class WEMoELinear(RoutedLinear):
    """A merged linear layer (or pointwise convolution) with WEMoE's routed task vectors (see
    `wemoe_forward`).

    The merged weight and bias are the wrapped layer's; the task vectors (and bias vectors)
    are buffers; the router is a trainable submodule (`router`). `last_routing` keeps the
    routing weights [..., T] of the latest forward (for inspection; [..., H, W, T] for a
    convolution)."""

    def __init__(self, layer: torch.nn.Linear | torch.nn.Conv2d, extras: Mapping[str, torch.Tensor],
                 scale: float):
        super().__init__(layer, extras["task_vectors"].shape[0])
        self.scale = float(scale)
        dtype = layer.weight.dtype
        self.register_buffer("task_vectors", extras["task_vectors"].to(dtype))
        self.register_buffer("bias_vectors", extras["bias"].to(dtype) if "bias" in extras else None)
        self.router = Router({k: extras[k].to(dtype) for k in ROUTER_KEYS}).to(layer.weight.device)
        self.last_routing: torch.Tensor | None = None

    def routed(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.router(x)
        self.last_routing = routing.detach()
        return wemoe_forward(x, self.weight.flatten(1), self.bias, self.task_vectors,
                             self.bias_vectors, routing, self.scale)  # fmt: skip

    def routing_repr(self) -> str:
        return f"router_hidden={self.router.hidden}"


def wemoe_module(
    layer: torch.nn.Linear | torch.nn.Conv2d, extras: Mapping[str, torch.Tensor],
    params: Mapping[str, ParamValue],
) -> WEMoELinear:
    return WEMoELinear(layer, extras, float(params["lambda"]))


def wemoe_cost(
    shape: tuple[int, ...], extras: Mapping[str, tuple[int, ...]], params: Mapping[str, ParamValue]
) -> tuple[int, int]:
    """Multiply-adds per token of one WEMoE layer (the merged layer, each task vector applied,
    their weighted sum and the router) and of the merged layer alone."""
    rows, cols = shape[:2]
    base = rows * cols
    if "task_vectors" not in extras:
        return base, base
    num_tasks = extras["task_vectors"][0]
    hidden = extras["router_in"][0]
    router = hidden * cols + num_tasks * (hidden if hidden > 0 else cols)
    bias = num_tasks * rows if "bias" in extras else 0
    return base + num_tasks * base + num_tasks * rows + bias + router, base


WEMOE = register(
    MergeMethod(
        name="wemoe",
        title="WEMoE: Merging Multi-Task Models via Weight-Ensembling Mixture of Experts",
        paper="Tang, Shen, Luo, Yin, Zhang, Tao, ICML 2024",
        url="https://arxiv.org/abs/2402.00433",
        kernel=wemoe_kernel,
        upscaling=Upscaling(
            kernel=wemoe_tensor,
            shapes=wemoe_shapes,
            wraps=(torch.nn.Linear, torch.nn.Conv2d),
            module=wemoe_module,
            cost=wemoe_cost,
            forward_params=("lambda",),
            trainer="wemoe_routers",
            trained=ROUTER_KEYS,
        ),
        params=(
            Param(
                "lambda",
                float,
                0.3,
                "task-arithmetic scale of the shared weights, and every router's initial output "
                "(FusionBench's init_lambda)",
                low=0.0,
                high=10.0,
            ),
            Param(
                "router_hidden",
                int,
                32,
                "width of each router's hidden layer (0: a one-layer router W x + b)",
                low=0,
                high=65536,
            ),
            Param(
                "steps",
                int,
                100,
                "router training steps (Adam on the tasks' summed prediction entropy; 0: "
                "untrained routers, the task-arithmetic merge)",
                low=0,
                high=1_000_000,
            ),
            Param("lr", float, 1e-3, "the routers' learning rate", low=0.0, high=1.0,
                  low_exclusive=True),  # fmt: skip
            Param(
                "all_linear",
                bool,
                False,
                "upscale every linear layer (embeddings and LM heads excepted; pointwise "
                "convolutions count), not only the MLPs'",
            ),
        ),
        base="required",
        min_models=1,
        # The routers' initialisation is drawn from each tensor's generator (the merge seed).
        randomized=True,
        needs=("data",),
    )
)
