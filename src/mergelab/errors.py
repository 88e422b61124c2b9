"""Errors raised by mergelab. Every message names the file, tensor or config key at fault."""

from __future__ import annotations


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


class CheckpointError(MergeLabError):
    """A checkpoint cannot be read or written (missing, corrupt, truncated, unsafe, disk full)."""


class MergeError(MergeLabError):
    """A merge failed while running (non-finite values, numerical failure)."""
