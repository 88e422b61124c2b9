"""The folder a fine-tune is written to, and read back from.

Text encoders: a Hugging Face folder (`config.json`, `model.safetensors`, tokenizer files), so
`mergelab merge` and `transformers` read it as any other checkpoint. Other torch encoders:
their state dict as `model.safetensors`. Either way, next to it: the classifier head
(`head.safetensors`: `weight` [classes, dim], `bias` [classes]) and `recipe.json`, the base
model and every setting that produced the folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mergelab.errors import CheckpointError

HEAD_FILE = "head.safetensors"
RECIPE_FILE = "recipe.json"
WEIGHTS_FILE = "model.safetensors"


def save_head(head: nn.Linear, path: Path) -> None:
    """Write a linear head as safetensors (`weight` [classes, dim], `bias` [classes])."""
    save_file(
        {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
        str(path),
    )


def load_head(path: Path) -> nn.Linear:
    """Read a head written by `save_head` (frozen)."""
    if not Path(path).is_file():
        raise CheckpointError(f"no classifier head at {path}")
    tensors = load_file(str(path))
    missing = sorted({"weight", "bias"} - set(tensors))
    if missing:
        raise CheckpointError(f"{path} lacks tensor(s) {missing}")
    num_classes, dim = tensors["weight"].shape
    head = nn.utils.skip_init(nn.Linear, dim, num_classes)  # no draw from the global RNG
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        head.bias.copy_(tensors["bias"])
    return head.requires_grad_(False)


def write_recipe(folder: Path, recipe: Mapping[str, Any]) -> None:
    (Path(folder) / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")


def read_recipe(folder: Path) -> dict[str, Any]:
    path = Path(folder) / RECIPE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from None


def save_finetuned(
    folder: Path, encoder, tokenizer, head: nn.Linear, recipe: Mapping[str, Any],
    base: Path | None = None,
) -> None:  # fmt: skip
    """Write a Hugging Face `encoder` (safetensors + tokenizer), the head and `recipe.json`.

    base: the folder the encoder was loaded from; tensors its weights hold that the saved
    encoder lacks (buffers transformers no longer saves, such as BERT's
    `embeddings.position_ids`) are copied in, so the folder holds every tensor its base has and
    a merge of fine-tunes with their base finds no tensor missing.
    """
    encoder.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if base is not None:
        carry_base_tensors(Path(folder), Path(base), {name for name, _ in encoder.named_buffers()})
    save_head(head, Path(folder) / HEAD_FILE)
    write_recipe(folder, recipe)


def carry_base_tensors(folder: Path, base: Path, buffers: set[str]) -> list[str]:
    """Add to `folder`'s single `model.safetensors` the tensors of `base`'s checkpoint it lacks
    that are among the encoder's `buffers` (unchanged by training); returns their names. A
    sharded output is left as is."""
    from mergelab.checkpoint import open_checkpoint

    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        return []
    with open_checkpoint(base) as source:
        saved = load_file(str(weights))
        missing = sorted((set(source.keys()) & buffers) - set(saved))
        if not missing:
            return []
        saved.update({name: source.get(name).contiguous() for name in missing})
    save_file(saved, str(weights), metadata={"format": "pt"})
    return missing


def save_finetuned_module(
    folder: Path, encoder: nn.Module, head: nn.Linear, recipe: Mapping[str, Any]
) -> None:
    """Write any torch `encoder`'s state dict as `model.safetensors`, the head and `recipe.json`."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    save_file(tensors, str(Path(folder) / WEIGHTS_FILE))
    save_head(head, Path(folder) / HEAD_FILE)
    write_recipe(folder, recipe)
