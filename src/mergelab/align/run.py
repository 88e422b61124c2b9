"""Run an `align:` config: checkpoints of different initialisations -> one merged checkpoint.

    report = align_merge("align.yml", "merged")      # what `mergelab align run` calls

The models are built from their checkpoints (the config's `architecture` callable, or the
Hugging Face class a folder's config.json names), their permutation spec is derived with
torch.fx (`derive_spec`) or declared (`bert_spec` for BERT), and then:
- weight / activation: every model is permuted into the first one's unit order
  (`align_to_reference`) and the aligned weights are averaged by the core `linear` method
  (`merge_state_dicts`, the same plan and engine as every merge);
- zipit: `zip_models` (full, or partial with `stop_at`).
BatchNorm statistics are re-estimated on the data afterwards (`repair`). The result is written
atomically like every checkpoint (`ShardedWriter`), in the first model's dtypes, with its
config.json and tokenizer files (the files `mergelab merge` copies from its donor).
"""

from __future__ import annotations

import copy
import importlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergelab.align.config import AlignData, AlignSection, load_align_config, parse_align_config
from mergelab.align.derive import derive_spec
from mergelab.align.matching import align_to_reference
from mergelab.align.repair import repair_rescale, reset_batchnorm
from mergelab.align.spec import AlignError, PermutationSpec
from mergelab.align.specs import bert_spec
from mergelab.align.zipit import zip_models
from mergelab.checkpoint import ShardedWriter, open_checkpoint, parse_size
from mergelab.errors import ConfigError

SPLITS = ("train", "validation", "test")


@dataclass
class AlignResult:
    """What an alignment produced (in memory).

    state_dict: the merged weights (for `stop_at`, a MultiHeadModel's: `trunk.*`, `heads.N.*`).
    dtypes: each tensor's dtype in the first model's checkpoint (the output is cast back to it).
    """

    method: str
    state_dict: dict[str, torch.Tensor]
    dtypes: dict[str, torch.dtype]
    model_paths: list[Path]
    examples: int
    seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass
class AlignReport:
    """What `align_merge` wrote."""

    out_dir: Path
    method: str
    tensors: int
    examples: int
    seconds: float
    notes: list[str] = field(default_factory=list)


def _read(config: Any) -> tuple[AlignSection, Path | None]:
    if isinstance(config, (str, os.PathLike)):
        path = Path(config)
        return load_align_config(path), path.parent
    return parse_align_config(config), None


def resolve_path(path: str, config_dir: Path | None) -> Path:
    """`path` as given, or relative to the config's folder when it does not exist as given."""
    resolved = Path(path).expanduser()
    if not resolved.is_absolute() and config_dir is not None and not resolved.exists():
        resolved = config_dir / resolved
    return resolved


def _factory(spec: str):
    module_name, _, attribute = spec.partition(":")
    try:
        target = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"align.architecture: cannot import {spec!r} ({exc})") from None
    if not callable(target):
        raise ConfigError(f"align.architecture: {spec!r} is not callable")
    return target


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.dtype]]:
    with open_checkpoint(path) as reader:
        tensors = {name: reader.get(name) for name in reader.keys()}
    return tensors, {name: t.dtype for name, t in tensors.items()}


def _hf_model(folder: Path) -> nn.Module:
    try:
        import transformers
    except ImportError:
        raise ConfigError(
            f"{folder} is a Hugging Face folder: reading it needs transformers "
            "(pip install 'mergelab[hf]'), or give `architecture`"
        ) from None
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    cls = cls or transformers.AutoModel
    return cls.from_pretrained(folder, local_files_only=True)


def load_model(section: AlignSection, path: Path) -> tuple[nn.Module, dict[str, torch.dtype]]:
    """Build one model of the config from its checkpoint (eval mode, float32)."""
    tensors, dtypes = _read_tensors(path)
    if section.architecture is not None:
        module = _factory(section.architecture)(**section.architecture_args)
        if not isinstance(module, nn.Module):
            raise ConfigError(f"align.architecture: {section.architecture} returned no nn.Module")
        expected = module.state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        wrong = sorted(
            k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape
        )
        if missing or unexpected or wrong:
            raise AlignError(
                f"checkpoint {path} does not fit {section.architecture}: missing {missing}, "
                f"unexpected {unexpected}, wrong shape {wrong}"
            )
        module.load_state_dict({k: v.to(expected[k].dtype) for k, v in tensors.items()})
    elif path.is_dir() and (path / "config.json").is_file():
        module = _hf_model(path)
    else:
        raise ConfigError(
            f"align.models: {path} has no config.json; give `architecture: module:callable` "
            "to build the model its weights fill"
        )
    return module.float().eval(), dtypes


def _tensor_file(path: Path, key: str | None) -> torch.Tensor:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
    elif suffix == ".npz":
        import numpy as np

        with np.load(path) as arrays:
            tensors = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
    elif suffix in (".pt", ".pth"):
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        tensors = loaded if isinstance(loaded, Mapping) else {"inputs": loaded}
    else:
        raise ConfigError(f"align.data.inputs: {path} is not .safetensors, .npz or .pt")
    if key is None:
        key = "inputs" if "inputs" in tensors or len(tensors) != 1 else next(iter(tensors))
    if key not in tensors:
        raise ConfigError(f"align.data: {path} has no tensor {key!r} (has {sorted(tensors)})")
    return tensors[key]


def load_batches(data: AlignData, config_dir: Path | None, first_model: Path) -> list:
    """The config's model inputs as a list of batches (tensors, or (input_ids, mask) pairs)."""
    if data.inputs is not None:
        path = resolve_path(data.inputs, config_dir)
        if not path.is_file():
            raise ConfigError(f"align.data.inputs: no file {path}")
        inputs = _tensor_file(path, data.key)
        if inputs.is_floating_point():
            inputs = inputs.float()
        inputs = inputs[: data.examples]
        return [inputs[i : i + data.batch_size] for i in range(0, len(inputs), data.batch_size)]
    from transformers import AutoTokenizer

    from mergelab.eval.tasks import SplitSizes, load_splits, read_csv_task, resolve_task

    spec = data.task or ""
    if spec.endswith(".csv") and not spec.startswith("csv:"):
        task = read_csv_task(resolve_path(spec, config_dir))  # a path beside the config
    else:
        task = resolve_task(spec)
    # Only the chosen split is used; the others get one example each.
    sizes = {split: data.examples if split == data.split else 1 for split in SPLITS}
    texts = getattr(load_splits(task, SplitSizes(**sizes), seed=data.seed), data.split).texts
    tokenizer = AutoTokenizer.from_pretrained(first_model, local_files_only=True)
    batches = []
    for start in range(0, len(texts), data.batch_size):
        tokens = tokenizer(
            list(texts[start : start + data.batch_size]), padding=True, truncation=True,
            max_length=data.max_length, return_tensors="pt",
        )  # fmt: skip
        batches.append((tokens["input_ids"], tokens["attention_mask"]))
    return batches


def _spec(section: AlignSection, model: nn.Module, batches: list) -> PermutationSpec | None:
    if getattr(getattr(model, "config", None), "model_type", None) == "bert":
        return bert_spec(model)
    if section.method == "zipit":
        return None  # zip_models derives it on the first batch (partial zipping needs that)
    if batches:
        example = batches[0]
    elif section.input_shape is not None:
        dtype = torch.int64 if section.input_dtype == "int64" else torch.float32
        example = torch.zeros(section.input_shape, dtype=dtype)
    else:
        raise ConfigError(
            "align: tracing the architecture needs an example input: give `data` or `input_shape`"
        )
    return derive_spec(model, tuple(example) if isinstance(example, list) else example)


def align_models(config: Any, config_dir: Path | None = None) -> AlignResult:
    """Align or zip the models an `align:` config names; returns the merged weights in memory.

    config: a path to a YAML file, an `{align: {...}}` mapping or an AlignSection.
    config_dir: what relative paths are relative to (default: the config file's folder).
    Raises ConfigError (config, paths, data) or AlignError (architecture, spec, shapes).
    """
    from mergelab.api import merge_state_dicts

    start = time.perf_counter()
    section, file_dir = _read(config)
    config_dir = config_dir if config_dir is not None else file_dir
    paths = [resolve_path(m, config_dir) for m in section.models]
    missing = [f"align.models.{i}: no checkpoint at {p}" for i, p in enumerate(paths) if not p.exists()]
    if missing:
        raise ConfigError(missing)
    loaded = [load_model(section, p) for p in paths]
    models = [m for m, _ in loaded]
    dtypes = loaded[0][1]
    batches = load_batches(section.data, config_dir, paths[0]) if section.data is not None else []
    examples = sum(int(_first_tensor(b).shape[0]) for b in batches)
    spec = _spec(section, models[0], batches)
    repair = section.repair_mode
    notes: list[str] = []
    if section.method == "zipit":
        merged_module = zip_models(
            models, batches, spec=spec, alpha=section.alpha, beta=section.beta,
            stop_at=section.stop_at, repair=repair,
        )  # fmt: skip
        state = merged_module.state_dict()
        if section.stop_at is not None:
            notes.append(
                f"partial zip at `{section.stop_at}`: a multi-head model (trunk.*, heads.N.*) "
                "with one head per source model"
            )
    else:
        aligned, _ = align_to_reference(
            spec, models, method=section.method, batches=batches or None,
            generator=torch.Generator().manual_seed(section.seed),
        )  # fmt: skip
        weights = section.weights or [1.0] * len(models)
        names = [f"model_{i}" for i in range(len(models))]
        linear = {
            "merge_method": "linear",
            "models": [{"model": n, "parameters": {"weight": w}} for n, w in zip(names, weights)],
        }
        floats = {k for k, v in aligned[0].items() if v.is_floating_point()}
        averaged = merge_state_dicts(
            linear, {n: {k: sd[k] for k in floats} for n, sd in zip(names, aligned)}
        )
        # Counters (BatchNorm's num_batches_tracked) are not averaged: the first model's stay.
        state = {k: averaged[k] if k in floats else v for k, v in aligned[0].items()}
        if repair is not None:
            merged_module = copy.deepcopy(models[0])
            merged_module.load_state_dict(state)
            if repair == "rescale":
                sources = []
                for sd in aligned:
                    source = copy.deepcopy(models[0])
                    source.load_state_dict(sd)
                    sources.append(source)
                repair_rescale(merged_module, sources, spec, batches)
            else:
                reset_batchnorm(merged_module, batches)
            state = merged_module.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return AlignResult(
        method=section.method, state_dict=state, dtypes=dtypes, model_paths=paths,
        examples=examples, seconds=time.perf_counter() - start, notes=notes,
    )  # fmt: skip


def _first_tensor(batch: Any) -> torch.Tensor:
    return batch if isinstance(batch, torch.Tensor) else batch[0]


def align_merge(
    config: Any,
    out_dir: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
    out_shard_size: int | str = "5GB",
    config_dir: Path | None = None,
) -> AlignReport:
    """Align or zip the models of an `align:` config and write the merged checkpoint.

    out_dir: the output folder (default: the config's `output`, relative to its folder).
    The folder is written atomically (nothing appears before it is complete); an existing one
    is refused unless `overwrite`, and writing into an input always is.
    """
    from mergelab.checkpoint.format import CONFIG_FILES, TOKENIZER_FILES

    section, file_dir = _read(config)
    config_dir = config_dir if config_dir is not None else file_dir
    if out_dir is None:
        if section.output is None:
            raise ConfigError("align.output: give an output folder (or pass out_dir)")
        out_dir = resolve_path(section.output, config_dir)
    try:
        max_shard = parse_size(out_shard_size)
    except ValueError as exc:
        raise ConfigError([f"out_shard_size: {exc}"]) from None
    result = align_models(section, config_dir)
    tensors = {k: v.to(result.dtypes.get(_source_name(k), v.dtype)) for k, v in result.state_dict.items()}
    writer = ShardedWriter(
        out_dir,
        [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()],
        max_shard_size=max_shard,
        overwrite=overwrite,
        inputs=result.model_paths,
        metadata={"mergelab_align": result.method},
    )
    first = result.model_paths[0]
    with writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        if first.is_dir() and section.stop_at is None:
            # The first model's architecture and tokenizer files describe the output too.
            for name in ("config.json", *CONFIG_FILES, *TOKENIZER_FILES):
                if (first / name).is_file():
                    writer.copy_file(first / name, name)
        written = writer.commit()
    return AlignReport(
        out_dir=Path(written), method=result.method, tensors=len(tensors),
        examples=result.examples, seconds=result.seconds, notes=result.notes,
    )  # fmt: skip


def _source_name(name: str) -> str:
    # A partial zip's tensors are the source model's, under `trunk.` or `heads.N.`.
    if name.startswith("trunk."):
        return name[len("trunk.") :]
    if name.startswith("heads."):
        return name.split(".", 2)[-1]
    return name
