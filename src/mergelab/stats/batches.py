"""What a batch is, for statistics and data-aware merges on any torch module.

A batch is whatever the user's data loader yields:
- a tensor: the module's only input, no labels;
- a pair `(inputs, labels)` (a list or tuple of two); `inputs` may itself be a tensor, a tuple
  of positional inputs or a mapping of keyword inputs;
- a mapping of keyword inputs (e.g. a tokenizer's output); a `labels` or `label` entry is taken
  out as the labels.

A `Forward` turns (module, inputs) into logits; the default calls the module on the inputs and
takes `.logits`, the first element of a tuple, or the tensor itself. A task whose module gives
features rather than logits passes a head (`TaskData.head`) or a full `forward`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map

from mergelab.errors import MergeLabError

Batch = Any
Inputs = Any
Forward = Callable[[nn.Module, Inputs], torch.Tensor]

_LABEL_KEYS = ("labels", "label")


class DataError(MergeLabError):
    """The data given to a statistic or a data-aware merge is unusable (empty, mismatched, NaN)."""


def split_batch(batch: Batch) -> tuple[Inputs, torch.Tensor | None]:
    """(inputs, labels or None) of one batch, following the conventions of this module."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        labels = next((batch[k] for k in _LABEL_KEYS if k in batch), None)
        inputs = {k: v for k, v in batch.items() if k not in _LABEL_KEYS}
        return inputs, labels
    if isinstance(batch, (list, tuple)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
    raise DataError(
        "a batch must be a tensor, a mapping of inputs, or a pair (inputs, labels); "
        f"got {type(batch).__name__}" + (f" of length {len(batch)}" if hasattr(batch, "__len__") else "")
    )


def call_module(module: nn.Module, inputs: Inputs) -> Any:
    """Call `module` on inputs: a mapping as keywords, a tuple as positional arguments."""
    if isinstance(inputs, Mapping):
        return module(**inputs)
    if isinstance(inputs, tuple):
        return module(*inputs)
    return module(inputs)


def as_logits(output: Any) -> torch.Tensor:
    """The logits in a module's output: `.logits`, a `logits` entry, a tuple's first, or itself."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise DataError(
        f"cannot find logits in the module's output ({type(output).__name__}); "
        "give the task a `head` or a `forward` that returns logits"
    )


def default_forward(module: nn.Module, inputs: Inputs) -> torch.Tensor:
    return as_logits(call_module(module, inputs))


def with_head(head: nn.Module, forward: Forward | None = None) -> Forward:
    """A forward that applies `head` to what `forward` (default: the module's output) returns."""
    inner = forward or default_forward

    def forward_with_head(module: nn.Module, inputs: Inputs) -> torch.Tensor:
        return head(inner(module, inputs))

    return forward_with_head


def batch_size(inputs: Inputs) -> int:
    """Number of examples in `inputs`: the first dimension of its first tensor."""
    leaves = [x for x in tree_flatten(inputs)[0] if isinstance(x, torch.Tensor)]
    if not leaves:
        raise DataError("a batch holds no tensor")
    if leaves[0].dim() == 0:
        raise DataError("a batch's tensors need a batch dimension; got a scalar")
    return int(leaves[0].shape[0])


def to_device(tree: Any, device: torch.device | str | None) -> Any:
    if device is None:
        return tree
    return tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


def slice_examples(tree: Any, start: int, stop: int) -> Any:
    """Examples [start, stop) of every tensor in `tree` (tensors are sliced on dimension 0)."""
    return tree_map(lambda x: x[start:stop] if isinstance(x, torch.Tensor) else x, tree)


@dataclass
class TaskData:
    """One task's data for a data-aware merge.

    batches: a list of batches, or a function returning a fresh iterator of them (methods that
        pass over the data several times call it once per pass). A one-shot iterator is
        read once into a list.
    head: applied to the module's output to get logits (Fisher and AdaMerging need logits;
        RegMean does not).
    forward: full control: `forward(module, inputs) -> logits` (the head, if any, is applied
        to what it returns).
    """

    batches: Sequence[Batch] | Callable[[], Iterable[Batch]]
    head: nn.Module | None = None
    forward: Forward | None = None

    def __post_init__(self) -> None:
        if not callable(self.batches) and not isinstance(self.batches, Sequence):
            self.batches = list(self.batches)

    def iterate(self) -> Iterator[Batch]:
        return iter(self.batches() if callable(self.batches) else self.batches)

    def logits_fn(self) -> Forward:
        if self.head is not None:
            return with_head(self.head, self.forward)
        return self.forward or default_forward


def as_task_data(value: TaskData | Sequence[Batch] | Callable[[], Iterable[Batch]] | Iterable) -> TaskData:
    return value if isinstance(value, TaskData) else TaskData(batches=value)


def limited(batches: Iterable[Batch], max_examples: int | None) -> Iterator[tuple[Inputs, Any]]:
    """(inputs, labels) of each batch, cut so that at most `max_examples` examples are seen."""
    seen = 0
    for batch in batches:
        if max_examples is not None and seen >= max_examples:
            return
        inputs, labels = split_batch(batch)
        n = batch_size(inputs)
        if max_examples is not None and seen + n > max_examples:
            keep = max_examples - seen
            inputs = slice_examples(inputs, 0, keep)
            labels = None if labels is None else labels[:keep]
            n = keep
        seen += n
        yield inputs, labels
