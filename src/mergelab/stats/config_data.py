"""The data a config's `data:` section names, for Hugging Face encoder folders.

    merge_method: regmean
    models:
      - model: ft-sentiment        # Hugging Face encoder folders (as `mergelab finetune` writes)
      - model: ft-subjectivity
    base_model: pretrained          # optional: the architecture, and AdaMerging's theta_0
    data: {tasks: [sentiment, subjectivity], examples: 256}
    parameters: {alpha: 0.9}

Each model gets its own task's inputs from the chosen split (tasks from mergelab.eval.tasks, or
CSV files); methods whose statistics or optimiser need logits (Fisher, AdaMerging) also read
each model's classifier head (`head.safetensors` in its folder, as `mergelab finetune` writes).
The sentence features are mean-pooled last hidden states, as in mergelab.eval. Other
architectures go through the Python API (`mergelab.data_merge`) with their own forward.

`ConfigData.check()` finds every problem without loading a model or running data (validate and
dry runs call it); `module()` and `task_data()` load lazily when the stage runs.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mergelab.plan.config import MergeConfig
from mergelab.stats.batches import TaskData


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


def _head_classes(head_file: Path) -> tuple[int, tuple[str, ...]]:
    """(rows of the head's weight, its label names as the folder's recipe.json records them or
    ()), read from the file header and the recipe only."""
    from mergelab.checkpoint.format import read_header
    from mergelab.checkpoint.heads import folder_heads

    shapes = {t.name: t.shape for t in read_header(head_file).tensors}
    rows = shapes["weight"][0] if len(shapes.get("weight", ())) == 2 else 0
    names = next((h.label_names for h in folder_heads(head_file.parent)
                  if h.path == head_file), ())  # fmt: skip
    return rows, names


def _head_problem(head_file: Path, task) -> str | None:
    """Why the head cannot score `task`'s labels (a label it lacks, more classes than rows)."""
    from mergelab.errors import CheckpointError

    try:
        rows, names = _head_classes(head_file)
    except CheckpointError as error:
        return str(error)
    if names:
        lacking = [n for n in task.label_names if n not in names]
        if lacking:
            return (f"label(s) {lacking} of the task are not classes of the head {head_file} "
                    f"({list(names)})")  # fmt: skip
    elif task.num_classes > rows:
        return (f"the task has {task.num_classes} classes {list(task.label_names)}; the head "
                f"{head_file} predicts {rows}")  # fmt: skip
    return None


def _head_labels(head_file: Path, task, labels):
    """`labels` (indices into the task's classes) as indices into the head's rows, matched by
    label name where the head's names are recorded."""
    _, names = _head_classes(head_file)
    if not names or tuple(names) == tuple(task.label_names):
        return labels
    to_head = [names.index(n) for n in task.label_names]
    return tuple(to_head[k] for k in labels)


def needs_logits(method) -> bool:
    """Whether the method's data stage needs each model's task head (declarations only: its
    optimiser's, or its statistics kinds')."""
    from mergelab.plan.stages import OPTIMISERS
    from mergelab.stats.stage import KINDS

    if method.optimiser is not None:
        return OPTIMISERS[method.optimiser].needs_logits
    return method.trains_extras or any(KINDS[k].needs_logits for k in method.statistics)


class ConfigData:
    """DataProvider (mergelab.stats.stage) for a config whose models are HF encoder folders."""

    def __init__(self, config: MergeConfig, config_dir: Path | None, method, skip: set[str] | None = None):
        self.config = config
        self.config_dir = config_dir
        self.method = method
        self.skip = skip or set()  # models whose statistics are loaded from folders
        self.models = [e.model for e in config.models or ()]
        self.folders = {m: _resolve(m, config_dir) for m in self.models}
        base = config.base_model
        self.base_folder = _resolve(base, config_dir) if base else None
        data = config.data
        assert data is not None
        self.specs = (
            data.tasks if data.tasks is not None
            else [data.task] * len(self.models) if data.task is not None else []
        )
        self._module: nn.Module | None = None
        self._tokenizer = None

    def check(self) -> list[str]:
        """Every problem of the data section and the folders (no model loaded, no data run)."""
        from mergelab.training.folder import HEAD_FILE

        problems: list[str] = []
        needed = [m for m in self.models if m not in self.skip]
        if needed and not self.specs:
            problems.append(
                "data: statistics folders are missing for "
                + ", ".join(map(repr, needed)) + ": give `task` or `tasks` to collect them"
            )
        folders = [(m, self.folders[m]) for m in self.models]
        if self.base_folder is not None:
            folders.append(("base_model", self.base_folder))
        if needed:
            for m, folder in folders:
                if not (folder / "config.json").is_file():
                    problems.append(
                        f"model {m!r}: {folder} is not a Hugging Face folder (no config.json); "
                        "for other architectures call mergelab.data_merge from Python"
                    )
        if needs_logits(self.method):
            for m in needed:
                if not (self.folders[m] / HEAD_FILE).is_file():
                    problems.append(
                        f"model {m!r}: `{self.method.name}` needs the task head {self.folders[m] / HEAD_FILE}"
                    )
        if len(self.specs) == len(self.models):
            for m, spec in zip(self.models, self.specs, strict=True):
                if m in self.skip:
                    continue
                try:
                    task = _task_of(spec, self.config_dir)
                except Exception as exc:  # MergeLabError, OSError: reported with the task
                    problems.append(f"data: task {spec!r} of model {m!r}: {exc}")
                    continue
                if needs_logits(self.method) and (self.folders[m] / HEAD_FILE).is_file():
                    problem = _head_problem(self.folders[m] / HEAD_FILE, task)
                    if problem:
                        problems.append(f"data: task {spec!r} of model {m!r}: {problem}")
        return problems

    def module(self) -> nn.Module:
        if self._module is None:
            from transformers import AutoModel, AutoTokenizer

            architecture = self.base_folder or self.folders[self.models[0]]
            self._tokenizer = AutoTokenizer.from_pretrained(architecture, local_files_only=True)
            self._module = AutoModel.from_pretrained(architecture, local_files_only=True).eval()
        return self._module

    def task_data(self, key: str) -> TaskData:
        from mergelab.eval.tasks import SplitSizes, load_splits
        from mergelab.stats.text import pooled_forward, text_batches
        from mergelab.training.folder import HEAD_FILE, load_head

        self.module()
        data = self.config.data
        assert data is not None
        task = _task_of(self.specs[self.models.index(key)], self.config_dir)
        n = data.examples
        sizes = {
            "train": SplitSizes(train=n, validation=1, test=1),
            "validation": SplitSizes(train=1, validation=n, test=1),
            "test": SplitSizes(train=1, validation=1, test=n),
        }[data.split]
        texts = getattr(load_splits(task, sizes, seed=data.seed), data.split)
        head_file = self.folders[key] / HEAD_FILE
        logits = needs_logits(self.method)
        labels = _head_labels(head_file, task, texts.labels) if logits else texts.labels
        batches = text_batches(
            self._tokenizer, texts.texts, labels,
            batch_size=data.batch_size, max_length=data.max_length,
        )
        head = load_head(head_file) if logits else None
        return TaskData(batches, head=head, forward=pooled_forward)
