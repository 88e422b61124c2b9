"""The data stages between a validated plan and the engine, dispatched on declarations only.

    plan = build_plan(config, ...)                  # validates everything, `data:` included
    prepared = prepare_plan(plan, provider, ...)    # statistics stage, or optimiser stage
    execute(prepared.plan, sink)                    # the one engine

- A method declaring `statistics` gets them from mergelab.stats.stage (collected from the
  provider's data, or loaded from statistics folders), attached to the plan as lazy per-tensor
  references; the engine reads them next to the tensors.
- A method declaring an `optimiser` runs it (registered in `OPTIMISERS`); its output is a new
  config (AdaMerging, ProDistill: task arithmetic with per-tensor coefficients), planned like
  any other.
- Any other method's plan goes to the engine unchanged.

`describe_data_stage` says, without running anything, what the stage will do and cost.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.plan.config import MergeConfig
from mergelab.plan.planner import MergePlan, attach_statistics, build_plan


@dataclass(frozen=True)
class OptimiserStage:
    """A registered optimisation stage.

    run: "module:function(plan, provider, options, folders) -> (MergeConfig, result)", the
        result with .coefficients, .tensor_names, .examples, .seconds (and optionally .notes,
        .entropy_history).
    describe: "module:function(plan) -> dict" of what a dry run reports about its cost:
        `output`, `estimated_forward_passes`, `cost`, and optionally `examples` (the examples
        per task it will use, when not the data section's).
    needs_logits: its data must produce logits (each model's task head).
    """

    run: str
    describe: str
    needs_logits: bool


OPTIMISERS: dict[str, OptimiserStage] = {
    "adamerging": OptimiserStage(
        "mergelab.plan.adamerging:optimise", "mergelab.plan.adamerging:describe", needs_logits=True
    ),
    "prodistill": OptimiserStage(
        "mergelab.plan.prodistill:optimise", "mergelab.plan.prodistill:describe", needs_logits=False
    ),
}
# Training stages of upscaling methods: name -> "module:function(plan, provider, options,
# folders) -> result with .extras (tensor -> key -> learned value), .entropy_history,
# .examples, .seconds, .notes"; the plan runs unchanged and the writer writes those extras.
TRAINERS: dict[str, str] = {
    "wemoe_routers": "mergelab.upscale.train:train_routers",
}


def _load(target: str) -> Callable:
    module_name, function = target.split(":")
    return getattr(importlib.import_module(module_name), function)


@dataclass
class PreparedMerge:
    """A plan ready for the engine and what its data stage did.

    config: the config the plan executes (for an optimised method, the optimiser's output,
        savable as plain YAML that `mergelab merge` runs to the same weights).
    statistics: merged source key -> kind -> StatisticsSource (reusable by a later merge).
    """

    plan: MergePlan
    config: MergeConfig
    examples: dict[str, int] = field(default_factory=dict)
    stage_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    statistics: dict[str, dict[str, Any]] = field(default_factory=dict)
    coefficients: torch.Tensor | None = None
    coefficient_tensors: list[str] = field(default_factory=list)
    entropy_history: list[float] = field(default_factory=list)
    extras: dict[str, dict[str, torch.Tensor]] | None = None
    optimisation: Any = None  # the optimiser's own result (AdaMergingResult, ProDistillResult)


def prepare_plan(
    plan: MergePlan,
    provider,
    options,
    open_source: Callable[[str], Any],
    *,
    folders: Mapping[str, Path] | None = None,
    statistics: Mapping[str, Mapping[str, Any]] | None = None,
    source_label: str | None = None,
) -> PreparedMerge:
    """Run the data stage `plan.method` declares and return the plan the engine executes.

    provider: the architecture and each merged source's data (mergelab.stats.stage.DataProvider);
        may be None when every statistic comes from `folders` or `statistics`.
    options: mergelab.stats.stage.CollectOptions.
    open_source: the planner's source opener (the optimiser's output plan is planned with it).
    folders: merged source key -> statistics folder (loaded if present, else written).
    statistics: statistics collected earlier (PreparedMerge.statistics): used as they are.
    An upscaling method with a `trainer` runs it: the plan is unchanged and the learned extras
    come back in `PreparedMerge.extras` for the writer.
    """
    method = plan.method
    if method.trains_extras:
        assert method.upscaling is not None and method.upscaling.trainer is not None
        trained = _load(TRAINERS[method.upscaling.trainer])(plan, provider, options, folders)
        return PreparedMerge(
            plan=plan,
            config=plan.config,
            examples=dict(trained.examples),
            stage_seconds=trained.seconds,
            notes=list(trained.notes),
            entropy_history=list(trained.entropy_history),
            extras=trained.extras,
        )
    if method.optimiser is not None:
        start = time.perf_counter()
        config, result = _load(OPTIMISERS[method.optimiser].run)(plan, provider, options, folders)
        final = build_plan(config, open_source, source_label=source_label)
        tensor_names = list(result.tensor_names)
        return PreparedMerge(
            plan=final,
            config=config,
            examples=dict(result.examples),
            stage_seconds=time.perf_counter() - start,
            notes=[
                f"`{method.name}` learned the coefficients of a `{config.merge_method}` plan "
                "(the output's mergelab_config.yml re-runs it)",
                *([_coefficients_note(method.name, result.coefficients)] if result.coefficients.dim() == 1 else []),
                *getattr(result, "notes", ()),
            ],
            coefficients=result.coefficients,
            coefficient_tensors=tensor_names,
            entropy_history=list(getattr(result, "entropy_history", ())),
            optimisation=result,
        )
    if method.statistics:
        from mergelab.stats.stage import collect_statistics

        if statistics is not None:
            stores = {k: dict(v) for k, v in statistics.items()}
            examples = {k: next(iter(v.values())).examples for k, v in stores.items() if v}
            seconds, notes = 0.0, []
        else:
            collected = collect_statistics(plan, provider, options, folders)
            stores, examples = collected.stores, collected.examples
            seconds, notes = collected.seconds, collected.notes
        final = attach_statistics(plan, stores, source_label=source_label)
        return PreparedMerge(
            plan=final,
            config=plan.config,
            examples=examples,
            stage_seconds=seconds,
            notes=notes,
            statistics=stores,
        )
    return PreparedMerge(plan=plan, config=plan.config)


def _coefficients_note(method: str, coefficients: torch.Tensor) -> str:
    return f"`{method}` coefficients: " + ", ".join(f"{c:.3f}" for c in coefficients.tolist())


def statistics_folders(config: MergeConfig, plan: MergePlan, config_dir: Path | None) -> dict[str, Path]:
    """Merged source key -> the statistics folder `data.statistics` names for it ({} if none).

    A list names one folder per `models` entry; a single path is a parent folder with one
    subfolder per model, named after the model's folder (`.../ft-sentiment` -> `ft-sentiment`).
    Relative paths are relative to the config file's folder.
    """
    data = config.data
    if data is None or data.statistics is None:
        return {}

    def resolve(path: str) -> Path:
        p = Path(path).expanduser()
        return config_dir / p if config_dir is not None and not p.is_absolute() else p

    models = [e.model for e in config.models or ()]
    if isinstance(data.statistics, list):
        by_model = {m: resolve(f) for m, f in zip(models, data.statistics, strict=False)}
    else:
        parent = resolve(data.statistics)
        by_model = {m: parent / Path(m).name for m in models}
    return {k: by_model[k] for k in plan.merged_sources if k in by_model}


def _task_of(config: MergeConfig, key: str) -> str | None:
    data = config.data
    if data is None:
        return None
    if data.task is not None:
        return data.task
    models = [e.model for e in config.models or ()]
    if data.tasks is not None and key in models and models.index(key) < len(data.tasks):
        return data.tasks[models.index(key)]
    return None


def describe_data_stage(plan: MergePlan, config_dir: Path | None = None) -> dict[str, Any] | None:
    """What the data stage of `plan` will do, without running it: which statistics (or which
    optimisation), for which source from which task/split on how many examples, and an
    estimate of its cost (bytes of statistics, forward passes). None for data-free methods."""
    method = plan.method
    if not plan.needs_data_stage:
        return None
    data = plan.config.data
    sources = plan.merged_sources
    split = data.split if data is not None else None
    examples = data.examples if data is not None else None
    folders = statistics_folders(plan.config, plan, config_dir) if data is not None else {}
    from mergelab.stats.stage import KINDS, is_statistics_folder

    per_source = []
    for key in sources:
        folder = folders.get(key)
        loaded = folder is not None and is_statistics_folder(folder)
        per_source.append(
            {
                "model": key,
                "task": _task_of(plan.config, key) if data is not None else "given by the caller",
                "split": split,
                "examples": examples,
                "statistics_folder": None if folder is None else str(folder),
                "loaded_from_folder": loaded,
            }
        )
    out: dict[str, Any] = {"method": method.name, "sources": per_source}
    to_run = [s for s in per_source if not s["loaded_from_folder"]]
    n = examples or 0
    if method.trains_extras:
        params = plan.tasks[0].params if plan.tasks else {}
        steps = int(params.get("steps", 0))
        batch = data.batch_size if data is not None else 0
        assert method.upscaling is not None
        out.update(
            stage="trainer",
            trainer=method.upscaling.trainer,
            output=f"the upscaled model with its learned {', '.join(method.upscaling.trained)}",
            estimated_forward_passes=steps * len(sources) * batch,
            cost=f"one in-memory merge, then {steps} steps x {len(sources)} task(s) x {batch} "
            "examples, each a forward and a backward pass through the upscaled model",
        )
        return out
    if method.optimiser is not None:
        described = _load(OPTIMISERS[method.optimiser].describe)(plan)
        used = described.pop("examples", None)
        if used is not None:
            for source in per_source:
                source["examples"] = used
        out.update(
            stage="optimiser",
            optimiser=method.optimiser,
            options=dict(method.optimiser_options),
            **described,
        )
        return out
    kinds = [KINDS[k] for k in method.statistics]
    per_model_bytes = sum(
        kind.estimate_bytes(t.name, t.shape) for kind in kinds for t in plan.tasks if t.is_float
    )
    passes = len(to_run) * n
    blocks = None
    if method.collector == "progressive":
        from mergelab.stats.progressive import block_of

        blocks = len({block_of(t.name.rpartition(".")[0]) for t in plan.tasks if t.name.endswith("weight")})
        passes *= max(blocks, 1)
    out.update(
        stage="statistics",
        statistics=[{"kind": k.name, "what": k.title, "per_example": k.passes} for k in kinds],
        collector=method.collector or "each source on its own data",
        estimated_statistics_bytes=per_model_bytes * len(sources),
        estimated_forward_passes=passes,
        cost=(
            f"{len(to_run)} source(s) x {n} examples"
            + (f" x {blocks} blocks (partial passes)" if blocks else "")
            + f"; about {per_model_bytes / 1e6:.2f} MB of statistics per source"
        ),
    )
    return out
