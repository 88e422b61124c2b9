"""What a task is, for every evaluator: a name, label names, a metric and three splits.

`Task` is a protocol with one variant per kind of data, all in `mergelab.eval`:
- `tasks.TextTask`: labelled texts (built-in corpora, `csv:PATH`), split by group;
- `images.ImageTask`: labelled images (`npz:PATH`, `images:DIR`, the harness's digit and
  clothing sets), split at random, with an official test set where the data has one;
- `perplexity.PerplexityTask`: lines of a text file, scored by a causal language model's
  perplexity;
- `FixedSplitsTask`: examples split already (the multimodal study's downstream tasks, built
  together from one seed).
A new task is one declaration of one of these; evaluators, the CLI and tables need no change.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from mergelab.eval.data import Splits

MODALITIES = ("text", "image", "multimodal", "language-model")
METRICS = ("accuracy", "perplexity", "recall")


@runtime_checkable
class Task(Protocol):
    """A task: data only (where the examples come from, how they are split), never a model.

    name: short identifier (shown in tables).
    label_names: class names, index = label (empty for perplexity).
    modality: one of MODALITIES: what a model must read.
    metric: the primary metric's name (accuracy, perplexity...).
    source: where the data comes from and under which licence.
    splits(seed): the disjoint train/validation/test splits, the same for the same seed.
    """

    name: str
    label_names: tuple[str, ...]
    modality: str
    metric: str
    source: str

    def splits(self, seed: int = 0) -> Splits: ...


@dataclass(frozen=True)
class FixedSplitsTask:
    """A task whose examples were split when they were made (`splits` ignores its seed)."""

    name: str
    label_names: tuple[str, ...]
    data: Splits[Any]
    modality: str = "multimodal"
    metric: str = "accuracy"
    source: str = ""
    description: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    def splits(self, seed: int = 0) -> Splits[Any]:
        return self.data
