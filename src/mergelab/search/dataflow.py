"""Data-flow space (Akiba et al. 2024): which layers of which source a hidden state runs
through, in what order, and how it is scaled between them.

The N sources' layers are laid out one model after the other (M = N * L slots of the layout,
L layers per source), and that sequence is repeated r times: T = M * r slots. A point of the
space holds an indicator per slot (slot t runs when its coordinate exceeds 0.5; the order is
fixed, so the space has 2^T routings rather than (M + 1)^T) and, with `scaling`, a scaling
matrix W (M x M): the hidden state passed from layout layer i to layout layer j is multiplied
by W[i, j] (the paper found that without it the routed model loses more than 20%). Each W
entry maps [0, 1] linearly onto `scale_range` (default [0.5, 1.5], so the cube's centre is
scale 1, the paper's 1 + w at w = 0).

A routing is a plain mapping, written as YAML:

    routing:
      host: /path/a          # embeddings, final layers and everything outside the stack
      models: [/path/a, /path/b]
      layers:                # in order
        - {model: 0, layer: 0, scale: 1.0}
        - {model: 1, layer: 3, scale: 0.93}

The routed model (`routed_model`, `load_routing`) runs by composing the sources' own layer
modules: a copy of the host's module tree that shares every tensor with the sources, its layer
stack replaced by the routed one (no weight is copied). A routing with every scale 1 is also a
passthrough merge config (`routing_merge_config`), which `mergelab merge` writes as a
checkpoint with the layer stack as slices.

Sources are model folders (`mergelab finetune` or `mergelab merge` outputs, any Hugging Face
model with a layer stack) or merge configs (a parameter-space search's `best.yaml`), merged in
memory into the architecture of their base: the paper's hybrid, where a parameter-space merge
becomes model A of the data-flow search.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import nn

from mergelab.errors import ConfigError, MergeLabError
from mergelab.search.space import Dimension, load_checkpoints

DATAFLOW_KEYS = {"space", "repeats", "scaling", "scale_range", "host", "start"}
INCLUDE = "include"
SCALE = "scale"
THRESHOLD = 0.5
CONFIG_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class DataflowSpace:
    """The routings of `models` (see the module docstring)."""

    models: tuple[str, ...]
    layers: int  # per source (every source has as many)
    repeats: int
    scaling: bool
    scale_low: float
    scale_high: float
    host: int
    start: str  # "host": the first trial is the host's own stack; "centre": no such trial

    @property
    def layout(self) -> int:  # M
        return len(self.models) * self.layers

    @property
    def slots(self) -> int:  # T
        return self.layout * self.repeats

    @property
    def dimensions(self) -> tuple[Dimension, ...]:
        include = [Dimension(INCLUDE, None, t, 0.0, 1.0) for t in range(self.slots)]
        if not self.scaling:
            return tuple(include)
        scales = [Dimension(SCALE, None, i * self.layout + j, self.scale_low, self.scale_high)
                  for i in range(self.layout) for j in range(self.layout)]
        return tuple(include + scales)

    @property
    def size(self) -> int:
        return self.slots + (self.layout**2 if self.scaling else 0)

    def slot(self, t: int) -> tuple[int, int]:
        """(source, layer) of slot t."""
        position = t % self.layout
        return position // self.layers, position % self.layers

    def to_config(self, x: Sequence[float]) -> dict:
        """The routing of point `x` (see the module docstring)."""
        if len(x) != self.size:
            raise ValueError(f"a point of this space has {self.size} coordinates; got {len(x)}")
        chosen = [t for t in range(self.slots) if float(x[t]) > THRESHOLD]
        layers, previous = [], None
        for t in chosen:
            model, layer = self.slot(t)
            position = model * self.layers + layer
            scale = 1.0
            if self.scaling and previous is not None:
                coordinate = min(max(float(x[self.slots + previous * self.layout + position]), 0.0), 1.0)
                scale = float(f"{self.scale_low + coordinate * (self.scale_high - self.scale_low):.12g}")
            layers.append({"model": model, "layer": layer, "scale": scale})
            previous = position
        return {"routing": {"host": self.models[self.host], "models": list(self.models),
                            "layers": layers}}

    def start_point(self) -> dict[str, float] | None:
        """The search's first trial: the host's own layers once, in order, unscaled ("host"),
        or None ("centre": no such trial). The sampler itself starts at the cube's centre."""
        if self.start != "host":
            return None
        point = {}
        for d in self.dimensions:
            if d.parameter == INCLUDE:
                model, _ = self.slot(d.group)
                point[d.label] = 0.75 if (d.group < self.layout and model == self.host) else 0.25
            else:
                point[d.label] = (1.0 - self.scale_low) / (self.scale_high - self.scale_low)
        return point

    def sampler_start(self) -> None:
        """CMA-ES starts at the cube's centre (the host's stack is only the first trial)."""
        return None

    def fingerprint_facts(self) -> dict:
        return {"space": "dataflow", **self.__dict__}

    def build(self, config: Mapping, sources: Sequence[nn.Module], seed: int = 0) -> nn.Module:
        """The routed model of `config` over the loaded `sources` (in `models` order)."""
        return routed_model(config, sources)


def build_dataflow_space(config: Mapping, section: Mapping, layers: int) -> DataflowSpace:
    """The space of a config's `models` and its `search:` section (`repeats`, `scaling`,
    `scale_range`, `host`, `start`); `layers` per source. Raises ConfigError listing every
    problem."""
    problems = []
    models = [m["model"] if isinstance(m, Mapping) else m for m in config.get("models") or []]
    if not models:
        problems.append("models: the data-flow search needs the source models")
    repeats = section.get("repeats", 1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        problems.append(f"search.repeats: a positive integer; got {repeats!r}")
        repeats = 1
    scale_range = section.get("scale_range", [0.5, 1.5])
    if (not isinstance(scale_range, Sequence) or len(scale_range) != 2
            or not all(isinstance(v, (int, float)) for v in scale_range)
            or not 0 <= scale_range[0] < scale_range[1]):
        problems.append(f"search.scale_range: [low, high] with 0 <= low < high; got {scale_range!r}")
        scale_range = [0.5, 1.5]
    host = section.get("host", 0)
    if not isinstance(host, int) or isinstance(host, bool) or not 0 <= host < max(len(models), 1):
        problems.append(f"search.host: the index of a source in `models` (0..{len(models) - 1}); "
                        f"got {host!r}")
        host = 0
    start = section.get("start", "host")
    if start not in ("host", "centre"):
        problems.append(f"search.start: host or centre; got {start!r}")
    for key in ("merge_method", "parameters", "base_model", "slices"):
        if config.get(key) is not None:
            problems.append(f"{key}: a data-flow search routes layers and merges nothing; remove "
                            "it (a merge config can be a source: `models: [best.yaml, ...]`)")
    if problems:
        raise ConfigError(problems)
    return DataflowSpace(tuple(str(m) for m in models), layers, repeats,
                         bool(section.get("scaling", True)), float(scale_range[0]),
                         float(scale_range[1]), host, start)


# --- the layer stack of a model -------------------------------------------------------------------


def layer_stack(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(attribute path, ModuleList) of the model's transformer layers: the outermost module list
    with `config.num_hidden_layers` entries. Raises MergeLabError for a model without one."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None)
    if count is None:
        raise MergeLabError(f"{type(model).__name__} has no `config.num_hidden_layers`: the "
                            "data-flow space routes Hugging Face models' layer stacks")
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, nn.ModuleList) and len(module) == count and name]
    if not found:
        raise MergeLabError(f"{type(model).__name__} has no module list of its "
                            f"{count} layers")
    return min(found, key=lambda item: item[0].count("."))


class ScaledLayer(nn.Module):
    """A source's layer run on its input hidden state times `scale` (attributes the host reads
    from its layers, such as an attention type, are the wrapped layer's)."""

    def __init__(self, layer: nn.Module, scale: float = 1.0):
        super().__init__()
        self.layer = layer
        self.scale = float(scale)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        return self.layer(hidden_states, *args, **kwargs)


def check_routing(routing: Mapping, sources: Sequence[nn.Module] | None = None) -> dict:
    """The `routing` mapping, checked (every problem at once, as a ConfigError)."""
    body = routing.get("routing", routing) if isinstance(routing, Mapping) else None
    if not isinstance(body, Mapping):
        raise ConfigError(["routing: a mapping with `host`, `models` and `layers`"])
    problems = []
    models = body.get("models")
    if not isinstance(models, list) or not models:
        problems.append("routing.models: the list of source models")
        models = []
    if body.get("host") not in models:
        problems.append(f"routing.host: one of routing.models; got {body.get('host')!r}")
    layers = body.get("layers")
    if not isinstance(layers, list):
        problems.append("routing.layers: a list of {model, layer, scale}")
        layers = []
    for i, entry in enumerate(layers):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), int) \
                or not isinstance(entry.get("layer"), int):
            problems.append(f"routing.layers.{i}: {{model: INDEX, layer: INDEX, scale: NUMBER}}; "
                            f"got {entry!r}")
            continue
        if not 0 <= entry["model"] < len(models):
            problems.append(f"routing.layers.{i}.model: {entry['model']} is not an index of "
                            f"routing.models (0..{len(models) - 1})")
        elif sources is not None:
            count = len(layer_stack(sources[entry["model"]])[1])
            if not 0 <= entry["layer"] < count:
                problems.append(f"routing.layers.{i}.layer: {entry['layer']} is not a layer of "
                                f"{models[entry['model']]} (0..{count - 1})")
        scale = entry.get("scale", 1.0)
        if not isinstance(scale, (int, float)) or isinstance(scale, bool):
            problems.append(f"routing.layers.{i}.scale: a number; got {scale!r}")
    if problems:
        raise ConfigError(problems)
    return dict(body)


def routed_model(routing: Mapping, sources: Sequence[nn.Module]) -> nn.Module:
    """The host's module tree, its layer stack replaced by the routing's layers of `sources`
    (in `routing.models` order); every tensor is shared with the sources, none copied. The
    sources are not changed."""
    body = check_routing(routing, sources)
    host = sources[body["models"].index(body["host"])]
    path, _ = layer_stack(host)
    shared = {id(t): t for t in itertools.chain(host.parameters(), host.buffers())}
    model = copy.deepcopy(host, shared)
    stacks = [layer_stack(source)[1] for source in sources]
    routed = nn.ModuleList(ScaledLayer(stacks[e["model"]][e["layer"]], e.get("scale", 1.0))
                           for e in body["layers"])
    parent_path, _, attribute = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, attribute, routed)
    model.config.num_hidden_layers = len(routed)
    return model.eval()


# --- sources --------------------------------------------------------------------------------------


def load_source(name: str) -> nn.Module:
    """A source as a torch module: a model folder, or a merge config merged in memory into the
    architecture of its base model (or its first model)."""
    from mergelab.eval.models import Classifier, load_model

    path = Path(name)
    if path.suffix in CONFIG_SUFFIXES:
        return _merged_source(path)
    model = load_model(path)
    return model.encoder if isinstance(model, Classifier) else model.model


def _merged_source(path: Path) -> nn.Module:
    from mergelab.api import merge_state_dicts
    from mergelab.eval.models import Classifier, load_model

    config = _read_merge_config(path)
    names = [m["model"] for m in config["models"]]
    merged = merge_state_dicts(config, load_checkpoints(config))
    architecture = load_model(config.get("base_model") or names[0])
    module = architecture.encoder if isinstance(architecture, Classifier) else architecture.model
    # A checkpoint may hold a module's non-persistent buffers (older BERTs' `position_ids`,
    # all-MiniLM-L6-v2's among them): the module computes those itself.
    persistent = set(module.state_dict())
    transient = {n for n, _ in module.named_buffers()} - persistent
    merged = {k: v for k, v in merged.items() if k not in transient}
    missing, unexpected = module.load_state_dict(merged, strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise MergeLabError(f"{path}: the merged weights do not fit the architecture of "
                            f"{config.get('base_model') or names[0]} (missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]})")
    return module.eval()


def _read_merge_config(path: Path) -> dict:
    """A merge config as a source names it, its paths made absolute (relative to its folder)."""
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise MergeLabError(f"cannot read the merge config {path}: {exc}") from None
    if not isinstance(config, dict) or not config.get("models"):
        raise MergeLabError(f"{path}: a merge config (`merge_method`, `models`) as a source")
    return _absolute_models(config, path.parent)


def _absolute_models(config: dict, base: Path) -> dict:
    def absolute(model: str) -> str:
        p = Path(model).expanduser()
        return str(p if p.is_absolute() else (base / p).resolve())

    config = dict(config)
    config["models"] = [{**m, "model": absolute(m["model"])} if isinstance(m, dict)
                        else {"model": absolute(m)} for m in config["models"]]
    if config.get("base_model"):
        config["base_model"] = absolute(config["base_model"])
    return config


def load_sources(space: DataflowSpace) -> list[nn.Module]:
    """Every source, loaded once, each with `space.layers` layers."""
    sources = [load_source(name) for name in space.models]
    for name, source in zip(space.models, sources):
        count = len(layer_stack(source)[1])
        if count != space.layers:
            raise MergeLabError(f"{name} has {count} layers, {space.models[0]} {space.layers}: "
                                "the data-flow sources need as many layers each")
    return sources


def architecture_folder(name: str) -> Path:
    """The model folder whose architecture (config.json, tokenizer) a source has: the folder
    itself, or a merge config's base model (else its first model), read without loading weights.

    Raises MergeLabError for a merge config that cannot be read or names no models.
    """
    path = Path(name)
    if path.suffix not in CONFIG_SUFFIXES:
        return path
    config = _read_merge_config(path)
    return Path(config.get("base_model") or config["models"][0]["model"])


def source_layers(name: str) -> int:
    """The layer count of a source, read without loading its weights where it is a folder."""
    import json

    path = architecture_folder(name)
    try:
        model_config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise MergeLabError(f"{path}: cannot read config.json for its layer count: {exc}") from None
    from mergelab.plan.layout import LAYER_COUNT_KEYS

    for key in LAYER_COUNT_KEYS:
        if isinstance(model_config.get(key), int):
            return model_config[key]
    raise MergeLabError(f"{path}/config.json names no layer count ({', '.join(LAYER_COUNT_KEYS)})")


# --- files ----------------------------------------------------------------------------------------


def load_routing(path: str | Path) -> nn.Module:
    """The runnable routed model of a routing file (its sources loaded from their paths)."""
    path = Path(path)
    try:
        routing = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise MergeLabError(f"cannot read the routing {path}: {exc}") from None
    try:
        body = check_routing(routing)
    except ConfigError as exc:
        raise ConfigError(exc.problems, str(path)) from None
    sources = [load_source(name) for name in body["models"]]
    return routed_model(body, sources)


def routing_merge_config(routing: Mapping, dtype: str | None = None) -> dict | None:
    """A passthrough merge config whose slices stack the routing's layers (runs of consecutive
    layers of one source become one slice), the host as base model; None when a layer is
    scaled (a scale between layers is no weight: only the routing file holds it)."""
    body = check_routing(routing)
    if any(float(e.get("scale", 1.0)) != 1.0 for e in body["layers"]):
        return None
    if not body["layers"]:
        return None
    slices, run = [], None
    for entry in body["layers"]:
        model = body["models"][entry["model"]]
        if run and run[0] == model and run[2] == entry["layer"]:
            run[2] += 1
        else:
            if run:
                slices.append(run)
            run = [model, entry["layer"], entry["layer"] + 1]
    slices.append(run)
    config = {
        "merge_method": "passthrough",
        "base_model": body["host"],
        "slices": [{"sources": [{"model": m, "layer_range": [a, b]}]} for m, a, b in slices],
    }
    if dtype:
        config["dtype"] = dtype
    return config
