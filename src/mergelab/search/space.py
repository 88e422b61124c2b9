"""Parameter space: a real vector in [0, 1]^d -> a mergekit-style merge config.

A search config is an ordinary merge config (`merge_method`, `base_model`, `models`, fixed
`parameters`, `dtype`...) plus a `search:` section naming which of the method's numeric
parameters are searched and over which range. Each searched per-model parameter (`weight`,
`density`, ...) gets one value per source and per layer group: with `layer_groups: G > 1` the
value is a gradient of G anchors that the config layer interpolates over the layers (mergekit's
gradient lists, the granularity of mergekit-evolve's `layer_granularity`). A searched global
parameter (`lambda`, `t`, ...) gets one value. Coordinate x maps to low + x * (high - low), so
every sampler works on the unit cube (CMA-ES starts at its centre).

Ranges come from the registry's declared ones (`Param.low`/`high`), narrowed or given by the
section; `weight` ranges over [0, 1] by default ([-1, 1] with `negative_weights`); a parameter
with no declared range needs one in the section.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mergelab.errors import ConfigError
from mergelab.methods import get_method


@dataclass(frozen=True)
class Dimension:
    """One coordinate of the space: `parameter` of `model` (None: a global parameter) at
    layer group `group`, ranging over [low, high]."""

    parameter: str
    model: str | None
    group: int
    low: float
    high: float

    @property
    def label(self) -> str:
        where = f"{self.model}." if self.model is not None else ""
        return f"{where}{self.parameter}[{self.group}]"

    def value(self, x: float) -> float:
        return self.low + min(max(float(x), 0.0), 1.0) * (self.high - self.low)


@dataclass(frozen=True)
class ParameterSpace:
    """The searched coordinates of a merge config (see the module docstring)."""

    config: dict  # the merge config without `search:`, fixed parameters included
    dimensions: tuple[Dimension, ...]
    layer_groups: int
    normalize_weights: bool
    start: Mapping[str, float] | None = None  # `start: config`: the config's own point

    @property
    def size(self) -> int:
        return len(self.dimensions)

    def start_point(self) -> dict[str, float] | None:
        """`start: centre` (the default): None, no fixed first trial, and CMA-ES starts at the
        cube's centre (the paper's x0 = 0.5). `start: config`: the point of the config's own
        values (a hand-tuned recipe), which is then the first trial and CMA-ES's x0."""
        return dict(self.start) if self.start is not None else None

    def sampler_start(self) -> dict[str, float] | None:
        """Where CMA-ES's mean starts (None: the cube's centre): the start point, if any."""
        return self.start_point()

    def fingerprint_facts(self) -> dict:
        return {"config": self.config, "dimensions": [d.__dict__ for d in self.dimensions],
                "layer_groups": self.layer_groups, "normalize_weights": self.normalize_weights,
                **({"start": dict(self.start)} if self.start is not None else {})}

    def build(self, config: dict, sources, seed: int = 0) -> dict:
        """The merged state dict of a trial's config (merged in memory by the engine)."""
        from mergelab.api import merge_state_dicts

        return merge_state_dicts(config, sources, seed=seed)

    def to_config(self, x: Sequence[float]) -> dict:
        """The merge config of point `x` (len == size), as `mergelab merge` reads it."""
        if len(x) != self.size:
            raise ValueError(f"a point of this space has {self.size} coordinates; got {len(x)}")
        config = copy.deepcopy(self.config)
        values: dict[tuple[str, str | None], list[float]] = {}
        for dimension, coordinate in zip(self.dimensions, x):
            values.setdefault((dimension.parameter, dimension.model), []).append(
                dimension.value(coordinate)
            )
        if self.normalize_weights:
            _normalise_weights(values, self.layer_groups)
        models = config["models"]
        for (parameter, model), anchors in values.items():
            if model is None:
                config.setdefault("parameters", {})[parameter] = _rounded(anchors[0])
                continue
            entry = next(m for m in models if m["model"] == model)
            value = [_rounded(v) for v in anchors]
            entry.setdefault("parameters", {})[parameter] = value[0] if len(value) == 1 else value
        return config


def _rounded(value: float) -> float:
    # 12 significant digits: the YAML written for the best trial reads back to the same float
    # the trial merged with (the trial config is built from the same rounded values).
    return float(f"{value:.12g}")


def _normalise_weights(values: dict, groups: int) -> None:
    weights = {k: v for k, v in values.items() if k[0] == "weight" and k[1] is not None}
    for g in range(groups):
        total = sum(v[g] for v in weights.values())
        if abs(total) > 1e-12:
            for v in weights.values():
                v[g] /= total


def build_space(config: Mapping, section: Mapping) -> ParameterSpace:
    """The space of `section` (the `search:` section's `parameters`, `layer_groups`,
    `normalize_weights`, `negative_weights`) over the merge `config`. Raises ConfigError listing
    every problem: an unknown method or parameter, a non-numeric one, a range that is empty or
    outside the declared one, a parameter without a range."""
    problems: list[str] = []
    method_name = config.get("merge_method")
    try:
        method = get_method(str(method_name))
    except KeyError as exc:
        raise ConfigError([f"merge_method: {exc.args[0]}"]) from None
    declared = {p.name: p for p in method.params}
    groups = section.get("layer_groups", 1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        problems.append(f"search.layer_groups: a positive integer; got {groups!r}")
        groups = 1
    negative = bool(section.get("negative_weights", False))
    searched = section.get("parameters") or {}
    if not isinstance(searched, Mapping) or not searched:
        problems.append("search.parameters: name at least one numeric parameter of "
                        f"`{method.name}` to search ({', '.join(_numeric(declared))})")
        searched = {}
    models = [m["model"] if isinstance(m, Mapping) else m for m in config.get("models") or []]
    if not models:
        problems.append("models: the search needs the models to merge")
    dimensions: list[Dimension] = []
    for name, spec in searched.items():
        key = f"search.parameters.{name}"
        param = declared.get(name)
        if param is None:
            problems.append(f"{key}: `{method.name}` has no parameter `{name}`; its numeric "
                            f"parameters: {', '.join(_numeric(declared))}")
            continue
        if param.kind not in (int, float):
            problems.append(f"{key}: `{name}` is {param.kind.__name__}, not numeric")
            continue
        spec = spec or {}
        if not isinstance(spec, Mapping):
            problems.append(f"{key}: a mapping with `low` and `high`; got {spec!r}")
            continue
        default_low, default_high = param.low, param.high
        if name == "weight" and default_low is None:
            default_low, default_high = (-1.0 if negative else 0.0), 1.0
        low, high = spec.get("low", default_low), spec.get("high", default_high)
        if low is None or high is None:
            problems.append(f"{key}: `{name}` has no declared range; give `low` and `high`")
            continue
        low, high = float(low), float(high)
        if not (math.isfinite(low) and math.isfinite(high)) or not low < high:
            problems.append(f"{key}: the range [{low:g}, {high:g}] is empty")
            continue
        if param.low_exclusive and "low" not in spec and low == param.low:
            # A bound the method refuses (density 0 keeps nothing): start a hundredth inside it.
            low = low + (high - low) / 100
        if not (param.in_range(low) and param.in_range(high)):
            problems.append(f"{key}: [{low:g}, {high:g}] leaves `{name}`'s declared range "
                            f"{param.range_text()}")
            continue
        if param.per_model:
            for model in models:
                for g in range(groups):
                    dimensions.append(Dimension(name, str(model), g, low, high))
        else:
            dimensions.append(Dimension(name, None, 0, low, high))
    start = section.get("start", "centre")
    if start not in STARTS:
        problems.append(f"search.start: one of {', '.join(STARTS)}; got {start!r}")
    if problems:
        raise ConfigError(problems)
    merge_config = {k: copy.deepcopy(v) for k, v in config.items() if k != "search"}
    merge_config["models"] = [
        dict(m) if isinstance(m, Mapping) else {"model": m} for m in config["models"]
    ]
    point = _config_point(merge_config, dimensions, declared, groups) if start == "config" else None
    return ParameterSpace(merge_config, tuple(dimensions), groups,
                          bool(section.get("normalize_weights", False)), point)


STARTS = ("centre", "config")


def _config_point(config: Mapping, dimensions: Sequence[Dimension], declared: Mapping,
                  groups: int) -> dict[str, float]:
    """The unit-cube point of the values `config` gives the searched parameters (a model's
    `parameters`, else the config's `parameters`, else the declared default; a gradient list
    needs one value per layer group). Raises ConfigError for a value that is missing, not a
    number or outside the searched range."""
    problems, point = [], {}
    for d in dimensions:
        where = "parameters"
        value = (config.get("parameters") or {}).get(d.parameter, declared[d.parameter].default)
        if d.model is not None:
            entry = next(m for m in config["models"] if m["model"] == d.model)
            if d.parameter in (entry.get("parameters") or {}):
                where, value = f"models[{d.model}].parameters", entry["parameters"][d.parameter]
        key = f"search.start: config: `{where}.{d.parameter}`"
        if isinstance(value, list):
            if len(value) != groups:
                problems.append(f"{key} is a list of {len(value)}; the search has {groups} layer group(s)")
                continue
            value = value[d.group]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{key}: a number is needed to start from; got {value!r}")
            continue
        if not d.low <= value <= d.high:
            problems.append(f"{key} = {value:g} lies outside the searched range [{d.low:g}, {d.high:g}]")
            continue
        point[d.label] = (float(value) - d.low) / (d.high - d.low)
    if problems:
        raise ConfigError(sorted(dict.fromkeys(problems)))
    return point


def _numeric(declared: Mapping) -> list[str]:
    return [n for n, p in declared.items() if p.kind in (int, float)]


def load_checkpoints(config: Mapping) -> dict[str, dict]:
    """Every checkpoint a merge config names (`models`, `base_model`), read into memory once
    (keys: the config's paths)."""
    from mergelab.checkpoint import open_checkpoint

    names = [m["model"] if isinstance(m, Mapping) else m for m in config["models"]]
    if config.get("base_model"):
        names.append(config["base_model"])
    sources = {}
    for name in dict.fromkeys(names):
        reader = open_checkpoint(name)
        try:
            sources[name] = {key: reader.get(key) for key in reader.keys()}
        finally:
            reader.close()
    return sources
