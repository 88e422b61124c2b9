"""Config -> validated per-tensor plan.

Everything that can be checked before reading tensor data is checked here, and all problems are
reported at once: the schema, the method and its arity, parameter names and ranges, that every
source opens, that every output tensor exists in every source with the same shape, and that every
required parameter resolves for every tensor.

Layer structure is found from tensor names (`model.layers.3.mlp...`, `encoder.layer.3...`,
`transformer.h.3...`), so no per-architecture table is needed. As in mergekit, a layer tensor's
gradient position is `t = index / (layers_in_slice - 1)`; other tensors take `t = 0`.

Three layouts say which input tensors make each output tensor: `models` (the same names in every
model), `slices` (layer ranges) and `expert_groups` (copies inside one model, planned by
mergelab.plan.expert_groups). Each yields `PlannedTensor`s (mergelab.plan.layout); the
parameters of all of them are validated and resolved here, by the same code.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergelab.errors import CheckpointError, ConfigError
from mergelab.methods.registry import MergeMethod, Param, ParamValue, get_method, list_methods
from mergelab.plan import expert_groups
from mergelab.plan.config import MergeConfig, Parameters
from mergelab.plan.layout import (  # noqa: F401  (LAYER_RE, TensorSource: re-exported)
    LAYER_COUNT_KEYS,
    LAYER_RE,
    PlannedInput,
    PlannedTensor,
    TensorSource,
    count_layers,
    split_layer_name,
)
from mergelab.plan.params import MISSING, resolve_param, setting_leaves
from mergelab.plan.tokenizer import (
    VocabularyPlan,
    VocabularyRemap,
    chat_template_files,
    is_vocabulary_tensor,
    plan_vocabulary,
    tokenizer_source_of,
)

# Non-layer tensors that come before the layer stack (taken from the first slice's sources);
# all others (final norm, lm_head, pooler...) come after it (taken from the last slice's).
_PRE_LAYER_RE = re.compile(r"(embed|\bwte\b|\bwpe\b|\.wte\.|\.wpe\.|^wte|^wpe)")

DTYPE_BY_NAME = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class Assembly:
    """An output tensor assembled from its inputs rather than merged (a MoE's experts):
    stack([cat([input i for i in group], dim 0) for group in groups]) (with `stack` false, the
    one group's concatenation), each input first given Gaussian noise of std `noise` (0: none)
    and multiplied by its `scales` entry."""

    groups: tuple[tuple[int, ...], ...]
    scales: tuple[float, ...]
    noise: tuple[float, ...]
    stack: bool = True


@dataclass(frozen=True)
class TensorTask:
    """How to produce one output tensor.

    inputs: (model key, tensor name in that model) for every input, in merge order; when
        `base_index` is not None the input at that position is the base model.
    model_params: per-model parameters of each non-base input, in order.
    copied: the single input is written unchanged (cast like any merge input), without calling
        the method: tensors outside every expert group.
    statistics: for a method declaring `statistics`, one lazy reference per non-base input:
        (key of a store in `MergePlan.statistics`, entry in it), or None where that source has
        no statistics of this tensor; empty when the method reads none. The engine reads the
        entries next to the tensors.
    vocabulary: for an embedding or LM head under vocabulary merging, how each input's rows
        map onto the output vocabulary (mergelab.plan.tokenizer); the engine applies it to the
        inputs before the kernel, so `shape` is the output's, not the inputs'.
    assembly: the output is assembled from the inputs, not merged (mergelab.plan.moe).
    constant: the output is this tensor, decided by the plan (a MoE's router rows); no inputs.
    depth: the tensor's position in its layer stack, in [0, 1], the `t` at which gradients
        resolve (`index / (layers - 1)`); 0 for tensors outside the stack. Handed to the kernel
        as `TensorMerge.depth` (LiNeS scales task vectors by it).
    """

    name: str
    shape: tuple[int, ...]
    out_dtype: torch.dtype
    inputs: tuple[tuple[str, str], ...]
    base_index: int | None
    model_params: tuple[dict[str, ParamValue], ...]
    params: dict[str, ParamValue]
    is_float: bool = True
    copied: bool = False
    statistics: tuple[tuple[str, str] | None, ...] = ()
    vocabulary: VocabularyRemap | None = None
    assembly: Assembly | None = None
    constant: torch.Tensor | None = None
    depth: float = 0.0

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def out_nbytes(self) -> int:
        return self.numel * _itemsize(self.out_dtype)


@dataclass
class MergePlan:
    """A validated merge: the sources, the method and one task per output tensor."""

    config: MergeConfig
    method: MergeMethod
    sources: dict[str, TensorSource]
    tasks: list[TensorTask]
    merge_dtype: torch.dtype | None
    donor: str | None
    tokenizer_donor: str | None
    out_config: dict | None
    notes: list[str] = field(default_factory=list)
    statistics: dict[str, Any] = field(default_factory=dict)  # store key -> StatisticsSource
    config_dir: Path | None = None  # where relative paths of the config (data:) resolve
    # The output tokenizer's files (vocabulary merging, a chat template), written in place of
    # the tokenizer donor's; empty: the donor's files are copied as they are.
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)
    # What the output records as mergelab_config.yml when not `config` itself (a multi-stage
    # file's whole text: its final stage reads the other stages by name).
    recorded_config: str | None = None

    @property
    def merged_sources(self) -> list[str]:
        """Keys of the sources whose tensors the kernel merges (the base excluded), in order."""
        out: dict[str, None] = {}
        for task in self.tasks:
            for i, (key, _) in enumerate(task.inputs):
                if i != task.base_index:
                    out.setdefault(key)
        return list(out)

    @property
    def needs_data_stage(self) -> bool:
        """A data stage must run before the engine: the method runs data through the models
        and the plan lacks what that gives (its statistics, or its optimised coefficients).
        An expert-group plan whose members' Grams are referenced needs none."""
        return self.method.needs_data and (
            self.method.learns_from_data or self.awaits_statistics
        )

    @property
    def awaits_statistics(self) -> bool:
        """The method reads statistics that are not attached yet (see `attach_statistics`)."""
        return bool(self.method.statistics) and not self.statistics

    def input_nbytes(self, task: TensorTask) -> int:
        """Bytes read for `task`: its input tensors and their statistics entries."""
        total = 0
        for key, name in task.inputs:
            total += task.numel * _itemsize(self.sources[key].dtype(name))
        for ref in task.statistics:
            if ref is not None:
                total += self.statistics[ref[0]].entry_nbytes(ref[1])
        return total

    def estimate_peak_bytes(self, prefetch: int = 2) -> int:
        """Peak tensor memory: the largest tasks' inputs in flight plus their float32 work."""
        per_task = sorted(
            (self.input_nbytes(t) + t.numel * 4 * (len(t.inputs) + 2) + t.out_nbytes)
            for t in self.tasks
        )
        return sum(per_task[-(prefetch + 1) :]) if per_task else 0

    @property
    def total_out_bytes(self) -> int:
        return sum(t.out_nbytes for t in self.tasks)

    @property
    def total_in_bytes(self) -> int:
        return sum(self.input_nbytes(t) for t in self.tasks)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass
class _SliceSpec:
    sources: list[tuple[str, int, int, Parameters | None]]  # key, start, end, params
    base: str | None
    params: Parameters | None
    where: str


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, msg: str) -> None:
        if msg not in self.items:
            self.items.append(msg)

    def extend(self, messages: Sequence[str]) -> None:
        for msg in messages:
            self.add(msg)

    def __bool__(self) -> bool:
        return bool(self.items)


def build_plan(
    config: MergeConfig,
    open_source: Callable[[str], TensorSource],
    *,
    source_label: str | None = None,
    open_grams: Callable[[str], expert_groups.GramLookup] | None = None,
    data_supplied: bool = False,
    strict: bool = False,
) -> MergePlan:
    """Validate `config` against its sources and return the per-tensor plan.

    open_source: maps a model string of the config to a TensorSource (a checkpoint reader, or a
        state dict for in-memory merges); it raises CheckpointError for sources that cannot open.
    open_grams: maps `expert_groups.grams` to its Gram matrices (module name -> Gram); default:
        mergelab.stats.GramStore, a lazy reader of a statistics folder.
    data_supplied: the caller brings the data of a data-aware method itself (mergelab.data_merge),
        so the config needs no `data:` section.
    strict: parameters mergekit accepts and ignores (for a method declared `mergekit`) are
        errors, as for mergelab's own methods; by default they are ignored with a plan note.
    A data-aware method's plan is complete except for its statistics (`awaits_statistics`),
    which the statistics stage attaches (`attach_statistics`); an optimised method's plan is
    validated here and replaced by its optimiser's output plan.
    Raises ConfigError listing every problem found.
    """
    problems = _Problems()
    ignored: list[str] = []
    try:
        method = get_method(config.merge_method)
    except KeyError as exc:
        # Still check that every source opens: all problems are reported at once.
        problems.add(f"merge_method: {exc.args[0]}")
        _open_sources(config, config.referenced_models(), open_source, problems)
        raise ConfigError(problems.items, source_label) from None

    _check_data_section(config, method, problems, data_supplied)
    ignored = _check_parameter_settings(config, method, problems, strict)
    groups = config.expert_groups is not None
    if groups:
        problems.extend(expert_groups.check_config(config, method))
    keys = expert_groups.source_keys(config, method) if groups else config.referenced_models()
    sources = _open_sources(config, keys, open_source, problems)
    if len(sources) < len(keys) or (groups and problems):
        # A source that does not open leaves nothing to check tensors against (nor does a bad
        # expert-group section); the problems found so far are reported together.
        raise ConfigError(problems.items, source_label)

    merge_dtype = DTYPE_BY_NAME[config.dtype] if config.dtype else None
    out_dtype = DTYPE_BY_NAME[config.out_dtype] if config.out_dtype else None
    tok = tokenizer_source_of(config)
    if tok not in (None, "base", "union") and tok not in sources:
        try:
            sources[tok] = open_source(tok)
        except (CheckpointError, FileNotFoundError) as exc:
            problems.add(f"tokenizer source: {exc}")
    vocab_problems: list[str] = []
    vocab_notes: list[str] = []
    vocabulary = None
    if not groups:
        vocabulary = plan_vocabulary(config, sources, vocab_problems, vocab_notes)
        problems.extend(vocab_problems)
    planner = _TensorPlanner(config, method, sources, merge_dtype, out_dtype, problems, vocabulary)
    planner.notes.extend(vocab_notes)
    slices: list[_SliceSpec] = []
    statistics: dict = {}
    if groups:
        layout = expert_groups.plan_groups(config, method, sources, open_grams)
        problems.extend(layout.problems)
        for planned in layout.tensors:
            planner.plan_tensor(planned)
        method, donor = layout.method, layout.donor
        planner.notes.extend(layout.notes)
        statistics = layout.statistics
    else:
        before = len(problems.items)
        slices = _normalise_slices(config, method, sources, problems)
        for spec in slices:
            _check_arity(spec, method, problems)
        if len(problems.items) > before:
            # Wrong layer ranges or inputs would make every tensor check below a duplicate.
            raise ConfigError(problems.items, source_label)
        _plan_tensors(config, slices, sources, planner)
        donor = config.base_model or (slices[0].sources[0][0] if slices else None)
    tokenizer_donor = donor if tok in (None, "base", "union") else tok
    tokenizer_files = vocabulary.files if vocabulary is not None else {}
    if vocabulary is None and not problems:
        chat_problems: list[str] = []
        tokenizer_files = chat_template_files(config, tokenizer_donor, sources, chat_problems)
        problems.extend(chat_problems)
    if problems:
        raise ConfigError(problems.items, source_label)
    tasks, notes = planner.tasks, planner.notes
    notes[:0] = ignored
    notes.extend(_dtype_notes(sources, tasks, merge_dtype))
    if method.modulation is not None:
        notes.append(f"method `{method.name}` writes each task's modulators (bit-packed masks) in "
                     "modulators/ beside the shared weights (docs/modulators.md)")  # fmt: skip
    if method.upscaling is not None:
        notes.append(f"method `{method.name}` writes its extra tensors in upscaled/ beside the "
                     "shared weights; load the result as a module (docs/upscaled.md)")  # fmt: skip
    out_config = _output_config(config, sources.get(donor) if donor else None, slices)
    if vocabulary is not None and out_config is not None:
        _set_vocab_size(out_config, vocabulary.rows)
        notes.append(f"output vocabulary: {len(vocabulary.vocab)} tokens"
                     + (f" in {vocabulary.rows} rows" if vocabulary.rows > len(vocabulary.vocab) else "")
                     + f" ({tok}); embedding and head rows mapped onto it")
    return MergePlan(
        config=config,
        method=method,
        sources=sources,
        tasks=tasks,
        merge_dtype=merge_dtype,
        donor=donor,
        tokenizer_donor=tokenizer_donor,
        out_config=out_config,
        notes=notes,
        statistics=statistics,
        tokenizer_files=tokenizer_files,
    )


def _set_vocab_size(out_config: dict, rows: int) -> None:
    """config.json's vocab_size is the merged vocabulary's row count (where the config keeps it:
    at the top, or in a multimodal wrapper's text_config)."""
    text = out_config.get("text_config")
    if "vocab_size" not in out_config and isinstance(text, dict) and "vocab_size" in text:
        out_config["text_config"] = {**text, "vocab_size": rows}
    else:
        out_config["vocab_size"] = rows


def _open_sources(
    config: MergeConfig,
    keys: Sequence[str],
    open_source: Callable[[str], TensorSource],
    problems: _Problems,
) -> dict[str, TensorSource]:
    sources: dict[str, TensorSource] = {}
    for key in keys:
        where = "base_model" if key == config.base_model else "model"
        try:
            sources[key] = open_source(key)
        except (CheckpointError, FileNotFoundError) as exc:
            problems.add(f"{where} {key!r}: {exc}")
    return sources


def _check_data_section(
    config: MergeConfig, method: MergeMethod, problems: _Problems, data_supplied: bool
) -> None:
    if config.expert_groups is not None:
        # Copies inside one model: their statistics come from `expert_groups.grams`.
        problems.extend(expert_groups.check_statistics(config, method))
        return
    data = config.data
    if not method.needs_data:
        if data is not None:
            problems.add(f"data: `{method.name}` uses no data; remove the `data:` section")
        return
    if data is None:
        if not data_supplied:
            problems.add(
                f"merge_method: `{method.name}` needs data: add a `data:` section naming a task "
                "or a dataset path (e.g. `data: {task: sentiment}`) or statistics folders "
                "(`data: {statistics: [...]}`), or call mergelab.data_merge"
            )
        return
    if config.slices is not None:
        problems.add("slices: data-aware methods merge whole models; use `models`")
        return
    n = len(config.models or ())
    if data.tasks is not None and len(data.tasks) != n:
        problems.add(f"data.tasks: {len(data.tasks)} task(s) for {n} model(s)")
    if isinstance(data.statistics, list) and len(data.statistics) != n:
        problems.add(f"data.statistics: {len(data.statistics)} folder(s) for {n} model(s)")
    if data.statistics is not None and not method.statistics:
        problems.add(
            f"data.statistics: `{method.name}` learns from the data itself and reads no statistics"
        )
    if method.learns_from_data:
        learned = "optimised" if method.optimiser is not None else "trained"
        for path, settings, _ in _parameter_scopes(config):
            for name, setting in settings.items():
                if isinstance(setting, (list, dict)) or hasattr(setting, "model_dump"):
                    problems.add(
                        f"{path}.{name}: `{method.name}` is {learned} once for the whole merge; "
                        "give a single value (no gradients or filters)"
                    )


def attach_statistics(
    plan: MergePlan, stores: Mapping[str, Mapping[str, Any]], *, source_label: str | None = None,
    partial: bool = False,
) -> MergePlan:
    """The plan with each task's lazy statistics references filled in.

    stores: merged source key -> statistics kind -> StatisticsSource (mergelab.stats.store),
        one per kind the method declares. A tensor gets a reference per source where that
        source's store holds an entry for it; a tensor whose statistics some sources have and
        others lack is an error, as is a source or kind without a store, an entry whose shape
        does not fit its tensor, and (unless `partial`: statistics of some blocks only) stores
        that hold an entry for no tensor at all (all listed).
    Returns a new MergePlan sharing the sources; the input plan is unchanged.
    """
    import dataclasses

    problems = _Problems()
    kinds = plan.method.statistics
    if len(kinds) != 1:
        raise ConfigError(
            [f"merge_method: `{plan.method.name}` declares statistics {list(kinds)}; a plan "
             "carries exactly one kind per tensor"], source_label,
        )
    (kind,) = kinds
    merged = plan.merged_sources
    store_keys: dict[str, str] = {}
    table: dict[str, Any] = {}
    for key in merged:
        store = (stores.get(key) or {}).get(kind)
        if store is None:
            problems.add(f"model {key!r}: no {kind} statistics (collect them or name a folder)")
            continue
        store_keys[key] = f"{key}#{kind}"
        table[store_keys[key]] = store
    if problems:
        raise ConfigError(problems.items, source_label)
    tasks = []
    for task in plan.tasks:
        refs: list[tuple[str, str] | None] = []
        for i, (key, name) in enumerate(task.inputs):
            if i == task.base_index:
                continue
            store = table[store_keys[key]]
            entry = store.entry_for(name) if task.is_float else None
            refs.append(None if entry is None else (store_keys[key], entry))
            problem = entry is not None and hasattr(store, "entry_problem") and \
                store.entry_problem(entry, tuple(task.shape))
            if problem:
                problems.add(f"tensor `{task.name}` of model {key!r}: the {kind} statistics "
                             f"entry `{entry}` does not fit: {problem} (statistics of another "
                             "model?)")  # fmt: skip
        present = [r is not None for r in refs]
        if any(present) and not all(present):
            lacking = [k for (k, _), p in zip(
                [inp for j, inp in enumerate(task.inputs) if j != task.base_index], present
            ) if not p]
            problems.add(
                f"tensor `{task.name}` has {kind} statistics in some sources but not in "
                f"{', '.join(map(repr, lacking))}"
            )
        tasks.append(dataclasses.replace(task, statistics=tuple(refs) if any(present) else ()))
    if problems:
        raise ConfigError(problems.items, source_label)
    with_stats = sum(1 for t in tasks if t.statistics)
    if with_stats == 0 and not partial and any(t.is_float for t in tasks):
        # Otherwise every tensor falls back to the data-free rule: a plain average, silently.
        examples = []
        for key in merged:
            entries = getattr(table[store_keys[key]], "entries", lambda: [])()
            examples.append(f"{key!r}: {entries[:3]}")
        sample = [t.name for t in tasks if t.is_float][:3]
        raise ConfigError(
            [f"the {kind} statistics share no layer with the model: no tensor of it (e.g. "
             f"{sample}) has an entry (entries: {'; '.join(examples)}); they were computed for "
             "another model"], source_label,
        )  # fmt: skip
    notes = [*plan.notes, f"{with_stats} of {len(tasks)} tensors merged with {kind} statistics; "
             "the others by the method's data-free rule"]
    return dataclasses.replace(plan, tasks=tasks, statistics=table, notes=notes)


def _parameter_scopes(config: MergeConfig) -> list[tuple[str, Parameters, bool]]:
    """(key path, settings, is_per_model_scope) for every parameters block in the config."""
    scopes: list[tuple[str, Parameters, bool]] = []
    if config.parameters:
        scopes.append(("parameters", config.parameters, False))
    for i, entry in enumerate(config.models or ()):
        if entry.parameters:
            scopes.append((f"models.{i}.parameters", entry.parameters, True))
    for i, out_slice in enumerate(config.slices or ()):
        if out_slice.parameters:
            scopes.append((f"slices.{i}.parameters", out_slice.parameters, False))
        for j, src in enumerate(out_slice.sources):
            if src.parameters:
                scopes.append((f"slices.{i}.sources.{j}.parameters", src.parameters, True))
    if config.expert_groups is not None:
        scopes.extend(expert_groups.parameter_scopes(config.expert_groups))
    return scopes


def _check_parameter_settings(
    config: MergeConfig, method: MergeMethod, problems: _Problems, strict: bool = False
) -> list[str]:
    """Check every parameter setting of the config against `method`'s declaration.

    A parameter that mergekit accepts for this method and ignores (the method is declared
    `mergekit`, not `strict`): another registered method's parameter (`weight` for
    model_stock), or a global parameter given per model (`lambda` per model for della), is
    ignored as mergekit ignores it; returns one warning per such setting. A name no method has
    stays an error (a typo, with a "did you mean").
    """
    known = [p.name for p in method.params]
    lenient = method.mergekit and not strict
    anywhere = {p.name for m in list_methods() for p in m.params}
    ignored: list[str] = []
    for path, settings, per_model in _parameter_scopes(config):
        for name, setting in settings.items():
            param = method.param(name)
            if param is None:
                if lenient and name in anywhere:
                    ignored.append(
                        f"{path}.{name}: `{method.name}` has no parameter `{name}`; ignored, as "
                        "mergekit ignores it (--strict refuses it)"
                    )
                    continue
                import difflib

                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean `{close[0]}`?)" if close else ""
                listing = ", ".join(known) if known else "none"
                problems.add(
                    f"{path}.{name}: unknown parameter of method `{method.name}`{hint}; "
                    f"its parameters: {listing}"
                )
                continue
            if per_model and not param.per_model:
                if lenient:
                    ignored.append(
                        f"{path}.{name}: `{name}` is a global parameter of `{method.name}`; the "
                        "per-model value is ignored, as mergekit ignores it (--strict refuses it)"
                    )
                    continue
                shared = "a group's" if config.expert_groups is not None else "slice"
                problems.add(
                    f"{path}.{name}: `{name}` is a global parameter of `{method.name}`; "
                    f"set it under the top-level or {shared} `parameters`"
                )
            for leaf in setting_leaves(setting):
                msg = param.check(leaf)
                if msg:
                    problems.add(f"{path}.{name}: {msg} (method `{method.name}`)")
    return ignored


def _normalise_slices(
    config: MergeConfig,
    method: MergeMethod,
    sources: Mapping[str, TensorSource],
    problems: _Problems,
) -> list[_SliceSpec]:
    """Both config forms as a list of slices; `models` becomes one slice over all layers.

    As in mergekit, in the `models` form a base model that is not listed is added as an input
    (except for a data-aware method that takes no base: there it names the architecture).
    """
    if config.models is not None:
        entries = [(e.model, e.parameters) for e in config.models]
        listed = {m for m, _ in entries}
        # A data-aware method without a base (Fisher) takes `base_model` as the architecture
        # the data runs through, never as one more model to merge.
        architecture_only = method.needs_data and method.base == "none"
        if config.base_model and config.base_model not in listed and not architecture_only:
            entries.append((config.base_model, None))
        specs = []
        for key, params in entries:
            specs.append((key, 0, count_layers(sources[key]), params))
        return [_SliceSpec(specs, config.base_model, None, "models")]
    out: list[_SliceSpec] = []
    for i, out_slice in enumerate(config.slices or ()):
        specs = []
        for j, src in enumerate(out_slice.sources):
            n = count_layers(sources[src.model])
            start, end = src.layer_range
            if end > n:
                problems.add(
                    f"slices.{i}.sources.{j}.layer_range: [{start}, {end}] exceeds the "
                    f"{n} layers of {src.model!r}"
                )
            specs.append((src.model, start, end, src.parameters))
        lengths = {end - start for _, start, end, _ in specs}
        if len(lengths) > 1:
            problems.add(
                f"slices.{i}.sources: every source of a slice needs the same number of layers; "
                f"got {sorted(lengths)}"
            )
        base = out_slice.base_model or config.base_model
        out.append(_SliceSpec(specs, base, out_slice.parameters, f"slices.{i}"))
    return out


def _check_arity(spec: _SliceSpec, method: MergeMethod, problems: _Problems) -> None:
    keys = [s[0] for s in spec.sources]
    if len(set(keys)) != len(keys):
        problems.add(f"{spec.where}: a model is listed twice")
    uses_base = method.base != "none"
    has_base = spec.base is not None and spec.base in keys
    if method.base == "required" and spec.base is None:
        problems.add(f"{spec.where}: method `{method.name}` needs a `base_model`")
    elif uses_base and spec.base is not None and not has_base:
        problems.add(
            f"{spec.where}: base model {spec.base!r} is not among this slice's sources"
        )
    n = len(keys) - (1 if uses_base and has_base else 0)
    msg = method.arity_problem(n, "non-base models" if uses_base else "models")
    if msg:
        problems.add(f"{spec.where}: {msg}")


def _is_pre_layer(name: str) -> bool:
    return _PRE_LAYER_RE.search(name) is not None


def _plan_tensors(
    config: MergeConfig,
    slices: list[_SliceSpec],
    sources: Mapping[str, TensorSource],
    planner: _TensorPlanner,
) -> None:
    """The `models` and `slices` layouts: every output tensor, planned in output order."""
    if config.models is not None:
        # One slice over everything: output names are the reference model's, in file order.
        spec = slices[0]
        ref_key = config.base_model or spec.sources[0][0]
        layers = max(end for _, _, end, _ in spec.sources)
        for name in sources[ref_key].keys():
            parts = split_layer_name(name)
            t = 0.0
            if parts is not None:
                t = parts[1] / (layers - 1) if layers > 1 else 1.0
            planner.add(name, spec, [(k, name) for k, *_ in spec.sources], t)
        planner.notes.extend(planner.report_extras(spec, set(sources[ref_key].keys())))
        return

    first, last = slices[0], slices[-1]
    ref = sources[first.sources[0][0]]
    stacks = {p[0] for p in map(split_layer_name, ref.keys()) if p is not None}
    if len(stacks) > 1:
        planner.problems.add(
            f"slices: {first.sources[0][0]!r} has several layer stacks ({', '.join(sorted(stacks))}); "
            "slices need a model with one"
        )
        return
    stack = next(iter(stacks), None)
    non_layer = [n for n in ref.keys() if split_layer_name(n) is None]
    for name in (n for n in non_layer if _is_pre_layer(n)):
        planner.add(name, first, [(k, name) for k, *_ in first.sources], 0.0)
    out_index = 0
    for spec in slices:
        length = spec.sources[0][2] - spec.sources[0][1]
        for offset in range(length):
            t = offset / (length - 1) if length > 1 else 1.0
            ref_key, ref_start = spec.sources[0][0], spec.sources[0][1]
            prefix = f"{stack}.{ref_start + offset}."
            suffixes = [n[len(prefix) :] for n in sources[ref_key].keys() if n.startswith(prefix)]
            for rest in suffixes:
                inputs = [(k, f"{stack}.{start + offset}.{rest}") for k, start, _, _ in spec.sources]
                planner.add(f"{stack}.{out_index}.{rest}", spec, inputs, t)
            out_index += 1
    for name in (n for n in non_layer if not _is_pre_layer(n)):
        planner.add(name, last, [(k, name) for k, *_ in last.sources], 0.0)


class _TensorPlanner:
    """Checks and resolves every output tensor of any layout into its TensorTask."""

    def __init__(self, config, method, sources, merge_dtype, out_dtype, problems, vocabulary=None):
        self.config: MergeConfig = config
        self.vocabulary: VocabularyPlan | None = vocabulary
        self.method: MergeMethod = method
        self.sources: Mapping[str, TensorSource] = sources
        self.merge_dtype = merge_dtype
        self.out_dtype = out_dtype
        self.problems: _Problems = problems
        self.tasks: list[TensorTask] = []
        self.notes: list[str] = []
        self._names: set[str] = set()
        self._missing: set[tuple[str, str | None]] = set()

    def add(self, out_name: str, spec: _SliceSpec, inputs: list[tuple[str, str]], t: float):
        """One output tensor of the `models` or `slices` layout: its inputs (model key, tensor
        name) must exist in every source with one shape (integer buffers some lack excepted)."""
        resolved: list[tuple[str, str]] = []
        shapes: list[tuple[tuple[int, ...], str, str]] = []
        missing: list[str] = []
        for key, name in inputs:
            src = self.sources[key]
            actual = src.resolve(name)
            if actual is None:
                missing.append(key)
                continue
            resolved.append((key, actual))
            shapes.append((tuple(src.shape(actual)), key, actual))
        if missing:
            if resolved and not any(
                self.sources[k].dtype(n).is_floating_point for k, n in resolved
            ):
                # An integer buffer (e.g. BERT's `position_ids`) that some checkpoints leave out
                # (recent transformers do not save it): copied from the models that have it.
                self.notes.append(
                    f"buffer `{out_name}` is missing from {', '.join(map(repr, missing))}; "
                    "copied from the other models"
                )
                inputs = resolved
            else:
                for key in missing:
                    self.problems.add(f"tensor `{dict(inputs)[key]}` is missing from model {key!r}")
                return
        first_shape, first_key, _ = shapes[0]
        # Under vocabulary merging an embedding's or head's rows are mapped onto the output
        # vocabulary, so only the other axes must agree.
        by_token = bool(self.vocabulary is not None and is_vocabulary_tensor(out_name) and first_shape)
        for shape, key, name in shapes[1:]:
            if (shape[1:] != first_shape[1:] or len(shape) != len(first_shape)) if by_token \
                    else shape != first_shape:
                self.problems.add(
                    f"tensor `{name}`: shape {list(shape)} in model {key!r} differs from "
                    f"{list(first_shape)} in model {first_key!r}"
                )
                return
        uses_base = self.method.base != "none"
        keys = [k for k, _ in resolved]
        base_index = keys.index(spec.base) if uses_base and spec.base in keys else None
        remap = None
        if by_token:
            try:
                remap = self.vocabulary.remap(keys, spec.base, [s[0][0] for s in shapes])
            except LookupError as exc:
                self.problems.add(
                    f"tokenizer.tokens: a token takes its row from model {exc.args[0]!r}, which "
                    f"is not an input of tensor `{out_name}`"
                )
                return
        param_scopes = {key: params for key, _, _, params in spec.sources}
        planned_inputs = tuple(
            PlannedInput(key, name, param_scopes.get(key), f"model {key!r}") for key, name in resolved
        )
        scopes = (spec.params, self.config.parameters)
        self.plan_tensor(PlannedTensor(out_name, planned_inputs, base_index, scopes, t), remap)

    def plan_tensor(self, planned: PlannedTensor, vocabulary: VocabularyRemap | None = None) -> None:
        """Resolve and check the parameters of one output tensor of any layout; add its task.

        Global parameters resolve at the output name from `planned.scopes`; each non-base
        input's per-model parameters at its own tensor name, from its own scope first.
        """
        out_name, inputs, base_index = planned.name, planned.inputs, planned.base_index
        if out_name in self._names:
            self.problems.add(f"output tensor `{out_name}` would be written twice")
            return
        self._names.add(out_name)
        first = inputs[0]
        shape = tuple(self.sources[first.key].shape(first.name))
        if vocabulary is not None:
            shape = (vocabulary.rows, *shape[1:])
        reference = planned.reference
        if reference is None:
            reference = base_index if base_index is not None else 0
        ref = inputs[reference]
        src_dtype = self.sources[ref.key].dtype(ref.name)
        is_float = src_dtype.is_floating_point
        out_dtype = self.out_dtype or self.merge_dtype or src_dtype
        if not is_float:
            out_dtype = src_dtype
        params: dict[str, ParamValue] = {}
        model_params: list[dict[str, ParamValue]] = []
        if planned.copied:
            model_params = [{}]
        else:
            scopes = list(planned.scopes)
            params = self._resolve(self.method.global_params, scopes, out_name, planned.t, None)
            if self.method.check_params is not None and len(params) == len(self.method.global_params):
                msg = self.method.check_params(params, base_index is not None)
                if msg:
                    self.problems.add(f"parameters: {msg} (method `{self.method.name}`)")
            merged_count = len(inputs) - (base_index is not None)
            if self.method.check_sources is not None and len(params) == len(
                self.method.global_params
            ):
                msg = self.method.check_sources(params, merged_count)
                if msg:
                    self.problems.add(f"parameters: {msg} (method `{self.method.name}`)")
            for i, item in enumerate(inputs):
                if i == base_index:
                    continue
                resolved_params = self._resolve(
                    self.method.model_params, [item.parameters, *scopes], item.name, planned.t,
                    item.label,
                )
                if self.method.check_model_params is not None:
                    msg = self.method.check_model_params(resolved_params)
                    if msg:
                        self.problems.add(f"{item.label}, tensor `{item.name}`: {msg}")
                model_params.append(resolved_params)
        self.tasks.append(
            TensorTask(
                name=out_name,
                shape=shape,
                out_dtype=out_dtype,
                inputs=tuple((item.key, item.name) for item in inputs),
                base_index=base_index,
                model_params=tuple(model_params),
                params=params,
                is_float=is_float,
                copied=planned.copied,
                statistics=planned.statistics if is_float else (),
                vocabulary=vocabulary,
                depth=planned.t,
            )
        )

    def _resolve(
        self,
        params: Sequence[Param],
        scopes: list,
        tensor_name: str,
        t: float,
        label: str | None,
    ) -> dict[str, ParamValue]:
        out: dict[str, ParamValue] = {}
        for p in params:
            try:
                value = resolve_param(p, scopes, tensor_name, t)
            except (TypeError, ValueError):
                continue  # a value of the wrong type: reported by _check_parameter_settings
            if value is MISSING:
                if (p.name, label) in self._missing:
                    continue  # reported once, at the first tensor that needs it
                self._missing.add((p.name, label))
                who = f" for {label}" if label else ""
                self.problems.add(
                    f"parameter `{p.name}` of method `{self.method.name}` is required{who} "
                    f"but not set (first needed by tensor `{tensor_name}`)"
                )
                continue
            out[p.name] = value  # type: ignore[assignment]
        return out

    def report_extras(self, spec: _SliceSpec, ref_names: set[str]) -> list[str]:
        """Tensors some sources have but the reference lacks are not merged: say so."""
        notes = []
        for key, *_ in spec.sources:
            extra = sorted(
                n for n in self.sources[key].keys()
                if n not in ref_names and self.sources[key].resolve(n) == n
            )
            if extra:
                shown = ", ".join(extra[:5]) + (" ..." if len(extra) > 5 else "")
                notes.append(f"{len(extra)} tensor(s) of {key!r} are not in the reference "
                             f"model and are not written: {shown}")
        return notes


def _dtype_notes(
    sources: Mapping[str, TensorSource], tasks: list[TensorTask], merge_dtype: torch.dtype | None
) -> list[str]:
    seen: dict[str, set[str]] = {}
    for task in tasks:
        for key, name in task.inputs:
            seen.setdefault(key, set()).add(str(sources[key].dtype(name)).replace("torch.", ""))
    kinds = {d for ds in seen.values() for d in ds if d.startswith(("float", "bfloat"))}
    notes = []
    if len(kinds) > 1 or (merge_dtype is not None and kinds - {str(merge_dtype)[6:]}):
        target = str(merge_dtype).replace("torch.", "") if merge_dtype else "float32"
        listing = "; ".join(f"{k}: {', '.join(sorted(v))}" for k, v in seen.items())
        notes.append(f"sources have dtypes ({listing}); all are cast to {target} for the merge")
    return notes


def _output_config(
    config: MergeConfig, donor: TensorSource | None, slices: list[_SliceSpec]
) -> dict | None:
    if donor is None:
        return None
    cfg = donor.config()
    if cfg is None:
        return None
    cfg = dict(cfg)
    if config.out_dtype or config.dtype:
        # transformers 5 writes `dtype`, older versions `torch_dtype`: update what is there.
        keys = [k for k in ("dtype", "torch_dtype") if k in cfg] or ["torch_dtype"]
        for key in keys:
            cfg[key] = config.out_dtype or config.dtype
    if config.slices is not None:
        total = sum(s.sources[0][2] - s.sources[0][1] for s in slices)
        for key in LAYER_COUNT_KEYS:
            if key in cfg:
                cfg[key] = total
                break
    return cfg


def describe_plan(plan: MergePlan) -> dict[str, Any]:
    """A JSON-able summary for `--dry-run` (with the data stage a data-aware method will run)."""
    from mergelab.plan.stages import describe_data_stage

    return {
        "data_stage": describe_data_stage(plan, plan.config_dir),
        "method": plan.method.name,
        "sources": {k: str(getattr(s, "path", k)) for k, s in plan.sources.items()},
        "tensors": len(plan.tasks),
        "output_bytes": plan.total_out_bytes,
        "input_bytes": plan.total_in_bytes,
        "merge_dtype": str(plan.merge_dtype or torch.float32).replace("torch.", ""),
        "notes": plan.notes,
    }
