"""Reading PEFT LoRA adapters: ``adapter_config.json`` + ``adapter_model.safetensors`` (or a
pickled ``adapter_model.bin``, loaded only with the weights-only unpickler).

`open_adapter` parses the config and the weights' headers and checks the adapter against
itself (pairs of factors, ranks against ``r``/``rank_pattern``); `AdapterReader.check_against`
checks it against a base model (every targeted module exists, every factor and saved module has
the shape the base implies, no rank exceeds its matrix). Both report every problem at once,
before any tensor data is read. The math of folding lives in `mergelab.lora.kernels`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from mergelab.checkpoint.reader import CheckpointReader, open_checkpoint
from mergelab.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_BIN = "adapter_model.bin"
# PEFT saves tensors under the wrapper's names: `base_model.model.` + the wrapped model's module.
PEFT_PREFIX = "base_model.model."

_FACTOR_RE = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<param>weight|bias))?$"
)
# Saved copies of whole modules (`modules_to_save`, embeddings saved with the adapter): the name
# of the base tensor is the key without these wrapper segments.
_WRAPPER_SEGMENT_RE = re.compile(r"\.(?:modules_to_save(?:\.[^.]+)?|original_module|base_layer)(?=\.)")
_DORA_MARKER = "lora_magnitude_vector"


# Architectures whose linear layers are transformers' `Conv1D`, which stores W as (in, out). PEFT
# picks the orientation from the layer's class, whatever `fan_in_fan_out` says (it warns and
# overrides), so the reader must know which modules are Conv1D: those of these model types whose
# leaf name is one of GPT-2's.
_CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
_CONV1D_LEAVES = ("c_attn", "c_proj", "c_fc", "q_attn")


def is_conv1d_module(model_type: str | None, module: str) -> bool:
    """True when `module` of a model of `model_type` is a transformers Conv1D (W is (in, out))."""
    return model_type in _CONV1D_MODEL_TYPES and module.rsplit(".", 1)[-1] in _CONV1D_LEAVES


class AdapterError(CheckpointError):
    """An adapter cannot be read or does not fit its base model (every problem listed)."""

    def __init__(self, where: str | Path, problems: Iterable[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"LoRA adapter {where}: {len(self.problems)} problem(s):\n{lines}")


class _BaseShapes(Protocol):
    def keys(self) -> list[str]: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def config(self) -> dict | None: ...


@dataclass(frozen=True)
class LoraModule:
    """One adapted weight: W + scale * B @ A.

    module: the module's name in the base model (``model.layers.0.self_attn.q_proj``).
    weight: the base tensor it updates (module + ``.weight``).
    lora_A / lora_B: the factors' tensor names in the adapter file; bias: ``lora_B.bias``
        (PEFT's ``lora_bias``), added to the module's bias times the scale, or None.
    layout: ``linear`` (W is (out, in) or a convolution) or ``transposed`` (W is stored
        (in, out): embeddings and ``fan_in_fan_out`` Conv1D layers).
    """

    module: str
    weight: str
    lora_A: str
    lora_B: str
    bias: str | None
    rank: int
    alpha: float
    scale: float
    layout: Literal["linear", "transposed"]
    kind: Literal["linear", "embedding", "conv"]

    @property
    def bias_target(self) -> str:
        return self.module + ".bias"


@dataclass(frozen=True)
class AdapterSettings:
    """The fields of ``adapter_config.json`` that change the weights."""

    r: int
    lora_alpha: float
    use_rslora: bool
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, float]
    fan_in_fan_out: bool
    target_modules: Any
    modules_to_save: list[str]

    def rank_of(self, module: str) -> int:
        return int(self.rank_pattern.get(_pattern_key(self.rank_pattern, module), self.r))

    def alpha_of(self, module: str) -> float:
        return float(self.alpha_pattern.get(_pattern_key(self.alpha_pattern, module), self.lora_alpha))

    def scale_of(self, module: str, rank: int) -> float:
        alpha = self.alpha_of(module)
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    # PEFT's get_pattern_key: a pattern matches a module whose name ends with it at a dot.
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module):
            return pattern
    return None


class AdapterReader:
    """A PEFT LoRA adapter: its settings, its modules and lazy access to its tensors."""

    def __init__(
        self,
        path: Path,
        config: dict[str, Any],
        settings: AdapterSettings,
        reader: CheckpointReader,
        modules: dict[str, LoraModule],
        saved: dict[str, str],
    ):
        self.path = path
        self.raw_config = config
        self.settings = settings
        self._reader = reader
        # Keyed by the base tensor each entry changes.
        self.modules = modules
        # Base tensor name -> adapter tensor name: whole tensors saved with the adapter
        # (`modules_to_save`, an adapted embedding's `base_layer`) that replace the base's.
        self.saved = saved

    @property
    def saved_base_layers(self) -> set[str]:
        """Saved tensors that are copies of an adapted layer's own base weight (PEFT saves an
        adapted embedding's ``base_layer`` with the adapter), as opposed to `modules_to_save`."""
        return {target for target, key in self.saved.items() if ".base_layer." in key}

    def __repr__(self) -> str:
        return f"AdapterReader({str(self.path)!r}, {len(self.modules)} modules)"

    @property
    def weights_file(self) -> Path:
        return self._reader.path

    def get(self, adapter_tensor: str) -> torch.Tensor:
        """Read one of the adapter's tensors by its name in the adapter file."""
        return self._reader.get(adapter_tensor)

    def shape(self, adapter_tensor: str) -> tuple[int, ...]:
        return self._reader.shape(adapter_tensor)

    def dtype(self, adapter_tensor: str) -> torch.dtype:
        return self._reader.dtype(adapter_tensor)

    def biases(self) -> dict[str, LoraModule]:
        """Base bias tensor -> the module whose ``lora_B.bias`` updates it."""
        return {m.bias_target: m for m in self.modules.values() if m.bias is not None}

    def touched(self) -> set[str]:
        """Every base tensor the adapter changes or replaces."""
        return set(self.modules) | set(self.biases()) | set(self.saved)

    def check_against(self, base: _BaseShapes, base_label: str | os.PathLike = "the base") -> None:
        """Check that the adapter fits `base` (a checkpoint reader or any source of shapes).

        Also settles each linear module's orientation from the base's config.json as PEFT does
        from the layer class: transformers' Conv1D layers (GPT-2) store W as (in, out).

        Raises:
            AdapterError: listing every module the base lacks (with a close name when there is
                one), every factor, bias or saved tensor whose shape disagrees with the base
                (naming the tensor and both shapes), and every rank above its matrix's.
        """
        self._settle_layouts(base.config() if hasattr(base, "config") else None)
        problems: list[str] = []
        names = set(base.keys())
        for weight, module in sorted(self.modules.items()):
            if weight not in names:
                problems.append(
                    f"target module `{module.module}` (tensors `{module.lora_A}`, "
                    f"`{module.lora_B}`) has no weight `{weight}` in {base_label}"
                    + _close_hint(weight, names)
                )
                continue
            problems.extend(self._check_factors(module, tuple(base.shape(weight)), base_label))
            if module.bias is not None:
                bias_shape = self.shape(module.bias)
                if module.bias_target not in names:
                    problems.append(
                        f"`{module.bias}` (lora_bias) updates bias `{module.bias_target}`, which "
                        f"{base_label} does not have"
                    )
                elif tuple(base.shape(module.bias_target)) != tuple(bias_shape):
                    problems.append(
                        f"tensor `{module.bias}` has shape {list(bias_shape)}; bias "
                        f"`{module.bias_target}` of {base_label} has "
                        f"{list(base.shape(module.bias_target))}"
                    )
        for target, tensor in sorted(self.saved.items()):
            if target not in names:
                problems.append(
                    f"saved module tensor `{tensor}` replaces `{target}`, which {base_label} "
                    "does not have" + _close_hint(target, names)
                )
            elif tuple(base.shape(target)) != tuple(self.shape(tensor)):
                problems.append(
                    f"saved module tensor `{tensor}` has shape {list(self.shape(tensor))}; "
                    f"`{target}` of {base_label} has {list(base.shape(target))}"
                )
        if problems:
            raise AdapterError(self.path, problems)

    def _settle_layouts(self, base_config: dict | None) -> None:
        # As PEFT does on load: the layer's class decides the orientation. Without a config.json
        # the adapter's `fan_in_fan_out` stands.
        model_type = (base_config or {}).get("model_type")
        if model_type is None:
            return
        for weight, module in list(self.modules.items()):
            if module.kind != "linear":
                continue
            layout = "transposed" if is_conv1d_module(model_type, module.module) else "linear"
            if layout != module.layout:
                self.modules[weight] = dataclasses.replace(module, layout=layout)

    def _check_factors(
        self, module: LoraModule, weight_shape: tuple[int, ...], base_label: str | os.PathLike
    ) -> list[str]:
        a_shape, b_shape = tuple(self.shape(module.lora_A)), tuple(self.shape(module.lora_B))
        rank = module.rank
        if module.layout == "transposed":
            # W is (in, out) for Conv1D, (num_embeddings, dim) for embeddings.
            fan_in, fan_out = (weight_shape[0], weight_shape[1]) if len(weight_shape) == 2 else (None, None)
            expect_a, expect_b = (rank, fan_in), (fan_out, rank)
        else:
            fan_out = weight_shape[0] if weight_shape else None
            rest = weight_shape[1:]
            expect_a = (rank, *rest)
            expect_b = (fan_out, rank) if len(weight_shape) <= 2 else (fan_out, rank, 1, 1)
        problems = []
        if len(weight_shape) < 2:
            return [
                f"target module `{module.module}`: weight `{module.weight}` of {base_label} has "
                f"shape {list(weight_shape)}, not a matrix LoRA can update"
            ]
        for tensor, got, want in ((module.lora_A, a_shape, expect_a), (module.lora_B, b_shape, expect_b)):
            if got != tuple(want):
                problems.append(
                    f"tensor `{tensor}` has shape {list(got)}, but weight `{module.weight}` of "
                    f"{base_label} has shape {list(weight_shape)}, which needs {list(want)}"
                )
        if not problems:
            fan_in_total = math.prod(a_shape[1:])
            limit = min(b_shape[0], fan_in_total)
            if rank > limit:
                problems.append(
                    f"target module `{module.module}`: rank {rank} is larger than its "
                    f"{b_shape[0]}x{fan_in_total} matrix allows ({limit})"
                )
        return problems

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> AdapterReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_hint(name: str, names: set[str]) -> str:
    import difflib

    close = difflib.get_close_matches(name, sorted(names), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def is_adapter(path: str | os.PathLike) -> bool:
    """True when `path` is a folder holding an ``adapter_config.json``."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def open_adapter(path: str | os.PathLike) -> AdapterReader:
    """Open a PEFT LoRA adapter folder, validating its config and tensors up front.

    Raises:
        AdapterError / CheckpointError: naming the file, for a missing folder or config, a
            config without weights, a pickled ``adapter_model.bin`` holding code (never
            unpickled), a non-LoRA adapter, DoRA (``use_dora``: its magnitude vector needs the
            base weight's norm, which mergelab does not fold yet), an A without its B, a rank
            that disagrees with ``r`` / ``rank_pattern``, or non-float factors.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CheckpointError(f"LoRA adapter {folder} does not exist")
    if not folder.is_dir():
        raise CheckpointError(f"LoRA adapter {folder} is not a folder (expected {ADAPTER_CONFIG} + weights)")
    folder = folder.resolve()
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"LoRA adapter {folder}: no {ADAPTER_CONFIG}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: cannot parse adapter config: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: adapter config is not a JSON object")
    settings = _settings(config_path, config)

    weights = None
    for candidate in (ADAPTER_SAFETENSORS, ADAPTER_BIN):
        if (folder / candidate).is_file():
            weights = folder / candidate
            break
    if weights is None:
        raise CheckpointError(
            f"LoRA adapter {folder}: {ADAPTER_CONFIG} but no weights ({ADAPTER_SAFETENSORS} or "
            f"{ADAPTER_BIN})"
        )
    reader = open_checkpoint(weights)
    try:
        modules, saved = _modules(folder, weights, reader, settings)
    except BaseException:
        reader.close()
        raise
    return AdapterReader(folder, config, settings, reader, modules, saved)


def _settings(config_path: Path, config: dict[str, Any]) -> AdapterSettings:
    problems = []
    peft_type = config.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        problems.append(f"peft_type is {peft_type!r}; only LoRA adapters (LORA) can be read")
    if config.get("use_dora"):
        problems.append(
            "use_dora is true: DoRA rescales every column by a learned magnitude over the "
            "norm of the updated weight, which folding tensor by tensor does not reproduce yet; "
            "merge it in PEFT (merge_and_unload) and use the full checkpoint"
        )
    r = config.get("r", 8)
    alpha = config.get("lora_alpha", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        problems.append(f"r must be a positive integer; got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        problems.append(f"lora_alpha must be a number; got {alpha!r}")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for key, value in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(value, dict):
            problems.append(f"{key} must be an object of module pattern -> number; got {value!r}")
    if isinstance(rank_pattern, dict):
        bad = [k for k, v in rank_pattern.items() if isinstance(v, bool) or not isinstance(v, int) or v <= 0]
        if bad:
            problems.append(f"rank_pattern values must be positive integers (bad: {', '.join(bad)})")
    modules_to_save = config.get("modules_to_save") or []
    if problems:
        raise AdapterError(config_path, problems)
    return AdapterSettings(
        r=r,
        lora_alpha=float(alpha),
        use_rslora=bool(config.get("use_rslora", False)),
        rank_pattern=dict(rank_pattern),
        alpha_pattern=dict(alpha_pattern),
        fan_in_fan_out=bool(config.get("fan_in_fan_out", False)),
        target_modules=config.get("target_modules"),
        modules_to_save=list(modules_to_save),
    )


def _modules(
    folder: Path, weights: Path, reader: CheckpointReader, settings: AdapterSettings
) -> tuple[dict[str, LoraModule], dict[str, str]]:
    problems: list[str] = []
    parts: dict[str, dict[str, str]] = {}
    saved: dict[str, str] = {}
    for key in reader.keys():
        name = key[len(PEFT_PREFIX) :] if key.startswith(PEFT_PREFIX) else key
        if _DORA_MARKER in name:
            problems.append(f"tensor `{key}` is a DoRA magnitude vector; DoRA is not supported")
            continue
        match = _FACTOR_RE.match(name)
        if match is None:
            if ".lora_" in name:
                problems.append(f"tensor `{key}`: unknown LoRA tensor kind")
                continue
            target = _WRAPPER_SEGMENT_RE.sub("", name)
            if target in saved:
                problems.append(f"tensors `{saved[target]}` and `{key}` both replace `{target}`")
            saved[target] = key
            continue
        part = match["part"] + ("." + match["param"] if match["param"] else "")
        parts.setdefault(match["module"], {})[part] = key
    if not parts and not saved:
        problems.append(f"{weights.name} holds no LoRA tensors")

    modules: dict[str, LoraModule] = {}
    for module, found in sorted(parts.items()):
        embedding = any(p.startswith("lora_embedding") for p in found)
        a_key = found.get("lora_embedding_A" if embedding else "lora_A.weight")
        b_key = found.get("lora_embedding_B" if embedding else "lora_B.weight")
        if a_key is None or b_key is None:
            present = ", ".join(f"`{k}`" for k in sorted(found.values()))
            problems.append(f"module `{module}` has {present} but not both LoRA factors A and B")
            continue
        a_shape, b_shape = reader.shape(a_key), reader.shape(b_key)
        for key in (a_key, b_key):
            if not reader.dtype(key).is_floating_point:
                problems.append(f"tensor `{key}` has dtype {reader.dtype(key)}, not a float")
        if len(a_shape) < 2 or len(b_shape) < 2:
            problems.append(
                f"module `{module}`: factors `{a_key}` {list(a_shape)} and `{b_key}` "
                f"{list(b_shape)} are not matrices"
            )
            continue
        rank = a_shape[0]
        if b_shape[1] != rank:
            problems.append(
                f"module `{module}`: `{a_key}` has rank {rank} (shape {list(a_shape)}) but "
                f"`{b_key}` has {b_shape[1]} (shape {list(b_shape)})"
            )
            continue
        configured = settings.rank_of(module)
        if configured != rank:
            problems.append(
                f"module `{module}`: `{a_key}` has rank {rank} (shape {list(a_shape)}) but "
                f"{ADAPTER_CONFIG} says {configured} (r / rank_pattern)"
            )
            continue
        kind: Literal["linear", "embedding", "conv"] = (
            "embedding" if embedding else "conv" if len(a_shape) == 4 else "linear"
        )
        transposed = embedding or (kind == "linear" and settings.fan_in_fan_out)
        bias_key = found.get("lora_B.bias")
        modules[module + ".weight"] = LoraModule(
            module=module,
            weight=module + ".weight",
            lora_A=a_key,
            lora_B=b_key,
            bias=bias_key,
            rank=rank,
            alpha=settings.alpha_of(module),
            scale=settings.scale_of(module, rank),
            layout="transposed" if transposed else "linear",
            kind=kind,
        )
    # A weight both saved and adapted (PEFT saves an adapted embedding's `base_layer` with the
    # adapter): the saved tensor replaces the base's, then the LoRA update applies to it.
    if problems:
        raise AdapterError(folder, problems)
    return modules, saved
