"""Task heads that travel with a checkpoint, so a merged model can be scored and shipped.

A folder `mergelab finetune` writes holds one head: `head.safetensors` (`weight` [classes,
dim], `bias` [classes]) and, in `recipe.json`, the task's name, label names and how its inputs
were read (modality, max_length, split seed, base model). A merge of such folders holds every
source's head: `heads/<name>.safetensors` plus `heads.json`,

    {"format": 1, "heads": {"<name>": {"file": "heads/<name>.safetensors", "task": ...,
     "label_names": [...], "source": "<the source as the config names it>", ...facts}}}

where `<name>` is the task's name (or `<task>.<source folder>` when two sources were tuned on
the same task). `folder_heads` reads either form; `mergelab eval` and `mergelab export` pick a
head by task name from it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergelab.errors import CheckpointError

HEAD_FILE = "head.safetensors"
RECIPE_FILE = "recipe.json"
HEADS_DIR = "heads"
HEADS_MANIFEST = "heads.json"
HEADS_FORMAT = 1
# What a fine-tune's recipe.json says about reading its task's inputs, carried with its head.
_CARRIED_FACTS = ("modality", "base_model", "encoder_factory")
_CARRIED_DATA = ("max_length", "split_seed", "input_size")


@dataclass(frozen=True)
class TaskHead:
    """One task's classifier head and what it needs to be scored.

    name: the key in `heads.json` (the task's name unless two sources share a task).
    path: the head's safetensors file. label_names: its classes, in the order of its rows.
    source: the folder (as a merge config names it) the head was trained with.
    facts: modality, max_length, split_seed, base_model... as the fine-tune recorded them.
    """

    name: str
    task: str
    path: Path
    label_names: tuple[str, ...]
    source: str
    facts: dict[str, Any] = field(default_factory=dict)

    def to_json(self, file: str) -> dict[str, Any]:
        return {"file": file, "task": self.task, "label_names": list(self.label_names),
                "source": self.source, **self.facts}  # fmt: skip


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None


def folder_heads(folder: str | os.PathLike, source: str | None = None) -> list[TaskHead]:
    """The task heads `folder` holds: those `heads.json` lists (a merged folder), else the one
    `head.safetensors` described by `recipe.json` (a fine-tuned folder), else none.

    source: how the heads' `source` is recorded for a fine-tuned folder (default: the folder).
    Raises CheckpointError for a manifest that is not what this module writes, or that names a
    head file the folder lacks.
    """
    folder = Path(folder)
    manifest = folder / HEADS_MANIFEST
    if manifest.is_file():
        content = _read_json(manifest)
        entries = content.get("heads") if isinstance(content, dict) else None
        if not isinstance(entries, dict):
            raise CheckpointError(f"{manifest}: expected an object with `heads` (name -> head)")
        heads = []
        for name, entry in sorted(entries.items()):
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
                raise CheckpointError(f"{manifest}: head {name!r} names no `file`")
            path = folder / entry["file"]
            if not path.is_file():
                raise CheckpointError(f"{manifest}: head {name!r}: {path} does not exist")
            facts = {k: v for k, v in entry.items()
                     if k not in ("file", "task", "label_names", "source")}  # fmt: skip
            heads.append(TaskHead(name, str(entry.get("task", name)), path,
                                  tuple(str(n) for n in entry.get("label_names") or ()),
                                  str(entry.get("source", "")), facts))  # fmt: skip
        return heads
    head = folder / HEAD_FILE
    if not head.is_file():
        return []
    recipe = _read_json(folder / RECIPE_FILE) if (folder / RECIPE_FILE).is_file() else {}
    recipe = recipe if isinstance(recipe, dict) else {}
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    facts = {k: recipe[k] for k in _CARRIED_FACTS if k in recipe}
    facts.update({k: data[k] for k in _CARRIED_DATA if k in data})
    task = str(recipe.get("task") or folder.name)
    return [TaskHead(task, task, head, tuple(str(n) for n in recipe.get("label_names") or ()),
                     source if source is not None else str(folder), facts)]  # fmt: skip


def merged_heads(sources: Mapping[str, str | os.PathLike]) -> list[TaskHead]:
    """Every head of `sources` (source as the config names it -> its folder), named uniquely:
    a task's name, or `<task>.<folder name>` for a task two sources were tuned on."""
    found = [h for label, root in sources.items() for h in folder_heads(root, source=label)]
    counts: dict[str, int] = {}
    for head in found:
        counts[head.task] = counts.get(head.task, 0) + 1
    named = []
    for head in found:
        name = head.name
        if counts[head.task] > 1:
            name = f"{head.task}.{Path(head.source).name or head.source}"
        named.append(TaskHead(name, head.task, head.path, head.label_names, head.source, head.facts))
    return named


def head_file_name(name: str) -> str:
    """`heads/<name>.safetensors`, with characters a file name should not hold replaced."""
    return f"{HEADS_DIR}/{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.safetensors"


def heads_manifest(heads: list[TaskHead]) -> dict[str, Any]:
    """The `heads.json` content for `heads` (each stored at `head_file_name(name)`)."""
    return {"format": HEADS_FORMAT,
            "heads": {h.name: h.to_json(head_file_name(h.name)) for h in heads}}  # fmt: skip


def choose_head(heads: list[TaskHead], task: str, folder: str | os.PathLike) -> TaskHead:
    """The head of `heads` for the task named `task` (by head name, then by task name).

    Raises CheckpointError naming the heads there are when none or several fit.
    """
    by_name = [h for h in heads if h.name == task]
    fitting = by_name or [h for h in heads if h.task == task]
    if len(fitting) == 1:
        return fitting[0]
    names = sorted(h.name for h in heads)
    if not fitting:
        where = f"{folder} holds heads {names}" if names else f"{folder} holds no task head"
        raise CheckpointError(
            f"no head for task {task!r}: {where}; name the task as its head is named, or pass "
            "--head PATH"
        )
    raise CheckpointError(
        f"several heads for task {task!r} in {folder}: {sorted(h.name for h in fitting)}; "
        "pass --head NAME"
    )


def recorded_encoder_factory(folder: str | os.PathLike) -> str | None:
    """The `module:function` that builds the image encoder of a folder without config.json: as
    its recipe.json records it (a fine-tune), else as its heads record it (a merge of
    fine-tunes, when they agree); None when nothing records one."""
    folder = Path(folder)
    recipe = folder / RECIPE_FILE
    if recipe.is_file():
        content = _read_json(recipe)
        if isinstance(content, dict) and content.get("encoder_factory"):
            return str(content["encoder_factory"])
    if not (folder / HEADS_MANIFEST).is_file():
        return None
    factories = {h.facts.get("encoder_factory") for h in folder_heads(folder)} - {None}
    if len(factories) > 1:
        raise CheckpointError(
            f"{folder / HEADS_MANIFEST}: the heads were trained with different encoders "
            f"{sorted(factories)}"
        )
    return str(factories.pop()) if factories else None
