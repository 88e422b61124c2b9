"""The Python API: `merge` (checkpoints on disk) and `merge_state_dicts` (in memory)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from mergelab.checkpoint import ShardedWriter, open_checkpoint, parse_size
from mergelab.checkpoint.memory import StateDictSource
from mergelab.engine.execute import MemorySink, MergeReport, execute
from mergelab.errors import ConfigError
from mergelab.plan.config import MergeConfig, load_config, parse_config
from mergelab.plan.planner import MergePlan, build_plan

# Files copied from the donor (base model, or tokenizer_source for tokenizer files).
CONFIG_FILES = ("generation_config.json",)
TOKENIZER_FILES = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def _read_config(config: str | os.PathLike | Mapping | MergeConfig) -> tuple[MergeConfig, Path | None]:
    if isinstance(config, MergeConfig):
        return config, None
    if isinstance(config, Mapping):
        return parse_config(dict(config)), None
    path = Path(config)
    return load_config(path), path.parent


def _opener(config_dir: Path | None):
    def open_source(model: str):
        path = Path(model).expanduser()
        if not path.exists() and config_dir is not None and not path.is_absolute():
            candidate = config_dir / path
            if candidate.exists():
                path = candidate
        if not path.exists():
            raise FileNotFoundError(f"no such file or folder: {model}")
        return open_checkpoint(path)

    return open_source


def plan_merge(config: str | os.PathLike | Mapping | MergeConfig) -> MergePlan:
    """Validate a config (file path, mapping or MergeConfig) and its sources; return the plan."""
    cfg, config_dir = _read_config(config)
    label = str(config) if isinstance(config, (str, os.PathLike)) else None
    return _build(cfg, _opener(config_dir), label, config_dir)


def _build(cfg: MergeConfig, open_source, label: str | None, config_dir: Path | None = None) -> MergePlan:
    if cfg.expert_groups is not None:
        # Copies inside one model (modality or MoE experts): mergelab.multimodal plans them.
        from mergelab.multimodal.groups import plan_expert_groups

        grams = cfg.expert_groups.grams
        if grams is not None and config_dir is not None and not Path(grams).is_absolute():
            candidate = config_dir / grams
            if candidate.exists():
                cfg = cfg.model_copy(
                    update={"expert_groups": cfg.expert_groups.model_copy(update={"grams": str(candidate)})}
                )
        return plan_expert_groups(cfg, open_source, source_label=label)
    return build_plan(cfg, open_source, source_label=label)


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
) -> MergeReport | MergePlan:
    """Merge the checkpoints a config names and write the result to `out_dir`.

    The whole config is validated against the sources before any tensor is read. The output is
    written into a temporary folder beside `out_dir` and renamed into place only when complete;
    an existing `out_dir` is refused unless `overwrite`, and writing into an input always is.
    With `dry_run`, returns the validated MergePlan and writes nothing.
    A data-aware method (RegMean, Fisher, AdaMerging) with a `data:` section in the config runs
    through mergelab.datamerge.config instead of the per-tensor engine.
    Returns a MergeReport (timings, bytes, notes).
    """
    cfg, config_dir = _read_config(config)
    if (
        cfg.data is not None and cfg.expert_groups is None and not dry_run
        and _needs_data(cfg.merge_method)
    ):
        from mergelab.datamerge.config import merge_with_data

        return merge_with_data(
            cfg, config_dir, out_dir, out_shard_size=out_shard_size, overwrite=overwrite,
            seed=seed, progress=progress, device=device,
        )
    plan = plan_merge(config)
    if dry_run:
        return plan
    try:
        max_shard = parse_size(out_shard_size)
    except ValueError as exc:
        raise ConfigError([f"out_shard_size: {exc}"]) from None
    entries = [(t.name, t.shape, t.out_dtype) for t in plan.tasks]
    inputs = [_source_path(s) for s in plan.sources.values()]
    writer = ShardedWriter(
        out_dir,
        entries,
        max_shard_size=max_shard,
        overwrite=overwrite,
        inputs=[p for p in inputs if p is not None],
        metadata={"mergelab_method": plan.method.name},
    )
    with writer:
        report = execute(
            plan,
            writer,
            device=device,
            seed=seed,
            allow_nonfinite=allow_nonfinite,
            progress=progress,
            workers=workers,
            out_dir=str(out_dir),
        )
        _write_side_files(plan, writer)
        writer.commit()
    _close_sources(plan)
    return report


def _needs_data(method_name: str) -> bool:
    from mergelab.methods.registry import get_method

    try:
        return "data" in get_method(method_name).needs
    except KeyError:
        return False  # the planner reports the unknown name with the other problems


def _source_path(source: Any) -> Path | None:
    path = getattr(source, "path", None)
    return Path(path) if path is not None and Path(path).exists() else None


def _close_sources(plan: MergePlan) -> None:
    for source in plan.sources.values():
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
    if tok is not None and tok.root is not None:
        for name in TOKENIZER_FILES:
            if (tok.root / name).is_file():
                writer.copy_file(tok.root / name, name)
    config_yaml = yaml.safe_dump(
        plan.config.model_dump(exclude_none=True, mode="json"), sort_keys=False
    )
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "mergelab_config.yml"
        path.write_text(config_yaml, encoding="utf-8")
        writer.copy_file(path, "mergelab_config.yml")


def merge_state_dicts(
    config: Mapping | MergeConfig,
    state_dicts: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    device: str = "cpu",
    seed: int = 0,
    allow_nonfinite: bool = False,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Merge in memory: the config's model names are keys of `state_dicts`.

    The same validation and kernels as `merge`, without touching the disk; search loops call it.
    Returns the merged state dict (tensors on CPU, in the output dtype).
    """
    cfg, _ = _read_config(config)

    def open_source(model: str) -> StateDictSource:
        if model not in state_dicts:
            known = ", ".join(sorted(state_dicts))
            raise FileNotFoundError(f"no state dict named {model!r} (given: {known})")
        return StateDictSource(model, state_dicts[model])

    plan = _build(cfg, open_source, None)
    sink = MemorySink(plan)
    execute(
        plan,
        sink,
        device=device,
        seed=seed,
        allow_nonfinite=allow_nonfinite,
        progress=progress,
    )
    return sink.tensors


def dump_plan(plan: MergePlan) -> str:
    from mergelab.plan.planner import describe_plan

    return json.dumps(describe_plan(plan), indent=2)


__all__ = ["merge", "merge_state_dicts", "plan_merge", "ConfigError"]
