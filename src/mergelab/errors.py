"""Errors raised by mergelab. Every message names the file, tensor or config key at fault."""

from __future__ import annotations

from typing import Any


class MergeLabError(Exception):
    """Base class of every error mergelab raises on purpose."""


class ConfigError(MergeLabError):
    """A merge configuration is invalid. Carries every problem found, each with its key path."""

    def __init__(self, problems: list[str] | str, source: str | None = None):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        self.source = source
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s){where}:\n{lines}")

    def __reduce__(self):  # pickled as its problems (a Ray worker's error reaches the driver)
        return (type(self), (self.problems, self.source))


class CheckpointError(MergeLabError):
    """A checkpoint cannot be read or written (missing, corrupt, truncated, unsafe, disk full)."""


class MergeError(MergeLabError):
    """A merge failed while running (non-finite values, numerical failure)."""


def validation_problems(exc: Any, *, inputs: bool = False) -> list[str]:
    """One `key.path: message` line per problem of a pydantic ValidationError, each once
    (`unknown key` for a key the model forbids; a validator's several problems, one per line of
    its message, become one line each; a model-level problem carries its own key path).
    `inputs`: a field's problem also says the value it got (`; got 0`)."""
    problems: list[str] = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif inputs and err["loc"]:
            msg += f"; got {err['input']!r}"
        for part in msg.split("\n"):
            text = part if loc == "<root>" else f"{loc}: {part}"
            if text not in problems:
                problems.append(text)
    return problems
