"""Multi-document configs (mergekit-multi's format): merges whose stages feed each other.

A YAML file of several documents, each a merge config. A document's `name` names its stage; a
model string of another stage (`model: my-stage`, `base_model`, a slice source, or
`tokenizer_source`) equal to a stage's name reads that stage's output. The unnamed document
is the final merge (at most one; without one, the final stage is the one no other stage
reads). `order_stages` validates the references and orders the stages so that every stage runs
after the stages it reads; the API then plans every stage before any tensor is read (a later
stage sees an earlier one's output as its tensor list, mergelab.checkpoint.memory.ListedSource)
and runs them in order into intermediate folders.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mergelab.errors import ConfigError
from mergelab.plan.config import MergeConfig, parse_config, read_documents  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class Stage:
    """One document of a multi-document config.

    name: the stage's name (None for the unnamed, final document); reads: the names of the
    stages whose outputs this stage takes as models, in first-mention order.
    """

    name: str | None
    config: MergeConfig
    reads: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"stage `{self.name}`" if self.name is not None else "the final (unnamed) stage"


@dataclass(frozen=True)
class StagedConfig:
    """Stages in the order they run: every stage after those it reads; the final one last.
    `unused` are named stages the final one does not need (not run)."""

    stages: tuple[Stage, ...]
    unused: tuple[str, ...] = ()

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def stage_references(config: MergeConfig) -> list[str]:
    """Every model string of a config that may name a stage: its models, its tokenizer source
    and the models its `tokenizer.tokens` take rows from."""
    names = list(config.referenced_models())
    extra = [config.tokenizer_source]
    if config.tokenizer is not None:
        extra.append(config.tokenizer.source)
        for spec in (config.tokenizer.tokens or {}).values():
            extra.append(spec.source if isinstance(spec.source, str) else
                         getattr(spec.source, "model", None))
    for name in extra:
        if name not in (None, "base", "union") and name not in names:
            names.append(name)
    return names


def order_stages(
    documents: Sequence[Any], source: str | None = None, *, exists: Any = None
) -> StagedConfig:
    """Parse the documents and order their stages; every problem is reported at once.

    exists(model) -> bool: whether a model string names something on disk (a string that is
    neither that nor a stage name is an unknown stage; default: never checked).
    Raises ConfigError for schema problems (with the document number), duplicate names, more
    than one unnamed document, a reference to an unknown stage, a cycle of stages, or no single
    final stage.
    """
    problems: list[str] = []
    parsed: list[tuple[str | None, MergeConfig]] = []
    for i, doc in enumerate(documents):
        try:
            config = parse_config(doc)
        except ConfigError as exc:
            problems.extend(f"document {i + 1}: {p}" for p in exc.problems)
            continue
        parsed.append((config.name, config))
    names = [n for n, _ in parsed if n is not None]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"stage name `{name}` is used by {names.count(name)} documents")
    if sum(1 for n, _ in parsed if n is None) > 1:
        problems.append("more than one document has no `name`: only the final merge may be unnamed")
    if problems:
        raise ConfigError(problems, source)

    known = set(names)
    stages: dict[str | None, Stage] = {}
    for name, config in parsed:
        refs = [r for r in stage_references(config) if r in known]
        if name in refs:
            problems.append(f"stage `{name}` reads its own output")
        stages[name] = Stage(name, config, tuple(refs))
        if exists is not None:
            for ref in stage_references(config):
                if ref in known or exists(ref):
                    continue
                close = difflib.get_close_matches(ref, sorted(known), n=1)
                hint = f" (did you mean stage `{close[0]}`?)" if close else ""
                listing = ", ".join(f"`{n}`" for n in names)
                problems.append(
                    f"{stages[name].label}: model {ref!r} is neither a stage of this file "
                    f"({listing}) nor a file or folder{hint}"
                )
    problems.extend(_cycles(stages))
    if problems:
        raise ConfigError(problems, source)

    final = _final_stage(stages, source)
    order: list[Stage] = []
    seen: set[str | None] = set()

    def visit(stage: Stage) -> None:
        if stage.name in seen:
            return
        seen.add(stage.name)
        for ref in stage.reads:
            visit(stages[ref])
        order.append(stage)

    visit(final)
    unused = tuple(n for n in names if n not in seen)
    return StagedConfig(tuple(order), unused)


def _cycles(stages: dict[str | None, Stage]) -> list[str]:
    """One message per cycle of stages reading each other (a -> b -> a)."""
    problems: list[str] = []
    state: dict[str | None, int] = {}  # 1: on the current path, 2: done
    path: list[str | None] = []

    def visit(name: str | None) -> None:
        state[name] = 1
        path.append(name)
        for ref in stages[name].reads:
            if ref == name:
                continue  # reported as reading its own output
            if state.get(ref) == 1:
                loop = path[path.index(ref):] + [ref]
                problems.append(
                    "stages read each other in a cycle: "
                    + " -> ".join(f"`{n}`" if n is not None else "(final)" for n in loop)
                )
            elif ref not in state:
                visit(ref)
        path.pop()
        state[name] = 2

    for name in stages:
        if name not in state:
            visit(name)
    return problems


def _final_stage(stages: dict[str | None, Stage], source: str | None) -> Stage:
    if None in stages:
        return stages[None]
    read = {r for s in stages.values() for r in s.reads}
    sinks = [s for n, s in stages.items() if n not in read]
    if len(sinks) != 1:
        listing = ", ".join(f"`{s.name}`" for s in sinks)
        raise ConfigError(
            [f"no final merge: give one document without `name` (stages no other reads: {listing})"],
            source,
        )
    return sinks[0]
