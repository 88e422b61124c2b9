"""Helpers shared by the test files: tiny checkpoints on disk, registered kernels run the way
the engine runs them, seeded tensors, and the reference implementations the differential tests
compare with (mergekit 0.1.5: a missing reference is a failure, never a quiet skip).

Test files import the plain helpers (`from conftest import save_checkpoint`); fixtures are
found by pytest as usual.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file


def word_ids(vocab_file) -> dict[str, int]:
    """A vocab.txt as the token -> id mapping `BertTokenizerFast(vocab=...)` takes. (Under
    transformers 5, `BertTokenizerFast(vocab_file=...)` maps every word to [UNK], so tiny test
    tokenizers built that way would feed every text as the same ids.)"""
    lines = Path(vocab_file).read_text(encoding="utf-8").splitlines()
    return {word: i for i, word in enumerate(lines)}


def save_tiny_bert(folder: Path, words: list[str]) -> Path:
    """A 2-layer, hidden-32 BERT with random weights (seed 0) and a word-level tokenizer over
    `words`, saved as a Hugging Face folder (created)."""
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab=word_ids(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32)  # fmt: skip
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_task_csv(path: Path, pools: dict[str, list[str]], n: int = 60) -> Path:
    """A labelled CSV (`text,label`) of `n` rows cycling through the classes of `pools`, each
    text "the" and three words drawn (seeded by the file name) from its class's pool."""
    import csv

    generator = torch.Generator().manual_seed(len(path.name))
    names = sorted(pools)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = names[i % len(names)]
            picks = torch.randint(3, (3,), generator=generator).tolist()
            writer.writerow([" ".join(["the", *(pools[label][j] for j in picks)]), label])
    return path


MERGEKIT_HINT = (
    "mergekit 0.1.5 is the reference of the differential tests; `make venv` installs it "
    "(pip install --no-deps mergekit==0.1.5: only its pure-torch kernels are imported)"
)


def require(module: str, hint: str) -> Any:
    """Import `module` or fail the test, saying how to install it (the dev setup provides it)."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"cannot import {module} ({exc}): {hint}", pytrace=False)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    """A standard normal tensor from its own seeded generator."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def run_kernel(
    name: str,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None = None,
    params: Mapping[str, Any] | None = None,
    model_params: list[dict[str, Any]] | None = None,
    seed: int = 0,
    *,
    tensor_name: str = "layer.weight",
    depth: float = 0.0,
) -> torch.Tensor:
    """Run a registered kernel the way the engine does: validated, defaults filled.

    tensor_name, depth: the tensor's name and layer position as the plan gives them."""
    from mergelab.methods.registry import TensorMerge, get_method, resolve_defaults

    method = get_method(name)
    params = dict(params or {})
    model_params = model_params or [{} for _ in tensors]
    problems = [p.check(params[p.name]) for p in method.global_params if p.name in params]
    problems += [
        p.check(mp[p.name]) for mp in model_params for p in method.model_params if p.name in mp
    ]
    assert not any(problems), problems
    merge = TensorMerge(
        tensors=tensors,
        base=base,
        model_params=[resolve_defaults(method.model_params, mp) for mp in model_params],
        params=resolve_defaults(method.global_params, params),
        generator=torch.Generator().manual_seed(seed),
        name=tensor_name,
        depth=depth,
    )
    out = method.kernel(merge)
    assert out.shape == tensors[0].shape
    return out


def layered(values: list[float], extra: float = 0.0) -> dict[str, torch.Tensor]:
    """A toy model with len(values) layers whose layer i weight is filled with values[i]."""
    sd = {"model.embed_tokens.weight": torch.full((4, 2), extra)}
    for i, v in enumerate(values):
        sd[f"model.layers.{i}.mlp.weight"] = torch.full((2, 2), float(v))
    sd["model.norm.weight"] = torch.full((2,), extra + 1)
    return sd


def save_checkpoint(
    folder: Path,
    state_dict: Mapping[str, torch.Tensor],
    *,
    shards: int = 1,
    config: Mapping[str, Any] | None = None,
    files: Mapping[str, str] | None = None,
) -> Path:
    """Write a checkpoint folder: `model.safetensors`, or `shards` shards plus the HF index;
    `config` as config.json and `files` (name -> text) beside it. Returns the folder."""
    folder.mkdir(parents=True)
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    for name, text in (files or {}).items():
        (folder / name).write_text(text)
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    names = list(tensors)
    per = (len(names) + shards - 1) // shards
    weight_map = {}
    for s in range(shards):
        file_name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * per : (s + 1) * per]}
        save_file(part, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update({n: file_name for n in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.fixture(scope="session")
def mergekit_registry() -> Any:
    """mergekit 0.1.5's method registry (the test fails when mergekit is missing)."""
    return require("mergekit.merge_methods.registry", MERGEKIT_HINT)


@pytest.fixture(scope="session")
def mergekit_methods(mergekit_registry: Any) -> Any:
    """`reference(name, tensors, base, params, per_input)`: mergekit's kernel on the same tensors."""
    from mergekit.merge_methods.base import TensorGroup

    def reference(name, tensors, base=None, params=None, per_input=None):
        inputs = ([base] if base is not None else []) + tensors
        group = TensorGroup.from_tensors(inputs, base_index=0 if base is not None else None)
        (out,) = mergekit_registry.get(name)(
            (group,), parameters={**(params or {}), **(per_input or {})}
        )
        return out

    return reference
