"""`model+adapter` as a merge source: a base checkpoint with a LoRA adapter folded in on read.

`FoldedSource` answers the planner's and engine's questions (see
`mergelab.plan.planner.TensorSource`) with the base's names, shapes and dtypes; `get` returns
``W + scale * B @ A`` for adapted weights, the adapter's copy for saved modules and the base's
tensor for everything else. Nothing is folded ahead of time and no folded model is ever held:
one tensor at a time, as the engine asks.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mergelab.checkpoint.adapter import AdapterReader, is_adapter, open_adapter
from mergelab.checkpoint.reader import open_checkpoint
from mergelab.errors import CheckpointError
from mergelab.lora import kernels


class FoldedSource:
    """A base source seen with an adapter folded in (base tensors are never modified)."""

    # Folded tensors are fresh; pass-through tensors are the base reader's (copies for
    # checkpoint readers, a caller's tensors for in-memory sources).
    def __init__(self, base, adapter: AdapterReader, label: str | None = None):
        adapter.check_against(base, getattr(base, "path", "the base model"))
        self.base = base
        self.adapter = adapter
        self.label = label or f"{getattr(base, 'path', 'base')}+{adapter.path}"
        self.path = getattr(base, "path", None)
        self.root: Path | None = base.root
        self.returns_copies = bool(getattr(base, "returns_copies", False))
        self._biases = adapter.biases()

    def __repr__(self) -> str:
        return f"FoldedSource({self.label!r})"

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every folder this source reads (the writer refuses to write into any of them)."""
        return tuple(p for p in (self.path, self.adapter.path) if p is not None)

    # -- metadata: the base's ---------------------------------------------------------------------

    def keys(self) -> list[str]:
        return self.base.keys()

    def __contains__(self, name: object) -> bool:
        return name in self.base.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def nbytes(self, name: str) -> int:
        return self.base.nbytes(name)

    def resolve(self, name: str) -> str | None:
        return self.base.resolve(name)

    def config(self) -> dict | None:
        return self.base.config()

    def file_of(self, name: str) -> Path:
        if name in self.adapter.touched():
            return self.adapter.weights_file
        return self.base.file_of(name)

    # -- data ---------------------------------------------------------------------------------

    def _start(self, name: str) -> torch.Tensor:
        if name in self.adapter.saved:
            return self.adapter.get(self.adapter.saved[name]).to(self.base.dtype(name))
        return self.base.get(name)

    def get(self, name: str) -> torch.Tensor:
        module = self.adapter.modules.get(name)
        if module is not None:
            return kernels.fold(
                self._start(name),
                self.adapter.get(module.lora_A),
                self.adapter.get(module.lora_B),
                module.scale,
                module.layout,
            )
        bias_of = self._biases.get(name)
        if bias_of is not None:
            bias = self.base.get(name)
            update = self.adapter.get(bias_of.bias).to(torch.float32) * bias_of.scale
            return (bias.to(torch.float32) + update).to(bias.dtype)
        return self._start(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        module = self.adapter.modules.get(name)
        if module is None and name not in self._biases and name not in self.adapter.saved:
            return self.base.get_rows(name, start, stop)
        if module is None:
            return self.get(name)[start:stop]
        rows = (
            self.adapter.get(self.adapter.saved[name])[start:stop].to(self.base.dtype(name))
            if name in self.adapter.saved
            else self.base.get_rows(name, start, stop)
        )
        return kernels.fold_rows(
            rows,
            start,
            self.adapter.get(module.lora_A),
            self.adapter.get(module.lora_B),
            module.scale,
            module.layout,
        )

    def close(self) -> None:
        self.adapter.close()
        close = getattr(self.base, "close", None)
        if close is not None:
            close()


def split_model_adapter(model: str) -> tuple[str, str] | None:
    """mergekit's ``MODEL+ADAPTER`` syntax: (model, adapter), or None for a plain model.

    A path that exists as given is a plain model even when it contains a ``+``; otherwise the
    string must split at exactly one ``+``, as mergekit's `ModelReference` requires.
    """
    if "+" not in model or Path(model).expanduser().exists():
        return None
    parts = model.split("+")
    if len(parts) != 2 or not all(parts):
        raise CheckpointError(
            f"cannot parse {model!r}: write a model with at most one adapter as MODEL+ADAPTER"
        )
    return parts[0], parts[1]


def open_folded(base_path: str | os.PathLike, adapter_path: str | os.PathLike) -> FoldedSource:
    """Open a base checkpoint and a LoRA adapter folder as one folded source (checked up front)."""
    if not is_adapter(adapter_path):
        raise CheckpointError(
            f"{adapter_path} is not a LoRA adapter folder (no adapter_config.json)"
        )
    adapter = open_adapter(adapter_path)
    try:
        base = open_checkpoint(base_path)
    except BaseException:
        adapter.close()
        raise
    try:
        return FoldedSource(base, adapter, label=f"{base_path}+{adapter_path}")
    except BaseException:
        adapter.close()
        base.close()
        raise
