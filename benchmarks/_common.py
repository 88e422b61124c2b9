"""Helpers shared by the benchmarks: tiny seeded checkpoints, the peer venv, timing.

Everything here runs in the main venv (.venv). Peers such as mergekit live in their own venv
(.bench-venv, built by `make bench-env`; FusionBench in .fusionbench-venv, `make fusionbench-env`)
and are only ever run as subprocesses, so mergelab never imports them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
WORK_DIR = REPO_ROOT / "benchmarks" / "_work"  # git-ignored
MAIN_VENV = REPO_ROOT / ".venv"
BENCH_VENV = REPO_ROOT / ".bench-venv"
FUSIONBENCH_VENV = REPO_ROOT / ".fusionbench-venv"

# Nothing in a benchmark may reach the Hugging Face Hub: inputs are local folders.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}


# --------------------------------------------------------------------------- tiny checkpoints


@dataclass(frozen=True)
class TinyFamily:
    """A base checkpoint and fine-tuned-like variants of it, as safetensors folders."""

    name: str
    base: Path
    variants: tuple[Path, ...]

    @property
    def all(self) -> tuple[Path, ...]:
        return (self.base, *self.variants)


def _tiny_tokenizer(vocab_size: int, bert: bool):
    """A word-level tokenizer with `vocab_size` entries (so tokenizer files can be copied)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if bert else ["<unk>", "<s>", "</s>"]
    words = specials + [f"w{i}" for i in range(vocab_size - len(specials))]
    unk = specials[1] if bert else specials[0]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bert:
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token=unk, pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]",
        )
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, bos_token="<s>", eos_token="</s>")


def _perturb(
    state: Mapping[str, torch.Tensor], shared: Mapping[str, torch.Tensor], seed: int, scale: float
) -> dict[str, torch.Tensor]:
    """base + a sparse task vector: half shared direction, half own noise.

    The shared part makes task vectors correlated (so Model Stock, TIES sign election and
    RAM overlap are meaningful); the private noise gives sign conflicts; the random 60 %
    support makes some entries untouched by some models (RAM's unique/overlap split).
    """
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            out[name] = tensor.clone()
            continue
        noise = torch.randn(tensor.shape, generator=gen)
        support = torch.rand(tensor.shape, generator=gen) < 0.6
        magnitude = scale * (tensor.float().std() if tensor.numel() > 1 else 1.0)
        delta = (0.5 * shared[name] + noise) * support * magnitude
        out[name] = (tensor.float() + delta).to(tensor.dtype)
    return out


def _save(model, state: Mapping[str, torch.Tensor], tokenizer, folder: Path) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]  # what save_pretrained records
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})


def _state_for_saving(model) -> dict[str, torch.Tensor]:
    """The state dict transformers would save: tied duplicates dropped, buffers kept."""
    state = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        # A tied head is not written by transformers (it is re-tied on load).
        for key in ("lm_head.weight", "cls.predictions.decoder.weight"):
            state.pop(key, None)
    persistent = {name for name, _ in model.named_parameters()}
    persistent |= {n for n, b in model.named_buffers() if n in state}
    return {k: v.detach().clone() for k, v in state.items() if k in persistent}


def build_family(kind: str, root: Path, n_variants: int = 3, seed: int = 0,
                 scale: float = 0.05) -> TinyFamily:
    """Build (or reuse) a tiny random checkpoint family under `root/kind`.

    kind: "llama" (untied head), "llama_tied" (lm_head tied to embed_tokens) or "bert"
    (BertForSequenceClassification). The base is seeded with `seed`; variant i is the base
    plus `_perturb(seed=seed + 1 + i)`. A finished family is marked by `.complete` and reused.
    """
    folder = root / kind
    base, variants = folder / "base", tuple(folder / f"ft{i + 1}" for i in range(n_variants))
    family = TinyFamily(kind, base, variants)
    marker = folder / ".complete"
    if marker.exists() and marker.read_text() == f"{seed}:{scale}:{n_variants}":
        return family

    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)  # transformers' init draws from the global RNG
    if kind.startswith("llama"):
        config = transformers.LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            tie_word_embeddings=kind == "llama_tied", bos_token_id=1, eos_token_id=2,
        )
        model = transformers.LlamaForCausalLM(config)
        tokenizer = _tiny_tokenizer(256, bert=False)
    elif kind == "bert":
        config = transformers.BertConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=4, max_position_embeddings=128, num_labels=3,
        )
        model = transformers.BertForSequenceClassification(config)
        tokenizer = _tiny_tokenizer(256, bert=True)
    else:
        raise ValueError(f"unknown tiny model kind {kind!r}; use llama, llama_tied or bert")
    model.eval()
    # Random init leaves norms at exactly 1 and biases at 0; jitter them so every tensor has
    # a non-degenerate value (a norm of all ones makes SLERP and cosines trivial).
    gen = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    state = _state_for_saving(model)
    _save(model, state, tokenizer, base)
    shared_gen = torch.Generator().manual_seed(seed + 2000)
    shared = {k: torch.randn(v.shape, generator=shared_gen) for k, v in state.items()}
    for i, path in enumerate(variants):
        _save(model, _perturb(state, shared, seed + 1 + i, scale), tokenizer, path)
    marker.write_text(f"{seed}:{scale}:{n_variants}")
    return family


# --------------------------------------------------------------------------- checkpoints I/O


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors checkpoint folder (single file or sharded)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- subprocesses


@dataclass(frozen=True)
class RunResult:
    cmd: tuple[str, ...]
    returncode: int
    seconds: float
    output: str  # stdout + stderr, for error reports

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.output.strip().splitlines()[-lines:])


def run(cmd: Sequence[str | os.PathLike], timeout: float = 600, env: Mapping[str, str] | None = None,
        cwd: Path | None = None) -> RunResult:
    """Run a command offline with one CPU thread; never raises on a non-zero exit."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    argv = tuple(str(c) for c in cmd)
    start = time.perf_counter()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=full_env, cwd=cwd or REPO_ROOT)
        code, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out = 124, f"timed out after {timeout}s\n{exc.stdout or ''}{exc.stderr or ''}"
    except FileNotFoundError as exc:
        code, out = 127, str(exc)
    return RunResult(argv, code, time.perf_counter() - start, out)


@dataclass(frozen=True)
class Usage:
    """One command's wall seconds, CPU seconds (user + system), peak RSS (bytes) and stdout."""

    seconds: float
    cpu_seconds: float
    peak_rss: int
    stdout: str


def run_with_usage(cmd: Sequence[str | os.PathLike], env: Mapping[str, str] | None = None) -> Usage:
    """Run one command and measure it as GNU time does (`/usr/bin/time`, Debian's `time`);
    raises with the command's stderr on a non-zero exit.

    Not os.wait4 on a child of this process: Python starts children with vfork, so a child's
    maximum resident set starts at this (large) process's high-water mark; GNU time forks the
    command from its own small process, so the figure is the command's own.
    """
    import shlex
    import tempfile

    argv = [str(c) for c in cmd]
    with tempfile.NamedTemporaryFile("r", suffix=".time") as usage:
        start = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", "-o", usage.name, *argv], env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        user, system, max_kb = usage.read().split()[-3:]
    return Usage(wall, float(user) + float(system), int(max_kb) * 1024, proc.stdout)


def bench_tool(name: str) -> Path:
    """Path of a console script in the peer venv (e.g. `mergekit-yaml`), checked to exist."""
    path = BENCH_VENV / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `make bench-env` first")
    return path


def fusionbench_python() -> Path:
    """The interpreter of the FusionBench venv (`make fusionbench-env`), checked to exist."""
    path = FUSIONBENCH_VENV / "bin" / "python"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `make fusionbench-env` first")
    return path


def main_tool(name: str) -> Path:
    """Path of a console script in the main venv (e.g. `mergelab`)."""
    path = MAIN_VENV / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run `make venv` first")
    return path


def run_in_bench_venv(args: Sequence[str | os.PathLike], timeout: float = 600) -> RunResult:
    """Run `args[0]` from .bench-venv/bin with the remaining arguments."""
    return run([bench_tool(str(args[0])), *args[1:]], timeout=timeout)


@contextmanager
def timer() -> Iterator[dict[str, float]]:
    """`with timer() as t: ...` then `t["seconds"]`."""
    box: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["seconds"] = time.perf_counter() - start


def replace_docs_section(name: str, body: str, heading: str | None = None) -> None:
    """Write `body` between docs/benchmarks.md's `<!-- NAME:start -->` and `<!-- NAME:end -->`
    markers; when they are missing, append them under `heading` (None: an error)."""
    docs = REPO_ROOT / "docs" / "benchmarks.md"
    text = docs.read_text() if docs.exists() else "# Benchmarks\n"
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    elif heading is not None:
        text += f"\n## {heading}\n\n{block}\n"
    else:
        raise SystemExit(f"{docs} has no {start} ... {end} section to update")
    docs.write_text(text)
