"""Data-aware merging on any torch module: `data_merge` (Fisher, RegMean, RegMean++, AdaMerging,
ProDistill, and WEMoE's upscaled model with its routers trained on the data).

    result = mergelab.data_merge(
        "regmean", encoder, {"sentiment": sd_a, "topic": sd_b},
        {"sentiment": TaskData(batches_a, head=head_a), "topic": TaskData(batches_b, head=head_b)},
        alpha=0.9,
    )
    result.state_dict  # the merged weights

A thin front over the one pipeline (DESIGN.md), in memory: the arguments become a config whose
models are the given state dicts; the planner validates it once (parameters from the registry)
before any data runs; the method's declared data stage (mergelab.plan.stages) collects its
statistics from the given data (or runs its optimiser, whose output is a task-arithmetic
config); the engine merges that plan into memory. `mergelab merge` with a `data:` section runs
the same stages on checkpoints on disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from torch import nn

from mergelab.errors import ConfigError
from mergelab.stats.batches import Batch, DataError, TaskData, as_task_data

DataLike = TaskData | Sequence[Batch] | Callable[[], Iterable[Batch]]
StateDict = Mapping[str, torch.Tensor]
BASE_KEY = "__base__"  # the config's name of the base state dict


@dataclass
class DataMergeResult:
    """What a data-aware merge produced.

    state_dict: the merged weights (the keys of the fine-tuned state dicts).
    examples: examples of each task's data the method used (per model).
    seconds: wall time of the whole merge (statistics or optimisation included).
    stats_seconds: of which collecting statistics (RegMean, Fisher) or optimising the
        coefficients (AdaMerging); the rest is the engine's merge and bookkeeping.
    coefficients: an optimised method's learned coefficients (AdaMerging: [tasks] or
        [tasks, tensors]; ProDistill: [tasks, tensors]), else None; `coefficient_tensors` names
        the tensors of the columns.
    optimisation: the optimiser's own result (mergelab.plan.adamerging.AdaMergingResult,
        mergelab.plan.prodistill.ProDistillResult: e.g. ProDistill's loss per block), else None.
    config: the config the engine executed (optimised methods: the learned task-arithmetic config;
        `yaml` is it as text, which `merge_state_dicts` / `mergelab merge` run to the same
        weights, bit for bit).
    statistics: model -> kind -> statistics store; pass it back as `data_merge(...,
        statistics=...)` to merge again (other parameters) without running the data again.
    upscaled: an upscaling method's (WEMoE's) whole result, the shared weights (`state_dict`)
        plus every layer's extras with the trained ones (its routers) in place, as
        `mergelab.merge_upscaled` returns it (`.upscale(module)` wraps a module holding the
        shared weights; `.cost`); else None.
    """

    method: str
    state_dict: dict[str, torch.Tensor]
    params: dict[str, Any]
    examples: dict[str, int]
    seconds: float
    stats_seconds: float = 0.0
    coefficients: torch.Tensor | None = None
    coefficient_tensors: list[str] = field(default_factory=list)
    entropy_history: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: Any = None
    statistics: dict[str, dict[str, Any]] = field(default_factory=dict)
    optimisation: Any = None
    upscaled: Any = None

    @property
    def yaml(self) -> str:
        """The executed config as YAML (floats written to read back exactly)."""
        return yaml.safe_dump(self.config.model_dump(exclude_none=True, mode="json"), sort_keys=False)


def _check_module(module: nn.Module, state_dicts: Mapping[str, StateDict]) -> None:
    """Every state dict's keys are the module's, with its shapes (all problems listed)."""
    expected = module.state_dict()
    problems: list[str] = []
    for name, sd in state_dicts.items():
        unknown = sorted(set(sd) - set(expected))
        if unknown:
            problems.append(f"model {name!r} has keys the module lacks: {unknown[:8]}")
        for key in sorted(set(sd) & set(expected)):
            if tuple(sd[key].shape) != tuple(expected[key].shape):
                problems.append(
                    f"model {name!r}: `{key}` has shape {list(sd[key].shape)}, the module "
                    f"{list(expected[key].shape)}"
                )
    if problems:
        raise ConfigError(problems)


class _GivenData:
    """DataProvider (mergelab.stats.stage) over the caller's module and TaskData."""

    def __init__(self, module: nn.Module, data: Mapping[str, TaskData]):
        self._module, self._data = module, data

    def module(self) -> nn.Module:
        return self._module

    def task_data(self, key: str) -> TaskData:
        return self._data[key]


def data_merge(
    method: str,
    base_module: nn.Module,
    finetuned_state_dicts: Mapping[str, StateDict],
    batches_per_task: Mapping[str, DataLike],
    *,
    base_state_dict: StateDict | None = None,
    model_params: Mapping[str, Mapping[str, Any]] | None = None,
    max_examples: int | None = None,
    fisher_target: str = "auto",
    generator: torch.Generator | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    stats_dir: str | None = None,
    statistics: Mapping[str, Mapping[str, Any]] | None = None,
    merge_seed: int = 0,
    **params: Any,
) -> DataMergeResult:
    """Merge fine-tuned state dicts of one architecture with a data-aware method.

    method: any registered method that needs data ("regmean", "regmean_plusplus", "fisher",
        "adamerging_taskwise", "adamerging_layerwise", "prodistill", "wemoe": an upscaled
        model, in `DataMergeResult.upscaled`; see `mergelab methods`).
    base_module: the architecture (a torch module whose state dict keys match); its own weights
        are the base theta_0 (AdaMerging; RegMean's optional `scaling`) unless
        `base_state_dict` is given. It is not modified.
    finetuned_state_dicts: model name -> state dict (same keys; a subset of the module's keys).
    batches_per_task: model name -> its task's data: a `TaskData` (batches plus the head that
        turns the module's output into logits, needed by Fisher and AdaMerging), or just a list
        of batches / a function returning an iterator of them.
    model_params: per-model parameters (e.g. Fisher's `weight`), by model name.
    max_examples: examples per task used for statistics (default: every batch given); for
        ProDistill a cap on its `examples` parameter; AdaMerging uses every batch given.
    fisher_target: "auto", "labels", "sample" or "argmax" (see mergelab.stats.fisher).
    generator: the randomness of Fisher's sampled labels (ProDistill has its own `seed`).
    stats_dir: keep the statistics on disk, one folder per model (stats_dir/<model name>);
        existing folders are loaded instead of running the data.
    statistics: statistics of an earlier merge (`DataMergeResult.statistics`) to reuse.
    merge_seed: the merge seed, `merge_state_dicts`'s `seed` (a randomized kernel's draws; a
        trainer's batch order and initial values: WEMoE's routers).
    params: the method's global parameters (alpha, steps, lr...).
    Raises ConfigError (parameters, key/shape mismatches) or DataError (data) before merging.
    """
    from pathlib import Path

    from mergelab.api import _build, _state_dict_opener
    from mergelab.engine.execute import MemorySink, execute
    from mergelab.methods.registry import get_method, resolve_defaults
    from mergelab.plan.config import parse_config
    from mergelab.plan.stages import prepare_plan
    from mergelab.stats.stage import CollectOptions

    start = time.perf_counter()
    names = list(finetuned_state_dicts)
    if not names:
        raise ConfigError("no fine-tuned model to merge")
    empty = [n for n in names if not finetuned_state_dicts[n]]
    if empty:
        raise ConfigError([f"model {n!r}: its state dict has no tensors" for n in empty])
    try:
        declared = get_method(method)
    except KeyError as exc:
        raise ConfigError([f"merge_method: {exc.args[0]}"]) from None
    if not declared.needs_data:
        raise ConfigError(f"merge_method `{method}` needs no data: use mergelab.merge_state_dicts")
    state_dicts: dict[str, StateDict] = dict(finetuned_state_dicts)
    keys = list(finetuned_state_dicts[names[0]])
    cfg: dict[str, Any] = {
        "merge_method": method,
        "models": [
            {"model": n, **({"parameters": dict(model_params[n])} if model_params and n in model_params else {})}
            for n in names
        ],
    }
    if params:
        cfg["parameters"] = dict(params)
    unknown = sorted(set(model_params or {}) - set(names))
    if declared.base != "none":
        base = base_state_dict if base_state_dict is not None else base_module.state_dict()
        state_dicts[BASE_KEY] = {k: base[k] for k in keys if k in base}
        cfg["base_model"] = BASE_KEY
    floats = [v.dtype for v in finetuned_state_dicts[names[0]].values() if v.is_floating_point()]
    if floats and all(d == torch.float64 for d in floats):
        cfg["dtype"] = "float64"  # float64 models are merged in float64, as they were given
    config = parse_config(cfg)
    open_source = _state_dict_opener(state_dicts)
    # One validation, by the planner, before any data runs.
    plan = _build(config, open_source, None, data_supplied=True)
    if unknown:
        raise ConfigError([f"model_params names unknown model {m!r}" for m in unknown])
    _check_module(base_module, finetuned_state_dicts)
    missing = sorted(set(names) - set(batches_per_task))
    extra = sorted(set(batches_per_task) - set(names))
    if missing or extra:
        raise DataError(
            f"the data must name exactly the models to merge; no data for {missing}, "
            f"data for unknown model(s) {extra}"
        )
    data = {n: as_task_data(batches_per_task[n]) for n in names}
    options = CollectOptions(
        max_examples=max_examples,
        device=device,
        progress=progress,
        fisher_target=fisher_target,
        generator=generator,
        seed=merge_seed,
    )
    notes: list[str] = []
    if declared.optimiser is not None and declared.param("examples") is None and max_examples is not None:
        notes.append(f"max_examples does not apply to `{declared.name}`: give it the batches to use")
    folders = {n: Path(stats_dir) / n for n in names} if stats_dir is not None else None
    prepared = prepare_plan(
        plan, _GivenData(base_module, data), options, open_source,
        folders=folders, statistics=statistics,
    )
    sink = MemorySink(prepared.plan)
    extras = None
    if declared.upscaling is not None:
        from mergelab.upscale.memory import MemoryExtras, planned_extras

        extras = MemoryExtras(declared.upscaling, planned_extras(prepared.plan))
    execute(prepared.plan, sink, device="cpu" if device is None else device, progress=False,
            extras=extras, seed=merge_seed)  # fmt: skip
    merged = {k: v.detach().cpu() for k, v in sink.tensors.items()}
    upscaled = None
    if extras is not None:
        # The trained extras (WEMoE's routers) replace the kernel's initial values, as the
        # folder writer does.
        for tensor, learned in (prepared.extras or {}).items():
            extras.tensors[tensor].update(learned)
        upscaled = extras.finish(declared.name, names, merged)
    return DataMergeResult(
        method=declared.name,
        state_dict=merged,
        params=resolve_defaults(declared.global_params, params),
        examples=prepared.examples,
        seconds=time.perf_counter() - start,
        stats_seconds=prepared.stage_seconds,
        coefficients=prepared.coefficients,
        coefficient_tensors=prepared.coefficient_tensors,
        entropy_history=prepared.entropy_history,
        notes=[*prepared.notes, *notes],
        config=prepared.config,
        statistics=prepared.statistics,
        optimisation=prepared.optimisation,
        upscaled=upscaled,
    )


__all__ = ["DataMergeResult", "TaskData", "data_merge"]
