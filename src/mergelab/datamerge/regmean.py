"""RegMean and RegMean++ on any torch module, from Gram statistics (mergelab.stats).

RegMean (Jin et al. 2023, https://arxiv.org/abs/2212.09849): each model's Grams are collected
on its own data; every linear map (Linear, Conv1d/2d, Embedding) gets the closed form
`regmean_solve`; every other parameter (biases, norms) is averaged, as in the paper.

RegMean++ (Nguyen et al. 2025, https://arxiv.org/abs/2508.03121): the same closed form, but the
Grams of block b of model i are collected with model i's data flowing through the *already
merged* blocks 0..b-1 and then model i's own block b, so each layer is merged for the inputs
the merged model will really give it. Blocks are found from module names (`...layers.3`,
`encoder.layer.3`, `blocks.3`... as the planner splits layers) and ordered by a recorded forward
pass; a leaf module outside any numbered stack is a block of its own. Each block costs one
partial forward pass per model, which stops as soon as the block has run.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mergelab.datamerge.common import StateDict, load_into, module_of, working_copy
from mergelab.methods.data_aware import SingularGramWarning
from mergelab.methods.data_aware import regmean_tensor as merge_tensor
from mergelab.plan.planner import split_layer_name
from mergelab.stats.batches import TaskData, call_module, split_batch, to_device
from mergelab.stats.gram import GRAM_TYPES, GramStats, LayerGram, collect_grams, gram_layers


def _raw_forward(task: TaskData):
    # Grams need only the layers' inputs: call the module, no head, no logits.
    return task.forward or (lambda module, inputs: call_module(module, inputs))


def merge_with_grams(
    state_dicts: Sequence[StateDict],
    grams: Sequence[Mapping[str, LayerGram]],
    keys: Sequence[str],
    *,
    alpha: float = 0.9,
    regularization: float = 1e-6,
    average_grams: bool = False,
    base: StateDict | None = None,
    scaling: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Merge `keys` of `state_dicts` given each model's Grams (module name -> LayerGram).

    scaling: mergelab's extension, not in the paper: the merged task vector (merge - base) is
        multiplied by it, as task arithmetic's lambda does (RegMean is linear in the weights,
        so this is RegMean of the task vectors, scaled). 1 is the paper's RegMean.
    """
    if scaling != 1.0 and base is None:
        raise ValueError("RegMean `scaling` needs the base model's weights")
    merged: dict[str, torch.Tensor] = {}
    singular: list[str] = []
    for key in keys:
        owner, _ = module_of(key)
        layer_grams = [g.get(owner) for g in grams]
        have = None if any(g is None for g in layer_grams) else layer_grams
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SingularGramWarning)
            merged[key] = merge_tensor(
                key,
                [sd[key] for sd in state_dicts],
                have,
                alpha=alpha,
                regularization=regularization,
                average_grams=average_grams,
            )
        for w in caught:
            if issubclass(w.category, SingularGramWarning):
                singular.append(owner or "<root>")
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        if scaling != 1.0 and merged[key].is_floating_point():
            origin = base[key].to(merged[key])
            merged[key] = origin + scaling * (merged[key] - origin)
    if singular:
        # One warning for the whole merge, naming every layer (not one per layer).
        shown = ", ".join(f"`{n}`" for n in singular[:12]) + (" ..." if len(singular) > 12 else "")
        warnings.warn(
            f"RegMean: the summed Gram of {len(singular)} layer(s) is singular: {shown}; added "
            f"{regularization:g} x mean(diag) to their diagonals (directions no data reaches, "
            "such as always-zero inputs or padding, fall back to the average)",
            SingularGramWarning,
            stacklevel=2,
        )
    return merged


def collect_model_grams(
    module: nn.Module,
    finetuned: Mapping[str, StateDict],
    data: Mapping[str, TaskData],
    *,
    max_examples: int | None,
    device: str | torch.device | None,
    progress: bool,
    stats_dir: str | None,
) -> dict[str, GramStats]:
    """Each model's Grams on its own task's data (optionally kept on disk under stats_dir/name)."""
    work = working_copy(module)
    out: dict[str, GramStats] = {}
    for name, state in finetuned.items():
        load_into(work, state)
        out[name] = collect_grams(
            work,
            data[name].iterate(),
            forward=_raw_forward(data[name]),
            max_examples=max_examples,
            device=device,
            progress=progress,
            description=f"Grams {name}",
            out_dir=None if stats_dir is None else f"{stats_dir}/{name}",
        )
    return out


def regmean(
    module: nn.Module,
    finetuned: Mapping[str, StateDict],
    data: Mapping[str, TaskData],
    keys: Sequence[str],
    *,
    alpha: float,
    regularization: float,
    average_grams: bool,
    base: StateDict | None = None,
    scaling: float = 1.0,
    max_examples: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    stats_dir: str | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, int], float]:
    """RegMean over the models of `finetuned`; returns (merged state, examples used per model,
    seconds spent collecting statistics)."""
    stats = collect_model_grams(
        module,
        finetuned,
        data,
        max_examples=max_examples,
        device=device,
        progress=progress,
        stats_dir=stats_dir,
    )
    names = list(finetuned)
    merged = merge_with_grams(
        [finetuned[n] for n in names],
        [stats[n].layers for n in names],
        keys,
        alpha=alpha,
        regularization=regularization,
        average_grams=average_grams,
        base=base,
        scaling=scaling,
    )
    seconds = sum(stats[n].seconds for n in names)
    return merged, {n: stats[n].examples for n in names}, seconds


# --- RegMean++ ------------------------------------------------------------------------------------


def execution_order(module: nn.Module, task: TaskData, device) -> list[str]:
    """Names of the leaf modules with parameters, in the order one forward pass first runs them."""
    order: list[str] = []
    handles = []
    for name, m in module.named_modules():
        if not list(m.children()) and any(True for _ in m.parameters(recurse=False)):
            handles.append(
                m.register_forward_hook(
                    lambda _m, _a, _o, name=name: order.append(name) if name not in order else None
                )
            )
    try:
        first = next(iter(task.iterate()))
        inputs, _ = split_batch(first)
        with torch.no_grad():
            _raw_forward(task)(module, to_device(inputs, device))
    finally:
        for h in handles:
            h.remove()
    return order


def block_of(module_name: str) -> str:
    """The block a leaf module belongs to: its numbered layer (`encoder.layer.3`) or itself."""
    parts = split_layer_name(module_name + ".x")
    if parts is None:
        return module_name
    stack, index, _ = parts
    return f"{stack}.{index}"


def regmean_plusplus(
    module: nn.Module,
    finetuned: Mapping[str, StateDict],
    data: Mapping[str, TaskData],
    keys: Sequence[str],
    *,
    alpha: float,
    regularization: float,
    average_grams: bool,
    base: StateDict | None = None,
    scaling: float = 1.0,
    max_examples: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict[str, int], float]:
    """RegMean++ (see the module docstring); returns (merged state, examples used per model,
    seconds spent collecting statistics)."""
    names = list(finetuned)
    work = working_copy(module)
    load_into(work, finetuned[names[0]])
    order = execution_order(work, data[names[0]], device)
    blocks: dict[str, list[str]] = {}
    for leaf in order:
        blocks.setdefault(block_of(leaf), []).append(leaf)
    gram_modules = set(gram_layers(work))
    merged: dict[str, torch.Tensor] = {}
    done_keys: set[str] = set()
    examples: dict[str, int] = {n: 0 for n in names}
    stats_seconds = 0.0
    key_owner = {k: module_of(k)[0] for k in keys}
    for block, leaves in blocks.items():
        leaf_set = set(leaves)
        block_keys = [k for k in keys if key_owner[k] in leaf_set]
        targets = [leaf for leaf in leaves if leaf in gram_modules]
        per_model: list[Mapping[str, LayerGram]] = []
        if targets:
            for name in names:
                hybrid = {k: merged[k] if k in done_keys else v for k, v in finetuned[name].items()}
                load_into(work, hybrid)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # later blocks never run: not a problem here
                    stats = collect_grams(
                        work,
                        data[name].iterate(),
                        forward=_raw_forward(data[name]),
                        layers=targets,
                        max_examples=max_examples,
                        device=device,
                        progress=progress,
                        description=f"RegMean++ {block} {name}",
                        stop_after=leaves[-1],
                    )
                per_model.append(stats.layers)
                examples[name] = stats.examples
                stats_seconds += stats.seconds
        else:
            per_model = [{} for _ in names]
        merged.update(
            merge_with_grams(
                [finetuned[n] for n in names],
                per_model,
                block_keys,
                alpha=alpha,
                regularization=regularization,
                average_grams=average_grams,
                base=base,
                scaling=scaling,
            )
        )
        done_keys.update(block_keys)
    # Parameters of modules that never ran, buffers of containers...: averaged.
    rest = [k for k in keys if k not in merged]
    merged.update(
        merge_with_grams([finetuned[n] for n in names], [{} for _ in names], rest,
                         base=base, scaling=scaling)
    )
    return {k: merged[k] for k in keys}, examples, stats_seconds


def unsupported_weights(module: nn.Module, keys: Sequence[str]) -> list[str]:
    """Matrix parameters RegMean can only average: their module is not a Gram layer type
    (e.g. `nn.MultiheadAttention.in_proj_weight`), named with the module's type."""
    named = dict(module.named_modules())
    state = module.state_dict()
    out = []
    for key in keys:
        owner, leaf = module_of(key)
        m = named.get(owner)
        if m is None or isinstance(m, GRAM_TYPES) and leaf == "weight":
            continue
        value = state.get(key)
        if value is not None and value.is_floating_point() and value.dim() >= 2:
            out.append(f"{key} ({type(m).__name__})")
    return out
