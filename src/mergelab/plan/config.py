"""The merge configuration: mergekit's YAML format (a superset), as frozen pydantic models.

A config names the source models (`models`, or `slices` with `layer_range`), the `merge_method`,
an optional `base_model`, parameters at three levels (per model, per slice, global) and dtypes.
Parameters may be scalars, per-layer gradients (a list interpolated over the layers) or lists of
name-filtered values (`[{filter: self_attn, value: 0.5}, {value: 0.3}]`), as in mergekit.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from mergelab.errors import ConfigError
from mergelab.schema import StrictModel

Scalar = bool | int | float | str
ScalarOrGradient = Scalar | list[Scalar]

DTYPES = ("float32", "float16", "bfloat16", "float64")
DtypeName = Literal["float32", "float16", "bfloat16", "float64"]


class ConditionalValue(StrictModel):
    """A parameter value that applies to tensors whose name contains `filter` (all if omitted)."""

    value: ScalarOrGradient = Field(description="Scalar or per-layer gradient list.")
    filter: str | None = Field(
        default=None, description="Substring of the tensor name; `*` or omitted matches all."
    )


ParameterSetting = ScalarOrGradient | ConditionalValue | list[ConditionalValue]
Parameters = dict[str, ParameterSetting]


class ModelEntry(StrictModel):
    """A source model of a `models:` merge."""

    model: str = Field(description="Path of a checkpoint folder or file (or a state-dict name).")
    parameters: Parameters | None = Field(
        default=None, description="Per-model parameters, e.g. weight, density."
    )


class SliceSource(StrictModel):
    """A contiguous range of layers of one model, input to an output slice."""

    model: str = Field(description="Path of a checkpoint folder or file.")
    layer_range: tuple[int, int] = Field(description="[start, end) layer indices.")
    parameters: Parameters | None = Field(default=None, description="Per-source parameters.")

    @model_validator(mode="after")
    def _range_ordered(self) -> SliceSource:
        start, end = self.layer_range
        if start < 0 or end <= start:
            raise ValueError(f"layer_range must satisfy 0 <= start < end; got [{start}, {end}]")
        return self


class OutputSlice(StrictModel):
    """A run of output layers, merged from sources whose layer ranges have equal lengths."""

    sources: list[SliceSource] = Field(min_length=1, description="Input layer ranges.")
    base_model: str | None = Field(default=None, description="Base model of this slice.")
    parameters: Parameters | None = Field(default=None, description="Parameters of this slice.")


class DataSection(StrictModel):
    """Data for data-aware methods (RegMean, Fisher, AdaMerging; see mergelab.stats.stage).

    Each source model gets its own task's data: give `task` (one for all models) or `tasks`
    (one per entry of `models`, in order). A task is a registered task name (`mergelab.eval`),
    `csv:PATH` or a path to a CSV file with `text` and `label` columns.
    `statistics` names statistics folders (one per entry of `models`, or one parent folder
    holding a subfolder per model named after the model's folder): folders that exist are
    loaded and no data is run; missing ones are collected from the task(s) and saved there.
    """

    task: str | None = Field(default=None, description="Task name or CSV path for every model.")
    tasks: list[str] | None = Field(
        default=None, description="One task name or CSV path per model, in `models` order."
    )
    split: Literal["train", "validation", "test"] = Field(
        default="train", description="Split whose inputs the method sees."
    )
    examples: int = Field(default=256, ge=1, description="Examples per task.")
    batch_size: int = Field(default=16, ge=1, description="Examples per batch.")
    max_length: int = Field(default=64, ge=1, description="Tokens per text (longer are cut).")
    seed: int = Field(default=0, description="Seed of the split and of sampled Fisher labels.")
    statistics: str | list[str] | None = Field(
        default=None,
        description="Statistics folders to load (or to save collected statistics into): one "
        "per model, or one parent folder with a subfolder per model.",
    )

    @model_validator(mode="after")
    def _one_task_form(self) -> DataSection:
        if self.task is not None and self.tasks is not None:
            raise ValueError("give exactly one of `task` and `tasks`")
        if self.task is None and self.tasks is None and self.statistics is None:
            raise ValueError("give `task`, `tasks` or `statistics`")
        if self.tasks is not None and not self.tasks:
            raise ValueError("`tasks` is empty")
        return self


class ExpertGroupSpec(StrictModel):
    """Copies of one weight inside a model, one per modality (or expert), merged into one.

    Each member is a name pattern where `*` matches any text (including dots); tensors of the
    members are paired by what their `*`s match, and `into` (with as many `*`s) names the merged
    tensor: members `{v: "*.mlp_v.*", l: "*.mlp_l.*"}` with `into: "*.mlp.*"` merge
    `blocks.0.mlp_v.fc1.weight` and `blocks.0.mlp_l.fc1.weight` into `blocks.0.mlp.fc1.weight`.
    """

    name: str | None = Field(default=None, description="Label used in messages.")
    members: dict[str, str] = Field(
        description="Member name (e.g. v, l, vl) -> name pattern, in merge order."
    )
    into: str = Field(description="Name pattern of the merged tensor.")
    optional: list[str] = Field(
        default_factory=list,
        description="Members that some tensors lack (e.g. a VL copy only in the top blocks).",
    )
    parameters: Parameters | None = Field(
        default=None,
        description="The method's parameters for this group's tensors (before the global ones).",
    )


class ExpertGroupsSection(StrictModel):
    """Merge groups of copies *inside one model* (modality experts, MoE experts) into one weight.

    The config's single `models` entry is the model holding the copies; `base_model` is the seed
    checkpoint (for modality arithmetic, TIES and other methods with a base). See
    mergelab.plan.expert_groups and docs/multimodal.md.
    """

    preset: str | None = Field(
        default=None,
        description="Named pattern set: mergelab-mini, vlmo, beit3, mixtral, moe "
        "(mergelab.plan.expert_groups.PRESETS).",
    )
    groups: list[ExpertGroupSpec] | None = Field(
        default=None, description="Groups given explicitly (added to the preset's)."
    )
    drop: list[str] = Field(
        default_factory=list, description="Name patterns of tensors not written (e.g. routers)."
    )
    member_parameters: dict[str, Parameters] | None = Field(
        default=None,
        description="Per-member parameters of the method (e.g. density per copy), as "
        "`models.N.parameters` are per model.",
    )
    grams: str | None = Field(
        default=None,
        description="For methods reading Gram matrices (regmean): statistics folder with the "
        "Gram of every member's linear layer (mergelab.stats.collect_grams(..., out_dir=...)).",
    )

    @model_validator(mode="after")
    def _something_to_merge(self) -> ExpertGroupsSection:
        if self.preset is None and not self.groups:
            raise ValueError("give a `preset` or `groups`")
        return self


class TokenSourceSpec(StrictModel):
    """Where a token's row comes from (mergekit's `kind: model_token` / `kind: zero`)."""

    kind: Literal["model_token", "zero"] = Field(
        description="`model_token`: a model's row of a token; `zero`: a zero row."
    )
    model: str | None = Field(default=None, description="The model (kind model_token).")
    token: str | None = Field(default=None, description="The token whose row is taken.")
    token_id: int | None = Field(default=None, ge=0, description="Or that token's id.")

    @model_validator(mode="after")
    def _one_token(self) -> TokenSourceSpec:
        if self.kind == "zero":
            if self.model is not None or self.token is not None or self.token_id is not None:
                raise ValueError("`kind: zero` takes no `model`, `token` or `token_id`")
            return self
        if self.model is None:
            raise ValueError("`kind: model_token` needs `model`")
        if (self.token is None) == (self.token_id is None):
            raise ValueError("`kind: model_token` needs exactly one of `token` and `token_id`")
        return self


class TokenSpec(StrictModel):
    """How one token's embedding and LM-head rows are made (mergelab.plan.tokenizer)."""

    source: TokenSourceSpec | str | None = Field(
        default=None,
        description="A model (its row of this token), a `{kind: model_token | zero}` mapping, "
        "or omitted (mergekit's default rules).",
    )
    force: bool = Field(
        default=False, description="Use `source` even in the models that have the token."
    )


class TokenizerSection(StrictModel):
    """mergekit's `tokenizer:` section: the output vocabulary and how its rows are made."""

    source: str = Field(
        default="union", description="`union` (every source's tokens), `base` or a model path."
    )
    tokens: dict[str, TokenSpec] | None = Field(
        default=None, description="Per-token row sources; tokens absent from the vocabulary are added."
    )
    pad_to_multiple_of: int | None = Field(
        default=None, ge=1, description="Round the vocabulary rows up to a multiple of this."
    )


class MergeConfig(StrictModel):
    """A whole merge. Exactly one of `models` and `slices` is given."""

    merge_method: str = Field(description="Name of a registered merge method.")
    models: list[ModelEntry] | None = Field(default=None, description="Models to merge.")
    slices: list[OutputSlice] | None = Field(default=None, description="Layer slices to merge.")
    base_model: str | None = Field(
        default=None, description="Model the others were fine-tuned from; donor of config files."
    )
    parameters: Parameters | None = Field(default=None, description="Global parameters.")
    dtype: DtypeName | None = Field(
        default=None, description="Dtype the sources are cast to before merging (mergekit's)."
    )
    out_dtype: DtypeName | None = Field(default=None, description="Dtype of the written tensors.")
    tokenizer_source: str | None = Field(
        default=None,
        description="`union`, `base` or a model path: the output vocabulary; every source's "
        "embedding and LM-head rows are mapped onto it (mergelab.plan.tokenizer).",
    )
    tokenizer: TokenizerSection | None = Field(
        default=None, description="mergekit's tokenizer section (source, tokens, pad_to_multiple_of)."
    )
    chat_template: str | None = Field(
        default=None,
        description="A template name (chatml, llama3, mistral, alpaca, exaone) or a Jinja "
        "template, set on the output tokenizer.",
    )
    name: str | None = Field(default=None, description="Free-form name of the merge.")
    data: DataSection | None = Field(
        default=None, description="Data for data-aware methods (regmean, fisher, adamerging...)."
    )
    expert_groups: ExpertGroupsSection | None = Field(
        default=None,
        description="Merge copies of weights inside one model (modality or MoE experts).",
    )

    @model_validator(mode="after")
    def _one_input_form(self) -> MergeConfig:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give exactly one of `models` and `slices`")
        if self.models is not None and not self.models:
            raise ValueError("`models` is empty")
        if self.slices is not None and not self.slices:
            raise ValueError("`slices` is empty")
        if self.expert_groups is not None and (self.models is None or len(self.models) != 1):
            raise ValueError(
                "`expert_groups` merges copies inside one model: give exactly one entry under "
                "`models` (and the seed checkpoint as `base_model`)"
            )
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give `tokenizer_source` or the `tokenizer` section, not both")
        return self

    def referenced_models(self) -> list[str]:
        """Every model path the config names, in first-mention order (base first)."""
        seen: dict[str, None] = {}
        if self.base_model:
            seen[self.base_model] = None
        for entry in self.models or ():
            seen[entry.model] = None
        for out_slice in self.slices or ():
            if out_slice.base_model:
                seen[out_slice.base_model] = None
            for src in out_slice.sources:
                seen[src.model] = None
        return list(seen)


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


_KNOWN_FIELDS = {
    cls: _field_names(cls)
    for cls in (
        MergeConfig, ModelEntry, SliceSource, OutputSlice, ConditionalValue, DataSection,
        ExpertGroupSpec, ExpertGroupsSection, TokenizerSection, TokenSpec, TokenSourceSpec,
    )
}


def _describe_error(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p)) or "<root>"
    if err["type"] == "extra_forbidden":
        key = str(err["loc"][-1])
        candidates = sorted({f for fields in _KNOWN_FIELDS.values() for f in fields})
        close = difflib.get_close_matches(key, candidates, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        return f"{loc}: unknown key{hint}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    given = err.get("input")
    if isinstance(given, (str, int, float)) and err["type"] != "missing":
        msg += f" (got {given!r})"
    return f"{loc}: {msg}"


def _is_union_tag(part: Any) -> bool:
    # pydantic puts union member names (e.g. "list[ConditionalValue]") into error locations.
    return isinstance(part, str) and ("[" in part or part in ("bool", "int", "float", "str"))


def parse_config(data: Any, source: str | None = None) -> MergeConfig:
    """Validate a config mapping; every schema problem is reported at once with its key path.

    mergekit's `modules: {default: {slices|models, parameters}}` form is read as the same
    config without `modules` (`flatten_default_module`)."""
    if isinstance(data, MergeConfig):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping; got {type(data).__name__}", source)
    if "experts" in data and "merge_method" not in data:
        raise ConfigError(
            ["a mergekit-moe config (it has `experts` and no `merge_method`): build it with "
             "`mergelab moe CONFIG --out OUT` (mergelab.moe)"], source
        )
    if "modules" in data:
        data, problems = flatten_default_module(data)
        if problems:
            raise ConfigError(problems, source)
    try:
        return MergeConfig.model_validate(data)
    except ValidationError as exc:
        problems: list[str] = []
        for err in exc.errors():
            text = _describe_error(err)
            if text not in problems:
                problems.append(text)
        raise ConfigError(_prune_union_noise(problems), source) from None


def flatten_default_module(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """mergekit's `modules:` form with its one `default` module, as a plain config.

    The module's `slices` or `models` become the config's; its `parameters` sit between a
    slice's and the global ones in mergekit's search order, so each key set at both levels
    becomes one filter list, the module's entries first (the first match wins, so a filter of
    the module that does not match a tensor falls back to the global value, as in mergekit).
    Other modules (a multimodal model's towers) are not supported. Returns (config, problems).
    """
    modules = data.get("modules")
    problems: list[str] = []
    if not isinstance(modules, dict) or not modules:
        return data, ["modules: give a mapping with a `default` module"]
    others = sorted(str(k) for k in modules if k != "default")
    if others:
        problems.append(
            f"modules: only the `default` module is supported (one model's layers); got "
            f"{', '.join(f'`{k}`' for k in others)}"
        )
    module = modules.get("default")
    if not isinstance(module, dict):
        problems.append("modules.default: give `slices` or `models` (and optional `parameters`)")
        return data, problems
    extra = sorted(set(module) - {"slices", "models", "parameters"})
    if extra:
        problems.append(f"modules.default: unknown key(s) {', '.join(map(str, extra))}")
    if ("slices" in data) or ("models" in data):
        problems.append("modules: give exactly one of `models`, `slices` and `modules`")
    if problems:
        return data, problems
    out = {k: v for k, v in data.items() if k != "modules"}
    for key in ("slices", "models"):
        if key in module:
            out[key] = module[key]
    shared = module.get("parameters") or {}
    if shared:
        merged = dict(shared)
        for name, setting in (data.get("parameters") or {}).items():
            if name in merged:
                merged[name] = _as_filter_list(merged[name]) + _as_filter_list(setting)
            else:
                merged[name] = setting
        out["parameters"] = merged
    return out, []


def _as_filter_list(setting: Any) -> list[Any]:
    if isinstance(setting, dict):
        return [setting]
    if isinstance(setting, list) and setting and all(isinstance(e, dict) for e in setting):
        return list(setting)
    return [{"value": setting}]


def _prune_union_noise(problems: list[str]) -> list[str]:
    # A bad parameter value fails every member of the union; keep one line per key path.
    by_loc: dict[str, str] = {}
    for p in problems:
        loc = p.split(":", 1)[0]
        by_loc.setdefault(loc, p)
    return list(by_loc.values())


def read_documents(path: str | Path) -> list[Any]:
    """The YAML documents of a config file (one for a plain config); empty documents dropped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file: {exc.strerror}", str(path)) from None
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML syntax error: {exc}", str(path)) from None


def load_config(path: str | Path) -> MergeConfig:
    """Read and validate a YAML config file of one document (several documents are the stages
    of a multi-stage merge: mergelab.plan.multistage, run by mergelab.merge)."""
    documents = read_documents(path)
    if len(documents) > 1:
        raise ConfigError(
            f"the file holds {len(documents)} documents, the stages of a multi-stage merge: "
            "run it with mergelab.merge / mergelab.plan_merge", str(path)
        )
    return parse_config(documents[0] if documents else None, str(path))
