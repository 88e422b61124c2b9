"""Statistics of one model on one data set, on disk or in memory, read one entry at a time.

A statistics folder holds one safetensors file plus a JSON description, written atomically:
Grams (`grams.safetensors`: one float64 tensor per layer, named by module; `stats.json`: kind
and row count per layer, examples, batches) or a diagonal Fisher (`fisher.safetensors`: one
tensor per parameter; `stats.json`: examples and the mean Fisher entry).

Every store, on disk or in memory, is a `StatisticsSource`: the planner asks it which entry
holds a tensor's statistics (`entry_for`), the plan keeps that reference, and the engine reads
the entry (`read`) next to the tensors when their turn comes, so memory stays bounded by a few
entries whatever the size of the model. Expert-group methods can point any tensor at any entry
("the Gram of module X of source S") through the same `read`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergelab.errors import CheckpointError
from mergelab.fileio import write_folder_atomic
from mergelab.stats.gram import GramStats, LayerGram

GRAMS_FILE = "grams.safetensors"
FISHER_FILE = "fisher.safetensors"
INFO_FILE = "stats.json"
FORMAT = 1


class StatisticsSource(Protocol):
    """Lazy access to one source model's statistics of one kind."""

    kind: str
    examples: int

    def entry_for(self, tensor_name: str) -> str | None:
        """The entry holding this tensor's statistics, or None (the tensor has none)."""
        ...

    def read(self, entry: str) -> dict[str, torch.Tensor]:
        """The statistics of one entry, as the kernels read them (see each kind)."""
        ...

    def entry_nbytes(self, entry: str) -> int: ...

    # Optional: `entries()` (every entry's name) and `entry_problem(entry, tensor_shape)` (why
    # the entry cannot be that tensor's statistics, or None); the planner checks with them.


def _atomic_folder(out_dir: str | os.PathLike, write) -> Path:
    """Write the folder with `write(tmp)` and move it into place (`mergelab.fileio`): an
    existing statistics folder is replaced atomically, never lost."""
    final = Path(out_dir).expanduser().resolve()
    if final.exists() and not (final / INFO_FILE).is_file():
        # Replace an older statistics folder only if it is one (never an arbitrary folder).
        raise CheckpointError(f"{final} exists and is not a statistics folder")
    return write_folder_atomic(final, write, overwrite=True)


def _read_info(folder: Path, data_file: str, kind: str, what: str) -> dict:
    info_path = folder / INFO_FILE
    if not info_path.is_file() or not (folder / data_file).is_file():
        raise CheckpointError(f"{folder} is not a {what} statistics folder (needs {INFO_FILE} and {data_file})")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{info_path} is not valid JSON: {exc}") from None
    if info.get("kind") != kind:
        raise CheckpointError(f"{info_path} does not describe {what} statistics")
    return info


# --- Gram matrices (RegMean) ------------------------------------------------------------------------


def gram_entry_for(tensor_name: str, layers) -> str | None:
    """A weight's statistics are its owning module's Gram (`fc.weight` -> `fc`)."""
    owner, _, leaf = tensor_name.rpartition(".")
    if leaf == "weight" and owner in layers:
        return owner
    return None


def expected_gram_shape(kind: str, weight_shape: tuple[int, ...], groups: int) -> tuple[int, ...]:
    """The Gram shape a layer of `kind` with this weight has (see `LayerGram`)."""
    if kind == "embedding":
        return (weight_shape[0],)
    if kind == "conv":
        per_group = weight_shape[1] * math.prod(weight_shape[2:])
        return (groups, per_group, per_group)
    return (weight_shape[-1], weight_shape[-1])


def gram_shape_problem(kind: str, gram_shape: tuple[int, ...], weight_shape: tuple[int, ...]) -> str | None:
    """Why a Gram of `gram_shape` cannot be a weight of `weight_shape`'s statistics, or None."""
    groups = gram_shape[0] if kind == "conv" and gram_shape else 1
    expected = expected_gram_shape(kind, tuple(weight_shape), groups)
    if tuple(gram_shape) == expected:
        return None
    return (f"its {kind} Gram has shape {list(gram_shape)}; a weight of shape "
            f"{list(weight_shape)} needs {list(expected)}")  # fmt: skip


def gram_statistics(layer: LayerGram) -> dict[str, torch.Tensor]:
    """A layer's Gram as the kernels read it: {"gram": the sum, "rows": its row count}."""
    return {"gram": layer.gram, "rows": torch.tensor(layer.count, dtype=torch.int64)}


def save_grams(stats: GramStats, out_dir: str | os.PathLike) -> Path:
    """Write `stats` to `out_dir` (created or replaced atomically); return the folder."""
    tensors = {name: g.gram.detach().cpu().contiguous() for name, g in stats.layers.items()}
    info = {
        "format": FORMAT,
        "kind": "grams",
        "examples": stats.examples,
        "batches": stats.batches,
        "layers": {name: {"kind": g.kind, "count": g.count} for name, g in stats.layers.items()},
    }

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / GRAMS_FILE), metadata={"format": "pt"})
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")

    return _atomic_folder(out_dir, write)


class GramStore:
    """Lazy reader of a Gram statistics folder: one layer's Gram at a time."""

    kind = "gram"

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.info = _read_info(self.folder, GRAMS_FILE, "grams", "Gram")
        grams_path = self.folder / GRAMS_FILE
        self._file = safe_open(str(grams_path), framework="pt")
        missing = sorted(set(self.info["layers"]) - set(self._file.keys()))
        if missing:
            raise CheckpointError(f"{grams_path} lacks the Gram(s) of {missing}")

    @property
    def examples(self) -> int:
        return int(self.info["examples"])

    def layers(self) -> list[str]:
        return sorted(self.info["layers"])

    def __contains__(self, name: object) -> bool:
        return name in self.info["layers"]

    def get(self, name: str) -> LayerGram:
        meta = self.info["layers"][name]
        return LayerGram(meta["kind"], self._file.get_tensor(name), int(meta["count"]))

    def entry_for(self, tensor_name: str) -> str | None:
        return gram_entry_for(tensor_name, self.info["layers"])

    def entries(self) -> list[str]:
        return self.layers()

    def entry_problem(self, entry: str, tensor_shape: tuple[int, ...]) -> str | None:
        shape = tuple(self._file.get_slice(entry).get_shape())
        return gram_shape_problem(self.info["layers"][entry]["kind"], shape, tensor_shape)

    def read(self, entry: str) -> dict[str, torch.Tensor]:
        return gram_statistics(self.get(entry))

    def entry_nbytes(self, entry: str) -> int:
        shape = self._file.get_slice(entry).get_shape()
        n = 8
        for s in shape:
            n *= s
        return n


class MemoryGrams:
    """A GramStats in memory behind the same interface as `GramStore`."""

    kind = "gram"

    def __init__(self, stats: GramStats):
        self.stats = stats

    @property
    def examples(self) -> int:
        return self.stats.examples

    def __contains__(self, name: object) -> bool:
        return name in self.stats.layers

    def get(self, name: str) -> LayerGram:
        return self.stats.layers[name]

    def entry_for(self, tensor_name: str) -> str | None:
        return gram_entry_for(tensor_name, self.stats.layers)

    def entries(self) -> list[str]:
        return sorted(self.stats.layers)

    def entry_problem(self, entry: str, tensor_shape: tuple[int, ...]) -> str | None:
        layer = self.stats.layers[entry]
        return gram_shape_problem(layer.kind, tuple(layer.gram.shape), tensor_shape)

    def read(self, entry: str) -> dict[str, torch.Tensor]:
        return gram_statistics(self.stats.layers[entry])

    def entry_nbytes(self, entry: str) -> int:
        g = self.stats.layers[entry].gram
        return g.numel() * g.element_size()


def load_grams(folder: str | os.PathLike) -> GramStats:
    """Read a whole statistics folder into memory."""
    store = GramStore(folder)
    layers = {name: store.get(name) for name in store.layers()}
    return GramStats(layers=layers, examples=store.examples, batches=int(store.info["batches"]))


# --- diagonal Fisher (Fisher merging) ---------------------------------------------------------------


def fisher_mean(fisher: Mapping[str, torch.Tensor]) -> float:
    """The mean Fisher entry over every parameter (1 for an all-zero Fisher): what Fisher
    merging's `normalize` divides each model's Fisher by."""
    total = sum(float(f.double().sum()) for f in fisher.values())
    count = sum(f.numel() for f in fisher.values())
    return total / count if count and total > 0 else 1.0


def save_fisher(fisher: dict[str, torch.Tensor], examples: int, out_dir: str | os.PathLike) -> Path:
    """Write a diagonal Fisher (parameter name -> tensor) to `out_dir`, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in fisher.items()}
    info = {"format": FORMAT, "kind": "fisher", "examples": examples, "mean": fisher_mean(tensors)}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / FISHER_FILE), metadata={"format": "pt"})
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")

    return _atomic_folder(out_dir, write)


def _fisher_statistics(fisher: torch.Tensor, mean: float) -> dict[str, torch.Tensor]:
    return {"fisher": fisher, "fisher_mean": torch.tensor(mean, dtype=torch.float64)}


class FisherStore:
    """Lazy reader of a Fisher statistics folder: one parameter's Fisher at a time."""

    kind = "fisher"

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.info = _read_info(self.folder, FISHER_FILE, "fisher", "Fisher")
        self._file = safe_open(str(self.folder / FISHER_FILE), framework="pt")
        self._names = set(self._file.keys())
        if "mean" not in self.info:  # folders written before the mean was recorded
            self.info["mean"] = fisher_mean({k: self._file.get_tensor(k) for k in self._names})

    @property
    def examples(self) -> int:
        return int(self.info["examples"])

    def entry_for(self, tensor_name: str) -> str | None:
        return tensor_name if tensor_name in self._names else None

    def entries(self) -> list[str]:
        return sorted(self._names)

    def entry_problem(self, entry: str, tensor_shape: tuple[int, ...]) -> str | None:
        return fisher_shape_problem(tuple(self._file.get_slice(entry).get_shape()), tensor_shape)

    def read(self, entry: str) -> dict[str, torch.Tensor]:
        return _fisher_statistics(self._file.get_tensor(entry), float(self.info["mean"]))

    def entry_nbytes(self, entry: str) -> int:
        n = 4
        for s in self._file.get_slice(entry).get_shape():
            n *= s
        return n


class MemoryFisher:
    """A diagonal Fisher in memory behind the same interface as `FisherStore`."""

    kind = "fisher"

    def __init__(self, fisher: Mapping[str, torch.Tensor], examples: int):
        self.fisher = dict(fisher)
        self.examples = examples
        self.mean = fisher_mean(self.fisher)

    def entry_for(self, tensor_name: str) -> str | None:
        return tensor_name if tensor_name in self.fisher else None

    def entries(self) -> list[str]:
        return sorted(self.fisher)

    def entry_problem(self, entry: str, tensor_shape: tuple[int, ...]) -> str | None:
        return fisher_shape_problem(tuple(self.fisher[entry].shape), tensor_shape)

    def read(self, entry: str) -> dict[str, torch.Tensor]:
        return _fisher_statistics(self.fisher[entry], self.mean)

    def entry_nbytes(self, entry: str) -> int:
        f = self.fisher[entry]
        return f.numel() * f.element_size()


def fisher_shape_problem(fisher_shape: tuple[int, ...], tensor_shape: tuple[int, ...]) -> str | None:
    """A diagonal Fisher has its parameter's shape."""
    if tuple(fisher_shape) == tuple(tensor_shape):
        return None
    return f"its Fisher has shape {list(fisher_shape)}; the tensor has {list(tensor_shape)}"


def load_fisher(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], int]:
    """Read a Fisher written by `save_fisher`: (parameter name -> tensor, examples)."""
    store = FisherStore(folder)
    return {k: store._file.get_tensor(k) for k in sorted(store._names)}, store.examples


_STORES_BY_INFO_KIND = {"grams": GramStore, "fisher": FisherStore}


def open_statistics(folder: str | os.PathLike) -> StatisticsSource:
    """Open a statistics folder of any kind (Grams or Fisher), lazily."""
    info_path = Path(folder) / INFO_FILE
    kind = None
    if info_path.is_file():
        try:
            kind = json.loads(info_path.read_text()).get("kind")
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{info_path} is not valid JSON: {exc}") from None
    return _STORES_BY_INFO_KIND.get(kind, GramStore)(folder)
