"""Statistics on disk: one safetensors file plus a JSON description, written atomically.

A folder holds the Grams of one model on one data set (`grams.safetensors`: one float64 tensor
per layer, named by module; `stats.json`: kind and row count per layer, examples, batches). The
streaming RegMean (mergelab.datamerge.streaming) reads one layer at a time from it, so models
whose statistics do not fit in memory at once can still be merged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mergelab.errors import CheckpointError
from mergelab.stats.gram import GramStats, LayerGram

GRAMS_FILE = "grams.safetensors"
FISHER_FILE = "fisher.safetensors"
INFO_FILE = "stats.json"
FORMAT = 1


def _atomic_folder(out_dir: str | os.PathLike, write) -> Path:
    """Write into a temporary sibling folder with `write(tmp)`, then rename it into place."""
    final = Path(out_dir).expanduser().resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        write(tmp)
        if final.exists():
            # Replace an older statistics folder only if it is one (never an arbitrary folder).
            if not (final / INFO_FILE).is_file():
                raise CheckpointError(f"{final} exists and is not a statistics folder")
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


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
    """Lazy reader of a statistics folder: one layer's Gram at a time."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        info_path = self.folder / INFO_FILE
        grams_path = self.folder / GRAMS_FILE
        if not info_path.is_file() or not grams_path.is_file():
            raise CheckpointError(
                f"{self.folder} is not a Gram statistics folder (needs {INFO_FILE} and {GRAMS_FILE})"
            )
        try:
            self.info = json.loads(info_path.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{info_path} is not valid JSON: {exc}") from None
        if self.info.get("kind") != "grams":
            raise CheckpointError(f"{info_path} does not describe Gram statistics")
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


def load_grams(folder: str | os.PathLike) -> GramStats:
    """Read a whole statistics folder into memory."""
    store = GramStore(folder)
    layers = {name: store.get(name) for name in store.layers()}
    return GramStats(layers=layers, examples=store.examples, batches=int(store.info["batches"]))


def save_fisher(fisher: dict[str, torch.Tensor], examples: int, out_dir: str | os.PathLike) -> Path:
    """Write a diagonal Fisher (parameter name -> tensor) to `out_dir`, atomically."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in fisher.items()}
    info = {"format": FORMAT, "kind": "fisher", "examples": examples}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / FISHER_FILE), metadata={"format": "pt"})
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")

    return _atomic_folder(out_dir, write)


def load_fisher(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], int]:
    """Read a Fisher written by `save_fisher`: (parameter name -> tensor, examples)."""
    folder = Path(folder)
    info_path, data_path = folder / INFO_FILE, folder / FISHER_FILE
    if not info_path.is_file() or not data_path.is_file():
        raise CheckpointError(f"{folder} is not a Fisher statistics folder (needs {INFO_FILE} and {FISHER_FILE})")
    info = json.loads(info_path.read_text())
    if info.get("kind") != "fisher":
        raise CheckpointError(f"{info_path} does not describe a Fisher")
    from safetensors.torch import load_file

    return load_file(str(data_path)), int(info["examples"])
