"""Data-aware merging on any torch module: `data_merge` (Fisher, RegMean, RegMean++, AdaMerging).

    result = mergelab.data_merge(
        "regmean", encoder, {"sentiment": sd_a, "topic": sd_b},
        {"sentiment": TaskData(batches_a, head=head_a), "topic": TaskData(batches_b, head=head_b)},
        alpha=0.9,
    )
    result.state_dict  # the merged weights

Data flow (DESIGN.md): the models, loaded one at a time into a copy of `base_module`, run a few
batches of their task's data; mergelab.stats collects per-layer statistics through hooks; the
closed forms of mergelab.methods.data_aware (or AdaMerging's optimisation) give the merged
state dict. Method declarations (parameters, ranges, defaults) live in the registry like every
other method's.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mergelab.datamerge.common import StateDict, check_state_dicts
from mergelab.errors import ConfigError
from mergelab.methods.registry import get_method, resolve_defaults
from mergelab.stats.batches import Batch, DataError, TaskData, as_task_data

DataLike = TaskData | Sequence[Batch] | Callable[[], Iterable[Batch]]


@dataclass
class DataMergeResult:
    """What a data-aware merge produced.

    state_dict: the merged weights (the keys of the fine-tuned state dicts).
    examples: examples of each task's data the method used (per model).
    seconds: wall time of the whole merge (statistics or optimisation included).
    stats_seconds: of which collecting statistics (RegMean, Fisher) or optimising the
        coefficients (AdaMerging); the rest is the closed-form merge and bookkeeping.
    coefficients: AdaMerging's learned coefficients ([tasks] or [tasks, tensors]), else None.
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


def _check_params(method_name: str, params: Mapping[str, Any], model_params: Mapping[str, Mapping[str, Any]], names: Sequence[str]):
    method = get_method(method_name)
    if "data" not in method.needs:
        raise ConfigError(
            f"merge_method `{method_name}` needs no data: use mergelab.merge_state_dicts"
        )
    problems: list[str] = []
    for key, value in params.items():
        p = method.param(key)
        if p is None or p.per_model:
            problems.append(f"`{key}` is not a global parameter of `{method_name}`")
            continue
        msg = p.check(value)
        if msg:
            problems.append(f"{msg} (method `{method_name}`)")
    for model, given in model_params.items():
        if model not in names:
            problems.append(f"model_params names unknown model {model!r}")
        for key, value in given.items():
            p = method.param(key)
            if p is None or not p.per_model:
                problems.append(f"`{key}` is not a per-model parameter of `{method_name}`")
                continue
            msg = p.check(value)
            if msg:
                problems.append(f"model {model!r}: {msg}")
    if len(names) < method.min_models:
        problems.append(f"`{method_name}` needs at least {method.min_models} models; got {len(names)}")
    if problems:
        raise ConfigError(problems)
    resolved = resolve_defaults(method.global_params, params)
    per_model = {n: resolve_defaults(method.model_params, model_params.get(n, {})) for n in names}
    return method, resolved, per_model


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
    **params: Any,
) -> DataMergeResult:
    """Merge fine-tuned state dicts of one architecture with a data-aware method.

    method: "regmean", "regmean_plusplus", "fisher", "adamerging_taskwise" or
        "adamerging_layerwise" (see `mergelab methods` for their parameters).
    base_module: the architecture (a torch module whose state dict keys match); its own weights
        are the base theta_0 (AdaMerging; RegMean's optional `scaling`) unless
        `base_state_dict` is given. It is not modified.
    finetuned_state_dicts: model name -> state dict (same keys; a subset of the module's keys).
    batches_per_task: model name -> its task's data: a `TaskData` (batches plus the head that
        turns the module's output into logits, needed by Fisher and AdaMerging), or just a list
        of batches / a function returning an iterator of them.
    model_params: per-model parameters (e.g. Fisher's `weight`), by model name.
    max_examples: examples per task used for statistics (default: every batch given).
    fisher_target: "auto", "labels", "sample" or "argmax" (see mergelab.stats.fisher).
    generator: the randomness of Fisher's sampled labels.
    stats_dir: keep the statistics on disk, one folder per model (RegMean and Fisher).
    params: the method's global parameters (alpha, steps, lr...).
    Raises ConfigError (parameters, key/shape mismatches) or DataError (data) before merging.
    """
    names = list(finetuned_state_dicts)
    method_decl, resolved, per_model = _check_params(method, params, model_params or {}, names)
    missing = sorted(set(names) - set(batches_per_task))
    extra = sorted(set(batches_per_task) - set(names))
    if missing or extra:
        raise DataError(
            f"the data must name exactly the models to merge; no data for {missing}, "
            f"data for unknown model(s) {extra}"
        )
    keys = check_state_dicts(base_module, finetuned_state_dicts)
    data = {n: as_task_data(batches_per_task[n]) for n in names}
    if device is not None:
        # Work on copies moved to the device: the caller's module and heads stay where they are.
        base_module = copy.deepcopy(base_module).to(device)
        data = {
            n: dataclasses.replace(t, head=None if t.head is None else copy.deepcopy(t.head).to(device))
            for n, t in data.items()
        }
    start = time.perf_counter()
    notes: list[str] = []
    coefficients = None
    coefficient_tensors: list[str] = []
    history: list[float] = []
    common = dict(max_examples=max_examples, device=device, progress=progress)
    if method_decl.name in ("regmean", "regmean_plusplus"):
        from mergelab.datamerge import regmean as rm

        skipped = rm.unsupported_weights(base_module, keys)
        if skipped:
            notes.append("averaged (no Gram statistics for this layer type): " + ", ".join(skipped))
        scaling = float(resolved["scaling"])
        base = None
        if scaling != 1.0:
            base = base_state_dict if base_state_dict is not None else base_module.state_dict()
        gram_params = dict(
            alpha=float(resolved["alpha"]),
            regularization=float(resolved["regularization"]),
            average_grams=bool(resolved["average_grams"]),
            base=base,
            scaling=scaling,
        )
        if method_decl.name == "regmean":
            merged, examples, stats_seconds = rm.regmean(
                base_module, finetuned_state_dicts, data, keys, stats_dir=stats_dir, **gram_params, **common
            )
        else:
            merged, examples, stats_seconds = rm.regmean_plusplus(
                base_module, finetuned_state_dicts, data, keys, **gram_params, **common
            )
    elif method_decl.name == "fisher":
        from mergelab.datamerge.fisher import fisher_merge

        merged, examples, stats_seconds = fisher_merge(
            base_module,
            finetuned_state_dicts,
            data,
            keys,
            model_weights={n: float(per_model[n]["weight"]) for n in names},
            fisher_floor=float(resolved["fisher_floor"]),
            normalize=bool(resolved["normalize"]),
            target=fisher_target,  # type: ignore[arg-type]
            generator=generator,
            stats_dir=stats_dir,
            **common,
        )
    else:
        from mergelab.datamerge.adamerging import adamerging

        base = base_state_dict if base_state_dict is not None else base_module.state_dict()
        base = {k: base[k] for k in keys}
        if max_examples is not None:
            notes.append("max_examples does not apply to AdaMerging: give it the batches to use")
        result = adamerging(
            base_module,
            base,
            finetuned_state_dicts,
            data,
            granularity="task" if method_decl.name == "adamerging_taskwise" else "layer",
            steps=int(resolved["steps"]),
            lr=float(resolved["lr"]),
            init=float(resolved["init"]),
            clamp=bool(resolved["clamp"]),
            device=device,
            progress=progress,
        )
        merged, examples = result.state_dict, result.examples
        stats_seconds = result.seconds  # the optimisation is AdaMerging's pass over the data
        coefficients, coefficient_tensors = result.coefficients, result.tensor_names
        history = result.entropy_history
    return DataMergeResult(
        method=method_decl.name,
        state_dict={k: v.detach().cpu() for k, v in merged.items()},
        params=resolved,
        examples=examples,
        seconds=time.perf_counter() - start,
        stats_seconds=stats_seconds,
        coefficients=coefficients,
        coefficient_tensors=coefficient_tensors,
        entropy_history=history,
        notes=notes,
    )


__all__ = ["DataMergeResult", "TaskData", "data_merge"]
