"""The statistics stage: collect what a plan's method reads, before the engine runs the plan.

A method declares the statistics its kernel reads (`MergeMethod.statistics`, kinds registered
here in `KINDS`) and, if it gathers them differently from "each source on its own data", a
collector (`MergeMethod.collector`, registered in `COLLECTORS`). `collect_statistics` dispatches
on those declarations only: it loads each merged source's weights into a copy of the
architecture, runs that source's data through it with the kind's hooks, and returns one
`StatisticsSource` per source and kind (in memory, or saved atomically to a folder and read back
lazily), which `mergelab.plan.planner.attach_statistics` turns into per-tensor references.
A folder that already holds a source's statistics is loaded instead: no data runs.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from mergelab.stats.batches import TaskData
from mergelab.stats.store import (
    FisherStore,
    GramStore,
    MemoryFisher,
    MemoryGrams,
    StatisticsSource,
    save_fisher,
    save_grams,
)

StateDict = Mapping[str, torch.Tensor]


class DataProvider(Protocol):
    """Where a data stage gets the architecture and each merged source's data."""

    def module(self) -> nn.Module:
        """The architecture (its weights are replaced by each source's before running data)."""
        ...

    def task_data(self, key: str) -> TaskData:
        """The data of the merged source `key` (batches, and the head when logits are needed)."""
        ...


@dataclass
class CollectOptions:
    """How to run the data: examples per source (None: every batch), device, progress bar, and
    Fisher's label `target` and `generator` (see mergelab.stats.fisher)."""

    max_examples: int | None = None
    device: str | torch.device | None = None
    progress: bool = False
    fisher_target: str = "auto"
    generator: torch.Generator | None = None
    seed: int = 0  # the merge seed (a trainer's batch order, e.g. WEMoE's routers)


@dataclass
class Collected:
    """One source's statistics of one kind, in memory, with what it took."""

    store: StatisticsSource
    examples: int
    seconds: float
    save: Callable[[Path], None]
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class StatisticKind:
    """A kind of per-tensor statistics.

    collect(module, task, options) -> Collected: one source's statistics on its own data
        (`module` already holds that source's weights, on the device).
    open(folder) -> StatisticsSource: a folder written by `Collected.save`, read lazily.
    estimate_bytes(tensor name, shape) -> bytes of this tensor's statistics (for dry runs).
    passes: what one example costs, in words (for dry runs).
    needs_logits: the data must produce logits (a task head).
    """

    name: str
    title: str
    collect: Callable[[nn.Module, TaskData, CollectOptions], Collected]
    open: Callable[[Path], StatisticsSource]
    estimate_bytes: Callable[[str, tuple[int, ...]], int]
    passes: str
    needs_logits: bool = False


def raw_forward(task: TaskData):
    """Grams need only the layers' inputs: call the module (the task's forward), no head."""
    from mergelab.stats.batches import call_module

    return task.forward or (lambda module, inputs: call_module(module, inputs))


def _collect_grams(module: nn.Module, task: TaskData, options: CollectOptions) -> Collected:
    from mergelab.stats.gram import collect_grams

    stats = collect_grams(
        module,
        task.iterate(),
        forward=raw_forward(task),
        max_examples=options.max_examples,
        device=options.device,
        progress=options.progress,
    )
    return Collected(MemoryGrams(stats), stats.examples, stats.seconds, lambda f: save_grams(stats, f))


def _collect_fisher(module: nn.Module, task: TaskData, options: CollectOptions) -> Collected:
    from mergelab.stats.fisher import collect_fisher

    stats = collect_fisher(
        module,
        task.iterate(),
        forward=task.logits_fn(),
        target=options.fisher_target,  # type: ignore[arg-type]
        generator=options.generator,
        max_examples=options.max_examples,
        device=options.device,
        progress=options.progress,
    )
    return Collected(
        MemoryFisher(stats.fisher, stats.examples),
        stats.examples,
        stats.seconds,
        lambda f: save_fisher(stats.fisher, stats.examples, f),
    )


def _gram_bytes(name: str, shape: tuple[int, ...]) -> int:
    # A weight [out, in, *kernel] of a linear map or convolution: an [in * kernel]^2 float64
    # Gram (groups unknown from the shape: counted as one). Embeddings store counts only, but
    # cannot be told from a linear weight by shape: the estimate is an upper bound.
    if not name.endswith("weight") or len(shape) < 2:
        return 0
    d = 1
    for s in shape[1:]:
        d *= s
    return 8 * d * d


def _fisher_bytes(name: str, shape: tuple[int, ...]) -> int:
    n = 4
    for s in shape:
        n *= s
    return n


KINDS: dict[str, StatisticKind] = {
    "gram": StatisticKind(
        name="gram",
        title="Gram matrices of layer inputs (Linear, Conv1d/2d, Embedding token counts)",
        collect=_collect_grams,
        open=GramStore,
        estimate_bytes=_gram_bytes,
        passes="one forward pass (no gradients)",
    ),
    "fisher": StatisticKind(
        name="fisher",
        title="diagonal Fisher information (squared per-example gradients)",
        collect=_collect_fisher,
        open=FisherStore,
        estimate_bytes=_fisher_bytes,
        passes="one forward and one backward pass",
        needs_logits=True,
    ),
}

# Collectors that gather a method's statistics otherwise than each source on its own data:
# name -> "module:function", imported when used. The function takes the same arguments as
# `collect_statistics` and returns a `StatisticsResult`.
COLLECTORS: dict[str, str] = {
    "progressive": "mergelab.stats.progressive:collect_progressive",
}


@dataclass
class StatisticsResult:
    """stores: merged source key -> kind -> StatisticsSource; examples used per source."""

    stores: dict[str, dict[str, StatisticsSource]]
    examples: dict[str, int]
    seconds: float
    notes: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)  # sources read from existing folders


def source_weights(plan, key: str) -> dict[str, torch.Tensor]:
    """Every tensor of the plan's source `key` (to load into the architecture).

    Raises DataError naming the tensor and its file when one holds NaN or Inf: run through the
    model, it would poison every layer after it, and the error would name one of those.
    """
    from mergelab.stats.batches import DataError

    source = plan.sources[key]
    weights = {name: source.get(name) for name in source.keys() if source.resolve(name) == name}
    for name, tensor in weights.items():
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            file_of = getattr(source, "file_of", None)
            where = f" ({file_of(name)})" if file_of is not None else ""
            bad = int((~torch.isfinite(tensor)).sum())
            raise DataError(
                f"tensor `{name}` of model {key!r}{where} holds {bad} NaN/Inf value(s): the "
                "data stage cannot run the model through it"
            )
    return weights


def working_module(provider: DataProvider, device) -> nn.Module:
    """A private copy of the provider's architecture, on `device`."""
    work = copy.deepcopy(provider.module())
    return work.to(device) if device is not None else work


def task_on_device(task: TaskData, device) -> TaskData:
    """The task with a copy of its head on `device` (the caller's head stays where it is)."""
    if device is None or task.head is None:
        return task
    return dataclasses.replace(task, head=copy.deepcopy(task.head).to(device))


@torch.no_grad()
def load_weights(module: nn.Module, weights: StateDict) -> None:
    """Copy `weights` into `module` (keys it lacks keep the module's values)."""
    module.load_state_dict(dict(weights), strict=False)


def is_statistics_folder(folder: Path) -> bool:
    from mergelab.stats.store import INFO_FILE

    return (folder / INFO_FILE).is_file()


def collect_statistics(
    plan,
    provider: DataProvider | None,
    options: CollectOptions,
    folders: Mapping[str, Path] | None = None,
) -> StatisticsResult:
    """The statistics `plan.method` declares, for every merged source of `plan`.

    folders: merged source key -> statistics folder: an existing one is loaded (no data runs),
        a missing one receives the collected statistics (atomically) and is read back lazily.
        Sources without a folder keep their statistics in memory.
    provider: the architecture and data; may be None when every folder exists.
    Raises DataError (data) or CheckpointError (an unreadable folder).
    """
    method = plan.method
    if method.collector is not None:
        target = COLLECTORS[method.collector]
        module_name, function = target.split(":")
        collector = getattr(importlib.import_module(module_name), function)
        return collector(plan, provider, options, folders)
    folders = folders or {}
    result = StatisticsResult(stores={}, examples={}, seconds=0.0)
    work: nn.Module | None = None
    for key in plan.merged_sources:
        folder = folders.get(key)
        result.stores[key] = {}
        for kind_name in method.statistics:
            kind = KINDS[kind_name]
            if folder is not None and is_statistics_folder(folder):
                store = kind.open(folder)
                result.stores[key][kind_name] = store
                result.examples[key] = store.examples
                result.loaded.append(key)
                continue
            if provider is None:
                from mergelab.stats.batches import DataError

                raise DataError(f"model {key!r}: no statistics folder at {folder} and no data")
            if work is None:
                work = working_module(provider, options.device)
                result.notes.extend(unsupported_weights(work, plan, kind_name))
            load_weights(work, source_weights(plan, key))
            task = task_on_device(provider.task_data(key), options.device)
            collected = kind.collect(work, task, options)
            store = collected.store
            if folder is not None:
                collected.save(folder)
                store = kind.open(folder)
            result.stores[key][kind_name] = store
            result.examples[key] = collected.examples
            result.seconds += collected.seconds
            result.notes.extend(collected.notes)
    return result


def unsupported_weights(module: nn.Module, plan, kind: str) -> list[str]:
    """A note naming matrix parameters Gram statistics cannot cover (their module is not a
    Gram layer type, e.g. `nn.MultiheadAttention.in_proj_weight`): they are averaged."""
    if kind != "gram":
        return []
    from mergelab.stats.gram import GRAM_TYPES

    named = dict(module.named_modules())
    state = module.state_dict()
    out = []
    for task in plan.tasks:
        owner, _, leaf = task.name.rpartition(".")
        m = named.get(owner)
        if m is None or isinstance(m, GRAM_TYPES) and leaf == "weight":
            continue
        value = state.get(task.name)
        if value is not None and value.is_floating_point() and value.dim() >= 2:
            out.append(f"{task.name} ({type(m).__name__})")
    if not out:
        return []
    return ["averaged (no Gram statistics for this layer type): " + ", ".join(out)]
