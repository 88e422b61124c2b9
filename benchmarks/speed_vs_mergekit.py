"""Speed and peak memory of `mergelab merge` against `mergekit-yaml`, side by side, same machine.

Builds three Llama-shaped bf16 checkpoints (a base and two fine-tune-like variants; random
seeded weights), then for each method times both tools on the same YAML, alternating runs, and
takes the median of `--repeats` runs. Peak RSS is GNU time's "Maximum resident set size" of each
command (`/usr/bin/time`, which forks it from its own small process: a child of this script
would start from this script's high-water mark). The I/O floor is
measured in the same run: reading the inputs from the page cache plus writing one output-sized
file with fsync.

    make bench-env                       # mergekit 0.1.5 in its own venv
    .venv/bin/python benchmarks/speed_vs_mergekit.py --size 505m --size 100m --repeats 3

Run it alone: two CPU-heavy jobs at once on 2 cores distort both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import BENCH_VENV, MAIN_VENV, replace_docs_section, run_with_usage  # noqa: E402

CACHE = Path(os.environ.get("MERGELAB_CACHE", Path.home() / ".cache" / "mergelab")) / "bench"

# name -> (hidden, intermediate, layers, vocab)
SIZES = {
    "505m": (1024, 4096, 24, 50000),
    "100m": (512, 2048, 12, 50000),
}


@dataclass(frozen=True)
class Family:
    name: str
    base: Path
    variants: tuple[Path, Path]
    params: int
    bytes_per_model: int


def _llama_shapes(hidden: int, inter: int, layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def build_family(size: str, seed: int = 0) -> Family:
    """Build (once; cached, atomic) a bf16 base and two variants of the given size."""
    from safetensors.torch import save_file

    hidden, inter, layers, vocab = SIZES[size]
    shapes = _llama_shapes(hidden, inter, layers, vocab)
    params = sum(int(torch.tensor(s).prod()) for s in shapes.values())
    root = CACHE / f"llama-{size}-seed{seed}"
    names = ("base", "ft1", "ft2")
    fam = Family(size, root / "base", (root / "ft1", root / "ft2"), params, params * 2)
    if (root / ".complete").exists():
        return fam
    tmp = root.with_name(root.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": 16,
        "num_key_value_heads": 16, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    gen = torch.Generator().manual_seed(seed)
    base = {n: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for n, s in shapes.items()}
    for k, name in enumerate(names):
        folder = tmp / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        if k == 0:
            sd = base
        else:
            g = torch.Generator().manual_seed(seed + k)
            sd = {n: (t.float() + torch.randn(t.shape, generator=g) * 0.002).to(torch.bfloat16)
                  for n, t in base.items()}
        # two shards per model, as a hub checkpoint of this size would be
        keys = list(sd)
        half = len(keys) // 2
        weight_map = {}
        for i, part in enumerate((keys[:half], keys[half:])):
            fname = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file({n: sd[n] for n in part}, str(folder / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": params * 2}, "weight_map": weight_map})
        )
        del sd
    tmp.rename(root)
    (root / ".complete").write_text("ok")
    return fam


def configs(fam: Family) -> dict[str, dict]:
    b, (m1, m2) = str(fam.base), (str(fam.variants[0]), str(fam.variants[1]))
    common = {"base_model": b, "dtype": "bfloat16"}
    return {
        "ties": {**common, "merge_method": "ties", "parameters": {"lambda": 1.0},
                 "models": [{"model": m1, "parameters": {"weight": 0.5, "density": 0.5}},
                            {"model": m2, "parameters": {"weight": 0.5, "density": 0.5}}]},
        "linear": {"merge_method": "linear", "dtype": "bfloat16",
                   "models": [{"model": m, "parameters": {"weight": 1 / 3}} for m in (b, m1, m2)]},
        "dare_ties": {**common, "merge_method": "dare_ties", "parameters": {"lambda": 1.0},
                      "models": [{"model": m1, "parameters": {"weight": 0.5, "density": 0.5}},
                                 {"model": m2, "parameters": {"weight": 0.5, "density": 0.5}}]},
        "slerp": {**common, "merge_method": "slerp", "parameters": {"t": 0.5},
                  "models": [{"model": m1}]},
    }


def merge_seconds(stdout: str) -> float:
    """The merge's own time as `mergelab merge` reports it (without interpreter start-up)."""
    match = re.search(r"in ([0-9.]+) s", " ".join(stdout.split()))
    return float(match.group(1)) if match else float("nan")


def startup_seconds(repeats: int, module: str = "mergelab.cli") -> float:
    """Interpreter start-up and imports of `module` (the mergelab CLI: paid by every run;
    torch: what any Python merging tool pays)."""
    cmd = [str(MAIN_VENV / "bin" / "python"), "-c", f"import {module}"]
    return statistics.median(run_with_usage(cmd).seconds for _ in range(repeats))


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, torch {torch.__version__}"


def drop_output(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def io_floor(fam: Family, out: Path) -> tuple[float, float]:
    """Seconds to read the three inputs (page cache) and to write + fsync one output."""
    files = [f for d in (fam.base, *fam.variants) for f in sorted(d.glob("*.safetensors"))]
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    read = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    target = out / "floor.bin"
    t0 = time.perf_counter()
    with open(target, "wb", buffering=0) as fh:
        remaining = fam.bytes_per_model
        while remaining > 0:
            n = min(len(buf), remaining)
            fh.write(view[:n])
            remaining -= n
        os.fsync(fh.fileno())
    write = time.perf_counter() - t0
    target.unlink()
    return read, write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", action="append", choices=sorted(SIZES), help="model size(s)")
    ap.add_argument("--method", action="append", help="methods (default: ties linear dare_ties slerp)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args()
    sizes = args.size or ["505m"]
    methods = args.method or ["ties", "linear", "dare_ties", "slerp"]
    work = CACHE / "runs"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    mergekit = BENCH_VENV / "bin" / "mergekit-yaml"
    mergelab = MAIN_VENV / "bin" / "mergelab"
    if not args.skip_mergekit and not mergekit.exists():
        sys.exit("mergekit is not installed: run `make bench-env` first")
    rows = []
    load_start = os.getloadavg()[0]
    startup = startup_seconds(args.repeats)
    torch_import = startup_seconds(args.repeats, "torch")
    print(f"start-up of the mergelab CLI (python + imports): {startup:.2f} s; "
          f"python + import torch: {torch_import:.2f} s")
    for size in sizes:
        fam = build_family(size)
        print(f"== {size}: {fam.params / 1e6:.0f}M parameters, {fam.bytes_per_model / 1e9:.2f} GB per model")
        for method in methods:
            cfg_path = work / f"{size}-{method}.yml"
            cfg_path.write_text(yaml.safe_dump(configs(fam)[method]))
            ours, theirs, floors = [], [], []
            for _ in range(args.repeats):
                out = work / "out"
                # the floor is measured beside every run, so it sees the same machine state
                floors.append(io_floor(fam, work / "floor"))
                if not args.skip_mergekit:
                    drop_output(out)
                    theirs.append(run_with_usage([str(mergekit), str(cfg_path), str(out)], env))
                drop_output(out)
                ours.append(run_with_usage([str(mergelab), "merge", str(cfg_path), str(out), "--no-progress"], env))
                drop_output(out)
            read_floor = statistics.median(r for r, _ in floors)
            write_floor = statistics.median(w for _, w in floors)
            row = {
                "size": size, "method": method, "params_m": round(fam.params / 1e6),
                "mergelab_s": statistics.median(u.seconds for u in ours),
                "mergelab_merge_s": statistics.median(merge_seconds(u.stdout) for u in ours),
                "mergelab_rss_gb": max(u.peak_rss for u in ours) / 1e9,
                "floor_read_s": read_floor, "floor_write_s": write_floor,
                "floor_s": read_floor + write_floor,
                "limit_s": torch_import + read_floor + write_floor,
            }
            if theirs:
                row["mergekit_s"] = statistics.median(u.seconds for u in theirs)
                row["mergekit_rss_gb"] = max(u.peak_rss for u in theirs) / 1e9
            rows.append(row)
            print(json.dumps(row))
    table = render(rows, startup, torch_import)
    print(table)
    if args.write_docs:
        write_docs(table, sizes, methods, args.repeats, (load_start, os.getloadavg()[0]))


def render(rows: list[dict], startup: float, torch_import: float) -> str:
    lines = [
        "| size | method | mergekit s | mergelab s | speed-up | mergelab merge s (no start-up) "
        "| I/O floor s (read + write/fsync) | limit s (torch import + floor) | mergelab / limit "
        "| peak RSS GB mergekit | peak RSS GB mergelab |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mk = r.get("mergekit_s")
        mk_cell = "-" if mk is None else f"{mk:.1f}"
        speedup = "-" if mk is None else f"{mk / r['mergelab_s']:.1f}x"
        mk_rss = r.get("mergekit_rss_gb")
        mk_rss_cell = "-" if mk_rss is None else f"{mk_rss:.2f}"
        lines.append(
            f"| {r['params_m']}M | {r['method']} | {mk_cell} | {r['mergelab_s']:.1f} | {speedup} | "
            f"{r['mergelab_merge_s']:.1f} | {r['floor_s']:.2f} ({r['floor_read_s']:.2f} + "
            f"{r['floor_write_s']:.2f}) | {r['limit_s']:.2f} | "
            f"{r['mergelab_s'] / r['limit_s']:.2f}x | "
            f"{mk_rss_cell} | {r['mergelab_rss_gb']:.2f} |"
        )
    lines.append("")
    lines.append(f"Start-up of the mergelab CLI (Python + torch + imports), included in "
                 f"`mergelab s`: {startup:.2f} s; Python + `import torch` alone (in the limit): "
                 f"{torch_import:.2f} s.")
    return "\n".join(lines)


def write_docs(
    table: str, sizes: list[str], methods: list[str], repeats: int, loads: tuple[float, float]
) -> None:
    command = (
        "make bench-env && .venv/bin/python benchmarks/speed_vs_mergekit.py "
        + " ".join(f"--size {s}" for s in sizes)
        + f" --repeats {repeats} --write-docs"
    )
    busy = ("" if max(loads) < (os.cpu_count() or 1) else
            " (above the core count: other jobs shared the machine, the timings are indicative)")
    header = (
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}, no GPU. "
        f"Reproduce with `{command}`. Three Llama-shaped bf16 checkpoints per size (a base and "
        "two variants, random seeded weights, two shards each), methods "
        f"{', '.join(methods)}; each cell is the median of {repeats} runs, mergekit and mergelab "
        "alternating, peak RSS the maximum (the kernel's accounting of each process, as GNU "
        "time reports it). The I/O floor is measured beside every run: reading the three inputs "
        "from the page cache plus writing and fsyncing one output-sized file. 1-minute load "
        f"average {loads[0]:.1f} at the start and {loads[1]:.1f} at the end{busy}."
    )
    replace_docs_section("speed", f"{header}\n\n{table}", heading="Speed and memory vs mergekit")


if __name__ == "__main__":
    main()
