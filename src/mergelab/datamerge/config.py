"""`mergelab merge` for data-aware methods: a config with a `data:` section.

    merge_method: regmean
    models:
      - model: ft-sentiment        # Hugging Face encoder folders (as `mergelab finetune` writes)
      - model: ft-subjectivity
    base_model: pretrained          # optional: the architecture, and AdaMerging's theta_0
    data: {tasks: [sentiment, subjectivity], examples: 256}
    parameters: {alpha: 0.9}

Each model gets its own task's inputs from the chosen split; Fisher and AdaMerging also need
each model's classifier head (`head.safetensors` in its folder, as `mergelab finetune` writes).
The sentence features are mean-pooled last hidden states, as in mergelab.eval. Other
architectures go through the Python API (`mergelab.data_merge`) with their own forward.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from mergelab.checkpoint import ShardedWriter, open_checkpoint, parse_size
from mergelab.datamerge import data_merge
from mergelab.datamerge.text import pooled_forward, text_batches
from mergelab.engine.execute import MergeReport
from mergelab.errors import ConfigError
from mergelab.methods.registry import get_method
from mergelab.plan.config import MergeConfig
from mergelab.stats.batches import TaskData

_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt")


def _resolve(model: str, config_dir: Path | None) -> Path:
    path = Path(model).expanduser()
    if not path.exists() and config_dir is not None and not path.is_absolute():
        path = config_dir / path
    return path


def _task_of(spec: str, config_dir: Path | None):
    from mergelab.eval.tasks import read_csv_task, resolve_task

    if spec.endswith(".csv") and not spec.startswith("csv:"):
        return read_csv_task(_resolve(spec, config_dir))
    return resolve_task(spec)


def _scalar_params(config: MergeConfig, method) -> tuple[dict, dict]:
    """Global and per-model parameters; data-aware methods take scalars only."""
    problems: list[str] = []

    def scalar(path: str, value):
        if isinstance(value, (list, dict)) or hasattr(value, "model_dump"):
            problems.append(f"{path}: data-aware methods take a single value (no gradients or filters)")
            return None
        return value

    global_params = {k: scalar(f"parameters.{k}", v) for k, v in (config.parameters or {}).items()}
    per_model = {}
    for i, entry in enumerate(config.models or ()):
        per_model[entry.model] = {
            k: scalar(f"models.{i}.parameters.{k}", v) for k, v in (entry.parameters or {}).items()
        }
    if config.slices is not None:
        problems.append("slices: data-aware methods merge whole models; use `models`")
    if problems:
        raise ConfigError(problems)
    return global_params, per_model


def merge_with_data(
    config: MergeConfig,
    config_dir: Path | None,
    out_dir: str | Path,
    *,
    out_shard_size: int | str = "5GB",
    overwrite: bool = False,
    seed: int = 0,
    progress: bool = True,
    device: str = "cpu",
) -> MergeReport:
    """Run the data-aware merge a config describes and write the merged encoder to `out_dir`."""
    from transformers import AutoModel, AutoTokenizer

    from mergelab.eval.tasks import SplitSizes, load_splits
    from mergelab.training.folder import HEAD_FILE, load_head

    start = time.perf_counter()
    method = get_method(config.merge_method)
    data_cfg = config.data
    assert data_cfg is not None
    global_params, per_model = _scalar_params(config, method)
    models = [e.model for e in config.models or ()]
    folders = {m: _resolve(m, config_dir) for m in models}
    base_folder = _resolve(config.base_model, config_dir) if config.base_model else None
    specs = data_cfg.tasks if data_cfg.tasks is not None else [data_cfg.task] * len(models)
    problems = []
    if len(specs) != len(models):
        problems.append(f"data.tasks: {len(specs)} task(s) for {len(models)} model(s)")
    if method.base == "required" and base_folder is None:
        problems.append(f"base_model: `{method.name}` needs the model the others were fine-tuned from")
    for m, folder in [*folders.items(), *([("base_model", base_folder)] if base_folder else [])]:
        if not (folder / "config.json").is_file():
            problems.append(
                f"model {m!r}: {folder} is not a Hugging Face folder (no config.json); for other "
                "architectures call mergelab.data_merge from Python"
            )
    needs_head = method.name != "regmean" and method.name != "regmean_plusplus"
    if needs_head:
        for m, folder in folders.items():
            if not (folder / HEAD_FILE).is_file():
                problems.append(f"model {m!r}: `{method.name}` needs the task head {folder / HEAD_FILE}")
    if problems:
        raise ConfigError(problems)
    tasks = [_task_of(s, config_dir) for s in specs]
    architecture = base_folder or folders[models[0]]
    tokenizer = AutoTokenizer.from_pretrained(architecture)
    module = AutoModel.from_pretrained(architecture).eval()
    n = data_cfg.examples
    sizes = {
        "train": SplitSizes(train=n, validation=1, test=1),
        "validation": SplitSizes(train=1, validation=n, test=1),
        "test": SplitSizes(train=1, validation=1, test=n),
    }[data_cfg.split]
    finetuned = {}
    data = {}
    for m, task in zip(models, tasks, strict=True):
        reader = open_checkpoint(folders[m])
        with reader:
            finetuned[m] = {k: reader.get(k) for k in reader.keys()}
        texts = getattr(load_splits(task, sizes, seed=data_cfg.seed), data_cfg.split)
        batches = text_batches(
            tokenizer, texts.texts, texts.labels,
            batch_size=data_cfg.batch_size, max_length=data_cfg.max_length,
        )
        head = load_head(folders[m] / HEAD_FILE) if needs_head else None
        data[m] = TaskData(batches, head=head, forward=pooled_forward)
    base_state = None
    if base_folder is not None:
        with open_checkpoint(base_folder) as reader:
            base_state = {k: reader.get(k) for k in reader.keys()}
    result = data_merge(
        method.name,
        module,
        finetuned,
        data,
        base_state_dict=base_state,
        model_params=per_model,
        generator=torch.Generator().manual_seed(data_cfg.seed + seed),
        device=None if device == "cpu" else device,
        progress=progress,
        **global_params,
    )
    merged = result.state_dict
    first = open_checkpoint(folders[models[0]])
    with first:
        dtypes = {k: first.dtype(k) for k in first.keys()}
    entries = [(k, tuple(v.shape), dtypes.get(k, v.dtype)) for k, v in merged.items()]
    writer = ShardedWriter(
        out_dir,
        entries,
        max_shard_size=parse_size(out_shard_size),
        overwrite=overwrite,
        inputs=[p for p in [*folders.values(), base_folder] if p is not None],
        metadata={"mergelab_method": method.name},
    )
    written = 0
    with writer:
        for k, v in merged.items():
            tensor = v.to(dtypes.get(k, v.dtype)).contiguous()
            writer.write(k, tensor)
            written += tensor.numel() * tensor.element_size()
        for name in _SIDE_FILES:
            if (architecture / name).is_file():
                writer.copy_file(architecture / name, name)
        writer.commit()
    notes = list(result.notes)
    notes.append(
        "examples per model: " + ", ".join(f"{m}={k}" for m, k in result.examples.items())
    )
    if result.coefficients is not None and result.coefficients.dim() == 1:
        notes.append("AdaMerging coefficients: " + ", ".join(f"{c:.3f}" for c in result.coefficients.tolist()))
    return MergeReport(
        out_dir=str(out_dir),
        method=method.name,
        tensors=len(merged),
        bytes_read=0,
        bytes_written=written,
        wall_seconds=time.perf_counter() - start,
        compute_seconds=result.seconds,
        notes=notes,
    )
