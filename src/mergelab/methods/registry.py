"""The registry of merge methods: each method is a declaration plus a pure tensor kernel.

The CLI (`mergelab methods`), config validation and the docs table all read this registry;
nothing else in mergelab branches on a method's name.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

ParamValue = float | int | bool


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method.

    `per_model` parameters are given per source model (mergekit's "tensor parameters", e.g.
    `weight`, `density`); the others are given once for the merge (e.g. `lambda`, `t`).
    A `default` of None means the parameter is required.
    """

    name: str
    kind: type  # float, int or bool
    default: ParamValue | None
    description: str
    per_model: bool = False
    low: float | None = None
    high: float | None = None
    # True where `low` itself would make the method do nothing (a density of 0 keeps nothing).
    low_exclusive: bool = False

    def range_text(self, unbounded: tuple[str, str] = ("-inf", "inf")) -> str:
        """The declared range as an interval: "[0, 1]", "(0, 1]", "[0, inf]" (`unbounded`: what
        an end without a bound shows)."""
        lo = unbounded[0] if self.low is None else f"{self.low:g}"
        hi = unbounded[1] if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_exclusive else '['}{lo}, {hi}]"

    def in_range(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_exclusive else value < self.low):
            return False
        return self.high is None or value <= self.high

    def check(self, value: Any) -> str | None:
        """Return a problem message for `value`, or None if it is acceptable."""
        if self.kind is bool:
            if not isinstance(value, bool):
                return f"`{self.name}` must be true or false; got {value!r}"
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"`{self.name}` must be a number; got {value!r}"
        if self.kind is int and float(value) != int(value):
            return f"`{self.name}` must be an integer; got {value!r}"
        if not self.in_range(value):
            why = f" ({self.name} {self.low:g} makes the method a no-op)" if self.low_exclusive and value == self.low else ""
            return f"`{self.name}` must be in {self.range_text()}; got {value!r}{why}"
        return None

    def coerce(self, value: ParamValue) -> ParamValue:
        if self.kind is bool:
            return bool(value)
        return self.kind(value)


@dataclass
class TensorMerge:
    """Everything a kernel needs to merge one tensor.

    tensors: the source models' tensors, in config order, already cast to the merge dtype
        (float32 or float64) and on the merge device. When the method uses a base model, the
        base is *not* among them.
    base: the base model's tensor, or None when the method takes no base / none was given.
    model_params: for each entry of `tensors`, its resolved per-model parameters (defaults filled).
    params: the resolved global parameters (defaults filled).
    generator: a torch.Generator seeded from the merge seed and the tensor name (randomised
        methods must draw from it, never from the global RNG).
    name: the output tensor's name (some methods treat embeddings or norms differently).
    row_start: in a blockwise merge (see `Blockwise`), the first row of the whole tensor that
        this block holds; 0 for a whole tensor.
    writable: the engine made `tensors` for this merge alone (read from disk or cast), so a
        kernel may overwrite them in place to save memory; never true for a caller's tensors.
    statistics: for a method declaring `statistics`, one mapping per entry of `tensors` (that
        source's statistics of this tensor, e.g. {"gram": [in, in], "rows": []} of the layer
        owning a weight), float64/float32 as stored, on the merge device; None when the
        sources have no statistics for this tensor (biases, norms: kernels fall back to a
        data-free rule, e.g. the average).
    depth: the tensor's position in its model's layer stack, in [0, 1] (`index / (layers - 1)`,
        the position at which per-layer gradients resolve); 0 for tensors outside the stack
        (embeddings, final norm, heads). Depth-dependent methods (LiNeS) read it.
    """

    tensors: list[torch.Tensor]
    base: torch.Tensor | None
    model_params: list[dict[str, ParamValue]]
    params: dict[str, ParamValue]
    generator: torch.Generator | None = None
    name: str = ""
    row_start: int = 0
    writable: bool = False
    statistics: list[Mapping[str, torch.Tensor]] | None = None
    depth: float = 0.0

    def per_model(self, key: str) -> list[ParamValue]:
        return [p[key] for p in self.model_params]


Kernel = Callable[[TensorMerge], torch.Tensor]


class InputGram(Protocol):
    """One model's input statistics of the layer owning a tensor (mergelab.stats.LayerGram).

    kind: "linear", "conv" or "embedding"; gram: the summed Gram ([in, in]; convs
    [groups, d, d]; embeddings the token counts); count: rows summed; mean(): gram / count.
    """

    kind: str
    gram: torch.Tensor
    count: int

    def mean(self) -> torch.Tensor: ...


class BlockAccess(Protocol):
    """What a blockwise method's `prepare` sees of one whole tensor (see mergelab.engine.blocks).

    `meta` carries the name, parameters and shape information with empty `tensors`;
    `blocks()` iterates the row blocks in order (each a TensorMerge of float rows, with its own
    generator when the method is randomised); `rows(indices)` reads a few whole rows (e.g. a
    sample). Every call reads again: nothing of the tensor is kept in memory between passes.
    """

    meta: TensorMerge
    shape: tuple[int, ...]
    numel: int

    def blocks(self) -> Iterator[TensorMerge]: ...
    def rows(self, indices: Sequence[int]) -> TensorMerge: ...


@dataclass(frozen=True)
class Blockwise:
    """A bounded-memory form of a kernel: the tensor is merged in blocks of rows.

    prepare(access) -> state: zero or more passes over the blocks computing whole-tensor
        statistics (a top-k threshold, norms and a dot product, an L1 norm...); None when the
        method needs none.
    apply(block, state) -> merged rows of that block. Called once per block, in row order.
    The result must equal the whole-tensor kernel's up to float rounding of sums; randomised
    methods draw each block's randomness from that block's generator.
    applies(name, shape, params) -> whether this form may merge that tensor (None: every
        tensor); e.g. WUDI solves weight matrices whole but averages the other tensors, which
        may go block by block. The others are merged whole by `kernel`.
    """

    apply: Callable[[TensorMerge, Any], torch.Tensor]
    prepare: Callable[[BlockAccess], Any] | None = None
    applies: Callable[[str, tuple[int, ...], Mapping[str, ParamValue]], bool] | None = None

    @classmethod
    def entrywise(
        cls,
        kernel: Kernel,
        applies: Callable[[str, tuple[int, ...], Mapping[str, ParamValue]], bool] | None = None,
    ) -> Blockwise:
        """For kernels where each output entry depends only on the same entry of the inputs
        (of the tensors `applies` accepts): a block of rows merges exactly as the whole tensor
        does."""
        return cls(apply=lambda block, _state: kernel(block), applies=applies)


@dataclass
class ModulatedTensor:
    """What a modulated method makes of one tensor (see `Modulation`).

    merged: the shared weights, written to the checkpoint: base + the shared task vector.
    masks: one boolean mask per source (shape of the tensor): the entries of the shared task
        vector that source's task keeps.
    sums: one mapping per source of per-tensor quantities that the method adds up over all
        tensors to compute each task's rescaler (e.g. EMR's mean magnitudes); empty when the
        method needs none.
    """

    merged: torch.Tensor
    masks: list[torch.Tensor]
    sums: list[dict[str, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Modulation:
    """A merge that also gives each task light modulators over the shared weights.

    Task t's own weights are base + rescaler_t * mask_t * (merged - base), tensor by tensor.
    kernel(task) -> ModulatedTensor for one tensor (the method's plain `kernel` returns its
        `merged` alone, so the shared weights also merge like any method's).
    rescalers(totals) -> one float per source, from each source's `sums` added up over every
        tensor (called once, after the last tensor); None: every rescaler is 1.
    """

    kernel: Callable[[TensorMerge], ModulatedTensor]
    rescalers: Callable[[list[dict[str, float]]], list[float]] | None = None


@dataclass
class Upscaled:
    """What an upscaling method makes of one tensor (see `Upscaling`).

    merged: the tensor written to the shared checkpoint.
    extras: the method's extra tensors for it, by key (shapes as `Upscaling.shapes` planned).
    active: false when the extras are placeholders (zeros) that a loader must ignore, e.g. a
        layer no fine-tune changed.
    """

    merged: torch.Tensor
    extras: dict[str, torch.Tensor]
    active: bool = True


@dataclass(frozen=True)
class Upscaling:
    """A merge whose output is a bigger model: shared weights plus extra tensors per tensor
    (SMILE's low-rank experts and routers), loaded as a torch module (mergelab.upscale).

    kernel(task) -> Upscaled for one tensor (the method's plain `kernel` returns `merged`).
    shapes(name, shape, num_models, params) -> {key: shape} of the extras a tensor gets, known
        before merging (so they stream to disk at planned offsets); {} for none.
    forward_params: the global parameters the loaded module needs at run time (recorded per
        tensor in the manifest), e.g. SMILE's `top_k`.
    wraps: the module types whose weights get extras at load time (e.g. torch.nn.Linear).
    module(layer, extras, params) -> the torch module replacing `layer` (one of `wraps`), from
        the extras of its `weight` (and, under key "bias", of its bias) and `forward_params`.
    cost(shape, extras, params) -> (multiply-adds per input row of the upscaled layer, of the
        base layer), for the inference cost the merge reports.
    trainer: name of a registered training stage (mergelab.plan.stages.TRAINERS) that learns
        some extras on the config's data before the output is written (WEMoE's routers); the
        kernel then gives their initial values and the stage's values replace them.
    trained: the extras' keys the trainer learns (the others are the kernel's as they are).
    """

    kernel: Callable[[TensorMerge], Upscaled]
    shapes: Callable[[str, tuple[int, ...], int, Mapping[str, ParamValue]], dict[str, tuple[int, ...]]]
    wraps: tuple[type, ...]
    module: Callable[[Any, Mapping[str, torch.Tensor], Mapping[str, ParamValue]], Any]
    cost: Callable[[tuple[int, ...], Mapping[str, tuple[int, ...]], Mapping[str, ParamValue]], tuple[int, int]]
    forward_params: tuple[str, ...] = ()
    trainer: str | None = None
    trained: tuple[str, ...] = ()


@dataclass(frozen=True)
class MergeMethod:
    """Declaration of a merge method.

    base: "required" (e.g. TIES), "optional" (e.g. nuslerp) or "none" (e.g. linear: a
        `base_model` then only supplies config/tokenizer files and is merged only if listed
        under `models`).
    min_models / max_models: how many non-base source models the method takes.
    blockwise: optional bounded-memory form of the kernel, used for large tensors.
    needs: inputs beyond the checkpoints, e.g. ("data",) for methods that run data through the
        models (RegMean, Fisher, AdaMerging); the planner refuses such methods unless the config
        has a `data:` section (or the caller supplies the data, as `mergelab.data_merge`).
    statistics: the per-tensor statistics the kernel reads (kinds registered in
        mergelab.stats.kinds, e.g. ("gram",) or ("fisher",)): a statistics stage collects them
        from the data before planning (or loads a statistics folder), the plan references them
        per tensor and the engine hands them to the kernel in `TensorMerge.statistics`.
    collector: name of a registered statistics collector (mergelab.stats.stage) that gathers
        `statistics` differently from the default (each source on its own data), e.g.
        "progressive" (RegMean++: Grams collected in the partially merged model).
    optimiser: name of a registered optimisation stage (mergelab.plan.stages) whose output is a
        plan of another method (AdaMerging: per-tensor task-arithmetic coefficients); such a
        method's own kernel is never called. `optimiser_options` are handed to that stage.
    check_model_params: optional check of constraints *between* parameters that single-`Param`
        ranges cannot express; called with one source's resolved per-model params, returns a
        problem message or None (e.g. DELLA: `density` +/- `epsilon` must lie in (0, 1)).
    check_params: the same for the global parameters, which may also depend on whether a base
        tensor is given: called with one tensor's resolved global params and `has_base`
        (e.g. RegMean: a `scaling` other than 1 needs the base).
    mergekit: mergekit 0.1.5 has this method under the same name, so its configs follow
        mergekit's rules: parameters mergekit accepts for it and ignores (another method's
        parameter, a global parameter given per model) are accepted with a warning instead of
        refused (a strict validation keeps them errors).
    warm_up: optional one-time preparation of the kernel's runtime (e.g. loading compiled
        kernels, ~0.7 s for numba's): the engine starts it in a background thread before it
        reads the first tensor, so that it overlaps the reads.
    modulation: for methods whose output is a merged model plus per-task modulators (TALL
        masks, EMR): see `Modulation`. `mergelab merge` then writes the modulators beside the
        shared weights (mergelab.modulators); in-memory merges return the shared weights.
    upscaling: for methods whose output is an upscaled model (SMILE): see `Upscaling`.
        `mergelab merge` writes the extras beside the shared weights (mergelab.upscale);
        in-memory merges return the shared weights.
    check_sources: optional check of the global parameters against the number of merged
        (non-base) models of a tensor, e.g. Consensus merging: `k` at most that number;
        returns a problem message or None.
    """

    name: str
    title: str
    paper: str
    url: str
    kernel: Kernel
    params: tuple[Param, ...] = ()
    base: Literal["required", "optional", "none"] = "none"
    min_models: int = 1
    max_models: int | None = None
    randomized: bool = False
    aliases: tuple[str, ...] = field(default=())
    check_model_params: Callable[[Mapping[str, ParamValue]], str | None] | None = None
    blockwise: Blockwise | None = None
    needs: tuple[str, ...] = ()
    check_params: Callable[[Mapping[str, ParamValue], bool], str | None] | None = None
    check_sources: Callable[[Mapping[str, ParamValue], int], str | None] | None = None
    modulation: Modulation | None = None
    upscaling: Upscaling | None = None
    statistics: tuple[str, ...] = ()
    collector: str | None = None
    optimiser: str | None = None
    optimiser_options: tuple[tuple[str, Any], ...] = ()
    mergekit: bool = False
    warm_up: Callable[[], None] | None = None

    @property
    def needs_data(self) -> bool:
        """Whether the method runs data through the models (statistics or an optimiser)."""
        return "data" in self.needs

    @property
    def trains_extras(self) -> bool:
        """Whether an upscaling method learns some of its extras on data (`Upscaling.trainer`)."""
        return self.upscaling is not None and self.upscaling.trainer is not None

    @property
    def learns_from_data(self) -> bool:
        """Whether the data stage learns something once for the whole merge (an optimiser's
        coefficients, or the extras an upscaling trainer fits) rather than only collecting
        statistics; whether it needs the tasks' heads is the stage's own declaration."""
        return self.optimiser is not None or self.trains_extras

    @property
    def merges_with_grams(self) -> bool:
        """Whether the method merges from each model's own input Grams alone (RegMean), so that
        Grams collected beforehand (a statistics folder: `expert_groups.grams`) suffice.
        RegMean++'s are collected in the partially merged model (`collector`), so they do not."""
        return self.statistics == ("gram",) and self.collector is None

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def arity_problem(self, count: int, what: str = "models") -> str | None:
        """A message when `count` (non-base) inputs are fewer than `min_models` or more than
        `max_models`; None when the method takes that many. `what` names the inputs."""
        def counted(n: int) -> str:
            return f"{n} {what[:-1] if n == 1 and what.endswith('s') else what}"

        if count < self.min_models:
            return f"method `{self.name}` needs at least {counted(self.min_models)}; got {count}"
        if self.max_models is not None and count > self.max_models:
            return f"method `{self.name}` takes at most {counted(self.max_models)}; got {count}"
        return None

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if not p.per_model)

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.per_model)


_REGISTRY: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    """Add a method to the registry (its name must be new)."""
    for key in (method.name, *method.aliases):
        if key in _REGISTRY:
            raise ValueError(f"merge method {key!r} is registered twice")
        _REGISTRY[key] = method
    return method


def get_method(name: str) -> MergeMethod:
    """Look a method up by name; the error lists the known names (and a close match)."""
    _ensure_loaded()
    try:
        return _REGISTRY[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        known = ", ".join(sorted({m.name for m in _REGISTRY.values()}))
        raise KeyError(f"unknown merge method {name!r}{hint}; known methods: {known}") from None


def list_methods(pattern: str = "*") -> list[MergeMethod]:
    """Registered methods whose name matches a glob pattern, sorted by name."""
    _ensure_loaded()
    seen = {m.name: m for m in _REGISTRY.values()}
    return [seen[n] for n in sorted(seen) if fnmatch.fnmatch(n, pattern)]


def method_names() -> Sequence[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def resolve_defaults(
    params: tuple[Param, ...], given: Mapping[str, ParamValue]
) -> dict[str, ParamValue]:
    """Fill defaults and coerce types; callers validated the values beforehand."""
    out: dict[str, ParamValue] = {}
    for p in params:
        if p.name in given:
            out[p.name] = p.coerce(given[p.name])
        elif p.default is not None:
            out[p.name] = p.default
    return out


def _ensure_loaded() -> None:
    # Importing the package registers every built-in method.
    import mergelab.methods  # noqa: F401
