"""Expert groups: copies of one weight inside one model, merged into a single weight.

A modality-specific transformer (VLMo, BEiT-3; Sung et al. 2023, "An Empirical Study of
Multimodal Model Merging", https://arxiv.org/abs/2304.14933) keeps a vision (V), a language (L)
and, in its top blocks, a vision-language (VL) copy of each block's layer norms, attention and FFN;
a mixture-of-experts layer keeps one FFN per expert. Merging each group of copies gives a
modality-agnostic (or dense) model with a fraction of the block parameters.

A group names its members by patterns (`*` matches any text, dots included); the tensors of the
members are paired by what their `*`s matched, and `into` names the merged tensor. Tensors outside
every group are copied unchanged; `drop` patterns remove tensors (e.g. a MoE router).

This is one of the planner's layouts (mergelab.plan.planner.build_plan plans a config with an
`expert_groups:` section through it): each group's members become the models of one output
tensor, the seed checkpoint (`base_model`) its base, so every registry method applies with the
planner's parameter validation: `interpolation` and `modality_arithmetic` (Sung et al.,
mergelab.methods.modality), any data-free method, and RegMean from each member's Gram matrices
(each member's Gram referenced per tensor in the plan's statistics, read by the engine).
Parameters come from the top-level `parameters`, a group's `parameters` and, per member,
`expert_groups.member_parameters`.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from mergelab.methods.registry import MergeMethod, list_methods
from mergelab.plan.config import ExpertGroupSpec, ExpertGroupsSection, MergeConfig, Parameters
from mergelab.plan.layout import (
    PlannedInput,
    PlannedTensor,
    TensorSource,
    count_layers,
    split_layer_name,
)

# --- groups and their patterns ---------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertGroup:
    """One kind of weight copied per member: member patterns, in merge order, and the output
    pattern; `parameters`: the method's parameters for this group's tensors (a config group's)."""

    name: str
    members: tuple[tuple[str, str], ...]
    into: str
    optional: frozenset[str] = frozenset()
    parameters: Parameters | None = field(default=None, hash=False, compare=False)

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
            parameters=spec.parameters,
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


# --- Gram matrices of the members ------------------------------------------------------------------


class GramLookup(Protocol):
    """Module name -> Gram (a dict of mergelab.stats.LayerGram, or a GramStore folder reader)."""

    def __contains__(self, name: object) -> bool: ...
    def get(self, name: str) -> Any: ...


GRAMS_STORE = "expert_groups.grams"  # the key of the members' Grams in MergePlan.statistics


class _LayerGrams:
    """A module name -> LayerGram mapping as a statistics store (what the engine reads)."""

    kind = "gram"

    def __init__(self, layers: Mapping[str, Any]):
        self.layers = layers

    def read(self, entry: str) -> dict[str, torch.Tensor]:
        from mergelab.stats.store import gram_statistics

        return gram_statistics(self.layers[entry])

    def entry_nbytes(self, entry: str) -> int:
        gram = self.layers[entry].gram
        return gram.numel() * gram.element_size()


def grams_store(grams: GramLookup):
    """The members' Grams as a statistics store of the plan: a GramStore as it is, a mapping of
    LayerGrams wrapped."""
    return grams if hasattr(grams, "read") and hasattr(grams, "entry_nbytes") else _LayerGrams(grams)


def _open_gram_folder(path: str) -> GramLookup:
    from mergelab.stats.store import GramStore

    return GramStore(path)


def gram_methods() -> list[str]:
    """Names of the methods that merge from Gram matrices (usable with `expert_groups.grams`)."""
    return [m.name for m in list_methods() if m.merges_with_grams]


# --- checks of the config (before any source is opened) --------------------------------------------


def parameter_scopes(section: ExpertGroupsSection) -> list[tuple[str, Parameters, bool]]:
    """(key path, settings, per-model scope?) of the section's parameter blocks, for the
    planner's one parameter validator: each member's (per-model) and each group's."""
    scopes: list[tuple[str, Parameters, bool]] = []
    for member, settings in (section.member_parameters or {}).items():
        if settings:
            scopes.append((f"expert_groups.member_parameters.{member}", settings, True))
    for i, spec in enumerate(section.groups or ()):
        if spec.parameters:
            scopes.append((f"expert_groups.groups.{i}.parameters", spec.parameters, False))
    return scopes


def check_statistics(config: MergeConfig, method: MergeMethod) -> list[str]:
    """What the method needs beyond the checkpoints: Grams from `expert_groups.grams`, never data."""
    section = config.expert_groups
    assert section is not None
    problems = []
    if config.data is not None:
        problems.append(
            "data: an expert-group merge runs no data through the model; methods that need "
            "statistics read each member's Gram matrices from `expert_groups.grams`"
        )
    if method.merges_with_grams:
        if section.grams is None:
            problems.append(
                f"method `{method.name}` needs each member's Gram matrices: set "
                "`expert_groups.grams` to a statistics folder (mergelab.stats.collect_grams(..., "
                "out_dir=...)), or pass `grams` to merge_expert_groups"
            )
    elif "data" in method.needs:
        problems.append(
            f"merge_method: `{method.name}` needs data per model; in an expert-group merge use "
            f"a method that reads Gram matrices ({', '.join(gram_methods())}) with "
            "`expert_groups.grams`"
        )
    return problems


def check_config(config: MergeConfig, method: MergeMethod) -> list[str]:
    """Problems of an `expert_groups` config that need no source: parameters and the seed."""
    problems = []
    if config.models[0].parameters:
        problems.append(
            "models.0.parameters: per-model parameters of an expert-group merge go under "
            "`expert_groups.member_parameters` (one entry per member)"
        )
    if method.base == "required" and config.base_model is None:
        problems.append(
            f"method `{method.name}` needs the seed checkpoint the copies started from: "
            "set `base_model`"
        )
    return problems


def source_keys(config: MergeConfig, method: MergeMethod) -> list[str]:
    """The sources to open: the model with the copies, and the seed when the method uses a base."""
    keys = [config.models[0].model]
    if method.base != "none" and config.base_model is not None and config.base_model not in keys:
        keys.append(config.base_model)
    return keys


# --- the layout --------------------------------------------------------------------------------------


@dataclass
class GroupLayout:
    """An expert-group merge as the planner takes it.

    tensors: every output tensor in the model's order (merged groups and copied tensors), a
        linear weight referencing each member's Gram when the method merges from Grams.
    method: the config's method.
    donor: the source whose config.json and tokenizer files are copied (the model).
    statistics: the plan's statistics stores (the members' Grams under GRAMS_STORE).
    """

    tensors: list[PlannedTensor]
    method: MergeMethod
    donor: str
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    statistics: dict[str, Any] = field(default_factory=dict)


def _groups_of(
    section: ExpertGroupsSection, names: Sequence[str], problems: list[str]
) -> tuple[list[ExpertGroup], list[str]]:
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


def _layer_position(name: str, layers: int) -> float:
    # A gradient runs over the model's own layers (a group merge has no slices); tensors outside
    # the layer stack, and every tensor of a one-layer model, take t = 0.
    split = split_layer_name(name)
    return 0.0 if split is None or layers < 2 else min(split[1] / (layers - 1), 1.0)


def plan_groups(
    config: MergeConfig,
    method: MergeMethod,
    sources: Mapping[str, TensorSource],
    open_grams: Callable[[str], GramLookup] | None = None,
) -> GroupLayout:
    """Match the groups in the model's tensor names and plan every output tensor.

    sources: the opened `source_keys`. open_grams: maps `expert_groups.grams` to a GramLookup
    (default: a GramStore folder reader); opened only when the method reads Grams.
    Problems (patterns matching nothing, copies without counterparts, members of different shape,
    arity, seed tensors, missing Grams) are returned in the layout, all of them.
    """
    section = config.expert_groups
    assert section is not None
    model_key = config.models[0].model
    model = sources[model_key]
    seed_key = config.base_model if method.base != "none" else None
    seed = sources.get(seed_key) if seed_key is not None else None
    problems: list[str] = []
    grams: GramLookup | None = None
    if method.merges_with_grams and section.grams is not None:
        try:
            grams = (open_grams or _open_gram_folder)(section.grams)
        except Exception as exc:  # CheckpointError, FileNotFoundError: reported with the key
            problems.append(f"expert_groups.grams: {exc}")

    names = [n for n in model.keys() if model.resolve(n) == n]
    groups, drop = _groups_of(section, names, problems)
    if problems:
        return GroupLayout([], method, model_key, problems=problems)
    match = match_groups(names, groups, drop)
    problems += match.problems
    known_members = {m for g in groups for m in g.member_names}
    member_scopes = section.member_parameters or {}
    for member in member_scopes:
        if member not in known_members:
            close = difflib.get_close_matches(member, known_members, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            problems.append(
                f"expert_groups.member_parameters.{member}: no group has a member `{member}`{hint}"
            )

    layers = max(count_layers(model), 1)
    grouped = {item.out_name: item for item in match.grouped}
    tensors: list[PlannedTensor] = []
    for name in match.order:
        item = grouped.get(name)
        if item is None:  # outside every group: written as it is
            only = (PlannedInput(model_key, name),)
            tensors.append(PlannedTensor(name, only, None, (), 0.0, copied=True))
            continue
        shapes = {tuple(model.shape(n)) for _, n in item.members}
        dtypes = {model.dtype(n) for _, n in item.members}
        if len(shapes) > 1 or len(dtypes) > 1:
            listing = ", ".join(
                f"`{n}` {list(model.shape(n))} {str(model.dtype(n)).replace('torch.', '')}"
                for _, n in item.members
            )
            problems.append(f"group `{item.group.name}`: members differ in shape or dtype: {listing}")
            continue
        msg = method.arity_problem(len(item.members), "members")
        if msg:
            problems.append(f"group `{item.group.name}`: {msg}")
            continue
        shape = shapes.pop()
        inputs = [
            PlannedInput(model_key, n, member_scopes.get(m), f"member `{m}`") for m, n in item.members
        ]
        base_index = None
        if seed is not None:
            seed_name = seed.resolve(item.out_name) or seed.resolve(item.members[0][1])
            if seed_name is None:
                problems.append(
                    f"seed checkpoint {seed_key!r} has neither `{item.out_name}` nor "
                    f"`{item.members[0][1]}`"
                )
                continue
            if tuple(seed.shape(seed_name)) != shape:
                problems.append(
                    f"seed tensor `{seed_name}` has shape {list(seed.shape(seed_name))}, the "
                    f"members {list(shape)}"
                )
                continue
            inputs.insert(0, PlannedInput(seed_key, seed_name, None, "the seed"))
            base_index = 0
        if grams is not None and len(shape) == 2 and item.out_name.endswith(".weight"):
            # A linear layer's weight: merged from its members' Grams (other tensors averaged).
            owners = [n.rpartition(".")[0] for _, n in item.members]
            absent = [o for o in owners if o not in grams]
            if absent:
                problems.append(
                    f"{method.name}: no Gram matrix for layer(s) {absent} (group "
                    f"`{item.group.name}`, tensor `{item.out_name}`)"
                )
                continue
            refs = tuple((GRAMS_STORE, owner) for owner in owners)
        else:
            refs = ()
        tensors.append(
            PlannedTensor(
                name=item.out_name,
                inputs=tuple(inputs),
                base_index=base_index,
                scopes=(item.group.parameters, config.parameters),
                t=_layer_position(item.out_name, layers),
                reference=len(inputs) - len(item.members),  # the first member: the model's dtype
                statistics=refs,
            )
        )
    notes = [
        f"expert groups: {len(grouped)} merged tensors from "
        f"{sum(len(g.members) for g in match.grouped)} copies; {len(match.copied)} copied; "
        f"{len(match.dropped)} dropped"
    ]
    if model.config() is not None:
        notes.append("config.json is copied unchanged: adapt it to the merged architecture")
    if section.grams is not None and not method.merges_with_grams:
        notes.append(f"expert_groups.grams is not read: `{method.name}` uses no Gram matrices")
    statistics = {GRAMS_STORE: grams_store(grams)} if grams is not None else {}
    return GroupLayout(tensors, method, model_key, notes, problems, statistics)


__all__ = [
    "PRESETS",
    "ExpertGroup",
    "GramLookup",
    "GroupLayout",
    "Preset",
    "compile_pattern",
    "fill_pattern",
    "get_preset",
    "match_groups",
    "plan_groups",
    "register_preset",
]
