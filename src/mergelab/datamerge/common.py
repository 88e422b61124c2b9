"""Helpers shared by the data-aware merges: checking and loading state dicts into a module."""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import nn

from mergelab.errors import ConfigError
from mergelab.methods.data_aware import average  # noqa: F401  (re-exported: the one mean)

StateDict = Mapping[str, torch.Tensor]


def check_state_dicts(module: nn.Module, state_dicts: Mapping[str, StateDict]) -> list[str]:
    """Check that every state dict has the same keys, all known to `module`, with its shapes.

    Returns the common keys in the module's order. Raises ConfigError listing every problem.
    """
    expected = module.state_dict()
    problems: list[str] = []
    names = list(state_dicts)
    if not names:
        raise ConfigError("no fine-tuned model to merge")
    first = set(state_dicts[names[0]])
    for name in names:
        keys = set(state_dicts[name])
        if keys != first:
            extra = sorted(keys - first)[:5]
            missing = sorted(first - keys)[:5]
            problems.append(
                f"model {name!r} has different keys from {names[0]!r} "
                f"(extra: {extra}, missing: {missing})"
            )
        unknown = sorted(keys - set(expected))
        if unknown:
            problems.append(f"model {name!r} has keys the module lacks: {unknown[:8]}")
        for key in sorted(keys & set(expected)):
            shape = tuple(state_dicts[name][key].shape)
            if shape != tuple(expected[key].shape):
                problems.append(
                    f"model {name!r}: `{key}` has shape {list(shape)}, the module {list(expected[key].shape)}"
                )
    if problems:
        raise ConfigError(problems)
    return [k for k in expected if k in first]


def working_copy(module: nn.Module) -> nn.Module:
    """A private copy of `module` to load each model's weights into (the caller's is untouched)."""
    return copy.deepcopy(module)


@torch.no_grad()
def load_into(module: nn.Module, state_dict: StateDict) -> None:
    """Copy `state_dict` into `module` (keys it lacks keep the module's values)."""
    module.load_state_dict(dict(state_dict), strict=False)


def module_of(key: str) -> tuple[str, str]:
    """`encoder.layer.0.dense.weight` -> (`encoder.layer.0.dense`, `weight`)."""
    if "." not in key:
        return "", key
    owner, leaf = key.rsplit(".", 1)
    return owner, leaf
