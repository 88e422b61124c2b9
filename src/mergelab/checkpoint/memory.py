"""A state dict seen through the checkpoint-reader interface, for in-memory merges."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from mergelab.errors import CheckpointError


class StateDictSource:
    """Wraps `{name: tensor}` so the planner and engine treat it like a checkpoint on disk."""

    def __init__(self, label: str, state_dict: Mapping[str, torch.Tensor], config: dict | None = None):
        self.label = label
        self.path = Path(label)
        self.root: Path | None = None
        self._tensors = dict(state_dict)
        self._config = config
        for name, value in self._tensors.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(
                    f"state dict {label!r}: entry `{name}` is a {type(value).__name__}, not a tensor"
                )

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[name].dtype

    def nbytes(self, name: str) -> int:
        t = self._tensors[name]
        return t.numel() * t.element_size()

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._tensors[name].detach()
        except KeyError:
            raise CheckpointError(f"state dict {self.label!r} has no tensor `{name}`") from None

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get(name)[start:stop]

    def resolve(self, name: str) -> str | None:
        return name if name in self._tensors else None

    def config(self) -> dict | None:
        return self._config

    def file_of(self, name: str) -> Path:
        return Path(f"<state dict {self.label}>")

    def close(self) -> None:
        pass


class ListedSource:
    """A checkpoint known only by its tensor list and config: the output of a merge stage that
    has not run yet, so that a later stage reading it is validated before any tensor is read.
    Shapes, dtypes and tied aliases answer as the written checkpoint's will; `get` is an error.
    `root`, when given, holds the side files (tokenizer) the checkpoint will hold.
    """

    def __init__(
        self,
        label: str,
        entries: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
        config: dict | None = None,
        root: Path | None = None,
    ):
        self.label = label
        self.path = Path(label)
        self.root: Path | None = root  # side files (a tokenizer) the checkpoint will hold
        self._entries = dict(entries)
        self._config = config

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][0])

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][1]

    def get(self, name: str) -> torch.Tensor:
        raise CheckpointError(f"{self.label} is not written yet: tensor `{name}` cannot be read")

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.get(name)

    def resolve(self, name: str) -> str | None:
        from mergelab.checkpoint.reader import resolve_tied

        return resolve_tied(name, self._entries, self._entries, self._config)

    def config(self) -> dict | None:
        return self._config

    def file_of(self, name: str) -> Path:
        return Path(f"<{self.label}>")

    def close(self) -> None:
        pass
