"""Derive a permutation spec automatically by tracing a model with torch.fx.

Every tensor flowing through the traced graph gets a *space variable* (which hidden units its
feature axis holds). Layers with weights (Linear, Conv, Embedding, attention) start a new space
for their output; element-wise operations, normalisation and pooling keep their input's space; an
addition ties the spaces of its two operands (this is how a residual stream forces one
permutation on every block that writes to it, Ainsworth et al. 2023, Sec. 3). The model's inputs
and outputs are fixed: whatever touches them is never permuted. Spaces are merged with a
union-find, so the order in which ties are discovered does not matter.

Anything the tracer does not understand raises `AlignError` naming the module or graph node, so a
user knows what to declare by hand (`PermutationSpec.build`) or register (`register_rule`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from mergelab.align.spec import AlignError, PermutationSpec, Probe, Role, Segment, Space

FIXED = 0  # the variable of the model's inputs and outputs: never permuted


@dataclass(frozen=True)
class Feat:
    """A feature tensor in the graph: its space variable and the axis holding the features."""

    var: int
    dim: int  # non-negative


@dataclass
class TraceInfo:
    """What partial zipping needs from the trace: the graph and each node's space and axis."""

    graph_module: fx.GraphModule
    node_space: dict[str, tuple[str | None, int]] = field(default_factory=dict)


class _Context:
    """Union-find over space variables plus the tensors and probes recorded while walking."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.parent = [FIXED]
        self.size = [0]
        self.head = [None]
        self.label = ["<fixed>"]
        self.tensors: dict[str, list[list[tuple[int, int, Role]]]] = {}
        self.probes: list[tuple[int, Probe]] = []

    def new_var(self, size: int, label: str, head_size: int | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.head.append(head_size)
        self.label.append(label)
        return len(self.parent) - 1

    def find(self, v: int) -> int:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if FIXED not in (ra, rb) and self.size[ra] != self.size[rb]:
            raise AlignError(f"{where}: adds features of sizes {self.size[ra]} and {self.size[rb]}")
        if self.head[ra] or self.head[rb]:
            raise AlignError(f"{where}: attention-head features cannot be tied to other features")
        # FIXED absorbs everything; otherwise the older variable names the space.
        keep, drop = (ra, rb) if ra == FIXED or (rb != FIXED and ra < rb) else (rb, ra)
        self.parent[drop] = keep
        return keep

    def param(self, tensor: str, axes: list[list[tuple[int, int, Role]]]) -> None:
        self.tensors[tensor] = axes

    def probe(self, var: int, probe: Probe) -> None:
        if var != FIXED:
            self.probes.append((var, probe))


ModuleRule = Callable[[_Context, fx.Node, str, nn.Module, list[Any]], Any]
_RULES: dict[type, ModuleRule] = {}


def register_rule(module_type: type) -> Callable[[ModuleRule], ModuleRule]:
    """Teach the tracer a leaf module type.

    The rule gets (context, node, module path, module, argument features) and returns the output
    `Feat` (or a tuple of them, or None for non-feature outputs). It records the module's
    tensors with `context.param` and where its input can be observed with `context.probe`.
    """

    def deco(rule: ModuleRule) -> ModuleRule:
        _RULES[module_type] = rule
        return rule

    return deco


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else ()


def _input_feat(ctx: _Context, node: fx.Node, args: list[Any], path: str) -> Feat:
    feats = [a for a in args if isinstance(a, Feat)]
    if len(feats) != 1:
        raise AlignError(
            f"module `{path}` ({node.name}): expected one feature input; got {len(feats)}"
        )
    return feats[0]


# ---------------------------------------------------------------------- rules for leaf modules


def _weight_layer(ctx, node, path, module, args, out_dim_fn):
    inp = _input_feat(ctx, node, args, path)
    n_out = module.weight.shape[0]
    out_var = ctx.new_var(n_out, path)
    in_size = module.weight.shape[1]
    in_seg = [(inp.var, in_size, "in")] if ctx.find(inp.var) != FIXED else []
    ndim = module.weight.dim()
    ctx.param(f"{path}.weight", [[(out_var, n_out, "out")], in_seg] + [[]] * (ndim - 2))
    if getattr(module, "bias", None) is not None:
        ctx.param(f"{path}.bias", [[(out_var, n_out, "out")]])
    ctx.probe(inp.var, Probe(path, dim=inp.dim))
    return Feat(out_var, out_dim_fn(node))


@register_rule(nn.Linear)
def _linear(ctx, node, path, module, args):
    return _weight_layer(ctx, node, path, module, args, lambda n: len(_shape(n)) - 1)


def _conv(ctx, node, path, module, args):
    if module.groups != 1:
        raise AlignError(
            f"module `{path}` ({type(module).__name__}) has groups={module.groups}; grouped "
            "convolutions are not supported by the automatic spec (declare it by hand)"
        )
    return _weight_layer(ctx, node, path, module, args, lambda n: 1)


for _conv_type in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_conv_type)(_conv)


def _norm(ctx, node, path, module, args):
    inp = _input_feat(ctx, node, args, path)
    if isinstance(module, nn.LayerNorm):
        if len(module.normalized_shape) != 1 or inp.dim != len(_shape(node)) - 1:
            raise AlignError(f"module `{path}` (LayerNorm) must normalise the feature axis only")
    var = ctx.find(inp.var)
    size = _shape(node)[inp.dim]
    seg = [[(inp.var, size, "out")]] if var != FIXED else [[]]
    for name in ("weight", "bias", "running_mean", "running_var"):
        if getattr(module, name, None) is not None:
            ctx.param(f"{path}.{name}", seg)
    return inp


for _norm_type in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm):
    register_rule(_norm_type)(_norm)


def _same_space(ctx, node, path, module, args):
    return _input_feat(ctx, node, args, path)


for _t in (
    nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.Dropout,
    nn.Identity, nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d,
):  # fmt: skip
    register_rule(_t)(_same_space)


@register_rule(nn.Flatten)
def _flatten_module(ctx, node, path, module, args):
    return _flatten(ctx, node, _input_feat(ctx, node, args, path), f"module `{path}` (Flatten)")


@register_rule(nn.Embedding)
def _embedding(ctx, node, path, module, args):
    n_out = module.weight.shape[1]
    out_var = ctx.new_var(n_out, path)
    ctx.param(f"{path}.weight", [[], [(out_var, n_out, "out")]])
    return Feat(out_var, len(_shape(node)) - 1)


@register_rule(nn.MultiheadAttention)
def _attention(ctx, node, path, module, args):
    """Self-attention: residual stream in, per-head query/key and value spaces, stream out.

    Within a head, permuting query and key dimensions together leaves every dot product
    unchanged, and permuting value dimensions together with the matching columns of the output
    projection leaves the output unchanged. Heads keep their order (a permutation of heads would
    have to tie both spaces; not derived).
    """
    feats = [a for a in args[:3]]
    if not all(isinstance(f, Feat) for f in feats) or len({id(a) for a in node.args[:3]}) != 1:
        raise AlignError(
            f"module `{path}` (MultiheadAttention): only self-attention (query, key and value the "
            "same tensor) is supported by the automatic spec"
        )
    if not module._qkv_same_embed_dim or module.in_proj_weight is None:
        raise AlignError(f"module `{path}` (MultiheadAttention): separate q/k/v dims not supported")
    inp = feats[0]
    if inp.dim != len(_shape(node.args[0])) - 1:
        raise AlignError(f"module `{path}` (MultiheadAttention): features must be the last axis")
    e, h = module.embed_dim, module.num_heads
    qk = ctx.new_var(e, f"{path}.qk", head_size=e // h)
    v = ctx.new_var(e, f"{path}.v", head_size=e // h)
    out = ctx.new_var(e, path)
    inp_seg = [(inp.var, e, "in")] if ctx.find(inp.var) != FIXED else []
    packed = [(qk, e, "out"), (qk, e, "out"), (v, e, "out")]
    ctx.param(f"{path}.in_proj_weight", [packed, inp_seg])
    if module.in_proj_bias is not None:
        ctx.param(f"{path}.in_proj_bias", [packed])
    ctx.param(f"{path}.out_proj.weight", [[(out, e, "out")], [(v, e, "in")]])
    if module.out_proj.bias is not None:
        ctx.param(f"{path}.out_proj.bias", [[(out, e, "out")]])
    ctx.probe(inp.var, Probe(path, dim=inp.dim))
    for var, start in ((qk, 0), (qk, e), (v, 2 * e)):
        ctx.probe(
            var,
            Probe(path, dim=inp.dim, weight="in_proj_weight",
                  bias="in_proj_bias" if module.in_proj_bias is not None else None,
                  rows=(start, start + e)),
        )  # fmt: skip
    return (Feat(out, inp.dim), None)


# ---------------------------------------------------------------------- functions and methods

_ELEMENTWISE = {
    F.relu, torch.relu, F.gelu, torch.tanh, torch.sigmoid, F.silu, F.leaky_relu, F.elu,
    F.dropout, torch.nn.functional.relu6, F.max_pool1d, F.max_pool2d, F.avg_pool1d,
    F.avg_pool2d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
    "relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "to", "detach",
}  # fmt: skip
_SCALAR_OPS = {operator.mul, operator.truediv, torch.mul, "mul", "div", operator.neg}
_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_NON_FEATURE_METHODS = {"size", "dim"}


def _flatten(ctx: _Context, node: fx.Node, inp: Feat, where: str) -> Feat:
    out_shape = _shape(node)
    in_shape = _shape(node.args[0]) if isinstance(node.args[0], fx.Node) else ()
    if ctx.find(inp.var) == FIXED:
        return Feat(FIXED, len(out_shape) - 1)
    size = in_shape[inp.dim]
    trailing = 1
    for s in in_shape[inp.dim + 1 :]:
        trailing *= s
    # Only a flatten that leaves the features alone on their axis keeps the space: a flatten of
    # C x H x W with H*W > 1 interleaves channels with positions (not derived).
    if trailing != 1 or not out_shape or out_shape[-1] != size:
        raise AlignError(
            f"{where}: flattening a feature axis of size {size} together with other axes "
            f"(shape {in_shape} -> {out_shape}) is not supported; pool to 1x1 first or declare "
            "the spec by hand"
        )
    return Feat(inp.var, len(out_shape) - 1)


def _reduce(ctx: _Context, node: fx.Node, inp: Feat, where: str) -> Feat:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    keepdim = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
    ndim = len(_shape(node.args[0]))
    if dims is None:
        raise AlignError(f"{where}: a reduction over all axes mixes features")
    dims = [d % ndim for d in ((dims,) if isinstance(dims, int) else dims)]
    if inp.dim in dims:
        raise AlignError(f"{where}: reduces over the feature axis")
    new_dim = inp.dim if keepdim else inp.dim - sum(d < inp.dim for d in dims)
    return Feat(inp.var, new_dim)


def _where(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    inside = f" inside module `{list(stack)[-1]}`" if stack else ""
    return f"graph node `{node.name}` ({node.target}){inside}"


def _function(ctx: _Context, node: fx.Node, args: list[Any]) -> Any:
    target = node.target
    feats = [a for a in args if isinstance(a, Feat)]
    if node.op == "call_method" and target in _NON_FEATURE_METHODS:
        return None
    if target is getattr:  # x.shape and the like: not features
        return None
    if target == operator.getitem and isinstance(args[0], tuple):  # one output of a tuple
        return args[0][node.args[1]]
    if not feats:
        return None
    if target in _ADDS:
        if len(feats) == 1:  # x + constant keeps the space
            return feats[0]
        a, b = feats[:2]
        ndim = len(_shape(node))
        if a.dim - len(_shape(node.args[0])) != b.dim - len(_shape(node.args[1])):
            raise AlignError(f"{_where(node)}: adds tensors whose features are on different axes")
        root = ctx.union(a.var, b.var, _where(node))
        return Feat(root, a.dim + ndim - len(_shape(node.args[0])))
    if target in _ELEMENTWISE:
        return feats[0]
    if target in _SCALAR_OPS:
        if len(feats) == 1:
            return feats[0]
        raise AlignError(f"{_where(node)}: multiplies two feature tensors (not supported)")
    if target in (torch.flatten, "flatten", "view", "reshape"):
        return _flatten(ctx, node, feats[0], _where(node))
    if target in (torch.mean, "mean", torch.sum, "sum"):
        return _reduce(ctx, node, feats[0], _where(node))
    if target == operator.getitem:
        inp = feats[0]
        in_shape, out_shape = _shape(node.args[0]), _shape(node)
        if ctx.find(inp.var) == FIXED:
            return Feat(FIXED, max(len(out_shape) - 1, 0))
        index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
        if (
            inp.dim == len(in_shape) - 1
            and out_shape
            and out_shape[-1] == in_shape[-1]
            and (len(index) < len(in_shape) or index[-1] == slice(None))
        ):
            return Feat(inp.var, len(out_shape) - 1)
        raise AlignError(f"{_where(node)}: indexing that may select features is not supported")
    raise AlignError(
        f"cannot derive a permutation spec: {_where(node)} is not supported; declare the spec "
        "by hand (mergelab.align.PermutationSpec.build) or register a rule"
    )


# ---------------------------------------------------------------------- the walk


def derive_spec(model: nn.Module, example_input: Any) -> PermutationSpec:
    """Trace `model` with torch.fx and derive its permutation spec.

    example_input: one batch (a tensor or a tuple of positional tensors) used for shapes only.
    Covers MLPs, CNNs with BatchNorm, ResNets (residual additions tie spaces) and transformer
    blocks built from nn.MultiheadAttention (self-attention), LayerNorm and Linear layers.
    Raises AlignError naming the first module or graph node it cannot handle.
    """
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises many types; all mean "not traceable"
        raise AlignError(
            f"cannot trace {type(model).__name__} with torch.fx ({exc}); declare the spec by hand"
        ) from exc
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    # Shapes come from one eval-mode pass, so BatchNorm running statistics are not touched.
    modes = {name: mod.training for name, mod in gm.named_modules()}
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    finally:
        for name, mod in gm.named_modules():
            mod.training = modes[name]

    ctx = _Context(model)
    modules = dict(gm.named_modules())
    values: dict[str, Any] = {}
    for node in gm.graph.nodes:
        args = [values.get(a.name) if isinstance(a, fx.Node) else a for a in node.args]
        args += [values.get(a.name) for a in node.kwargs.values() if isinstance(a, fx.Node)]
        if node.op == "placeholder":
            values[node.name] = Feat(FIXED, max(len(_shape(node)) - 1, 0))
        elif node.op == "get_attr":
            # A parameter used directly (a positional embedding added to the stream): its
            # last axis starts a space that an addition will usually tie to the stream.
            tensor = gm
            for part in str(node.target).split("."):
                tensor = getattr(tensor, part)
            if not isinstance(tensor, torch.Tensor) or tensor.dim() == 0:
                values[node.name] = None
                continue
            size = tensor.shape[-1]
            var = ctx.new_var(size, str(node.target))
            ctx.param(str(node.target), [[]] * (tensor.dim() - 1) + [[(var, size, "out")]])
            values[node.name] = Feat(var, tensor.dim() - 1)
        elif node.op == "call_module":
            module = modules[node.target]
            rule = _RULES.get(type(module))
            if rule is None:
                raise AlignError(
                    f"cannot derive a permutation spec: module `{node.target}` "
                    f"({type(module).__name__}) is not supported; declare the spec by hand "
                    "(mergelab.align.PermutationSpec.build) or register a rule"
                )
            values[node.name] = rule(ctx, node, str(node.target), module, args)
        elif node.op in ("call_function", "call_method"):
            values[node.name] = _function(ctx, node, args)
        elif node.op == "output":
            for out in _flatten_outputs(node.args[0]):
                feat = values.get(out.name)
                for f in feat if isinstance(feat, tuple) else (feat,):
                    if isinstance(f, Feat):
                        ctx.union(f.var, FIXED, "output")
    return _finish(ctx, gm, values, model)


def _flatten_outputs(value: Any) -> list[fx.Node]:
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, (tuple, list)):
        return [n for v in value for n in _flatten_outputs(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _flatten_outputs(v)]
    return []


def _finish(ctx: _Context, gm: fx.GraphModule, values: dict[str, Any], model: nn.Module):
    names: dict[int, str] = {}
    used: set[str] = set()
    for var in range(1, len(ctx.parent)):
        root = ctx.find(var)
        if root == FIXED or root in names:
            continue
        name = ctx.label[root]
        while name in used:
            name += "'"
        used.add(name)
        names[root] = name

    def space_of(var: int) -> str | None:
        return names.get(ctx.find(var))

    axes = {}
    state = model.state_dict()
    for tensor, per_axis in ctx.tensors.items():
        if tensor not in state:
            continue
        resolved = []
        for segs in per_axis:
            axis = tuple(Segment(space_of(v), n, role) for v, n, role in segs)
            # an axis whose every unit is fixed is simply not permuted
            resolved.append(axis if any(seg.space is not None for seg in axis) else ())
        axes[tensor] = tuple(resolved)
    probes: dict[str, list[Probe]] = {}
    for var, probe in ctx.probes:
        name = space_of(var)
        if name is not None:
            probes.setdefault(name, []).append(probe)
    spaces = {
        name: Space(name, ctx.size[root], ctx.head[root], tuple(probes.get(name, ())))
        for root, name in names.items()
    }
    info = TraceInfo(gm)
    for node_name, value in values.items():
        if isinstance(value, Feat):
            info.node_space[node_name] = (space_of(value.var), value.dim)
    # Drop spaces no tensor uses (e.g. a positional embedding tied to FIXED is already gone).
    live = {seg.space for per_axis in axes.values() for segs in per_axis for seg in segs}
    spaces = {k: v for k, v in spaces.items() if k in live}
    return PermutationSpec(spaces, axes, graph=info)
