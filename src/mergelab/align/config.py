"""The `align:` config: merging checkpoints trained from different initialisations.

    align:
      method: zipit                    # weight | activation | zipit
      models: [run-seed0, run-seed1]   # checkpoint folders or files
      architecture: mypkg.models:ResNet   # omitted for Hugging Face folders (config.json)
      architecture_args: {width: 64}
      data: {inputs: inputs.safetensors, batch_size: 32, batches: 8}
      stop_at: layer2                  # partial ZipIt!: merged trunk up to here, one head per model
      output: merged

A file holds one `align:` section and nothing else; `mergelab align run CONFIG` runs it, and
`mergelab.align.run.align_merge` is the same from Python. Relative paths are relative to the
config file's folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from mergelab.errors import ConfigError, validation_problems
from mergelab.schema import StrictModel


class AlignData(StrictModel):
    """Model inputs for activation matching, ZipIt!'s correlations and BatchNorm repair.

    Give `inputs` (a tensor file: any model taking one tensor) or `task` (a text task, for
    Hugging Face models: tokenised with the first model's tokenizer).
    """

    inputs: str | None = Field(
        default=None,
        description="A .safetensors, .pt or .npz file of model inputs, examples on dimension 0.",
    )
    key: str | None = Field(
        default=None,
        description="The tensor of `inputs` to use (default: `inputs`, or the file's only one).",
    )
    task: str | None = Field(
        default=None, description="Text task name or CSV path (Hugging Face models)."
    )
    split: Literal["train", "validation", "test"] = Field(
        default="train", description="Split of `task` whose texts are used."
    )
    examples: int = Field(default=256, ge=1, description="Examples used (at most).")
    batch_size: int = Field(default=32, ge=1, description="Examples per batch.")
    max_length: int = Field(default=64, ge=1, description="Tokens per text of `task`.")
    seed: int = Field(default=0, description="Seed of the task split.")

    @model_validator(mode="after")
    def _one_source(self) -> AlignData:
        if (self.inputs is None) == (self.task is None):
            raise ValueError("give exactly one of `inputs` and `task`")
        return self


class AlignSection(StrictModel):
    """Align (Git Re-Basin) or zip (ZipIt!) models of one architecture, trained from different
    initialisations, and write the merged checkpoint."""

    method: Literal["weight", "activation", "zipit"] = Field(
        description="weight: weight matching (data-free); activation: activation matching; "
        "zipit: ZipIt! feature merging (both need `data`)."
    )
    models: list[str] = Field(
        min_length=2,
        description="Checkpoint folders or files; weight/activation permute every model into "
        "the first one's unit order, then average.",
    )
    architecture: str | None = Field(
        default=None,
        description="`module:callable` returning the torch module the checkpoints fill (default: "
        "the Hugging Face class named in each folder's config.json).",
    )
    architecture_args: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of `architecture`."
    )
    data: AlignData | None = Field(
        default=None, description="Model inputs (activation and zipit methods, BatchNorm repair)."
    )
    input_shape: list[int] | None = Field(
        default=None,
        description="Shape of an example input for tracing the architecture when there is no "
        "`data` (weight matching of a non-BERT model), e.g. [1, 3, 32, 32].",
    )
    input_dtype: Literal["float32", "int64"] = Field(
        default="float32", description="Dtype of the `input_shape` example (int64 for tokens)."
    )
    weights: list[float] | None = Field(
        default=None,
        description="weight/activation: each aligned model's weight in the average (default "
        "equal), one per model.",
    )
    seed: int = Field(default=0, description="Weight matching: seed of the space order.")
    alpha: float = Field(
        default=0.3, ge=0, le=1, description="ZipIt!: penalty on a second unit of one model."
    )
    beta: float = Field(
        default=0.125, ge=0, le=1, description="ZipIt!: each model's budget of within-model merges."
    )
    stop_at: str | None = Field(
        default=None,
        description="ZipIt! partial zipping: merge up to and including this module; the output "
        "is a multi-head model (merged trunk, one head per model).",
    )
    repair: Literal["none", "reset", "rescale"] | None = Field(
        default=None,
        description="After merging: reset (re-estimate BatchNorm statistics), rescale (REPAIR, "
        "then reset) or none; default reset when `data` is given, else none.",
    )
    output: str | None = Field(
        default=None, description="Output folder (the command's --out takes precedence)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> AlignSection:
        problems = []
        if self.method in ("activation", "zipit") and self.data is None:
            problems.append(f"method `{self.method}` needs `data` (model inputs)")
        if self.repair in ("reset", "rescale") and self.data is None:
            problems.append(f"repair `{self.repair}` needs `data` (model inputs)")
        if self.stop_at is not None and self.method != "zipit":
            problems.append("`stop_at` (partial zipping) applies to method `zipit` only")
        if self.weights is not None and self.method == "zipit":
            problems.append("`weights` apply to methods `weight` and `activation` only")
        if self.weights is not None and len(self.weights) != len(self.models):
            problems.append(f"`weights`: {len(self.weights)} for {len(self.models)} models")
        if self.architecture is not None and ":" not in self.architecture:
            problems.append("`architecture` must read `module:callable`")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def repair_mode(self) -> str | None:
        """The repair to run (None for none), with the default resolved."""
        mode = self.repair or ("reset" if self.data is not None else "none")
        return None if mode == "none" else mode


class AlignConfig(StrictModel):
    """A config file holding an `align:` section."""

    align: AlignSection = Field(description="What to align or zip, and how.")


def parse_align_config(data: Any, source: str | None = None) -> AlignSection:
    """Validate an `{align: {...}}` mapping; every problem is reported at once with its path."""
    if isinstance(data, AlignSection):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping; got {type(data).__name__}", source)
    if "align" not in data:
        hint = " (a merge config? use `mergelab merge`)" if "merge_method" in data else ""
        raise ConfigError(f"<root>: no `align:` section{hint}", source)
    try:
        return AlignConfig.model_validate(data).align
    except ValidationError as exc:
        raise ConfigError(validation_problems(exc), source) from None


def load_align_config(path: str | Path) -> AlignSection:
    """Read and validate a YAML file with an `align:` section."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", str(path)) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML syntax error: {exc}", str(path)) from None
    return parse_align_config(data, str(path))
