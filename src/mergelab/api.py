"""The Python API: `merge` (checkpoints on disk); `merge_state_dicts`, `merge_modulated` and
`merge_upscaled` (in memory); `merge_expert_groups` (the copies inside one in-memory model)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from mergelab.checkpoint import ShardedWriter, open_checkpoint, parse_size
from mergelab.checkpoint.card import CARD_FILE, merge_card
from mergelab.checkpoint.format import CONFIG_FILES, TOKENIZER_FILES
from mergelab.checkpoint.heads import HEADS_MANIFEST, head_file_name, heads_manifest, merged_heads
from mergelab.checkpoint.memory import ListedSource, StateDictSource
from mergelab.engine.execute import MemorySink, MergeReport, execute, takes_extras
from mergelab.errors import CheckpointError, ConfigError, MergeLabError
from mergelab.fileio import temporary_folder
from mergelab.plan.config import ExpertGroupSpec, MergeConfig, load_config, parse_config
from mergelab.plan.expert_groups import GramLookup
from mergelab.plan.multistage import StagedConfig, order_stages, read_documents
from mergelab.plan.planner import MergePlan, build_plan


def _read_config(config: str | os.PathLike | Mapping | MergeConfig) -> tuple[MergeConfig, Path | None]:
    if isinstance(config, MergeConfig):
        return config, None
    if isinstance(config, Mapping):
        return parse_config(dict(config)), None
    path = Path(config)
    return load_config(path), path.parent


def _resolve_path(name: str, config_dir: Path | None, cwd: Path | None = None) -> Path:
    """A path of the config: as given (relative to `cwd`, by default the current folder), else
    relative to the config file's folder."""
    given = Path(name).expanduser()
    path = cwd / given if cwd is not None and not given.is_absolute() else given
    if not path.exists() and config_dir is not None and not given.is_absolute():
        candidate = config_dir / given
        if candidate.exists():
            path = candidate
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {name}")
    return path


def _opener(config_dir: Path | None, stages: Mapping[str, Any] | None = None,
            cwd: Path | None = None):  # fmt: skip
    """The source opener of a config: paths as given (relative to `cwd`, by default the
    current folder) or under `config_dir`, `model+adapter` pairs, and (multi-document configs)
    stage names: `stages` maps a stage's name to its written folder, or to its output's tensor
    list before it ran (a ListedSource)."""

    def open_source(model: str):
        if stages is not None and model in stages:
            written = stages[model]
            return open_checkpoint(written) if isinstance(written, Path) else written
        if not (config_dir is not None and (config_dir / model).exists()):
            from mergelab.lora.source import open_folded, split_model_adapter

            # mergekit's `model: ./base+./my-lora`: the adapter folded in tensor by tensor.
            pair = split_model_adapter(model)
            if pair is not None:
                return open_folded(_resolve_path(pair[0], config_dir, cwd),
                                   _resolve_path(pair[1], config_dir, cwd))  # fmt: skip
        return open_checkpoint(_resolve_path(model, config_dir, cwd))

    return open_source


def _gram_opener(config_dir: Path | None):
    def open_grams(folder: str) -> GramLookup:
        from mergelab.stats.store import GramStore

        return GramStore(_resolve_path(folder, config_dir))

    return open_grams


def _tracked(opener):
    """`opener` plus the list of every source it opened, so a failed validation can close them."""
    opened: list[Any] = []

    def open_source(model: str):
        source = opener(model)
        opened.append(source)
        return source

    return open_source, opened


def plan_merge(config: str | os.PathLike | Mapping | MergeConfig, *, strict: bool = False) -> MergePlan:
    """Validate a config (file path, mapping or MergeConfig) and its sources; return the plan.

    strict: refuse parameters that mergekit accepts and ignores (by default they are ignored,
    with a note saying so). A multi-document file (mergekit-multi) is validated stage by stage,
    each against the outputs of the stages it reads; the final stage's plan is returned, its
    notes naming the stages that run first.

    Every config is accepted, `data:` included: a data-aware method's plan is validated in full
    (parameters, sources, tasks, heads, statistics folders) without running any data; its data
    stage is described by `mergelab.plan.stages.describe_data_stage` (`--dry-run` prints it).
    """
    staged = _staged(config)
    if staged is not None:
        plans = _plan_stages(staged, Path(config), strict)
        final = plans.pop(staged.final.name)
        for plan in plans.values():
            close_plan(plan)
        return final
    cfg, config_dir = _read_config(config)
    label = str(config) if isinstance(config, (str, os.PathLike)) else None
    open_source, opened = _tracked(_opener(config_dir))
    try:  # when validation fails, the sources opened so far are closed before the error
        plan = _build(cfg, open_source, label, config_dir, strict=strict)
        _provider(plan, config_dir, label)  # checks the data section's folders, tasks and heads
    except BaseException:
        _close_all(opened)
        raise
    plan.config_dir = config_dir
    return plan


def _provider(plan: MergePlan, config_dir: Path | None, label: str | None):
    """The config's data provider for a data-aware plan (checked: no model loaded, no data
    run), or None for data-free methods or when statistics folders hold everything."""
    if not plan.needs_data_stage or plan.config.data is None:
        return None
    from mergelab.plan.stages import statistics_folders
    from mergelab.stats.config_data import ConfigData
    from mergelab.stats.stage import KINDS, is_statistics_folder

    folders = statistics_folders(plan.config, plan, config_dir)
    loaded = {k for k, f in folders.items() if is_statistics_folder(f)}
    problems: list[str] = []
    for key, folder in folders.items():
        if folder.exists() and key not in loaded:
            problems.append(f"data.statistics: {folder} exists and is not a statistics folder")
        for kind in plan.method.statistics if key in loaded else ():
            try:
                KINDS[kind].open(folder)
            except MergeLabError as exc:
                problems.append(f"data.statistics of model {key!r}: {exc}")
    provider = ConfigData(plan.config, config_dir, plan.method, skip=loaded)
    problems += provider.check()
    if problems:
        raise ConfigError(problems, label)
    return provider


def merge_modulated(
    config: Mapping | MergeConfig,
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    device: str = "cpu",
    seed: int = 0,
    allow_nonfinite: bool = False,
    progress: bool = False,
):
    """Merge in memory with a modulated method (`tall_masks`, `emr`): the shared weights plus
    each task's masks and rescaler, as a `mergelab.modulators.memory.ModulatedStateDicts`
    (`.task_state_dict(task)` gives a task's dense weights; tasks are the config's model
    names). Raises ConfigError for a method without modulators."""
    from mergelab.modulators.memory import MemoryModulators

    def require(plan: MergePlan) -> None:
        if plan.method.modulation is None:
            raise ConfigError([f"method `{plan.method.name}` has no per-task modulators; use "
                               "merge_state_dicts"])  # fmt: skip

    plan = _memory_plan(config, state_dicts, device, require=require)
    modulators = MemoryModulators(plan.merged_sources)
    tensors = _execute_in_memory(plan, device, seed, allow_nonfinite, progress, modulators=modulators)
    return modulators.finish(tensors, plan.method.modulation.rescalers)


def merge_upscaled(
    config: Mapping | MergeConfig,
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    device: str = "cpu",
    seed: int = 0,
    allow_nonfinite: bool = False,
    progress: bool = False,
):
    """Merge in memory with an upscaling method (`smile`): the shared weights plus every
    tensor's extras, as a `mergelab.upscale.memory.UpscaledStateDicts`, what `merge` would
    write to a folder (same validation, kernels and cost). Its `.upscale(module)` wraps the
    layers of a module holding `.state_dict`, as `mergelab.upscale.upscale_module` does for a
    folder. Raises ConfigError for a method that does not upscale, and for one whose extras
    are trained on data (WEMoE's routers: `mergelab.merge` with a `data:` section)."""
    from mergelab.upscale.memory import MemoryExtras, planned_extras

    def require(plan: MergePlan) -> None:
        if plan.method.upscaling is None:
            raise ConfigError([f"method `{plan.method.name}` does not upscale; use "
                               "merge_state_dicts"])  # fmt: skip

    plan = _memory_plan(config, state_dicts, device, require=require)
    extras = MemoryExtras(plan.method.upscaling, planned_extras(plan))
    tensors = _execute_in_memory(plan, device, seed, allow_nonfinite, progress, extras=extras)
    return extras.finish(plan.method.name, plan.merged_sources, tensors)


def _build(cfg: MergeConfig, open_source, label: str | None, config_dir: Path | None = None,
           data_supplied: bool = False, strict: bool = False) -> MergePlan:
    return build_plan(cfg, open_source, source_label=label, open_grams=_gram_opener(config_dir),
                      data_supplied=data_supplied, strict=strict)


def merge(
    config: str | os.PathLike | Mapping | MergeConfig,
    out_dir: str | os.PathLike,
    *,
    device: str = "cpu",
    out_shard_size: int | str = "5GB",
    overwrite: bool = False,
    seed: int = 0,
    dry_run: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = True,
    workers: int | None = None,
    strict: bool = False,
    ray_address: str | None = None,
) -> MergeReport | MergePlan:
    """Merge the checkpoints a config names and write the result to `out_dir`.

    The whole config is validated against the sources before any tensor is read or any data
    is run. A data-aware method then runs its data stage (mergelab.plan.stages): statistics
    (RegMean, Fisher...) are collected from the config's `data:` section, or loaded from the
    statistics folders it names, and read per tensor by the engine; an optimised method
    (AdaMerging) runs its optimiser, whose output plan (a task-arithmetic config, written to
    the output as `mergelab_config.yml`) the engine executes. The output is written into a
    temporary folder beside `out_dir` and renamed into place only when complete; an existing
    `out_dir` is refused unless `overwrite`, and writing into an input always is.
    With `dry_run`, returns the validated MergePlan and writes nothing. `strict` refuses
    parameters that mergekit accepts and ignores (by default: ignored, with a note).
    A multi-document file (mergekit-multi: stages that read each other by `name`) has every
    stage validated first, then runs them in order, each into a folder inside a temporary
    folder beside `out_dir` (removed at the end), the final stage into `out_dir`.
    `ray_address` ("auto", "HOST:PORT", "ray://HOST:PORT", or "local" for a Ray started for
    this merge) spreads the output shards over the tasks of a Ray cluster
    (mergelab.engine.distributed): the same plan, executor and bytes as a merge here; the
    inputs and `out_dir`'s parent must be on storage every node sees, which is checked on every
    node before any tensor is merged. Data-free, single-document configs only.
    Returns a MergeReport (timings, bytes, notes).
    """
    options = dict(device=device, out_shard_size=out_shard_size, overwrite=overwrite, seed=seed,
                   allow_nonfinite=allow_nonfinite, progress=progress, workers=workers,
                   ray_address=ray_address)  # fmt: skip
    staged = _staged(config)
    if staged is not None and ray_address is not None:
        raise ConfigError(["--ray-address: a multi-document config runs its stages one after "
                           "another on this machine; merge each stage with --ray-address "
                           "instead"], str(config))  # fmt: skip
    if staged is not None:
        return _merge_stages(staged, Path(config), out_dir, dry_run=dry_run, strict=strict,
                             **options)
    cfg, config_dir = _read_config(config)
    label = str(config) if isinstance(config, (str, os.PathLike)) else None
    return _merge_config(cfg, config_dir, label, out_dir, dry_run=dry_run, strict=strict,
                         **options)


def _merge_config(
    cfg: MergeConfig, config_dir: Path | None, label: str | None, out_dir, *, dry_run: bool,
    strict: bool, stages: Mapping[str, Any] | None = None, recorded: str | None = None,
    **options,
) -> MergeReport | MergePlan:  # fmt: skip
    """Validate and run one config (a plain file, or one stage of a multi-document file, whose
    output records the whole file's text `recorded`)."""
    open_source, opened = _tracked(_opener(config_dir, stages))
    try:  # a config that fails validation leaves no source open
        plan = _build(cfg, open_source, label, config_dir, strict=strict)
        provider = _provider(plan, config_dir, label)
    except BaseException:
        _close_all(opened)
        raise
    plan.recorded_config = recorded
    if dry_run:
        plan.config_dir = config_dir
        return plan
    recipe = _ConfigPlan(cfg, config_dir, label, strict, Path.cwd())
    try:  # the sources' files are closed however the merge ends
        return _merge_plan(plan, out_dir, provider=provider, config_dir=config_dir,
                           open_source=open_source, label=label, recipe=recipe, **options)
    finally:
        close_plan(plan)


def _staged(config: Any) -> StagedConfig | None:
    """The ordered stages of a multi-document config file; None for anything else."""
    if not isinstance(config, (str, os.PathLike)):
        return None
    documents = read_documents(config)
    if len(documents) <= 1:
        return None
    config_dir = Path(config).parent

    def exists(model: str) -> bool:
        from mergelab.lora.source import split_model_adapter

        pair = split_model_adapter(model) if not (config_dir / model).exists() else None
        for part in pair or (model,):
            try:
                _resolve_path(part, config_dir)
            except FileNotFoundError:
                return False
        return True

    return order_stages(documents, str(config), exists=exists)


def _plan_stages(staged: StagedConfig, path: Path, strict: bool) -> dict[str | None, MergePlan]:
    """Plan every stage before any tensor is read: a stage's readers see the outputs of the
    stages before it as their tensor lists. Returns stage name -> plan (sources open); on a
    problem, closes what it opened and raises one ConfigError listing every stage's problems."""
    plans: dict[str | None, MergePlan] = {}
    listed: dict[str, ListedSource] = {}
    problems: list[str] = []
    # The tokenizer each stage will write, for the stages reading it (vocabulary merging).
    with tempfile.TemporaryDirectory(prefix="mergelab-stage-tokenizers-") as scratch:
        for stage in staged.stages:
            label = f"{path} ({stage.label})"
            if any(ref not in listed for ref in stage.reads):
                continue  # a stage it reads is invalid: reported there
            try:
                plan = _merge_config(stage.config, path.parent, label, None, dry_run=True,
                                     strict=strict, stages=listed)
            except ConfigError as exc:
                problems.extend(f"{stage.label}: {p}" for p in exc.problems)
                continue
            plans[stage.name] = plan
            if stage.name is not None:
                listed[stage.name] = ListedSource(
                    f"the output of stage `{stage.name}`",
                    {t.name: (t.shape, t.out_dtype) for t in plan.tasks},
                    plan.out_config,
                    root=_tokenizer_preview(plan, Path(scratch) / str(len(listed))),
                )
    if problems:
        for plan in plans.values():
            close_plan(plan)
        raise ConfigError(problems, str(path))
    final = plans[staged.final.name]
    for stage in staged.stages[:-1]:
        plan = plans[stage.name]
        final.notes.append(
            f"{stage.label} runs first (`{plan.method.name}`, {len(plan.tasks)} tensors) into a "
            "temporary folder"
        )
    for name in staged.unused:
        final.notes.append(f"stage `{name}` is not read by the final merge and is not run")
    return plans


def _tokenizer_preview(plan: MergePlan, folder: Path) -> Path:
    """A folder holding the tokenizer files (and config.json) a plan's output will have."""
    folder.mkdir(parents=True)
    if plan.out_config is not None:
        (folder / "config.json").write_text(json.dumps(plan.out_config), encoding="utf-8")
    donor = plan.sources.get(plan.tokenizer_donor) if plan.tokenizer_donor else None
    if plan.tokenizer_files:
        for name, content in plan.tokenizer_files.items():
            (folder / name).write_bytes(content)
    elif donor is not None and donor.root is not None:
        for name in TOKENIZER_FILES:
            if (donor.root / name).is_file():
                shutil.copyfile(donor.root / name, folder / name)
    return folder


def _merge_stages(staged: StagedConfig, path: Path, out_dir, *, dry_run: bool, strict: bool,
                  **options) -> MergeReport | MergePlan:  # fmt: skip
    """Run the stages of a multi-document config in order (all validated first)."""
    plans = _plan_stages(staged, path, strict)
    final_plan = plans.pop(staged.final.name)
    for plan in plans.values():
        close_plan(plan)
    if dry_run:
        return final_plan
    close_plan(final_plan)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not options["overwrite"]:
        raise CheckpointError(
            f"refusing to write checkpoint: output folder {out} already exists "
            "(pass overwrite=True to replace)"
        )
    notes: list[str] = []
    work = temporary_folder(out)
    try:
        written: dict[str, Path] = {}
        for i, stage in enumerate(staged.stages[:-1]):
            folder = work / f"stage-{i}"
            report = _merge_config(
                stage.config, path.parent, f"{path} ({stage.label})", folder, dry_run=False,
                strict=strict, stages=written, **{**options, "overwrite": False},
            )  # fmt: skip
            written[stage.name] = folder
            notes.append(f"{stage.label}: merged {report.tensors} tensors with `{report.method}` "
                         "into an intermediate folder (removed after)")
            notes.extend(f"{stage.label}: {n}" for n in report.notes)
        report = _merge_config(staged.final.config, path.parent, f"{path} ({staged.final.label})",
                               out, dry_run=False, strict=strict, stages=written,
                               recorded=path.read_text(encoding="utf-8"), **options)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.notes[:0] = notes
    report.notes.extend(f"stage `{n}` is not read by the final merge and was not run"
                        for n in staged.unused)
    return report


def _merge_plan(
    plan: MergePlan, out_dir, *, device, out_shard_size, overwrite, seed, allow_nonfinite,
    progress, workers, provider, config_dir, open_source, label, recipe, ray_address,
) -> MergeReport:  # fmt: skip
    try:
        max_shard = parse_size(out_shard_size)
    except ValueError as exc:
        raise ConfigError([f"out_shard_size: {exc}"]) from None
    if ray_address is not None:
        return _write_on_cluster(plan, out_dir, max_shard, overwrite, device, seed,
                                 allow_nonfinite, progress, ray_address, recipe, label)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="mergelab-stats-") as scratch:
        prepared = None
        if plan.needs_data_stage:
            prepared = _prepare(plan, provider, config_dir, open_source, label, Path(scratch),
                                device=device, seed=seed, progress=progress)
            plan = prepared.plan
        report = _write(plan, out_dir, max_shard, overwrite, device, seed, allow_nonfinite,
                        progress, workers, trained=prepared.extras if prepared else None)
    if prepared is not None:
        report.notes[:0] = prepared.notes
        if prepared.examples:
            report.notes.append(
                "examples per model: " + ", ".join(f"{m}={k}" for m, k in prepared.examples.items())
            )
    return report


def _prepare(plan, provider, config_dir, open_source, label, scratch: Path, *, device, seed, progress):
    from mergelab.plan.stages import prepare_plan, statistics_folders
    from mergelab.stats.stage import CollectOptions

    data = plan.config.data
    folders = statistics_folders(plan.config, plan, config_dir)
    # Statistics the config does not keep go to a scratch folder: read back one tensor's at a
    # time, so the merge holds a few entries, never every model's statistics at once.
    for i, key in enumerate(plan.merged_sources):
        folders.setdefault(key, scratch / str(i))
    options = CollectOptions(
        device=None if device == "cpu" else device,
        progress=progress,
        generator=torch.Generator().manual_seed((data.seed if data else 0) + seed),
        seed=seed,
    )
    return prepare_plan(plan, provider, options, open_source, folders=folders, source_label=label)


def _writer(plan: MergePlan, out_dir, max_shard: int, overwrite: bool,
            shards_elsewhere: bool = False) -> ShardedWriter:  # fmt: skip
    """The output writer of a plan (never writing into one of its inputs)."""
    entries = [(t.name, t.shape, t.out_dtype) for t in plan.tasks]
    return ShardedWriter(
        out_dir,
        entries,
        max_shard_size=max_shard,
        overwrite=overwrite,
        inputs=_input_paths(plan),
        metadata={"mergelab_method": plan.method.name},
        shards_elsewhere=shards_elsewhere,
    )


def _input_paths(plan: MergePlan) -> list[Path]:
    """The files or folders a plan's sources read."""
    inputs = [p for s in plan.sources.values() for p in getattr(s, "paths", (_source_path(s),))]
    return [Path(p) for p in inputs if p is not None]


def _input_files(plan: MergePlan) -> list[Path]:
    """Every file a worker opens to plan the config again: each input folder's files (weights,
    index, config, tokenizer) or the input file itself."""
    files: list[Path] = []
    for path in _input_paths(plan):
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        else:
            files.append(path)
    return list(dict.fromkeys(files))


class _ConfigPlan:
    """Plans a config again on a Ray worker: the same validation over the same files, paths
    relative to the driver's current folder as on the driver (mergelab.engine.distributed)."""

    def __init__(self, config: MergeConfig, config_dir: Path | None, label: str | None,
                 strict: bool, cwd: Path):  # fmt: skip
        self.config, self.config_dir, self.label = config, config_dir, label
        self.strict, self.cwd = strict, cwd

    def open(self) -> MergePlan:
        config_dir = self.cwd / self.config_dir if self.config_dir is not None else None
        opener = _opener(config_dir, cwd=self.cwd)
        return _build(self.config, opener, self.label, config_dir, strict=self.strict)

    def close(self, plan: MergePlan) -> None:
        close_plan(plan)


def _write_on_cluster(plan, out_dir, max_shard, overwrite, device, seed, allow_nonfinite,
                      progress, ray_address, recipe, label) -> MergeReport:  # fmt: skip
    """The merge over a Ray cluster: every node checked first (it sees the inputs and the
    output's folder), the shards merged and verified there, the index, side files and rename
    here (mergelab.engine.distributed)."""
    from mergelab.cluster import check_shared_storage, connect, work_nodes
    from mergelab.engine.distributed import execute_on_cluster

    problems = []
    if plan.method.needs_data:
        problems.append(f"merge_method: `{plan.method.name}` runs data through the models on "
                        "this machine; --ray-address merges data-free methods")  # fmt: skip
    for what, side in (("per-task modulators", plan.method.modulation),
                       ("extra tensors", plan.method.upscaling)):  # fmt: skip
        if side is not None:
            problems.append(f"merge_method: `{plan.method.name}` writes {what} beside the "
                            "merged weights, which --ray-address does not spread")  # fmt: skip
    if problems:
        raise ConfigError(problems, label)
    with connect(ray_address, purpose="a merge over a Ray cluster") as ray:
        nodes = work_nodes(ray)
        writer = _writer(plan, out_dir, max_shard, overwrite, shards_elsewhere=True)
        with writer:
            check_shared_storage(ray, nodes, _input_files(plan), writer.tmp_dir)
            report = execute_on_cluster(plan, writer, recipe, ray, nodes, device=device,
                                        seed=seed, allow_nonfinite=allow_nonfinite,
                                        progress=progress, out_dir=str(out_dir))  # fmt: skip
            _write_side_files(plan, writer)
            writer.commit()
    return report


def _write(plan, out_dir, max_shard, overwrite, device, seed, allow_nonfinite, progress, workers,
           trained=None):
    writer = _writer(plan, out_dir, max_shard, overwrite)
    with writer:
        modulators = _modulator_writer(plan, writer)
        extras = _extras_writer(plan, writer, trained)
        try:
            report = execute(
                plan,
                writer,
                device=device,
                seed=seed,
                allow_nonfinite=allow_nonfinite,
                progress=progress,
                workers=workers,
                out_dir=str(out_dir),
                modulators=modulators,
                extras=extras,
            )
            if extras is not None:
                report.notes.extend(extras.finish())
            if modulators is not None:
                assert plan.method.modulation is not None
                modulators.finish(plan.method.modulation.rescalers)
                report.notes.append(
                    f"per-task modulators of {len(plan.merged_sources)} task(s) in "
                    f"{Path(out_dir) / 'modulators'}: apply one with `mergelab eval --modulators "
                    "TASK` or write its dense weights with `mergelab modulators export`"
                )
        except BaseException:
            for side in (modulators, extras):
                if side is not None:
                    side.abort()
            raise
        _write_side_files(plan, writer)
        writer.commit()
    return report


def _extras_writer(plan: MergePlan, writer: ShardedWriter, trained=None):
    """The writer of an upscaling method's extra tensors (None for other methods); `trained`:
    the extras a data stage learned (PreparedMerge.extras)."""
    if plan.method.upscaling is None:
        return None
    from mergelab.upscale.memory import planned_extras
    from mergelab.upscale.writer import ExtrasWriter

    return ExtrasWriter(writer, plan.method, plan.merged_sources, planned_extras(plan), trained)


def _modulator_writer(plan: MergePlan, writer: ShardedWriter):
    """The writer of a modulated method's per-task masks (None for other methods)."""
    if plan.method.modulation is None:
        return None
    from mergelab.modulators.writer import ModulatorWriter

    base_keys = {t.inputs[t.base_index][0] for t in plan.tasks if t.base_index is not None}
    base_key = next(iter(base_keys), plan.config.base_model or "")
    root = getattr(plan.sources.get(base_key), "path", None)
    entries = [(t.name, t.shape) for t in plan.tasks if takes_extras(t)]
    # A task's modulators take its head's name (heads.json), so `mergelab eval --task NAME`
    # finds both; sources without one head are named by their folder.
    roots = {key: plan.sources[key].root for key in plan.merged_sources
             if getattr(plan.sources[key], "root", None) is not None}  # fmt: skip
    heads: dict[str, list[str]] = {}
    for head in merged_heads(roots):
        heads.setdefault(head.source, []).append(head.name)
    names = [heads[k][0] if len(heads.get(k, ())) == 1 else k for k in plan.merged_sources]
    return ModulatorWriter(writer, plan.method.name, plan.merged_sources, entries,
                           (base_key, str(root) if root is not None else None), names)


def _source_path(source: Any) -> Path | None:
    path = getattr(source, "path", None)
    return Path(path) if path is not None and Path(path).exists() else None


def close_plan(plan: MergePlan) -> None:
    """Close the checkpoint readers a plan holds (safe to call twice)."""
    _close_all(plan.sources.values())


def _close_all(sources) -> None:
    for source in sources:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def _write_side_files(plan: MergePlan, writer: ShardedWriter) -> None:
    donor = plan.sources.get(plan.donor) if plan.donor else None
    if plan.out_config is not None:
        writer.write_json("config.json", plan.out_config)
    if donor is not None and donor.root is not None:
        for name in CONFIG_FILES:
            if (donor.root / name).is_file():
                writer.copy_file(donor.root / name, name)
    tok = plan.sources.get(plan.tokenizer_donor) if plan.tokenizer_donor else None
    if not plan.tokenizer_files and tok is not None and tok.root is not None:
        for name in TOKENIZER_FILES:
            if (tok.root / name).is_file():
                writer.copy_file(tok.root / name, name)
    heads = _write_heads(plan, writer)
    config_yaml = plan.recorded_config or yaml.safe_dump(
        plan.config.model_dump(exclude_none=True, mode="json"), sort_keys=False
    )
    _write_card(plan, writer, config_yaml, heads)
    # The merged vocabulary's (or the chat template's) tokenizer, as transformers saved it.
    files = {**plan.tokenizer_files, "mergelab_config.yml": config_yaml.encode("utf-8")}
    with tempfile.TemporaryDirectory() as scratch:
        for name, content in files.items():
            path = Path(scratch) / name
            path.write_bytes(content)
            writer.copy_file(path, name)


def _write_heads(plan: MergePlan, writer: ShardedWriter) -> list:
    """Every merged source's task heads (what `mergelab finetune` wrote beside its encoder)
    under `heads/`, listed in `heads.json`, so the merged model is scored and exported per task."""
    roots = {key: plan.sources[key].root for key in plan.merged_sources
             if getattr(plan.sources[key], "root", None) is not None}  # fmt: skip
    heads = merged_heads(roots)
    if not heads:
        return []
    for head in heads:
        writer.copy_file(head.path, head_file_name(head.name))
    writer.write_json(HEADS_MANIFEST, heads_manifest(heads))
    return heads


def _write_card(plan: MergePlan, writer: ShardedWriter, config_yaml: str, heads) -> None:
    """The merged checkpoint's model card (README.md), as mergekit writes one."""
    from mergelab import __version__

    cfg = plan.config
    sources = [e.model for e in cfg.models or ()] or list(
        dict.fromkeys(s.model for sl in cfg.slices or () for s in sl.sources)
    )
    card = merge_card(
        method=plan.method.name, paper=plan.method.paper, url=plan.method.url, sources=sources,
        base=cfg.base_model, parameters=dict(cfg.parameters or {}), config_yaml=config_yaml,
        heads=heads, version=__version__,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / CARD_FILE
        path.write_text(card, encoding="utf-8")
        writer.copy_file(path, CARD_FILE)


def merge_state_dicts(
    config: Mapping | MergeConfig,
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    device: str = "cpu",
    seed: int = 0,
    allow_nonfinite: bool = False,
    progress: bool = False,
    strict: bool = False,
) -> dict[str, torch.Tensor]:
    """Merge in memory: the config's model names are keys of `state_dicts`.

    The same validation and kernels as `merge`, without touching the disk; search loops call it.
    Returns the merged state dict (tensors on CPU, in the output dtype).
    """
    plan = _memory_plan(config, state_dicts, device, strict=strict)
    return _execute_in_memory(plan, device, seed, allow_nonfinite, progress)


def _memory_plan(config, state_dicts, device: str, *, strict: bool = False,
                 require: Callable[[MergePlan], None] | None = None) -> MergePlan:
    """The plan of an in-memory merge (the `merge_*` functions over state dicts): validated
    against the state dicts, `require`d of its method before any statistics are read, with a
    data-aware method's statistics loaded from the folders its config names."""
    cfg, config_dir = _read_config(config)
    open_source = _state_dict_opener(state_dicts)
    plan = _build(cfg, open_source, None, strict=strict)
    if require is not None:
        require(plan)
    if plan.needs_data_stage:
        plan = _statistics_from_folders(plan, open_source, config_dir, device)
    return plan


def _execute_in_memory(plan: MergePlan, device: str, seed: int, allow_nonfinite: bool,
                       progress: bool, **outputs) -> dict[str, torch.Tensor]:
    """Run `plan` into memory; `outputs`: the engine's extra outputs (modulators, extras)."""
    sink = MemorySink(plan)
    execute(plan, sink, device=device, seed=seed, allow_nonfinite=allow_nonfinite,
            progress=progress, **outputs)  # fmt: skip
    return sink.tensors


def _statistics_from_folders(plan: MergePlan, open_source, config_dir, device) -> MergePlan:
    """An in-memory merge has no data to run: a data-aware method's statistics come from the
    folders its config names (`data.statistics`); anything else is refused, pointing at the
    entry points that run data."""
    from mergelab.plan.stages import prepare_plan, statistics_folders
    from mergelab.stats.stage import CollectOptions, is_statistics_folder

    folders = statistics_folders(plan.config, plan, config_dir)
    missing = [k for k in plan.merged_sources if k not in folders or not is_statistics_folder(folders[k])]
    if plan.method.learns_from_data or missing:
        raise ConfigError(
            [f"merge_method: `{plan.method.name}` runs data through the models: "
             "merge_state_dicts only reads statistics folders (`data.statistics`); use "
             "mergelab.data_merge (modules and batches) or mergelab.merge (a `data:` section)"]
        )
    options = CollectOptions(device=None if device == "cpu" else device)
    return prepare_plan(plan, None, options, open_source, folders=folders).plan


def _state_dict_opener(state_dicts: Mapping[str, Mapping[str, torch.Tensor]]):
    def open_source(model: str) -> StateDictSource:
        if model not in state_dicts:
            known = ", ".join(sorted(state_dicts))
            raise FileNotFoundError(f"no state dict named {model!r} (given: {known})")
        return StateDictSource(model, state_dicts[model])

    return open_source


# The names an in-memory expert-group merge gives its inputs in the config it builds.
MODEL_KEY, SEED_KEY, GRAMS_KEY = "model", "seed", "grams"


def merge_expert_groups(
    state_dict: Mapping[str, torch.Tensor],
    *,
    method: str,
    preset: str | None = None,
    groups: Iterable[Mapping[str, Any] | ExpertGroupSpec] | None = None,
    drop: Sequence[str] = (),
    parameters: Mapping[str, Any] | None = None,
    member_parameters: Mapping[str, Mapping[str, Any]] | None = None,
    seed: Mapping[str, torch.Tensor] | None = None,
    grams: GramLookup | None = None,
    device: str = "cpu",
    random_seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Merge the expert groups of one in-memory model; returns the merged state dict (CPU).

    The config's `expert_groups:` section as arguments, run like `merge_state_dicts`.
    state_dict: the model holding the copies. preset / groups / drop: as the config's
    `expert_groups` section (see mergelab.plan.expert_groups). method: any registry method that
    works per tensor (`interpolation`, `modality_arithmetic`, `ties`, ...: the members are its
    models, `seed` its base) or one that reads Gram matrices (`regmean`, with `grams`).
    parameters: the method's global parameters; member_parameters: per-member ones
    (e.g. `{"v": {"density": 0.5}}`). seed: the seed checkpoint (modality-agnostic names, or
    the member names). grams: module name -> Gram (mergelab.stats.collect_grams(...).layers, or
    a mergelab.stats.GramStore). random_seed: the seed of randomised methods (DARE).
    Raises ConfigError listing every problem, before any tensor is merged.
    """
    section: dict[str, Any] = {"drop": list(drop)}
    if preset is not None:
        section["preset"] = preset
    if groups is not None:
        section["groups"] = [
            g.model_dump(exclude_none=True) if isinstance(g, ExpertGroupSpec) else dict(g)
            for g in groups
        ]
    if member_parameters is not None:
        section["member_parameters"] = {k: dict(v) for k, v in member_parameters.items()}
    if grams is not None:
        section["grams"] = GRAMS_KEY
    raw: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": MODEL_KEY}],
        "expert_groups": section,
    }
    if parameters:
        raw["parameters"] = dict(parameters)
    if seed is not None:
        raw["base_model"] = SEED_KEY
    config = parse_config(raw)
    held = {MODEL_KEY: state_dict, SEED_KEY: seed}

    def open_source(key: str) -> StateDictSource:
        if held.get(key) is None:
            raise FileNotFoundError(f"no state dict for {key!r}")
        return StateDictSource(key, held[key])

    plan = build_plan(config, open_source, open_grams=lambda _folder: grams)
    sink = MemorySink(plan)
    execute(plan, sink, device=device, seed=random_seed, progress=False)
    return sink.tensors


def moe(
    config: str | os.PathLike | Mapping,
    out_dir: str | os.PathLike,
    *,
    device: str = "cpu",
    out_shard_size: int | str = "5GB",
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> MergeReport:
    """Build a mixture of experts from dense models (mergekit-moe's config format): a
    Mixtral model, or a Qwen-MoE model when the config has a shared expert.

    The config and every source are checked before any tensor is read (mergelab.plan.moe);
    then the router rows are made by the config's `gate_mode` (reading the base's embeddings,
    or running the base model on the prompts for `hidden`), and the engine streams the base's
    tensors and each layer's experts into `out_dir` (written atomically, like a merge), with
    the Mixtral config.json and the base tokenizer. `seed` seeds random routers and noise.
    """
    from mergelab.plan import moe as moe_plan

    if isinstance(config, Mapping):
        raw, config_dir, label = dict(config), None, None
    else:
        documents = read_documents(config)
        raw = documents[0] if len(documents) == 1 else documents
        config_dir, label = Path(config).parent, str(config)
    cfg = moe_plan.parse_moe_config(raw, label)
    open_source, opened = _tracked(_opener(config_dir))
    try:
        sources: dict[str, Any] = {}
        problems: list[str] = []
        keys = [cfg.base_model, *(e.source_model for e in cfg.gated)]
        for key in dict.fromkeys(keys):
            try:
                sources[key] = open_source(key)
            except (CheckpointError, FileNotFoundError) as exc:
                problems.append(f"model {key!r}: {exc}")
        if not problems:
            problems += moe_plan.check_sources(cfg, sources)
        base = sources.get(cfg.base_model)
        tokenizer = None
        if not problems:
            try:
                tokenizer = moe_plan.router_tokenizer(base.root)
            except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
                problems.append(f"base_model: the tokenizer of {cfg.base_model!r} cannot be read: "
                                f"{' '.join(str(exc).split())[:300]}")
        if problems:
            raise ConfigError(problems, label)
        base_config = base.config() or {}
        dtype = cfg.dtype or base_config.get("dtype") or base_config.get("torch_dtype") or "float32"
        out_dtype = {"float32": torch.float32, "float16": torch.float16,
                     "bfloat16": torch.bfloat16}.get(dtype, torch.float32)
        routers = moe_plan.gate_vectors(cfg, base, tokenizer, torch.Generator().manual_seed(seed))
        out_config = moe_plan.output_config(cfg, base, str(out_dtype).removeprefix("torch."))
        plan = moe_plan.build_moe_plan(cfg, sources, routers, out_config, out_dtype)
        max_shard = parse_size(out_shard_size)
        entries = [(t.name, t.shape, t.out_dtype) for t in plan.tasks]
        inputs = [p for s in sources.values() for p in getattr(s, "paths", (_source_path(s),))]
        writer = ShardedWriter(out_dir, entries, max_shard_size=max_shard, overwrite=overwrite,
                               inputs=[p for p in inputs if p is not None],
                               metadata={"mergelab_method": plan.method.name})
        with writer:
            report = execute(plan, writer, device=device, seed=seed, progress=progress,
                             out_dir=str(out_dir))
            writer.write_json("config.json", out_config)
            for name in CONFIG_FILES:
                if base.root is not None and (base.root / name).is_file():
                    writer.copy_file(base.root / name, name)
            with tempfile.TemporaryDirectory() as scratch:
                tokenizer.save_pretrained(scratch)
                recorded = Path(scratch) / "mergelab_moe_config.yml"
                recorded.write_text(yaml.safe_dump(cfg.model_dump(exclude_none=True),
                                                   sort_keys=False), encoding="utf-8")
                for path in sorted(Path(scratch).iterdir()):
                    writer.copy_file(path, path.name)
            writer.commit()
        return report
    finally:
        _close_all(opened)


def dump_plan(plan: MergePlan) -> str:
    from mergelab.plan.planner import describe_plan

    return json.dumps(describe_plan(plan), indent=2, default=str)


__all__ = ["close_plan", "merge", "merge_expert_groups", "merge_state_dicts", "moe", "plan_merge", "ConfigError"]

