"""The settings of one fine-tune: one frozen pydantic model, validated before any work.

Every field carries its default and its description (the `mergelab finetune` help text comes
from them). A zoo or study that trains derives one `FinetuneSettings` per run from its own
settings; `recipe.json` of a fine-tuned folder records every field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from mergelab.errors import ConfigError, validation_problems
from mergelab.schema import StrictModel

Recipe = Literal["lpft", "joint"]
RECIPES: tuple[str, ...] = ("lpft", "joint")


class FinetuneSettings(StrictModel):
    """How an encoder (and its classification head) is fine-tuned. See `mergelab.training`."""

    recipe: Recipe = Field(
        "lpft",
        description="lpft: fit a linear probe on the frozen encoder, then fine-tune the encoder "
        "under that frozen probe (Kumar et al. 2022, merges well); joint: a head from random "
        "initialisation trained together with the encoder.",
    )
    steps: int = Field(100, ge=1, description="Optimiser steps.")
    batch_size: int = Field(16, ge=1, description="Training examples per step.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate of the encoder.")
    head_learning_rate: float = Field(
        2e-3, gt=0, description="Learning rate of the head (joint recipe only; lpft keeps it frozen)."
    )
    weight_decay: float = Field(0.0, ge=0, description="Weight decay (decoupled for AdamW).")
    warmup_steps: int = Field(
        10,
        ge=0,
        description="Steps of linear warm-up from 0 to the peak learning rate; must be below "
        "`steps` (0: start at the peak).",
    )
    schedule: Literal["linear", "cosine", "constant"] = Field(
        "linear",
        description="Learning rate after warm-up: linear or cosine decay to zero, or constant.",
    )
    lr_floor: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="Where the linear or cosine decay ends, as a fraction of the peak learning "
        "rate (0: decay to zero).",
    )
    optimizer: Literal["adamw", "adam"] = Field(
        "adamw", description="adamw (decoupled weight decay) or adam (weight decay as L2 in the gradient)."
    )
    sampling: Literal["epochs", "with_replacement"] = Field(
        "epochs",
        description="Batches: shuffled epochs (a batch never spans two; the last partial batch "
        "is dropped) or drawn uniformly with replacement.",
    )
    max_grad_norm: float | None = Field(
        None, gt=0, description="Clip the encoder's gradient to this norm (none: no clipping)."
    )
    freeze_input_embeddings: bool = Field(
        True,
        description="Keep a text encoder's token embedding table fixed (half of MiniLM's "
        "parameters; rare tokens get noisy updates, and a frozen table is identical in every "
        "fine-tune, so merges need not reconcile it). Encoders without one are unaffected.",
    )
    freeze: tuple[str, ...] = Field(
        (), description="Glob patterns of encoder parameter names to keep fixed."
    )
    batchnorm_statistics: Literal["frozen", "updated"] = Field(
        "frozen",
        description="frozen: BatchNorm layers normalise with (and keep) their running statistics, "
        "so a task vector holds weights only; updated: ordinary training mode.",
    )
    probe_solver: Literal["lbfgs", "sklearn"] = Field(
        "lbfgs",
        description="Solver of the lpft recipe's logistic-regression probe: full-batch L-BFGS in "
        "torch (float64) or scikit-learn's LogisticRegression; both minimise the same objective.",
    )
    probe_c: float = Field(
        1.0, gt=0, description="Inverse L2 strength of the probe (scikit-learn's C)."
    )
    probe_steps: int = Field(500, ge=1, description="Maximum L-BFGS iterations of the probe.")
    seed: int = Field(
        0, ge=0, description="Seed of batch order, dropout and a joint head's initialisation."
    )

    @model_validator(mode="after")
    def _warmup_ends_before_training_does(self) -> FinetuneSettings:
        if self.warmup_steps and self.warmup_steps >= self.steps:
            raise ValueError(
                f"`warmup_steps` ({self.warmup_steps}) must be below `steps` ({self.steps}): "
                "otherwise every step is warm-up and the peak learning rate is never reached "
                "(lower `warmup_steps`; 0: no warm-up)"
            )
        return self

    @classmethod
    def checked(cls, **values: Any) -> FinetuneSettings:
        """Build the settings, or raise one `ConfigError` naming every bad field."""
        try:
            return cls(**values)
        except ValidationError as error:
            raise settings_error(error) from None

    def replace(self, **changes: Any) -> FinetuneSettings:
        """A copy with `changes`, validated like a new instance."""
        return type(self).checked(**{**self.model_dump(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-serialisable (as recorded in `recipe.json`)."""
        return self.model_dump(mode="json")


def settings_error(error: ValidationError) -> ConfigError:
    """One `ConfigError` listing every problem of a `ValidationError`, each with its field and
    the value it got."""
    return ConfigError(validation_problems(error, inputs=True), source="the fine-tuning settings")
