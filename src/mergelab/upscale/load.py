"""Loading an upscaled merge as a torch module: the shared model with its layers wrapped."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint import open_checkpoint
from mergelab.errors import CheckpointError
from mergelab.methods import get_method
from mergelab.methods.registry import Upscaling
from mergelab.upscale.format import EXTRAS_PATH, FOLDER, MANIFEST, extra_name, read_manifest


def has_upscaling(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a merge output with an upscaling method's extras."""
    return (Path(folder) / FOLDER / MANIFEST).is_file()


def _candidates(module: torch.nn.Module, path: str) -> list[str]:
    # Checkpoints saved from a task model (`bert.encoder...`) load into the bare model
    # (`encoder...`): try the module path as is and under the model's prefix.
    prefix = getattr(module, "base_model_prefix", "")
    return [path, f"{prefix}.{path}"] if prefix else [path]


def upscale_module(module: torch.nn.Module, folder: str | os.PathLike) -> torch.nn.Module:
    """Replace, in place, every layer of `module` (loaded from `folder`'s shared weights) that
    has extras in `folder/upscaled/` by the method's module; returns `module`.

    Raises CheckpointError when an extra tensor is missing or has another shape than the
    manifest says, or when a tensor with extras matches no layer of a type the method wraps
    (the extras were saved for another model)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    method = get_method(manifest["method"])
    if method.upscaling is None:
        raise CheckpointError(f"{folder}: method {method.name!r} does not upscale")
    with open_checkpoint(folder / FOLDER / EXTRAS_PATH) as extras:

        def read(tensor: str, key: str, shape) -> torch.Tensor:
            return _read(extras, tensor, key, shape, folder)

        wrap_layers(module, method.upscaling, manifest["tensors"], read, str(folder))
    return module


def wrap_layers(
    module: torch.nn.Module,
    upscaling: Upscaling,
    records: Mapping[str, dict],
    read: Callable[[str, str, Any], torch.Tensor],
    where: str,
) -> dict[str, torch.nn.Module]:
    """Replace, in place, every layer of `module` of a type `upscaling` wraps whose weight has
    an active record (the manifest's `tensors` entries) by the method's module, its extras
    from `read(tensor, key, shape)`; returns weight tensor name -> the new module. `where`
    names the extras in errors."""
    records = {n: r for n, r in records.items() if r.get("active")}
    used: set[str] = set()
    wrapped: dict[str, torch.nn.Module] = {}
    for path, layer in list(module.named_modules()):
        if not isinstance(layer, upscaling.wraps):
            continue
        name = next((c for c in _candidates(module, path) if f"{c}.weight" in records), None)
        if name is None:
            continue
        weight = records[f"{name}.weight"]
        if list(layer.weight.shape) != list(weight["shape"]):
            raise CheckpointError(
                f"{where}: layer `{path}` has weight shape {list(layer.weight.shape)}; the "
                f"extras were made for {list(weight['shape'])} (saved for another model?)"
            )
        tensors = {k: read(f"{name}.weight", k, v) for k, v in weight["extras"].items()}
        bias = records.get(f"{name}.bias")
        if bias is not None:
            for key, shape in bias["extras"].items():
                tensors[key] = read(f"{name}.bias", key, shape)
            used.add(f"{name}.bias")
        used.add(f"{name}.weight")
        try:
            new = upscaling.module(layer, tensors, weight["params"])
        except CheckpointError as error:
            raise CheckpointError(f"{where}: layer `{path}`: {error}") from None
        _replace(module, path, new)
        wrapped[f"{name}.weight"] = new
    unused = sorted(n for n in records if n not in used and n.endswith(".weight"))
    if unused:
        raise CheckpointError(
            f"{where}: extras of {unused[:5]} match no layer the method wraps in this model "
            "(saved for another model?)"
        )
    return wrapped


def _read(extras, tensor: str, key: str, shape, folder: Path) -> torch.Tensor:
    name = extra_name(tensor, key)
    if extras.resolve(name) is None:
        raise CheckpointError(f"{folder}: {FOLDER}/{EXTRAS_PATH} lacks `{name}`")
    value = extras.get(name)
    if list(value.shape) != list(shape):
        raise CheckpointError(
            f"{folder}: `{name}` has shape {list(value.shape)}; the manifest says {list(shape)}"
        )
    return value


def _replace(module: torch.nn.Module, path: str, new: torch.nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = module.get_submodule(parent_path) if parent_path else module
    setattr(parent, child, new)
