"""The streamed LoRA operations behind `mergelab lora ...`: fold, merge, extract.

Each one validates everything before writing (adapters against each other or against the base,
method parameters, the output folder), then streams one module at a time into a
`ShardedWriter` (atomic: a temporary folder renamed into place), so memory stays bounded by the
largest module, never by the model. The math is in `mergelab.lora.kernels`; merge methods come
from the registry (`mergelab.methods`), applied to the deltas ``scale * B @ A`` as task vectors
over a zero base.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from mergelab.checkpoint import ShardedWriter, open_checkpoint, parse_size
from mergelab.checkpoint.adapter import (
    ADAPTER_CONFIG,
    ADAPTER_SAFETENSORS,
    PEFT_PREFIX,
    AdapterReader,
    LoraModule,
    is_conv1d_module,
    open_adapter,
)
from mergelab.checkpoint.format import CONFIG_FILES, TOKENIZER_FILES
from mergelab.errors import CheckpointError, ConfigError
from mergelab.lora import kernels
from mergelab.lora.source import open_folded
from mergelab.methods.registry import MergeMethod, TensorMerge, get_method, resolve_defaults
from mergelab.progress import progress_bar

# Files copied from the base into a folded checkpoint (as `mergelab merge` copies them).
SIDE_FILES = ("config.json", *CONFIG_FILES, *TOKENIZER_FILES)
REPORT_FILE = "mergelab_lora_report.json"
# Tensor names of vocabulary and position tables: PEFT adapts them as `nn.Embedding` layers
# (lora_embedding_A / _B, the delta transposed) rather than as linear maps.
_EMBEDDING_RE = re.compile(r"(embed_tokens|embeddings?\b|word_embeddings|position_embeddings|"
                           r"token_type_embeddings|\bwte\b|\bwpe\b|embed_positions|shared)")

SvdKind = Literal["exact", "randomized"]


def module_seed(seed: int, name: str) -> int:
    """A per-module seed independent of module order (as the engine seeds per tensor)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _dtype(name: str | None) -> torch.dtype | None:
    table = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
             "float64": torch.float64}
    if name is None:
        return None
    if name not in table:
        raise ConfigError([f"dtype: must be one of {', '.join(table)}; got {name!r}"])
    return table[name]


def _write_report(writer: ShardedWriter, report: dict[str, Any]) -> None:
    writer.write_json(REPORT_FILE, report)


# -- fold ----------------------------------------------------------------------------------------


@dataclass
class FoldReport:
    out_dir: Path
    tensors: int
    folded: int
    replaced: int
    seconds: float

    @property
    def tensors_per_second(self) -> float:
        return self.tensors / self.seconds if self.seconds > 0 else math.inf


def fold_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    out_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> FoldReport:
    """Write `base` with `adapter` folded in (``W + scale * B @ A``) as a full checkpoint.

    Tensor by tensor: only one base tensor and its factors are in memory at a time. The base's
    config.json and tokenizer files are copied; the output is atomic as for `mergelab merge`
    (refused over an existing folder unless `overwrite`, never into an input).

    Raises:
        CheckpointError: an unreadable base or adapter, or one that does not fit the base (every
            problem at once: names the tensor and both shapes), before anything is written.
    """
    started = time.perf_counter()
    source = open_folded(base, adapter)
    try:
        names = source.keys()
        entries = [(n, tuple(source.shape(n)), source.dtype(n)) for n in names]
        writer = ShardedWriter(
            out_dir, entries, max_shard_size=parse_size(out_shard_size), overwrite=overwrite,
            inputs=list(source.paths), metadata={"mergelab_lora": "fold"},
        )
        with writer:
            with progress_bar("folding", len(names), progress, unit="tensors") as advance:
                for name in names:
                    writer.write(name, source.get(name))
                    advance()
            root = source.root
            if root is not None:
                for side in SIDE_FILES:
                    if (root / side).is_file():
                        writer.copy_file(root / side, side)
            writer.commit()
        touched = source.adapter.touched()
        return FoldReport(
            out_dir=Path(out_dir),
            tensors=len(names),
            folded=sum(1 for n in names if n in source.adapter.modules or n in source.adapter.biases()),
            replaced=sum(1 for n in names if n in source.adapter.saved and n in touched),
            seconds=time.perf_counter() - started,
        )
    finally:
        source.close()


# -- writing adapters ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OutModule:
    """One module of an adapter to write: its name, kind and factor shapes."""

    module: str
    rank: int
    a_shape: tuple[int, ...]
    b_shape: tuple[int, ...]
    embedding: bool
    bias_shape: tuple[int, ...] | None = None  # PEFT's lora_bias: `lora_B.bias`, scale 1

    @property
    def bias_name(self) -> str:
        return f"{PEFT_PREFIX}{self.module}.lora_B.bias"

    @property
    def a_name(self) -> str:
        part = "lora_embedding_A" if self.embedding else "lora_A.weight"
        return f"{PEFT_PREFIX}{self.module}.{part}"

    @property
    def b_name(self) -> str:
        part = "lora_embedding_B" if self.embedding else "lora_B.weight"
        return f"{PEFT_PREFIX}{self.module}.{part}"


def adapter_config(
    modules: Sequence[OutModule],
    *,
    template: Mapping[str, Any] | None = None,
    modules_to_save: Sequence[str] = (),
    fan_in_fan_out: bool = False,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """A PEFT ``adapter_config.json`` for factors at scale 1 (``lora_alpha = r``, per module).

    ``r`` is the most common rank; the others go to ``rank_pattern`` and ``alpha_pattern``
    under their full module names (as mergekit-extract-lora writes them). Target modules are
    the full module names, so PEFT adapts exactly these modules.
    """
    ranks = [m.rank for m in modules]
    common = max(set(ranks), key=lambda r: (ranks.count(r), r)) if ranks else 1
    different = {m.module: m.rank for m in modules if m.rank != common}
    config: dict[str, Any] = {
        key: value for key, value in dict(template or {}).items()
        if key in ("task_type", "base_model_name_or_path", "revision", "bias", "inference_mode")
    }
    config.update({
        "peft_type": "LORA",
        "r": common,
        "lora_alpha": common,
        "rank_pattern": different,
        "alpha_pattern": dict(different),
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "fan_in_fan_out": fan_in_fan_out,
        "target_modules": sorted(m.module for m in modules),
        "modules_to_save": sorted(modules_to_save) or None,
        "init_lora_weights": True,
        "inference_mode": True,
        "bias": "none",
    })
    if any(m.bias_shape is not None for m in modules):
        config["lora_bias"] = True
    if base_model_name_or_path is not None:
        config["base_model_name_or_path"] = base_model_name_or_path
    return config


def _adapter_writer(
    out_dir: str | os.PathLike,
    modules: Sequence[OutModule],
    saved: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
    dtype: torch.dtype,
    *,
    overwrite: bool,
    inputs: Sequence[Path],
    kind: str,
) -> ShardedWriter:
    entries = []
    for m in modules:
        entries.append((m.a_name, m.a_shape, dtype))
        entries.append((m.b_name, m.b_shape, dtype))
        if m.bias_shape is not None:
            entries.append((m.bias_name, m.bias_shape, dtype))
    entries.extend((f"{PEFT_PREFIX}{n}", shape, d) for n, shape, d in saved)
    return ShardedWriter(
        out_dir, entries, max_shard_size=2**62, overwrite=overwrite, inputs=list(inputs),
        metadata={"mergelab_lora": kind}, single_file_name=ADAPTER_SAFETENSORS,
    )


# -- merge ---------------------------------------------------------------------------------------


@dataclass
class ModuleResult:
    module: str
    rank: int
    relative_error: float  # of the re-factorisation, 0 for exact combinations


@dataclass
class LoraMergeReport:
    out_dir: Path
    method: str
    modules: list[ModuleResult]
    seconds: float
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seconds": self.seconds,
            "notes": self.notes,
            "modules": {m.module: {"rank": m.rank, "relative_error": m.relative_error}
                        for m in self.modules},
        }


COMBINATIONS = ("cat", "delta", "knots", "factors")


def _method_params(
    method: MergeMethod, weights: Sequence[float], params: Mapping[str, Any], problems: list[str]
) -> tuple[list[dict], dict]:
    """Per-model and global parameters of a registry method, validated with its declarations."""
    given_model = {k: v for k, v in params.items() if (p := method.param(k)) is not None and p.per_model}
    given_global = {k: v for k, v in params.items() if (p := method.param(k)) is not None and not p.per_model}
    for key in params:
        if method.param(key) is None:
            known = ", ".join(p.name for p in method.params) or "none"
            problems.append(f"`{key}` is not a parameter of method `{method.name}` (its parameters: {known})")
    for key, value in params.items():
        param = method.param(key)
        if param is not None and (msg := param.check(value)):
            problems.append(f"{msg} (method `{method.name}`)")
    if "weight" in params:
        problems.append("give weights with --weights (weights=...), not as a method parameter")
    has_weight = method.param("weight") is not None
    if not has_weight and any(w != 1.0 for w in weights):
        problems.append(f"method `{method.name}` takes no `weight`; drop --weights")
    per_model = []
    for w in weights:
        values = dict(given_model)
        if has_weight:
            values["weight"] = w
        per_model.append(values)
    if problems:
        return [], {}
    return (
        [resolve_defaults(method.model_params, v) for v in per_model],
        resolve_defaults(method.global_params, given_global),
    )


def _apply_method(
    method: MergeMethod,
    tensors: list[torch.Tensor],
    model_params: list[dict],
    global_params: dict,
    name: str,
    seed: int,
) -> torch.Tensor:
    """Merge task vectors over a zero base with a registry kernel; returns the merged vector."""
    generator = None
    if method.randomized:
        generator = torch.Generator().manual_seed(module_seed(seed, name))
    base = torch.zeros_like(tensors[0]) if method.base != "none" else None
    merged = method.kernel(
        TensorMerge(
            tensors=tensors, base=base, model_params=model_params, params=global_params,
            generator=generator, name=name,
        )
    )
    return merged if base is None else merged - base


def merge_adapters(
    adapters: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    combination: str = "delta",
    method: str = "task_arithmetic",
    params: Mapping[str, Any] | None = None,
    rank: int | None = None,
    svd: SvdKind = "exact",
    seed: int = 0,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> LoraMergeReport:
    """Merge N LoRA adapters of one base into one adapter.

    combination:
        ``cat``: exact concatenation, ``[B_1 .. B_n] [w_1 s_1 A_1; ..]`` (rank = sum of ranks),
            as PEFT's ``cat``; `method` is not used.
        ``delta``: the deltas ``w_i``-weighted through the registry `method` (any data-free
            method: task_arithmetic, ties, dare_ties, ...) as task vectors over a zero base,
            then re-factorised to `rank` by exact or randomised SVD (PEFT's ``svd`` /
            ``ties_svd`` family).
        ``knots``: KnOTS (Stoica et al., ICLR 2025): one SVD of the concatenated deltas gives a
            shared basis; `method` merges the per-adapter coefficients in it; re-factorised.
        ``factors``: PEFT's factor-space combinations (``linear``, ``ties``, ...): `method`
            applied to the A's and the B's separately with weights ``sqrt|w_i s_i|`` (the
            sign on A). Not the weighted sum of deltas; kept for compatibility.
    rank: rank of the result for ``delta`` / ``knots`` (default: the largest input rank).

    Modules missing from some adapters count as zero deltas there. Saved whole modules
    (``modules_to_save``) and ``lora_bias`` terms are not merged (refused: fold and merge the
    checkpoints instead).

    Raises:
        ConfigError / CheckpointError: before anything is written, listing every problem
            (unknown method or parameter, weights count, rank, incompatible adapters).
    """
    started = time.perf_counter()
    problems: list[str] = []
    if combination not in COMBINATIONS:
        raise ConfigError([f"combination: must be one of {', '.join(COMBINATIONS)}; got {combination!r}"])
    if len(adapters) < 1:
        raise ConfigError(["give at least one adapter"])
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        problems.append(f"--weights: {len(weights)} weight(s) for {len(adapters)} adapter(s)")
    if svd not in ("exact", "randomized"):
        problems.append(f"svd: must be exact or randomized; got {svd!r}")
    if rank is not None and rank < 1:
        problems.append(f"rank: must be at least 1; got {rank}")
    registry_method: MergeMethod | None = None
    model_params: list[dict] = []
    global_params: dict = {}
    if combination != "cat":
        try:
            registry_method = get_method(method)
        except KeyError as exc:
            problems.append(f"method: {exc.args[0]}")
        else:
            if registry_method.needs:
                problems.append(
                    f"method `{method}` needs {', '.join(registry_method.needs)}; LoRA merges "
                    "take data-free methods"
                )
            if len(adapters) < registry_method.min_models:
                problems.append(
                    f"method `{method}` needs at least {registry_method.min_models} adapters"
                )
            if registry_method.max_models is not None and len(adapters) > registry_method.max_models:
                problems.append(
                    f"method `{method}` takes at most {registry_method.max_models} adapters"
                )
            model_params, global_params = _method_params(
                registry_method, weights, dict(params or {}), problems
            )
    elif params:
        problems.append("`cat` takes no method parameters")
    if problems:
        raise ConfigError(problems)
    out_dtype = _dtype(dtype)

    readers: list[AdapterReader] = []
    try:
        for path in adapters:
            readers.append(open_adapter(path))
        plan = _merge_plan(readers, combination, rank, problems)
        if problems:
            raise ConfigError(problems)
        first_dtype = readers[0].dtype(next(iter(readers[0].modules.values())).lora_A)
        out_dtype = out_dtype or first_dtype
        out_modules = [m for m, _ in plan]
        writer = _adapter_writer(
            out_dir, out_modules, [], out_dtype, overwrite=overwrite,
            inputs=[r.path for r in readers], kind=f"merge:{combination}",
        )
        results: list[ModuleResult] = []
        with writer:
            with progress_bar(f"merging ({combination})", len(plan), progress, unit="tensors") as advance:
                for out, members in plan:
                    lora_A, lora_B, error = _merge_module(
                        out, members, readers, weights, combination, registry_method,
                        model_params, global_params, svd, seed,
                    )
                    writer.write(out.a_name, lora_A.to(out_dtype).contiguous())
                    writer.write(out.b_name, lora_B.to(out_dtype).contiguous())
                    results.append(ModuleResult(out.module, out.rank, error))
                    advance()
            config = adapter_config(
                out_modules, template=readers[0].raw_config,
                fan_in_fan_out=readers[0].settings.fan_in_fan_out,
            )
            writer.write_json(ADAPTER_CONFIG, config)
            label = "cat" if combination == "cat" else f"{combination}:{method}"
            report = LoraMergeReport(
                Path(out_dir), label, results, time.perf_counter() - started,
            )
            _write_report(writer, report.as_json())
            writer.commit()
        report.seconds = time.perf_counter() - started
        return report
    finally:
        for reader in readers:
            reader.close()


def _merge_plan(
    readers: Sequence[AdapterReader], combination: str, rank: int | None, problems: list[str]
) -> list[tuple[OutModule, list[LoraModule | None]]]:
    for reader in readers:
        # Copies of an adapted embedding's base weight are the base's own: the merged adapter
        # applies to that same base, so they are not needed (not written).
        whole = sorted(set(reader.saved) - reader.saved_base_layers)
        if whole:
            shown = ", ".join(whole[:5])
            problems.append(
                f"adapter {reader.path} saves whole modules ({shown}), which cannot be merged "
                "without the base: fold each adapter (mergelab lora fold) and merge the checkpoints"
            )
        with_bias = sorted(m.module for m in reader.modules.values() if m.bias is not None)
        if with_bias:
            problems.append(f"adapter {reader.path}: lora_bias terms ({with_bias[0]}, ...) cannot be merged")
    names = sorted({w for r in readers for w in r.modules})
    plan = []
    for weight in names:
        members = [r.modules.get(weight) for r in readers]
        present = [(r, m) for r, m in zip(readers, members) if m is not None]
        shapes = {
            (tuple(r.shape(m.lora_A))[1:], tuple(r.shape(m.lora_B))[0], m.layout, m.kind)
            for r, m in present
        }
        if len(shapes) > 1:
            listing = "; ".join(
                f"{r.path}: A {list(r.shape(m.lora_A))}, B {list(r.shape(m.lora_B))}, {m.layout}"
                for r, m in present
            )
            problems.append(f"module `{weight[:-7]}` differs between adapters ({listing})")
            continue
        ref_reader, ref = present[0]
        a_shape, b_shape = tuple(ref_reader.shape(ref.lora_A)), tuple(ref_reader.shape(ref.lora_B))
        ranks = [m.rank for _, m in present]
        fan_in = math.prod(a_shape[1:])
        if combination == "cat":
            out_rank = sum(ranks)
        elif combination == "factors":
            if len(set(ranks)) > 1 or len(present) != len(readers):
                problems.append(
                    f"module `{ref.module}`: the factor-space combination needs every adapter to "
                    f"adapt it with one rank (got ranks {ranks} from {len(present)} of "
                    f"{len(readers)} adapters); use the delta-space combination"
                )
                continue
            out_rank = ranks[0]
        else:
            out_rank = min(rank or max(ranks), b_shape[0], fan_in)
        out = OutModule(
            module=ref.module, rank=out_rank,
            a_shape=(out_rank, *a_shape[1:]), b_shape=(b_shape[0], out_rank, *b_shape[2:]),
            embedding=ref.kind == "embedding",
        )
        plan.append((out, members))
    if not plan and not problems:
        problems.append("the adapters adapt no modules")
    return plan


def _merge_module(
    out: OutModule,
    members: list[LoraModule | None],
    readers: Sequence[AdapterReader],
    weights: Sequence[float],
    combination: str,
    method: MergeMethod | None,
    model_params: list[dict],
    global_params: dict,
    svd: SvdKind,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    present = [(i, r, m) for i, (r, m) in enumerate(zip(readers, members)) if m is not None]
    factors = [(r.get(m.lora_A), r.get(m.lora_B)) for _, r, m in present]
    if combination == "cat":
        lora_A, lora_B = kernels.concatenate(
            [a for a, _ in factors], [b for _, b in factors],
            [weights[i] * m.scale for i, _, m in present],
        )
        return lora_A, lora_B, 0.0
    assert method is not None
    if combination == "factors":
        coefficients = [weights[i] * m.scale for i, _, m in present]
        a_weights = [math.copysign(math.sqrt(abs(c)), c) for c in coefficients]
        b_weights = [math.sqrt(abs(c)) for c in coefficients]
        merged = []
        for side, side_weights in ((0, a_weights), (1, b_weights)):
            tensors = [f[side].to(torch.float32) for f in factors]
            side_params = [dict(p, weight=w) if "weight" in p else p
                           for p, w in zip(model_params, side_weights)]
            merged.append(_apply_method(method, tensors, side_params, global_params,
                                        f"{out.module}.{'AB'[side]}", seed))
        return merged[0], merged[1], 0.0
    # Delta space: every adapter's scale * B @ A as a (fan_out, fan_in) matrix; a module an
    # adapter lacks is a zero delta there.
    fan_out, fan_in = out.b_shape[0], math.prod(out.a_shape[1:])
    deltas = []
    for i in range(len(readers)):
        member = members[i]
        if member is None:
            deltas.append(torch.zeros(fan_out, fan_in))
        else:
            a, b = factors[[j for j, _, _ in present].index(i)]
            deltas.append(kernels.delta_matrix(a, b, member.scale))
    name = out.module + ".weight"
    if combination == "knots":
        shared = kernels.shared_basis(deltas)
        coefficient = _apply_method(method, shared.coefficients, model_params, global_params, name, seed)
        merged = shared.basis @ coefficient
    else:
        merged = _apply_method(method, deltas, model_params, global_params, name, seed)
    generator = torch.Generator().manual_seed(module_seed(seed, name))
    found = kernels.factorize(merged, out.rank, randomized=svd == "randomized", generator=generator)
    error = kernels.relative_error(merged, found.lora_B @ found.lora_A)
    # out.rank is capped by the matrix's dimensions, so both SVDs return exactly that rank.
    return found.lora_A.reshape(out.a_shape), found.lora_B.reshape(out.b_shape), error


# -- extract -------------------------------------------------------------------------------------


@dataclass
class ExtractReport:
    out_dir: Path
    modules: dict[str, dict[str, float | int]]
    saved: list[str]
    skipped: list[str]
    seconds: float

    def as_json(self) -> dict[str, Any]:
        return {"seconds": self.seconds, "modules": self.modules, "modules_to_save": self.saved,
                "not_representable": self.skipped}


def is_embedding_name(name: str) -> bool:
    """Whether a tensor name is a vocabulary / position table (adapted as an nn.Embedding)."""
    return _EMBEDDING_RE.search(name) is not None


def extract_adapter(
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    rank: int | None = None,
    energy: float | None = None,
    embeddings: bool = False,
    svd: SvdKind = "exact",
    seed: int = 0,
    dtype: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> ExtractReport:
    """Extract a PEFT LoRA adapter from a fine-tune: per-module SVD of ``finetuned - base``.

    Every changed matrix (``*.weight`` with 2 or 4 dimensions) becomes a LoRA module of rank
    `rank`, or, with `energy`, of the smallest rank keeping that fraction of the delta's squared
    Frobenius norm (capped by `rank` when both are given); ranks that differ from ``r`` go to
    ``rank_pattern``. Changed embedding tables are LoRA modules with `embeddings`, else saved
    whole (``modules_to_save``), as are other changed modules (norms); a changed bias of a LoRA
    module goes to ``lora_B.bias`` (``lora_bias``) when every LoRA module has a bias, else it
    cannot be represented and is listed in the report (``not_representable``). Factors take the singular values
    split evenly (``B = U sqrt(S)``, ``A = sqrt(S) Vh``), scale 1 (``lora_alpha = r``).

    Streamed: one module's delta and SVD at a time (with `energy`, a first pass computes only
    singular values). The per-module relative reconstruction error goes to the report JSON
    (``mergelab_lora_report.json`` in the adapter folder) and the returned report.

    Raises:
        ConfigError / CheckpointError: before writing, for neither or a bad rank/energy,
            tensors missing from either model or with different shapes (all listed).
    """
    started = time.perf_counter()
    problems: list[str] = []
    if rank is None and energy is None:
        problems.append("give --rank or --energy")
    if rank is not None and rank < 1:
        problems.append(f"rank: must be at least 1; got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        problems.append(f"energy: must be in (0, 1]; got {energy}")
    if energy is not None and svd == "randomized":
        problems.append("--energy needs the whole spectrum: use --svd exact")
    if problems:
        raise ConfigError(problems)
    out_dtype = _dtype(dtype)
    base_reader = open_checkpoint(base)
    tuned = None
    try:
        tuned = open_checkpoint(finetuned)
        model_type = (tuned.config() or base_reader.config() or {}).get("model_type")
        lora_names, saved_names, skipped = _classify(base_reader, tuned, embeddings, problems)
        if problems:
            raise CheckpointError(
                f"cannot extract from {finetuned} over {base}:\n"
                + "\n".join(f"  - {p}" for p in problems)
            )
        if not lora_names and not saved_names:
            raise CheckpointError(f"{finetuned} does not differ from {base}: nothing to extract")

        def delta_of(name: str) -> tuple[torch.Tensor, str]:
            module = name[: -len(".weight")]
            delta = tuned.get(name).to(torch.float32) - base_reader.get(name).to(torch.float32)
            transposed = is_embedding_name(name) or is_conv1d_module(model_type, module)
            layout = "transposed" if transposed else "linear"
            return kernels.weight_to_matrix(delta, layout), layout

        ranks: dict[str, int] = {}
        with progress_bar("spectra", len(lora_names) if energy is not None else 0,
                             progress and energy is not None, unit="tensors") as advance:
            for name in lora_names:
                shape = base_reader.shape(name)
                full = min(shape[0], math.prod(shape[1:]))
                if energy is None:
                    ranks[name] = min(rank or full, full)
                    continue
                matrix, _ = delta_of(name)
                chosen = kernels.energy_rank(torch.linalg.svdvals(matrix), energy)
                ranks[name] = max(1, min(chosen, rank or full, full))
                advance()

        out_modules = []
        for name in lora_names:
            shape = tuple(base_reader.shape(name))
            module = name[: -len(".weight")]
            embedding = is_embedding_name(name)
            conv1d = is_conv1d_module(model_type, module)
            r = ranks[name]
            if embedding or conv1d:
                a_shape, b_shape = (r, shape[0]), (shape[1], r)
            elif len(shape) == 4:
                a_shape, b_shape = (r, *shape[1:]), (shape[0], r, 1, 1)
            else:
                a_shape, b_shape = (r, shape[1]), (shape[0], r)
            out_modules.append(OutModule(module, r, a_shape, b_shape, embedding))
        # A changed bias of a LoRA module goes to `lora_B.bias` (PEFT's lora_bias, as
        # mergekit-extract-lora writes it); lora_bias is all-or-nothing, so it needs every LoRA
        # module to have a bias in the base.
        base_names = set(base_reader.keys())
        with_bias = bool(skipped) and all(m.module + ".bias" in base_names for m in out_modules)
        if with_bias:
            out_modules = [
                dataclasses.replace(m, bias_shape=tuple(base_reader.shape(m.module + ".bias")))
                for m in out_modules
            ]
            skipped = []
        saved = [(n, tuple(tuned.shape(n)), tuned.dtype(n)) for n in saved_names]
        factor_dtype = out_dtype or (tuned.dtype(lora_names[0]) if lora_names else torch.float32)
        writer = _adapter_writer(
            out_dir, out_modules, saved, factor_dtype, overwrite=overwrite,
            inputs=[base_reader.path, tuned.path], kind="extract",
        )
        per_module: dict[str, dict[str, float | int]] = {}
        with writer:
            with progress_bar("extracting", len(out_modules) + len(saved), progress, unit="tensors") as advance:
                for name, out in zip(lora_names, out_modules):
                    matrix, _ = delta_of(name)
                    generator = torch.Generator().manual_seed(module_seed(seed, name))
                    found = kernels.factorize(
                        matrix, out.rank, randomized=svd == "randomized", generator=generator
                    )
                    writer.write(out.a_name, found.lora_A.reshape(out.a_shape).to(factor_dtype).contiguous())
                    writer.write(out.b_name, found.lora_B.reshape(out.b_shape).to(factor_dtype).contiguous())
                    if out.bias_shape is not None:
                        bias = out.module + ".bias"
                        change = tuned.get(bias).to(torch.float32) - base_reader.get(bias).to(torch.float32)
                        writer.write(out.bias_name, change.to(factor_dtype).contiguous())
                    approx = found.lora_B.to(factor_dtype).to(torch.float32) @ found.lora_A.to(factor_dtype).to(torch.float32)
                    full_rank = min(matrix.shape)
                    per_module[out.module] = {
                        "rank": out.rank,
                        "full_rank": full_rank,
                        "relative_error": kernels.relative_error(matrix, approx),
                        "energy_kept": 1.0 - kernels.spectral_tail_error(found.singular_values, out.rank) ** 2
                        if svd == "exact" else float("nan"),
                    }
                    advance()
                for name, _shape, _saved_dtype in saved:
                    writer.write(f"{PEFT_PREFIX}{name}", tuned.get(name))
                    advance()
            config = adapter_config(
                out_modules,
                modules_to_save=sorted({n.rsplit(".", 1)[0] for n in saved_names}),
                fan_in_fan_out=any(is_conv1d_module(model_type, m.module) for m in out_modules),
                base_model_name_or_path=str(Path(base)),
            )
            writer.write_json(ADAPTER_CONFIG, config)
            report = ExtractReport(Path(out_dir), per_module, saved_names, skipped,
                                   time.perf_counter() - started)
            _write_report(writer, report.as_json())
            writer.commit()
        return report
    finally:
        base_reader.close()
        if tuned is not None:
            tuned.close()


def _classify(base, tuned, embeddings: bool, problems: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Split the changed tensors into LoRA targets, saved whole modules and unrepresentable ones."""
    base_names, tuned_names = set(base.keys()), set(tuned.keys())
    missing = sorted(base_names - tuned_names)
    extra = sorted(tuned_names - base_names)
    if missing:
        problems.append(f"tensors missing from the fine-tune: {', '.join(missing[:10])}"
                        + (" ..." if len(missing) > 10 else ""))
    if extra:
        problems.append(f"tensors the base lacks: {', '.join(extra[:10])}" + (" ..." if len(extra) > 10 else ""))
    changed = []
    for name in tuned.keys():
        if name not in base_names:
            continue
        if tuple(base.shape(name)) != tuple(tuned.shape(name)):
            problems.append(
                f"tensor `{name}`: shape {list(tuned.shape(name))} in the fine-tune, "
                f"{list(base.shape(name))} in the base"
            )
            continue
        if not tuned.dtype(name).is_floating_point:
            continue
        if not torch.equal(base.get(name).to(torch.float32), tuned.get(name).to(torch.float32)):
            changed.append(name)
    lora, whole = [], []
    for name in changed:
        dims = len(tuned.shape(name))
        if name.endswith(".weight") and dims in (2, 4) and (embeddings or not is_embedding_name(name)):
            lora.append(name)
        else:
            whole.append(name)
    lora_modules = {n[: -len(".weight")] for n in lora}
    saved, skipped = [], []
    for name in whole:
        module = name.rsplit(".", 1)[0]
        (skipped if module in lora_modules else saved).append(name)
    # A module saved whole is saved with every tensor it holds, as PEFT's ModulesToSaveWrapper
    # copies the whole module.
    saved_modules = {n.rsplit(".", 1)[0] for n in saved}
    saved = [n for n in tuned.keys() if n.rsplit(".", 1)[0] in saved_modules and n in base_names]
    return lora, saved, skipped
