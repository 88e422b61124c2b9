"""The pydantic base of every mergelab config and settings model.

Frozen (a validated config is not changed behind its checks) and strict about keys (a key the
model does not know is an error naming it, not silently ignored); `mergelab.errors.
validation_problems` turns its validation errors into one problem per line.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """A frozen pydantic model that forbids unknown keys."""

    model_config = ConfigDict(frozen=True, extra="forbid")
