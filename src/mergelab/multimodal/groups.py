"""Expert-group merging: copies of one weight inside one model, merged into a single weight.

A modality-specific transformer (VLMo, BEiT-3; Sung et al. 2023, "An Empirical Study of
Multimodal Model Merging", https://arxiv.org/abs/2304.14933) keeps a vision (V), a language (L)
and, in its top blocks, a vision-language (VL) copy of each block's layer norms, attention and FFN;
a mixture-of-experts layer keeps one FFN per expert. Merging each group of copies gives a
modality-agnostic (or dense) model with a fraction of the block parameters.

A group names its members by patterns (`*` matches any text, dots included); the tensors of the
members are paired by what their `*`s matched, and `into` names the merged tensor. Tensors outside
every group are copied unchanged; `drop` patterns remove tensors (e.g. a MoE router).

The merge is planned into the same per-tensor plan as any other merge (`mergelab.plan`) and runs
on the streaming engine, so every data-free method of the registry applies (the members are its
"models", the seed checkpoint its base), plus three group methods of the paper:

- `interpolation`: alpha * W_v + (1 - alpha) * W_l; with a VL copy, the paper's
  2 alpha / 3, 2 (1 - alpha) / 3 and 1 / 3. Members are taken in order (vision, language, VL).
- `modality_arithmetic`: W_seed + lambda * sum_m (W_m - W_seed) (task arithmetic of the modality
  vectors; needs the seed checkpoint as `base_model`).
- `regmean`: RegMean's closed form per linear layer from each member's Gram matrix (the Gram of the
  inputs that modality's tokens bring to that copy), other tensors averaged.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mergelab.datamerge.common import module_of
from mergelab.datamerge.regmean import merge_tensor
from mergelab.errors import ConfigError
from mergelab.methods.registry import (
    Blockwise,
    MergeMethod,
    Param,
    ParamValue,
    TensorMerge,
    get_method,
)
from mergelab.plan.config import ExpertGroupSpec, MergeConfig, Parameters, parse_config
from mergelab.plan.params import MISSING, resolve_param, setting_leaves
from mergelab.plan.planner import (
    DTYPE_BY_NAME,
    MergePlan,
    TensorSource,
    TensorTask,
    count_layers,
    split_layer_name,
)

# --- groups and their patterns ---------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertGroup:
    """One kind of weight copied per member: member patterns, in merge order, and the output pattern."""

    name: str
    members: tuple[tuple[str, str], ...]
    into: str
    optional: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if len(self.members) < 2:
            raise ValueError(f"group `{self.name}`: give at least two members")
        wildcards = self.into.count("*")
        for member, pattern in self.members:
            if pattern.count("*") != wildcards:
                raise ValueError(
                    f"group `{self.name}`: member `{member}` pattern {pattern!r} has "
                    f"{pattern.count('*')} `*` but `into` {self.into!r} has {wildcards}"
                )
        unknown = sorted(self.optional - {m for m, _ in self.members})
        if unknown:
            raise ValueError(f"group `{self.name}`: optional member(s) {unknown} are not members")
        if len(self.optional) > len(self.members) - 2:
            raise ValueError(f"group `{self.name}`: at least two members must be required")

    @classmethod
    def from_spec(cls, spec: ExpertGroupSpec, index: int) -> ExpertGroup:
        return cls(
            name=spec.name or f"groups.{index}",
            members=tuple(spec.members.items()),
            into=spec.into,
            optional=frozenset(spec.optional),
        )

    @property
    def member_names(self) -> list[str]:
        return [m for m, _ in self.members]


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """`*` captures any text (shortest first, the last one the rest); everything else is literal."""
    parts = pattern.split("*")
    regex = ""
    for i, part in enumerate(parts):
        regex += re.escape(part)
        if i < len(parts) - 1:
            regex += "(.+)" if i == len(parts) - 2 else "(.+?)"
    return re.compile(regex)


def fill_pattern(pattern: str, captures: Sequence[str]) -> str:
    parts = pattern.split("*")
    out = parts[0]
    for capture, part in zip(captures, parts[1:], strict=True):
        out += capture + part
    return out


@dataclass(frozen=True)
class GroupedTensor:
    """One merged output: its name, its group and the member tensors (member, tensor name)."""

    out_name: str
    group: ExpertGroup
    members: tuple[tuple[str, str], ...]


@dataclass
class GroupMatch:
    """How a model's tensor names fall into groups: merged outputs, copied and dropped tensors."""

    grouped: list[GroupedTensor]
    copied: list[str]
    dropped: list[str]
    order: list[str]  # output names in the model's order
    problems: list[str] = field(default_factory=list)


def match_groups(names: Sequence[str], groups: Sequence[ExpertGroup], drop: Sequence[str] = ()) -> GroupMatch:
    """Pair the tensors of each group's members; report every problem (nothing raised here)."""
    problems: list[str] = []
    owner: dict[str, str] = {}
    drop_res = [(p, compile_pattern(p)) for p in drop]
    dropped = []
    for pattern, regex in drop_res:
        hits = [n for n in names if regex.fullmatch(n)]
        if not hits:
            problems.append(f"drop pattern {pattern!r} matches no tensor")
        for n in hits:
            if n not in owner:
                owner[n] = "drop"
                dropped.append(n)
    grouped: list[GroupedTensor] = []
    first_member: dict[str, str] = {}  # out name -> first member tensor (for the output order)
    for group in groups:
        table: dict[tuple[str, ...], dict[str, str]] = {}
        for member, pattern in group.members:
            regex = compile_pattern(pattern)
            hits = 0
            for n in names:
                m = regex.fullmatch(n)
                if m is None or owner.get(n) == "drop":
                    continue
                hits += 1
                where = f"group `{group.name}` member `{member}`"
                if n in owner:
                    problems.append(f"tensor `{n}` matches both {owner[n]} and {where}")
                    continue
                owner[n] = where
                table.setdefault(m.groups(), {})[member] = n
            if hits == 0 and member not in group.optional:
                problems.append(
                    f"group `{group.name}`: member `{member}` pattern {pattern!r} matches no tensor"
                )
        for captures, found in table.items():
            out_name = fill_pattern(group.into, captures)
            missing = [m for m in group.member_names if m not in found and m not in group.optional]
            if missing:
                have = ", ".join(f"`{t}`" for t in found.values())
                expected = ", ".join(
                    f"`{fill_pattern(p, captures)}`" for m, p in group.members if m in missing
                )
                problems.append(
                    f"group `{group.name}`: {have} has no counterpart for member(s) "
                    f"{missing} (expected {expected})"
                )
                continue
            members = tuple((m, found[m]) for m in group.member_names if m in found)
            grouped.append(GroupedTensor(out_name, group, members))
            first_member[out_name] = members[0][1]
    copied = [n for n in names if n not in owner]
    outputs = {g.out_name for g in grouped}
    clash = sorted(outputs & set(copied))
    for n in clash:
        problems.append(
            f"merged tensor `{n}` would overwrite the model's own tensor of that name; "
            "drop it or change the group's `into`"
        )
    seen_out: set[str] = set()
    for g in grouped:
        if g.out_name in seen_out:
            problems.append(f"two groups write the merged tensor `{g.out_name}`")
        seen_out.add(g.out_name)
    position = {n: i for i, n in enumerate(names)}
    keyed = [(position[n], n) for n in copied] + [(position[first_member[o]], o) for o in outputs]
    order = [n for _, n in sorted(keyed)]
    return GroupMatch(grouped, copied, dropped, order, problems)


# --- presets -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """Groups (and drops) for a published layout; `build` sees the tensor names (e.g. to count experts)."""

    name: str
    description: str
    build: Callable[[Sequence[str]], tuple[list[ExpertGroup], list[str]]]


PRESETS: dict[str, Preset] = {}


def register_preset(preset: Preset) -> Preset:
    if preset.name in PRESETS:
        raise ValueError(f"preset {preset.name!r} is registered twice")
    PRESETS[preset.name] = preset
    return preset


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(
            f"unknown expert-group preset {name!r}{hint}; known: {', '.join(sorted(PRESETS))}"
        ) from None


def _modality_groups(stem: str, parts: Sequence[str], suffixes: Mapping[str, str], joiner: str):
    """Groups `stem.{part}{joiner}{suffix}.*` -> `stem.{part}.*` for each part, members by suffix."""
    groups = []
    for part in parts:
        members = {m: f"{stem}.{part}{joiner}{s}.*" for m, s in suffixes.items()}
        groups.append(
            ExpertGroup(
                name=part,
                members=tuple(members.items()),
                into=f"{stem}.{part}.*",
                optional=frozenset({"vl"} & set(suffixes)),
            )
        )
    return groups


register_preset(
    Preset(
        "mergelab-mini",
        "mergelab's miniature modality-specific transformer (mergelab_bench.multimodal.family): "
        "blocks.N.{norm1,attn,norm2,mlp}_{v,l,vl} -> blocks.N.{norm1,attn,norm2,mlp}",
        lambda names: (
            _modality_groups("blocks.*", ("norm1", "attn", "norm2", "mlp"),
                             {"v": "v", "l": "l", "vl": "vl"}, "_"),
            [],
        ),
    )
)
register_preset(
    Preset(
        "vlmo",
        "VLMo (microsoft/unilm vlmo) and vl-merging: transformer.blocks.N.{norm2,mlp}_{imag,text,vl} "
        "-> transformer.blocks.N.{norm2,mlp} (attention and norm1 are shared there)",
        lambda names: (
            _modality_groups("*", ("norm2", "mlp"), {"v": "imag", "l": "text", "vl": "vl"}, "_"),
            [],
        ),
    )
)
register_preset(
    Preset(
        "beit3",
        "BEiT-3 / torchscale multiway layers: `*.A.*` (vision) and `*.B.*` (language) -> `*.*`",
        lambda names: (
            [ExpertGroup("multiway", (("v", "*.A.*"), ("l", "*.B.*")), "*.*")],
            [],
        ),
    )
)

_EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")


def _expert_count(names: Sequence[str]) -> int:
    indices = {int(m.group(1)) for n in names if (m := _EXPERT_INDEX.search(n))}
    if not indices:
        raise ValueError("no `*.experts.N.*` tensors: this model has no MoE experts")
    if indices != set(range(len(indices))):
        raise ValueError(f"expert indices are not 0..N-1: {sorted(indices)}")
    return len(indices)


def _mixtral(names: Sequence[str]):
    count = _expert_count(names)
    dense = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    groups = [
        ExpertGroup(
            name=f"experts.{w}",
            members=tuple(
                (f"e{e}", f"*.block_sparse_moe.experts.{e}.{w}.weight") for e in range(count)
            ),
            into=f"*.mlp.{proj}.weight",
        )
        for w, proj in dense.items()
    ]
    return groups, ["*.block_sparse_moe.gate.weight"]


def _moe(names: Sequence[str]):
    count = _expert_count(names)
    group = ExpertGroup(
        name="experts",
        members=tuple((f"e{e}", f"*.experts.{e}.*") for e in range(count)),
        into="*.*",
    )
    return [group], []


register_preset(
    Preset(
        "mixtral",
        "collapse Mixtral experts into a dense Mistral FFN: block_sparse_moe.experts.N.{w1,w2,w3} "
        "-> mlp.{gate,down,up}_proj; the router is dropped",
        _mixtral,
    )
)
register_preset(
    Preset(
        "moe",
        "collapse any `*.experts.N.*` experts into `*.*` (routers are kept: add them to `drop`)",
        _moe,
    )
)


# --- group methods -----------------------------------------------------------------------------------


class GramLookup(Protocol):
    """Module name -> LayerGram (a dict from mergelab.stats, or a GramStore folder reader)."""

    def __contains__(self, name: object) -> bool: ...
    def get(self, name: str) -> Any: ...


@dataclass(frozen=True)
class GroupMethod:
    """A merge defined on the members of a group (the paper's methods), on top of a kernel.

    inner: the registry method doing the math (None: `kernel` builds one from the Grams).
    member_settings(params, members) -> one parameter mapping per present member, for `inner`.
    global_settings(params) -> `inner`'s global parameters.
    """

    name: str
    title: str
    params: tuple[Param, ...]
    base: str
    inner: str | None
    member_settings: Callable[[Mapping[str, ParamValue], Sequence[str]], list[dict]] | None = None
    global_settings: Callable[[Mapping[str, ParamValue]], dict] | None = None
    needs_grams: bool = False


def _interpolation_weights(params: Mapping[str, ParamValue], members: Sequence[str]) -> list[dict]:
    alpha = float(params["alpha"])
    if len(members) == 2:
        weights = [alpha, 1.0 - alpha]
    elif len(members) == 3:
        weights = [2 * alpha / 3, 2 * (1 - alpha) / 3, 1 / 3]
    else:
        raise ValueError(
            f"interpolation takes 2 or 3 members (vision, language[, vision-language]); got "
            f"{len(members)}: use `linear` with `member_parameters` weights instead"
        )
    return [{"weight": w} for w in weights]


GROUP_METHODS: dict[str, GroupMethod] = {
    m.name: m
    for m in (
        GroupMethod(
            name="interpolation",
            title="Interpolation of the modality copies (Sung et al. 2023)",
            params=(Param("alpha", float, 0.5, "Weight of the first (vision) member.", low=0, high=1),),
            base="none",
            inner="linear",
            member_settings=_interpolation_weights,
            global_settings=lambda params: {"normalize": False},
        ),
        GroupMethod(
            name="modality_arithmetic",
            title="Modality arithmetic: W_seed + lambda * sum_m (W_m - W_seed) (Sung et al. 2023)",
            params=(Param("lambda", float, 1.0, "Scale of the summed modality vectors."),),
            base="required",
            inner="task_arithmetic",
            member_settings=lambda params, members: [{"weight": 1.0} for _ in members],
            global_settings=lambda params: {"lambda": params["lambda"]},
        ),
        GroupMethod(
            name="regmean",
            title="RegMean of the modality copies from each modality's Gram matrices (Jin et al. 2023)",
            params=(
                Param("alpha", float, 0.9, "Scale of the Grams' off-diagonal entries.", low=0, high=1),
                Param("regularization", float, 1e-6, "Added to singular Grams (x mean diagonal).", low=0),
            ),
            base="none",
            inner=None,
            needs_grams=True,
        ),
    )
}


def method_names() -> list[str]:
    """Every method an expert-group merge accepts: the group methods and the data-free registry."""
    from mergelab.methods.registry import list_methods

    registry = [m.name for m in list_methods() if "data" not in m.needs]
    return sorted(set(GROUP_METHODS) | set(registry))


# --- planning ----------------------------------------------------------------------------------------

MODEL_KEY = "model"
SEED_KEY = "seed"


def _groups_of(config: MergeConfig, names: Sequence[str], problems: list[str]) -> tuple[list[ExpertGroup], list[str]]:
    section = config.expert_groups
    assert section is not None
    groups: list[ExpertGroup] = []
    drop = list(section.drop)
    if section.preset is not None:
        try:
            preset_groups, preset_drop = get_preset(section.preset).build(names)
        except (KeyError, ValueError) as exc:
            problems.append(f"expert_groups.preset: {exc.args[0]}")
        else:
            groups += preset_groups
            drop += preset_drop
    for i, spec in enumerate(section.groups or ()):
        try:
            groups.append(ExpertGroup.from_spec(spec, i))
        except ValueError as exc:
            problems.append(f"expert_groups.groups.{i}: {exc}")
    return groups, drop


def _check_settings(where: str, settings: Parameters | None, params: Sequence[Param], method: str, problems: list[str]):
    known = [p.name for p in params]
    for name, setting in (settings or {}).items():
        param = next((p for p in params if p.name == name), None)
        if param is None:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            problems.append(
                f"{where}.{name}: unknown parameter of method `{method}`{hint}; "
                f"its parameters: {', '.join(known) or 'none'}"
            )
            continue
        for leaf in setting_leaves(setting):
            msg = param.check(leaf)
            if msg:
                problems.append(f"{where}.{name}: {msg} (method `{method}`)")


def _regmean_method(grams: GramLookup, modules: Mapping[str, list[str]]) -> MergeMethod:
    """A kernel closing over the Grams: output name -> the member modules whose Grams it uses."""

    def kernel(job: TensorMerge) -> torch.Tensor:
        owners = modules.get(job.name)
        layer_grams = None
        if owners is not None:
            layer_grams = [grams.get(o) for o in owners]
        return merge_tensor(
            job.name,
            job.tensors,
            layer_grams,
            alpha=float(job.params["alpha"]),
            regularization=float(job.params["regularization"]),
            average_grams=False,
        )

    spec = GROUP_METHODS["regmean"]
    return MergeMethod(
        name="regmean",
        title=spec.title,
        paper="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models",
        url="https://arxiv.org/abs/2212.09849",
        kernel=kernel,
        params=spec.params,
        min_models=2,
    )


def _copying(inner: MergeMethod, merged: set[str], name: str) -> MergeMethod:
    """`inner` for the group outputs; every other tensor (a single input) is copied unchanged."""

    def kernel(job: TensorMerge) -> torch.Tensor:
        return inner.kernel(job) if job.name in merged else job.tensors[0]

    blockwise = None
    if inner.blockwise is not None:
        prepare, apply = inner.blockwise.prepare, inner.blockwise.apply
        blockwise = Blockwise(
            prepare=None if prepare is None else (
                lambda access: prepare(access) if access.meta.name in merged else None
            ),
            apply=lambda block, state: apply(block, state) if block.name in merged else block.tensors[0],
        )
    return dataclasses.replace(inner, name=name, kernel=kernel, blockwise=blockwise)


def plan_expert_groups(
    config: MergeConfig,
    open_source: Callable[[str], TensorSource],
    *,
    grams: GramLookup | None = None,
    source_label: str | None = None,
) -> MergePlan:
    """Validate an `expert_groups` config against its model (and seed) and return the plan.

    grams: RegMean's statistics (module name -> LayerGram); default: the folder named in
        `expert_groups.grams`. Raises ConfigError listing every problem found.
    """
    section = config.expert_groups
    if section is None:
        raise ConfigError("the config has no `expert_groups` section", source_label)
    problems: list[str] = []
    group_method = GROUP_METHODS.get(config.merge_method)
    inner: MergeMethod | None = None
    if group_method is None:
        try:
            inner = get_method(config.merge_method)
        except KeyError:
            close = difflib.get_close_matches(config.merge_method, method_names(), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                [f"merge_method: unknown method {config.merge_method!r} for an expert-group merge"
                 f"{hint}; known: {', '.join(method_names())}"],
                source_label,
            ) from None
        if "data" in inner.needs:
            problems.append(
                f"merge_method: `{inner.name}` needs data per model; in an expert-group merge use "
                "`regmean` with `expert_groups.grams`"
            )
    elif group_method.inner is not None:
        inner = get_method(group_method.inner)
    own_params = group_method.params if group_method else inner.params
    uses_base = (group_method.base if group_method else inner.base) != "none"
    base_required = (group_method.base if group_method else inner.base) == "required"
    _check_settings("parameters", config.parameters, own_params, config.merge_method, problems)
    if config.models[0].parameters:
        problems.append(
            "models.0.parameters: per-model parameters of an expert-group merge go under "
            "`expert_groups.member_parameters` (one entry per member)"
        )
    member_params_allowed = () if group_method else inner.model_params
    for member, settings in (section.member_parameters or {}).items():
        _check_settings(
            f"expert_groups.member_parameters.{member}", settings, member_params_allowed,
            config.merge_method, problems,
        )
    if base_required and config.base_model is None:
        problems.append(
            f"method `{config.merge_method}` needs the seed checkpoint the copies started from: "
            "set `base_model`"
        )
    if group_method is not None and group_method.needs_grams and grams is None and section.grams is None:
        problems.append(
            "method `regmean` needs each member's Gram matrices: set `expert_groups.grams` to a "
            "statistics folder (mergelab.stats.collect_grams(..., out_dir=...))"
        )
    if problems:
        raise ConfigError(problems, source_label)

    sources: dict[str, TensorSource] = {}
    for key, path in ((MODEL_KEY, config.models[0].model), (SEED_KEY, config.base_model if uses_base else None)):
        if path is None:
            continue
        try:
            sources[key] = open_source(path)
        except Exception as exc:  # CheckpointError, FileNotFoundError: reported with the key
            field_name = "models.0.model" if key == MODEL_KEY else "base_model"
            problems.append(f"{field_name} {path!r}: {exc}")
    if group_method is not None and group_method.needs_grams and grams is None:
        from mergelab.stats.store import GramStore

        try:
            grams = GramStore(section.grams)
        except Exception as exc:
            problems.append(f"expert_groups.grams: {exc}")
    if problems:
        raise ConfigError(problems, source_label)

    model = sources[MODEL_KEY]
    names = [n for n in model.keys() if model.resolve(n) == n]
    groups, drop = _groups_of(config, names, problems)
    if problems:
        raise ConfigError(problems, source_label)
    match = match_groups(names, groups, drop)
    problems += match.problems
    known_members = {m for g in groups for m in g.member_names}
    for member in section.member_parameters or {}:
        if member not in known_members:
            close = difflib.get_close_matches(member, known_members, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            problems.append(
                f"expert_groups.member_parameters.{member}: no group has a member `{member}`{hint}"
            )

    merge_dtype = DTYPE_BY_NAME[config.dtype] if config.dtype else None
    out_dtype = DTYPE_BY_NAME[config.out_dtype] if config.out_dtype else None
    layers = max(count_layers(model), 1)
    seed = sources.get(SEED_KEY)
    tasks: dict[str, TensorTask] = {}
    gram_modules: dict[str, list[str]] = {}
    for item in match.grouped:
        shapes = {tuple(model.shape(n)) for _, n in item.members}
        dtypes = {model.dtype(n) for _, n in item.members}
        if len(shapes) > 1 or len(dtypes) > 1:
            listing = ", ".join(
                f"`{n}` {list(model.shape(n))} {str(model.dtype(n)).replace('torch.', '')}"
                for _, n in item.members
            )
            problems.append(f"group `{item.group.name}`: members differ in shape or dtype: {listing}")
            continue
        shape = shapes.pop()
        src_dtype = dtypes.pop()
        inputs = [(MODEL_KEY, n) for _, n in item.members]
        base_index = None
        if uses_base and seed is not None:
            seed_name = seed.resolve(item.out_name) or seed.resolve(item.members[0][1])
            if seed_name is None:
                problems.append(
                    f"seed checkpoint {config.base_model!r} has neither `{item.out_name}` nor "
                    f"`{item.members[0][1]}`"
                )
                continue
            if tuple(seed.shape(seed_name)) != shape:
                problems.append(
                    f"seed tensor `{seed_name}` has shape {list(seed.shape(seed_name))}, the "
                    f"members {list(shape)}"
                )
                continue
            inputs.insert(0, (SEED_KEY, seed_name))
            base_index = 0
        split = split_layer_name(item.out_name)
        t = 0.0 if split is None or layers < 2 else min(split[1] / (layers - 1), 1.0)
        global_params, member_params = _resolve_params(
            config, group_method, inner, item, t, problems
        )
        if group_method is not None and group_method.needs_grams:
            owners = [module_of(n)[0] for _, n in item.members]
            is_linear_weight = len(shape) == 2 and item.out_name.endswith(".weight")
            if is_linear_weight:
                absent = [o for o in owners if o not in grams]
                if absent:
                    problems.append(
                        f"RegMean: no Gram matrix for layer(s) {absent} (group "
                        f"`{item.group.name}`, tensor `{item.out_name}`)"
                    )
                    continue
                gram_modules[item.out_name] = owners
        tasks[item.out_name] = TensorTask(
            name=item.out_name,
            shape=shape,
            out_dtype=(out_dtype or merge_dtype or src_dtype) if src_dtype.is_floating_point else src_dtype,
            inputs=tuple(inputs),
            base_index=base_index,
            model_params=tuple(member_params),
            params=global_params,
            is_float=src_dtype.is_floating_point,
        )
    if problems:
        raise ConfigError(problems, source_label)
    for name in match.copied:
        src_dtype = model.dtype(name)
        tasks[name] = TensorTask(
            name=name,
            shape=tuple(model.shape(name)),
            out_dtype=(out_dtype or merge_dtype or src_dtype) if src_dtype.is_floating_point else src_dtype,
            inputs=((MODEL_KEY, name),),
            base_index=None,
            model_params=({},),
            params={},
            is_float=src_dtype.is_floating_point,
        )
    merged = {g.out_name for g in match.grouped}
    kernel_method = _regmean_method(grams, gram_modules) if inner is None else inner
    method = _copying(kernel_method, merged, config.merge_method)
    notes = [
        f"expert groups: {len(merged)} merged tensors from "
        f"{sum(len(g.members) for g in match.grouped)} copies; {len(match.copied)} copied; "
        f"{len(match.dropped)} dropped"
    ]
    out_config = model.config()
    if out_config is not None:
        notes.append("config.json is copied unchanged: adapt it to the merged architecture")
    return MergePlan(
        config=config,
        method=method,
        sources=sources,
        tasks=[tasks[n] for n in match.order],
        merge_dtype=merge_dtype,
        donor=MODEL_KEY,
        tokenizer_donor=MODEL_KEY,
        out_config=dict(out_config) if out_config is not None else None,
        notes=notes,
    )


def _resolve_params(
    config: MergeConfig,
    group_method: GroupMethod | None,
    inner: MergeMethod | None,
    item: GroupedTensor,
    t: float,
    problems: list[str],
) -> tuple[dict[str, ParamValue], list[dict[str, ParamValue]]]:
    """(global params, per-member params) of the kernel for one merged tensor."""
    section = config.expert_groups
    member_scopes = section.member_parameters or {} if section else {}
    own = group_method.params if group_method else inner.global_params
    values: dict[str, ParamValue] = {}
    for p in own:
        value = resolve_param(p, [config.parameters], item.out_name, t)
        if value is MISSING:
            problems.append(
                f"parameter `{p.name}` of method `{config.merge_method}` is required but not set"
            )
            continue
        values[p.name] = value
    members = [m for m, _ in item.members]
    if group_method is None:
        per_member = []
        for member, tensor in item.members:
            resolved = {}
            for p in inner.model_params:
                value = resolve_param(p, [member_scopes.get(member), config.parameters], tensor, t)
                if value is MISSING:
                    problems.append(
                        f"parameter `{p.name}` of method `{inner.name}` is required for member "
                        f"`{member}` but not set: give it under `parameters` or "
                        "`expert_groups.member_parameters`"
                    )
                    continue
                resolved[p.name] = value
            if inner.check_model_params is not None and not problems:
                msg = inner.check_model_params(resolved)
                if msg:
                    problems.append(f"member `{member}`, tensor `{tensor}`: {msg}")
            per_member.append(resolved)
        return values, per_member
    if group_method.inner is None:
        return values, [{} for _ in members]
    try:
        settings = group_method.member_settings(values, members)
    except ValueError as exc:
        problems.append(f"group `{item.group.name}`: {exc}")
        return values, [{} for _ in members]
    inner_method = get_method(group_method.inner)
    per_member = [
        {p.name: s.get(p.name, p.default) for p in inner_method.model_params} for s in settings
    ]
    glob = group_method.global_settings(values) if group_method.global_settings else {}
    inner_globals = {p.name: glob.get(p.name, p.default) for p in inner_method.global_params}
    return inner_globals, per_member


# --- in-memory API -----------------------------------------------------------------------------------


def merge_expert_groups(
    state_dict: Mapping[str, torch.Tensor],
    *,
    method: str,
    preset: str | None = None,
    groups: Iterable[Mapping[str, Any] | ExpertGroupSpec] | None = None,
    drop: Sequence[str] = (),
    parameters: Mapping[str, Any] | None = None,
    member_parameters: Mapping[str, Mapping[str, Any]] | None = None,
    seed: Mapping[str, torch.Tensor] | None = None,
    grams: GramLookup | None = None,
    device: str = "cpu",
    random_seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Merge the expert groups of one in-memory model; returns the merged state dict (CPU).

    state_dict: the model holding the copies. preset / groups / drop: as the config's
    `expert_groups` section. method: `interpolation`, `modality_arithmetic`, `regmean` or any
    data-free registry method (members are its models, `seed` its base). parameters: the method's
    global parameters; member_parameters: per-member ones (e.g. `{"v": {"density": 0.5}}`).
    seed: the seed checkpoint (modality-agnostic names, or the member names). grams: RegMean's
    module name -> LayerGram (mergelab.stats.collect_grams(...).layers).
    Raises ConfigError listing every problem, before any tensor is merged.
    """
    from mergelab.checkpoint.memory import StateDictSource
    from mergelab.engine.execute import MemorySink, execute

    section: dict[str, Any] = {"drop": list(drop)}
    if preset is not None:
        section["preset"] = preset
    if groups is not None:
        section["groups"] = [
            g.model_dump(exclude_none=True) if isinstance(g, ExpertGroupSpec) else dict(g)
            for g in groups
        ]
    if member_parameters is not None:
        section["member_parameters"] = {k: dict(v) for k, v in member_parameters.items()}
    if grams is None and method in GROUP_METHODS and GROUP_METHODS[method].needs_grams:
        raise ConfigError("method `regmean` needs `grams` (module name -> LayerGram)")
    raw: dict[str, Any] = {
        "merge_method": method,
        "models": [{"model": MODEL_KEY}],
        "expert_groups": section,
    }
    if parameters:
        raw["parameters"] = dict(parameters)
    if seed is not None:
        raw["base_model"] = SEED_KEY
    config = parse_config(raw)
    held = {MODEL_KEY: state_dict, SEED_KEY: seed}

    def open_source(key: str) -> StateDictSource:
        if held.get(key) is None:
            raise FileNotFoundError(f"no state dict for {key!r}")
        return StateDictSource(key, held[key])

    plan = plan_expert_groups(config, open_source, grams=grams)
    sink = MemorySink(plan)
    execute(plan, sink, device=device, seed=random_seed, progress=False)
    return sink.tensors


__all__ = [
    "ExpertGroup",
    "GROUP_METHODS",
    "PRESETS",
    "Preset",
    "get_preset",
    "match_groups",
    "merge_expert_groups",
    "method_names",
    "plan_expert_groups",
    "register_preset",
]
