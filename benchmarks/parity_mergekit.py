"""Parity of mergelab with mergekit 0.1.5: the same YAML through both tools, outputs compared.

    make parity                                   # everything; rewrites docs/benchmarks.md
    .venv/bin/python benchmarks/parity_mergekit.py --only 'ties*' --no-docs
    .venv/bin/python benchmarks/parity_mergekit.py --self-check   # mergekit vs mergekit

Inputs are tiny random checkpoints built here with transformers (a Llama with an untied and a
tied head, a BertForSequenceClassification): a seeded base and three fine-tuned-like variants
(base + sparse, partly shared perturbations, so task vectors correlate and have sign conflicts).
For every method both tools implement, a config with typical parameters (per-layer gradients,
filter lists, slices with `layer_range`, `dtype: float32`) is merged by

    .bench-venv/bin/mergekit-yaml CONFIG OUT --random-seed 0 --device cpu
    .venv/bin/mergelab merge CONFIG OUT --seed 0

and the outputs are compared:
* key sets and config.json (ignoring `transformers_version`) must be equal;
* deterministic methods: every tensor must agree to 1e-5, relative to the tensor's largest
  magnitude (max|mergelab - mergekit| / max|mergekit|), in float32;
* randomised methods (DARE, DELLA): the two tools draw different random masks, so instead the
  fraction of entries that differ from the base and the norm of (merged - base) must agree
  within 1 % over the whole model, and per tensor within max(1 %, 5 binomial sigmas).
The exit status is non-zero if any row fails. mergekit outputs are cached by config hash.
"""

from __future__ import annotations

import argparse
import fnmatch
import math
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    REPO_ROOT,
    WORK_DIR,
    RunResult,
    TinyFamily,
    bench_tool,
    build_family,
    digest,
    load_folder,
    main_tool,
    read_json,
    run,
)

DETERMINISTIC_RTOL = 1e-5
RANDOM_RTOL = 0.01
SIGMAS = 5.0
# mergekit methods that draw random numbers for tensors this small (arcee_fusion only samples
# above 1M elements). Anything mergelab's registry marks `randomized` is added at run time.
MERGEKIT_RANDOMIZED = {"dare_ties", "dare_linear", "della", "della_linear"}
DOCS_FILE = REPO_ROOT / "docs" / "benchmarks.md"
SECTION = "## Parity with mergekit"
REPRODUCE = "make parity"


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Paths:
    """The checkpoint family of one case, as strings for YAML, with filter words."""

    base: str
    ft1: str
    ft2: str
    ft3: str
    attn: str  # a substring of attention tensor names
    mlp: str  # a substring of MLP tensor names
    tied_ft1: str  # a tied-head Llama variant, for mixing tied and untied inputs

    @classmethod
    def of(cls, family: TinyFamily) -> Paths:
        bert = family.name == "bert"
        b, (f1, f2, f3) = family.base, family.variants
        tied = WORK_DIR / "models" / "llama_tied" / "ft1"
        return cls(str(b), str(f1), str(f2), str(f3),
                   "attention" if bert else "self_attn", "intermediate" if bert else "mlp",
                   str(tied))


ConfigBuilder = Callable[[Paths], dict]


@dataclass(frozen=True)
class Case:
    name: str  # row id, unique
    method: str
    model: str  # family kind
    build: ConfigBuilder
    randomized: bool | None = None  # None: decided from the method
    note: str = ""


def _models(*entries: tuple[str, dict | None]) -> list[dict]:
    return [{"model": m, **({"parameters": p} if p else {})} for m, p in entries]


def _gta(method: str, **extra: object) -> ConfigBuilder:
    """A task-arithmetic-family config: a gradient on one model, a filter list on another."""

    def build(p: Paths) -> dict:
        density = extra.get("density")
        per_model: list[dict] = [
            {"weight": [1.0, 0.6]},  # per-layer gradient
            {"weight": 0.8},
            {"weight": [{"filter": p.attn, "value": 0.7}, {"value": 0.4}]},  # filter list
        ]
        if density is not None:
            per_model[0]["density"] = density
            per_model[1]["density"] = [{"filter": p.mlp, "value": density}, {"value": min(1.0, density + 0.1)}]
            per_model[2]["density"] = density
        for key in ("gamma", "epsilon"):
            if key in extra:
                for pm in per_model:
                    pm[key] = extra[key]
        globals_ = {k: v for k, v in extra.items() if k not in ("density", "gamma", "epsilon")}
        cfg = {
            "merge_method": method,
            "base_model": p.base,
            "dtype": "float32",
            "models": _models((p.ft1, per_model[0]), (p.ft2, per_model[1]), (p.ft3, per_model[2])),
        }
        if globals_:
            cfg["parameters"] = globals_
        return cfg

    return build


def _simple(method: str, *, base: bool, n: int = 3, listed_base: bool = False,
            per_model: list[dict | None] | None = None, params: dict | None = None) -> ConfigBuilder:
    def build(p: Paths) -> dict:
        fts = [p.ft1, p.ft2, p.ft3][:n]
        pm = per_model or [None] * n
        entries = list(zip(fts, pm, strict=True))
        if listed_base:
            entries = [(p.base, None), *entries]
        cfg: dict = {"merge_method": method, "dtype": "float32", "models": _models(*entries)}
        if base:
            cfg["base_model"] = p.base
        if params:
            cfg["parameters"] = params
        return cfg

    return build


def _slerp(p: Paths) -> dict:
    return {
        "merge_method": "slerp",
        "base_model": p.base,
        "dtype": "float32",
        "models": _models((p.base, None), (p.ft1, None)),
        "parameters": {"t": [
            {"filter": p.attn, "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
            {"filter": p.mlp, "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
            {"value": 0.5},
        ]},
    }


def _passthrough_slices(p: Paths) -> dict:
    return {
        "merge_method": "passthrough",
        "dtype": "float32",
        "slices": [
            {"sources": [{"model": p.ft1, "layer_range": [0, 2]}]},
            {"sources": [{"model": p.ft2, "layer_range": [1, 4]}]},
        ],
    }


def _linear_slices(p: Paths) -> dict:
    return {
        "merge_method": "linear",
        "dtype": "float32",
        "slices": [
            {"sources": [
                {"model": p.ft1, "layer_range": [0, 2], "parameters": {"weight": [1.0, 0.0]}},
                {"model": p.ft2, "layer_range": [0, 2], "parameters": {"weight": [0.0, 1.0]}},
            ]},
            {"sources": [
                {"model": p.ft1, "layer_range": [2, 4], "parameters": {"weight": 0.3}},
                {"model": p.ft3, "layer_range": [1, 3], "parameters": {"weight": [0.2, 0.9]}},
            ], "parameters": {"normalize": True}},
        ],
    }


def _linear(p: Paths) -> dict:
    return {
        "merge_method": "linear",
        "dtype": "float32",
        "models": _models(
            (p.ft1, {"weight": [1.0, 0.2]}),
            (p.ft2, {"weight": 0.5}),
            (p.ft3, {"weight": [{"filter": p.attn, "value": 0.8}, {"value": 0.3}]}),
        ),
    }


def _with(build: ConfigBuilder, **top: object) -> ConfigBuilder:
    """`build` with extra top-level keys (e.g. out_dtype)."""
    return lambda p: {**build(p), **top}


def _listed_base(build: ConfigBuilder) -> ConfigBuilder:
    """`build` with the base model also listed first under `models`."""

    def listed(p: Paths) -> dict:
        cfg = build(p)
        return {**cfg, "models": [{"model": p.base}, *cfg["models"]]}

    return listed


def _ties_slices(p: Paths) -> dict:
    """TIES inside `slices`: the base must be one of each slice's sources."""
    return {
        "merge_method": "ties",
        "base_model": p.base,
        "dtype": "float32",
        "slices": [
            {"sources": [
                {"model": p.base, "layer_range": [0, 4]},
                {"model": p.ft1, "layer_range": [0, 4],
                 "parameters": {"weight": [0.5, 1.0], "density": 0.6}},
                {"model": p.ft2, "layer_range": [0, 4], "parameters": {"weight": 0.7}},
            ], "parameters": {"density": 0.4}},
        ],
    }


def _fallthrough(p: Paths) -> dict:
    """A per-model filter list with no catch-all falls through to the global value."""
    return {
        "merge_method": "ties",
        "base_model": p.base,
        "dtype": "float32",
        "models": _models(
            (p.ft1, {"density": [{"filter": p.mlp, "value": 0.3}]}),
            (p.ft2, None),
            (p.ft3, {"weight": 0.6}),
        ),
        "parameters": {
            "density": 0.7,
            "weight": [{"filter": p.attn, "value": [0.2, 1.0, 0.4]}, {"value": 0.5}],
        },
    }


def _mixed_tied(p: Paths) -> dict:
    """An untied and a tied-head Llama: mergekit reads the tied model's embeddings as its head."""
    untied_base = str(WORK_DIR / "models" / "llama" / "base")
    return {
        "merge_method": "linear",
        "base_model": untied_base,
        "dtype": "float32",
        "models": _models((untied_base, {"weight": 0.5}), (p.tied_ft1, {"weight": 0.5})),
    }


def cases() -> list[Case]:
    llama: list[Case] = [
        Case("linear", "linear", "llama", _linear),
        Case("linear(out bf16)", "linear", "llama", _with(_linear, out_dtype="bfloat16"),
             note="out_dtype bfloat16: merged in float32, cast on save"),
        Case("linear+base", "linear", "llama",
             _simple("linear", base=True, params={"weight": 1.0}),
             note="base_model not under models: mergekit merges it in as a 4th model"),
        Case("linear-slices", "linear", "llama", _linear_slices, note="slices, per-slice t"),
        Case("task_arithmetic", "task_arithmetic", "llama", _gta("task_arithmetic", **{"lambda": 0.9})),
        Case("ties", "ties", "llama", _gta("ties", density=0.5)),
        Case("ties(base listed)", "ties", "llama", _listed_base(_gta("ties", density=0.5)),
             note="base_model also under models (no parameters)"),
        Case("ties(no norm)", "ties", "llama",
             _gta("ties", density=0.5, normalize=False, int8_mask=True, **{"lambda": 0.5})),
        Case("ties(fallthrough)", "ties", "llama", _fallthrough,
             note="filter list without catch-all falls back to global; global filter gradient"),
        Case("ties-slices", "ties", "llama", _ties_slices,
             note="slice-level density under per-source density"),
        Case("dare_ties", "dare_ties", "llama", _gta("dare_ties", density=0.5)),
        Case("dare_ties(d=1)", "dare_ties", "llama", _gta("dare_ties", density=1.0),
             randomized=False, note="density 1: no random drop"),
        Case("dare_linear", "dare_linear", "llama", _gta("dare_linear", density=0.6)),
        Case("breadcrumbs", "breadcrumbs", "llama", _gta("breadcrumbs", density=0.8, gamma=0.05)),
        Case("breadcrumbs_ties", "breadcrumbs_ties", "llama",
             _gta("breadcrumbs_ties", density=0.7, gamma=0.02)),
        Case("della", "della", "llama", _gta("della", density=0.6, epsilon=0.1)),
        Case("della_linear", "della_linear", "llama", _gta("della_linear", density=0.5, epsilon=0.2)),
        Case("sce", "sce", "llama", _simple("sce", base=True, params={"select_topk": 0.5})),
        Case("slerp", "slerp", "llama", _slerp),
        Case("nuslerp", "nuslerp", "llama",
             _simple("nuslerp", base=True, n=2, per_model=[{"weight": 0.3}, {"weight": 0.7}])),
        Case("nuslerp(rows)", "nuslerp", "llama",
             _simple("nuslerp", base=False, n=2, per_model=[{"weight": 0.4}, {"weight": 0.6}],
                     params={"nuslerp_row_wise": True, "nuslerp_flatten": False})),
        Case("multislerp", "multislerp", "llama",
             _simple("multislerp", base=True,
                     per_model=[{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}])),
        Case("karcher", "karcher", "llama", _simple("karcher", base=False)),
        Case("model_stock", "model_stock", "llama", _simple("model_stock", base=True)),
        Case("model_stock(filter)", "model_stock", "llama",
             _simple("model_stock", base=True, params={"filter_wise": True})),
        Case("nearswap", "nearswap", "llama",
             _simple("nearswap", base=True, n=1, listed_base=True, params={"t": 0.001})),
        Case("arcee_fusion", "arcee_fusion", "llama",
             _simple("arcee_fusion", base=True, n=1, listed_base=True)),
        Case("ram", "ram", "llama", _simple("ram", base=True)),
        Case("ramplus_tl", "ramplus_tl", "llama",
             _simple("ramplus_tl", base=True, params={"r": 0.1, "alpha": 0.2})),
        Case("passthrough-slices", "passthrough", "llama", _passthrough_slices,
             note="5 layers out of 2+3"),
    ]
    tied = [
        Case("linear(mixed tied)", "linear", "llama_tied", _mixed_tied,
             note="untied base + tied ft1: mergekit loads ft1's embed_tokens as its lm_head"),
        Case("linear", "linear", "llama_tied", _linear),
        Case("ties", "ties", "llama_tied", _gta("ties", density=0.5)),
        Case("slerp", "slerp", "llama_tied", _slerp),
        Case("passthrough-slices", "passthrough", "llama_tied", _passthrough_slices),
    ]
    bert = [
        Case("linear", "linear", "bert", _linear),
        Case("task_arithmetic", "task_arithmetic", "bert", _gta("task_arithmetic", **{"lambda": 0.9})),
        Case("ties", "ties", "bert", _gta("ties", density=0.5)),
        Case("dare_linear", "dare_linear", "bert", _gta("dare_linear", density=0.6)),
        Case("slerp", "slerp", "bert", _slerp),
        Case("model_stock", "model_stock", "bert", _simple("model_stock", base=True)),
        Case("sce", "sce", "bert", _simple("sce", base=True, params={"select_topk": 0.5})),
        Case("passthrough-slices", "passthrough", "bert", _passthrough_slices),
    ]
    return llama + tied + bert


# --------------------------------------------------------------------------- comparison


@dataclass
class Row:
    case: str
    method: str
    model: str
    check: str  # "exact", "statistical" or "-"
    tensors: int = 0
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    passed: bool = False
    skipped: bool = False
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files_only_mk: tuple[str, ...] = ()  # non-weight files one tool writes and the other not
    files_only_ml: tuple[str, ...] = ()

    @property
    def status(self) -> str:
        return "skip" if self.skipped else ("pass" if self.passed else "FAIL")


def _config_diff(a: dict, b: dict) -> list[str]:
    """Differing config.json keys. `torch_dtype` and `dtype` are one key: transformers >= 4.56
    writes `dtype` (as mergekit does, through save_pretrained) and reads both spellings."""
    a, b = _dtype_key(a), _dtype_key(b)
    ignore = {"transformers_version"}
    keys = sorted((set(a) | set(b)) - ignore)
    return [f"{k}: mergekit={a.get(k, '<absent>')!r} mergelab={b.get(k, '<absent>')!r}"
            for k in keys if a.get(k, "<absent>") != b.get(k, "<absent>")]


def _dtype_key(cfg: dict) -> dict:
    cfg = dict(cfg)
    if "torch_dtype" in cfg and "dtype" not in cfg:
        cfg["dtype"] = cfg.pop("torch_dtype")
    return cfg


def compare_outputs(row: Row, mk_dir: Path, ml_dir: Path, base: dict[str, torch.Tensor] | None,
                    randomized: bool) -> None:
    """Fill `row` with the comparison of two merged checkpoint folders."""
    mk, ml = load_folder(mk_dir), load_folder(ml_dir)
    only_mk, only_ml = sorted(set(mk) - set(ml)), sorted(set(ml) - set(mk))
    if only_mk:
        row.problems.append(f"keys only in mergekit: {_short(only_mk)}")
    if only_ml:
        row.problems.append(f"keys only in mergelab: {_short(only_ml)}")
    mk_cfg, ml_cfg = read_json(mk_dir / "config.json"), read_json(ml_dir / "config.json")
    cfg_diff = _config_diff(mk_cfg, ml_cfg)
    if ("dtype" in mk_cfg) != ("dtype" in ml_cfg):
        row.notes.append("config.json spells the dtype key differently (`dtype` vs `torch_dtype`)")
    if cfg_diff:
        row.problems.append("config.json differs: " + "; ".join(cfg_diff))
    mk_files = {p.name for p in mk_dir.iterdir()
                if not p.name.endswith(".safetensors") and not p.name.startswith(".")}
    ml_files = {p.name for p in ml_dir.iterdir()
                if not p.name.endswith(".safetensors") and not p.name.startswith(".")}
    row.files_only_mk = tuple(sorted(mk_files - ml_files))
    row.files_only_ml = tuple(sorted(ml_files - mk_files))

    common = [k for k in mk if k in ml]
    row.tensors = len(common)
    worst_abs, worst_rel, worst_name = 0.0, 0.0, ""
    stats = {"changed_mk": 0, "changed_ml": 0, "numel": 0, "sq_mk": 0.0, "sq_ml": 0.0}
    tensor_fail: list[str] = []
    for name in common:
        a, b = mk[name], ml[name]
        if a.shape != b.shape:
            row.problems.append(f"{name}: shape mergekit {tuple(a.shape)} vs mergelab {tuple(b.shape)}")
            continue
        if a.dtype != b.dtype:
            row.problems.append(f"{name}: dtype mergekit {a.dtype} vs mergelab {b.dtype}")
        a64, b64 = a.double(), b.double()
        abs_diff = (a64 - b64).abs().max().item() if a.numel() else 0.0
        rel = abs_diff / max(a64.abs().max().item(), 1e-30) if a.numel() else 0.0
        if rel > worst_rel:
            worst_rel, worst_name = rel, name
        worst_abs = max(worst_abs, abs_diff)
        if randomized and base is not None and name in base and base[name].shape == a.shape:
            ref = base[name].double()
            fa, fb = _tensor_stats(a64, ref), _tensor_stats(b64, ref)
            stats["changed_mk"] += fa[0]
            stats["changed_ml"] += fb[0]
            stats["numel"] += a.numel()
            stats["sq_mk"] += fa[1] ** 2
            stats["sq_ml"] += fb[1] ** 2
            msg = _random_tensor_check(name, a.numel(), fa, fb)
            if msg:
                tensor_fail.append(msg)
    row.max_abs = worst_abs
    if not randomized:
        row.max_rel = worst_rel
        if worst_rel > DETERMINISTIC_RTOL:
            row.problems.append(f"max relative difference {worst_rel:.3g} in {worst_name}")
    else:
        if stats["numel"] == 0:
            row.problems.append("no tensors to compare against the base")
        else:
            f_mk, f_ml = stats["changed_mk"] / stats["numel"], stats["changed_ml"] / stats["numel"]
            n_mk, n_ml = math.sqrt(stats["sq_mk"]), math.sqrt(stats["sq_ml"])
            rel_f = abs(f_ml - f_mk) / max(f_mk, 1e-30)
            rel_n = abs(n_ml - n_mk) / max(n_mk, 1e-30)
            row.max_rel = max(rel_f, rel_n)
            row.notes.append(f"changed fraction mergekit {f_mk:.4f} / mergelab {f_ml:.4f}; "
                             f"|merged-base| {n_mk:.4f} / {n_ml:.4f}")
            if rel_f > RANDOM_RTOL:
                row.problems.append(f"fraction of entries changed from the base: mergekit "
                                    f"{f_mk:.4f}, mergelab {f_ml:.4f} (rel {rel_f:.3g})")
            if rel_n > RANDOM_RTOL:
                row.problems.append(f"norm of merged-base: mergekit {n_mk:.5g}, mergelab "
                                    f"{n_ml:.5g} (rel {rel_n:.3g})")
        if tensor_fail:
            row.problems.append(f"{len(tensor_fail)} tensors outside the per-tensor tolerance, "
                                f"e.g. {tensor_fail[0]}")
    row.passed = not row.problems


def _tensor_stats(merged: torch.Tensor, base: torch.Tensor) -> tuple[int, float]:
    """(entries that differ from the base, L2 norm of merged - base)."""
    delta = merged - base
    return int((delta != 0).sum().item()), float(delta.norm().item())


def _random_tensor_check(name: str, numel: int, a: tuple[int, float], b: tuple[int, float]) -> str:
    """Per-tensor statistical agreement; '' when fine.

    Two independent draws of a keep-mask over n entries give changed fractions whose relative
    difference has standard deviation about sqrt(2 (1-f) / (f n)); norms fluctuate with the
    mask count, so the same bound is used for them.
    """
    f = max(a[0], 1) / numel
    sigma = math.sqrt(2 * max(1 - f, 1 / numel) / (f * numel))
    tol = max(RANDOM_RTOL, SIGMAS * sigma)
    rel_f = abs(b[0] - a[0]) / max(a[0], 1)
    rel_n = abs(b[1] - a[1]) / max(a[1], 1e-30)
    if rel_f > tol or rel_n > tol:
        return (f"{name}: changed {a[0]}/{b[0]} of {numel}, norm {a[1]:.4g}/{b[1]:.4g} "
                f"(tolerance {tol:.3g})")
    return ""


def _short(items: list[str], n: int = 4) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


# --------------------------------------------------------------------------- running


def mergekit_version() -> str:
    res = run([bench_tool("python"), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"])
    return res.output.strip() if res.ok else "unknown"


def run_mergekit(config_path: Path, out: Path, seed: int, cache_key: str) -> RunResult | None:
    """Run mergekit-yaml unless a finished output for this exact config is cached."""
    marker = out / ".parity-complete"
    if marker.exists() and marker.read_text() == cache_key:
        return None
    shutil.rmtree(out, ignore_errors=True)
    res = run([bench_tool("mergekit-yaml"), config_path, out, "--random-seed", str(seed),
               "--device", "cpu", "--quiet"])
    if res.ok:
        marker.write_text(cache_key)
    return res


def run_mergelab(config_path: Path, out: Path, seed: int) -> RunResult:
    shutil.rmtree(out, ignore_errors=True)
    return run([main_tool("mergelab"), "merge", config_path, out, "--seed", str(seed),
                "--no-progress"])


def mergelab_methods() -> tuple[set[str], set[str], list[str]]:
    """(names and aliases, randomized names, canonical names) from mergelab's registry."""
    try:
        from mergelab.methods import list_methods
        from mergelab.methods.registry import method_names
    except ImportError as exc:  # not installed in this venv
        print(f"cannot import mergelab: {exc}", file=sys.stderr)
        return set(), set(), []
    methods = list_methods()
    return (set(method_names()), {m.name for m in methods if m.randomized}
            | {a for m in methods if m.randomized for a in m.aliases}, [m.name for m in methods])


def evaluate(case: Case, family: TinyFamily, work: Path, known: set[str], randomized_ml: set[str],
             self_check: bool, use_cache: bool) -> Row:
    randomized = (case.randomized if case.randomized is not None
                  else case.method in MERGEKIT_RANDOMIZED)
    row = Row(case.name, case.method, case.model, "statistical" if randomized else "exact")
    if case.note:
        row.notes.append(case.note)
    if case.randomized is None and (case.method in randomized_ml) != randomized:
        # mergekit's choice decides the check: e.g. arcee_fusion only samples above 1M entries.
        row.notes.append(f"mergelab marks `{case.method}` randomized={not randomized}; "
                         f"mergekit's kernel is {'random' if randomized else 'deterministic'} here")
    if not self_check and case.method not in known:
        row.skipped, row.check = True, "-"
        row.notes.append("not in mergelab's registry")
        return row
    config = case.build(Paths.of(family))
    text = yaml.safe_dump(config, sort_keys=False)
    folder = work / f"{case.model}__{_safe(case.name)}"
    folder.mkdir(parents=True, exist_ok=True)
    cfg_path = folder / "config.yml"
    cfg_path.write_text(text)
    key = digest(text, "mergekit-0.1.5", "seed0")
    mk_out = folder / "mergekit"
    if not use_cache:
        shutil.rmtree(mk_out, ignore_errors=True)
    mk_res = run_mergekit(cfg_path, mk_out, 0, key)
    if mk_res is not None and not mk_res.ok:
        row.problems.append(f"mergekit failed (exit {mk_res.returncode}): {mk_res.tail(3)}")
        return row
    if self_check:
        # The peer against itself with another seed: validates the comparison and tolerances.
        ml_out = folder / "mergekit-seed1"
        ml_res = run_mergekit(cfg_path, ml_out, 1, digest(text, "mergekit-0.1.5", "seed1"))
        if ml_res is not None and not ml_res.ok:
            row.problems.append(f"mergekit (seed 1) failed: {ml_res.tail(3)}")
            return row
    else:
        ml_out = folder / "mergelab"
        ml_res = run_mergelab(cfg_path, ml_out, 0)
        if not ml_res.ok:
            row.problems.append(f"mergelab failed (exit {ml_res.returncode}): {ml_res.tail(4)}")
            return row
    base = load_folder(family.base) if randomized else None
    try:
        compare_outputs(row, mk_out, ml_out, base, randomized)
    except Exception as exc:  # a malformed output is a failed row, not a crashed benchmark
        row.problems.append(f"comparison failed: {type(exc).__name__}: {exc}")
        row.passed = False
    return row


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# --------------------------------------------------------------------------- report


def render_table(rows: list[Row]):
    from rich.table import Table

    table = Table(title="mergelab vs mergekit 0.1.5 (float32, CPU)")
    for col in ("method", "model", "check", "tensors", "max abs diff", "max rel diff", "pass"):
        table.add_column(col, justify="right" if col in ("tensors", "max abs diff", "max rel diff") else "left")
    for r in rows:
        style = {"pass": "green", "FAIL": "bold red", "skip": "dim"}[r.status]
        table.add_row(r.case, r.model, r.check, str(r.tensors) if r.tensors else "-",
                      _fmt(r.max_abs), _fmt(r.max_rel), f"[{style}]{r.status}[/]")
    return table


def _fmt(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2e}"


def markdown(rows: list[Row], version: str, known_only: list[str]) -> str:
    lines = [
        SECTION,
        "",
        f"Reproduce with `{REPRODUCE}` (builds `.bench-venv` with mergekit=={version} and runs",
        "`benchmarks/parity_mergekit.py`; CPU only, offline, a few minutes on 2 cores).",
        "",
        "Inputs: tiny random seeded checkpoints built with transformers (Llama 4 layers, hidden 64,",
        "intermediate 128, vocab 256, untied `llama` and tied `llama_tied` heads; a",
        "BertForSequenceClassification of the same size), a base and three fine-tuned-like variants",
        "(base + sparse, partly shared perturbations). Each row is one YAML config (with per-layer",
        "gradients, filter lists, `slices` with `layer_range`, `dtype: float32`) merged by",
        "`.bench-venv/bin/mergekit-yaml CONFIG OUT --random-seed 0 --device cpu` and by",
        "`mergelab merge CONFIG OUT --seed 0`; the configs are written to",
        "`benchmarks/_work/parity/<model>__<case>/config.yml`.",
        "",
        "* **exact** rows: every tensor must agree to 1e-5 relative to its largest magnitude",
        "  (`max |mergelab - mergekit| / max |mergekit|`), and key sets and config.json",
        "  (ignoring `transformers_version`) must be equal.",
        "* **statistical** rows (DARE, DELLA: the tools draw different random masks): the fraction of",
        "  entries that differ from the base and the norm of (merged - base) must agree within 1 %",
        "  over the model (the \"max rel diff\" column is the larger of the two), and per tensor",
        "  within max(1 %, 5 binomial sigmas). `--self-check` runs mergekit against itself with",
        "  seeds 0 and 1 to validate these tolerances: its model-level differences are 0.1-0.3 %.",
        "* config.json: `torch_dtype` and `dtype` count as the same key (transformers >= 4.56 writes",
        "  `dtype` and reads both).",
        "",
        f"Environment: torch {torch.__version__}, mergekit {version} in `.bench-venv`; tolerances",
        f"`DETERMINISTIC_RTOL = {DETERMINISTIC_RTOL}`, `RANDOM_RTOL = {RANDOM_RTOL}`.",
        "",
        "| method | model | check | tensors | max abs diff | max rel diff | pass |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r.case} | {r.model} | {r.check} | {r.tensors or '-'} | {_fmt(r.max_abs)} | "
                     f"{_fmt(r.max_rel)} | {r.status} |")
    common = _common_notes(rows)
    detail = [r for r in rows if r.problems or set(r.notes) - common]
    if common or detail:
        lines += ["", "Notes and failures:", ""]
        lines += [f"* every row: {_md(msg)}" for msg in sorted(common)]
        for r in detail:
            for msg in r.problems:
                lines.append(f"* `{r.case}` / {r.model}: **{_md(msg)}**")
            for msg in r.notes:
                if msg not in common:
                    lines.append(f"* `{r.case}` / {r.model}: {_md(msg)}")
    lines += _files_summary(rows)
    lines += [
        "",
        "Not in the table (one-off checks, 2026-11-25): with `--out-shard-size` 100K (mergekit) /",
        "100KB (mergelab) the linear/llama merge gives the same 9 shard names, weight map and",
        "`total_size` (mergekit's index also records `mergekit_version`). With `dtype: bfloat16`",
        "the tools differ on purpose: mergekit runs the TIES-family kernels in the input dtype,",
        "mergelab accumulates in float32 and casts at the end; on ties/llama both bfloat16 results",
        "are 6.1e-2 (max, relative) from the float32 result, L2 error 0.1050 (mergekit) vs 0.1046",
        "(mergelab).",
    ]
    if known_only:
        lines += ["", "mergelab methods without a mergekit 0.1.5 counterpart (not compared): "
                  + ", ".join(f"`{m}`" for m in known_only) + "."]
    return "\n".join(lines) + "\n"


def _common_notes(rows: list[Row]) -> set[str]:
    """Notes shared by every compared row (reported once)."""
    done = [set(r.notes) for r in rows if r.tensors]
    return set.intersection(*done) if len(done) > 1 else set()


def _files_summary(rows: list[Row]) -> list[str]:
    """One line when every compared row has the same file-set difference, else one per row."""
    done = [r for r in rows if r.tensors]
    kinds = {(r.files_only_mk, r.files_only_ml) for r in done}
    if not done or kinds == {((), ())}:
        return []
    if len(kinds) == 1:
        mk, ml = kinds.pop()
        return ["", f"Other files (every row): only mergekit writes {', '.join(mk) or 'nothing more'}; "
                f"only mergelab writes {', '.join(ml) or 'nothing more'} (not a failure)."]
    return ["", "Other files (not a failure):", ""] + [
        f"* `{r.case}` / {r.model}: only mergekit {', '.join(r.files_only_mk) or '-'}; "
        f"only mergelab {', '.join(r.files_only_ml) or '-'}" for r in done]


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_docs(section: str, path: Path = DOCS_FILE) -> None:
    """Replace (or add) our section of docs/benchmarks.md, leaving other sections alone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    if SECTION in old:
        start = old.index(SECTION)
        nxt = old.find("\n## ", start + len(SECTION))
        rest = "\n" + old[nxt + 1:] if nxt != -1 else ""
        new = old[:start] + section + rest
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + section
    path.write_text(new)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="*", help="glob on case names (e.g. 'ties*')")
    parser.add_argument("--models", default="llama,llama_tied,bert", help="model kinds to run")
    parser.add_argument("--jobs", type=int, default=2, help="cases run in parallel")
    parser.add_argument("--no-cache", action="store_true", help="rerun mergekit even if cached")
    parser.add_argument("--no-docs", action="store_true", help=f"do not rewrite {DOCS_FILE.name}")
    parser.add_argument("--self-check", action="store_true",
                        help="compare mergekit with itself (seed 1) to validate the checks")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    selected = [c for c in cases() if c.model in kinds and fnmatch.fnmatch(c.name, args.only)]
    if not selected:
        print("no case matches", file=sys.stderr)
        return 2
    bench_tool("mergekit-yaml")  # fail early with the hint to run `make bench-env`
    known, randomized_ml, ml_names = mergelab_methods()
    needed = {c.model for c in selected}
    if needed & {"llama", "llama_tied"}:
        needed |= {"llama", "llama_tied"}  # mixed tied/untied cases read both families
    families = {k: build_family(k, WORK_DIR / "models") for k in sorted(needed)}
    work = WORK_DIR / ("parity-self" if args.self_check else "parity")

    def one(case: Case) -> Row:
        return evaluate(case, families[case.model], work, known, randomized_ml,
                        args.self_check, not args.no_cache)

    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(one, selected))

    from rich.console import Console

    console = Console(width=160)
    console.print(render_table(rows))
    common = _common_notes(rows)
    for msg in sorted(common):
        console.print(f"[dim]every row: {msg}[/]", highlight=False)
    for r in rows:
        for msg in r.problems:
            console.print(f"[red]{r.case} / {r.model}:[/] {msg}", highlight=False)
        for msg in r.notes:
            if msg not in common:
                console.print(f"[dim]{r.case} / {r.model}: {msg}[/]", highlight=False)
    for line in _files_summary(rows):
        if line:
            console.print(line, highlight=False)
    mk_names = {c.method for c in cases()}
    known_only = sorted(set(ml_names) - mk_names)
    full_run = args.only == "*" and set(kinds) == {"llama", "llama_tied", "bert"}
    if not args.no_docs and not args.self_check and full_run:
        write_docs(markdown(rows, mergekit_version(), known_only))
        console.print(f"wrote {DOCS_FILE.relative_to(REPO_ROOT)}")
    failed = [r for r in rows if r.status == "FAIL"]
    console.print(f"{len(rows) - len(failed)} of {len(rows)} rows pass or are skipped; "
                  f"{len(failed)} fail")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
