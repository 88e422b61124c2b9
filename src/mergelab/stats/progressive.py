"""RegMean++'s statistics: Grams collected in the partially merged model.

RegMean++ (Nguyen et al. 2025, https://arxiv.org/abs/2508.03121) uses RegMean's closed form, but
the Grams of block b of model i are collected with model i's data flowing through the *already
merged* blocks 0..b-1 and then model i's own block b, so each layer is merged for the inputs the
merged model will really give it. Collecting them therefore merges progressively: after the
Grams of a block are in, that block's tensors are merged by the engine's own `merge_one` with the
plan's kernel, and the next block's Grams are collected through them. The engine later solves
every tensor again from the same Grams, which gives exactly the same weights.

Blocks are found from module names (`...layers.3`, `encoder.layer.3`, `blocks.3`... as the
planner splits layers) and ordered by a recorded forward pass; a leaf module outside any numbered
stack is a block of its own. Each block costs one partial forward pass per model, which stops as
soon as the block has run.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from mergelab.plan.planner import split_layer_name
from mergelab.stats.batches import DataError, TaskData, split_batch, to_device
from mergelab.stats.gram import GramStats, LayerGram, collect_grams, gram_layers
from mergelab.stats.stage import (
    CollectOptions,
    StatisticsResult,
    is_statistics_folder,
    load_weights,
    raw_forward,
    source_weights,
    task_on_device,
    unsupported_weights,
    working_module,
)
from mergelab.stats.store import GramStore, MemoryGrams, save_grams


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
            raw_forward(task)(module, to_device(inputs, device))
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


def collect_progressive(
    plan,
    provider,
    options: CollectOptions,
    folders: Mapping[str, Path] | None = None,
) -> StatisticsResult:
    """Every merged source's Grams, block by block through the progressively merged model.

    A source whose folder already holds Grams is not recollected only when every source's
    does (the Grams of one depend on the merge of all). Returns the same StatisticsResult as
    the default collector.
    """
    from mergelab.engine.execute import merge_one, read_statistics
    from mergelab.plan.planner import attach_statistics

    folders = folders or {}
    names = plan.merged_sources
    if names and all(k in folders and is_statistics_folder(folders[k]) for k in names):
        stores = {k: {"gram": GramStore(folders[k])} for k in names}
        return StatisticsResult(
            stores=stores, examples={k: s["gram"].examples for k, s in stores.items()},
            seconds=0.0, loaded=list(names),
        )
    if provider is None:
        raise DataError("RegMean++ collects its Grams in the merged model: it needs the data")
    device = options.device
    weights = {k: source_weights(plan, k) for k in names}
    data = {k: task_on_device(provider.task_data(k), device) for k in names}
    work = working_module(provider, device)
    notes = unsupported_weights(work, plan, "gram")
    load_weights(work, weights[names[0]])
    order = execution_order(work, data[names[0]], device)
    blocks: dict[str, list[str]] = {}
    for leaf in order:
        blocks.setdefault(block_of(leaf), []).append(leaf)
    gram_modules = set(gram_layers(work))
    layers: dict[str, dict[str, LayerGram]] = {k: {} for k in names}
    examples = dict.fromkeys(names, 0)
    batches = dict.fromkeys(names, 0)
    seconds = 0.0
    merged: dict[str, torch.Tensor] = {}  # input tensor name -> merged value (models form)
    tasks_of_owner: dict[str, list] = {}
    for task in plan.tasks:
        tasks_of_owner.setdefault(task.name.rpartition(".")[0], []).append(task)
    merge_device = torch.device(device) if device is not None else torch.device("cpu")
    for block, leaves in blocks.items():
        targets = [leaf for leaf in leaves if leaf in gram_modules]
        # A block without Gram layers (a norm) is still merged before the next one runs.
        block_stats = {k: GramStats(layers={}, examples=0, batches=0) for k in names}
        for key in names if targets else ():
            hybrid = {n: merged.get(n, v) for n, v in weights[key].items()}
            load_weights(work, hybrid)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # later blocks never run: not a problem here
                stats = collect_grams(
                    work,
                    data[key].iterate(),
                    forward=raw_forward(data[key]),
                    layers=targets,
                    max_examples=options.max_examples,
                    device=device,
                    progress=options.progress,
                    description=f"RegMean++ {block} {key}",
                    stop_after=leaves[-1],
                )
            block_stats[key] = stats
            layers[key].update(stats.layers)
            examples[key], batches[key] = stats.examples, stats.batches
            seconds += stats.seconds
        # Merge this block's tensors with its Grams, exactly as the engine will.
        partial = attach_statistics(plan, {k: {"gram": MemoryGrams(s)} for k, s in block_stats.items()},
                                    partial=True)
        by_name = {t.name: t for t in partial.tasks}
        for leaf in leaves:
            for task in tasks_of_owner.get(leaf, ()):
                task = by_name[task.name]
                tensors = [plan.sources[k].get(n) for k, n in task.inputs]
                out = merge_one(
                    partial, task, tensors, device=merge_device, seed=0,
                    statistics=read_statistics(partial, task),
                )
                merged[task.name] = out.to(task.out_dtype).to(tensors[0].device)
    stores = {}
    for key in names:
        stats = GramStats(layers=layers[key], examples=examples[key], batches=batches[key])
        if key in folders:
            save_grams(stats, folders[key])
            stores[key] = {"gram": GramStore(folders[key])}
        else:
            stores[key] = {"gram": MemoryGrams(stats)}
    return StatisticsResult(stores=stores, examples=examples, seconds=seconds, notes=notes)
