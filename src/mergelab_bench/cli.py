"""The harness's commands, added to `mergelab` through the `mergelab.commands` entry point."""

from __future__ import annotations

import importlib

import typer

_COMMAND_MODULES = (
    "mergelab_bench.zoo.cli",
    "mergelab_bench.bench_cli",
    "mergelab_bench.study_cli",
    "mergelab_bench.multimodal.cli",
)


def register(app: typer.Typer) -> None:
    """Add `zoo build|list`, `bench run`, `diagnose study` and `multimodal recipe` (and
    `finetune`) to the `mergelab` app."""
    for module in _COMMAND_MODULES:
        importlib.import_module(module).register(app)
