"""Zoos by name, so the benchmark runner and the CLI find them without importing all of them.

A zoo module is imported only when its zoo is asked for (the text zoo pulls transformers, the
vision zoo its own model code). Adding a zoo is one `register_zoo` line.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from mergelab.errors import MergeLabError
from mergelab_bench.zoo.base import Zoo

# name -> "module:factory"; the factory takes keyword options (e.g. cache_root) and returns a Zoo.
_ZOOS: dict[str, str | Callable[..., Zoo]] = {
    "mlp": "mergelab_bench.zoo.mlp:MLPZoo",
    "text": "mergelab_bench.zoo.text:TextZoo",
    "vision": "mergelab_bench.zoo.vision:VisionZoo",
}


def register_zoo(name: str, factory: str | Callable[..., Zoo]) -> None:
    """Make `get_zoo(name)` build a zoo with `factory` ("module:attribute" or a callable)."""
    _ZOOS[name] = factory


def zoo_names() -> list[str]:
    return sorted(_ZOOS)


def get_zoo(name: str, **options: Any) -> Zoo:
    """The zoo registered as `name`, constructed with `options`; errors list the known zoos."""
    try:
        factory = _ZOOS[name]
    except KeyError:
        raise MergeLabError(f"unknown zoo {name!r}; known zoos: {', '.join(zoo_names())}") from None
    if isinstance(factory, str):
        module_name, _, attribute = factory.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:
                raise MergeLabError(f"zoo {name!r} is declared but {module_name} does not exist") from None
            raise
        try:
            factory = getattr(module, attribute)
        except AttributeError:
            raise MergeLabError(f"zoo {name!r}: {module_name} has no {attribute}") from None
    return factory(**options)


def test_examples_option(count: int | None) -> dict[str, Any]:
    """Zoo options for a `--test-examples` value: {} for None (the zoo's default), all of the
    test groups for 0, else at most `count` examples per task (the text zoo's option)."""
    if count is None:
        return {}
    if count < 0:
        raise MergeLabError(f"--test-examples must be 0 (all) or a positive count; got {count}")
    return {"test_examples": count or None}
