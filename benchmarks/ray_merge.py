"""A merge on this machine against the same merge on a local Ray cluster of 1 and 2 workers.

The inputs are the synthetic Llama-shaped bf16 families of benchmarks/speed_vs_mergekit.py
(`build_family`: a base and two variants, cached). For each size, the whole `mergelab merge`
command is timed (a child process, start-up included): once without Ray, then with
`--ray-address` on a local cluster started here (`ray.cluster_utils.Cluster`: a head node that
runs no task and 1 or 2 worker nodes of 1 CPU each; the cluster's own start-up is not timed).
Every Ray output is compared byte for byte with the local one. The output is cut into shards
of `--shard-size` so the shards can be spread. The per-shard costs behind the docs' "scale on
paper" (read, merge and write seconds per GB, from the local merge's `--profile`, and the
CRC-32 a worker and then the driver compute over every shard) are measured in the same run.

    .venv/bin/python benchmarks/ray_merge.py --size 100m --size 505m --write-docs

Run it alone: on 2 cores, two CPU-heavy jobs at once distort both.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's mergelab
from _common import REPO_ROOT, replace_docs_section  # noqa: E402
from speed_vs_mergekit import CACHE, build_family, configs, machine  # noqa: E402

SHARD_SIZE = {"100m": "50MB", "505m": "100MB"}
LABEL = {"100m": "102M", "505m": "505M"}


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}"
                           f"\n{done.stderr[-3000:]}")  # fmt: skip
    return wall, done.stdout


def profile(stdout: str) -> dict[str, float]:
    """The phases of `mergelab merge --profile` (seconds) and the merge's own wall time."""
    text = " ".join(stdout.split())
    out = {"merge": float(re.search(r"in ([0-9.]+) s \(", text).group(1))}
    for key, label in (("read", "read"), ("compute", "merge kernels"), ("write", "write")):
        match = re.search(rf"{label}(?: \([^)]*\))?\s*\W\s*([0-9.]+)", text)
        out[key] = float(match.group(1)) if match else float("nan")
    return out


def same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def crc_seconds_per_gb(folder: Path) -> float:
    """CRC-32 of every shard as the worker and the driver compute it (page cache)."""
    from mergelab.checkpoint.writer import file_crc32

    files = sorted(folder.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in files)
    start = time.perf_counter()
    for f in files:
        file_crc32(f)
    return (time.perf_counter() - start) / (size / 1e9)


def start_cluster(workers: int):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(workers):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    return cluster


def measure(size: str, method: str, work: Path, env: dict[str, str]) -> dict:
    fam = build_family(size)
    config = work / f"{size}-{method}.yml"
    config.write_text(yaml.safe_dump(configs(fam)[method]))
    cli = [sys.executable, "-m", "mergelab.cli", "merge", str(config)]
    shard = ["--out-shard-size", SHARD_SIZE[size], "--no-progress", "--profile"]
    local = work / f"{size}-local"
    shutil.rmtree(local, ignore_errors=True)
    wall, stdout = run([*cli, str(local), *shard], env)
    phases = profile(stdout)
    shards = len(list(local.glob("*.safetensors")))
    row = {"size": size, "method": method, "params": fam.params, "shards": shards,
           "out_gb": sum(f.stat().st_size for f in local.glob("*.safetensors")) / 1e9,
           "local_s": wall, "local_merge_s": phases["merge"], "phases": phases,
           "crc_s_per_gb": crc_seconds_per_gb(local), "ray": {}}  # fmt: skip
    print(f"{size} {method}: local {wall:.1f} s (merge {phases['merge']:.1f} s), {shards} shards")
    for workers in (1, 2):
        cluster = start_cluster(workers)
        try:
            out = work / f"{size}-ray{workers}"
            shutil.rmtree(out, ignore_errors=True)
            wall, stdout = run([*cli, str(out), *shard, "--ray-address", cluster.address], env)
            identical = same_bytes(local, out)
            row["ray"][workers] = {"s": wall, "merge_s": profile(stdout)["merge"],
                                   "identical": identical}  # fmt: skip
            print(f"  ray x{workers}: {wall:.1f} s (merge {row['ray'][workers]['merge_s']:.1f} s), "
                  f"bit-identical: {identical}")
            shutil.rmtree(out, ignore_errors=True)
        finally:
            cluster.shutdown()
    shutil.rmtree(local, ignore_errors=True)
    return row


def table(rows: list[dict]) -> str:
    lines = [
        "| set | method | output shards | local s | Ray, 1 worker s | Ray, 2 workers s | "
        "merge s: local / 1 / 2 (no start-up) | bit-identical |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        one, two = r["ray"][1], r["ray"][2]
        same = "yes" if one["identical"] and two["identical"] else "**no**"
        lines.append(
            f"| {LABEL[r['size']]} ({r['out_gb']:.2f} GB out) | {r['method']} | {r['shards']} | "
            f"{r['local_s']:.1f} | {one['s']:.1f} | {two['s']:.1f} | "
            f"{r['local_merge_s']:.1f} / {one['merge_s']:.1f} / {two['merge_s']:.1f} | {same} |"
        )
    return "\n".join(lines)


def costs(rows: list[dict]) -> str:
    """Per-GB costs of the largest set, for the projection."""
    r = max(rows, key=lambda r: r["params"])
    gb_in, gb_out = 3 * r["out_gb"], r["out_gb"]
    p = r["phases"]
    return (
        f"Per-shard costs measured on the {LABEL[r['size']]} set (local merge, `--profile`; "
        f"phases overlap across threads): reading {p['read'] / gb_in:.2f} s per GB of input, "
        f"merge kernels ({r['method']}) {p['compute'] / gb_out:.2f} thread-seconds per GB of output, "
        f"writing {p['write'] / gb_out:.2f} s per GB of output; the whole merge "
        f"{r['local_merge_s'] / gb_out:.1f} s per GB of output on this 2-core machine; CRC-32 "
        f"{r['crc_s_per_gb']:.2f} s per GB on one thread (paid twice: the worker, then the driver)."
    )


# Three 405B-parameter bf16 checkpoints (Llama 3.1 405B: 126 layers, hidden 16384, vocabulary
# 128256), merged into one, in the default 5 GB shards. What a cluster adds that this machine
# cannot measure is stated as assumptions: a 25 Gb/s NIC per node and a shared file system
# serving 40 GB/s in all; each node is taken to be this machine (2 cores), running 2 tasks.
P405_GB = 405e9 * 2 / 1e9
P405_SHARDS = 163  # 810 GB in 5 GB shards (the largest tensor, 4.2 GB, fits one)
P405_LARGEST_GB = 128256 * 16384 * 2 / 1e9
NIC_GB_S = 25 / 8
STORAGE_GB_S = 40.0
DRIVER_THREADS = 2


def projection(rows: list[dict]) -> str:
    """Projected wall time of merging three 405B checkpoints on 1, 8 and 64 nodes, from the
    measured per-GB costs, and what bounds each."""
    r = max(rows, key=lambda r: r["params"])
    node_s_per_gb = r["local_merge_s"] / r["out_gb"] + r["crc_s_per_gb"]  # merge + worker CRC
    overhead = r["ray"][1]["s"] - r["local_s"]  # connect, probe, a worker's start-up and re-plan
    shard_gb = P405_GB / P405_SHARDS
    driver_gb_s = min(NIC_GB_S, DRIVER_THREADS / r["crc_s_per_gb"])
    lines = [
        "| nodes | shards on the busiest node | merging on the nodes s | node network s "
        "(3 reads + 1 write per output byte) | shared storage s (inputs, output, driver re-read) "
        "| driver re-check s | projected wall | bound |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for nodes in (1, 8, 64):
        busiest = -(-P405_SHARDS // nodes)
        bounds = {
            "merging on the nodes (CPU: this machine's per-GB cost)": busiest * shard_gb * node_s_per_gb,
            "node network": busiest * shard_gb * 4 / NIC_GB_S,
            "shared storage": (3 * P405_GB + 2 * P405_GB) / STORAGE_GB_S,
            "the driver's re-check of every shard": P405_GB / driver_gb_s,
        }
        name, worst = max(bounds.items(), key=lambda kv: kv[1])
        # The last shard is checked after its task ends; everything else overlaps.
        total = worst + shard_gb / driver_gb_s + overhead
        values = list(bounds.values())
        lines.append(
            f"| {nodes} | {busiest} | {values[0]:,.0f} | {values[1]:,.0f} | {values[2]:,.0f} | "
            f"{values[3]:,.0f} | {_duration(total)} | {name} |"
        )
    return (
        f"Projected from those costs for three 405B-parameter bf16 checkpoints "
        f"({3 * P405_GB:,.0f} GB read, {P405_GB:,.0f} GB written in {P405_SHARDS} shards of 5 GB; "
        f"largest tensor {P405_LARGEST_GB:.1f} GB), each node like this machine "
        f"({node_s_per_gb:.1f} s per GB of output: merge plus the worker's CRC-32), a "
        f"{NIC_GB_S * 8:.0f} Gb/s NIC per node, a shared file system of {STORAGE_GB_S:.0f} GB/s "
        f"and a driver checking shards on {DRIVER_THREADS} threads "
        f"({driver_gb_s:.1f} GB/s); fixed cost {overhead:.1f} s (connect, probe, a worker's "
        f"start-up, measured above). Assumed, not measured: the NIC and the file system.\n\n"
        + "\n".join(lines)
    )


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", action="append", choices=sorted(SHARD_SIZE), help="model size(s)")
    ap.add_argument("--method", default="ties")
    ap.add_argument("--write-docs", action="store_true", help="update docs/benchmarks.md")
    args = ap.parse_args()
    sizes = args.size or ["100m", "505m"]
    work = CACHE / "ray-runs"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    os.environ["PYTHONPATH"] = env["PYTHONPATH"]  # the cluster's workers import mergelab too
    load_start = os.getloadavg()[0]
    rows = [measure(size, args.method, work, env) for size in sizes]
    load_end = os.getloadavg()[0]
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = "`.venv/bin/python benchmarks/ray_merge.py " + " ".join(f"--size {s}" for s in sizes)
    command += f" --method {args.method} --write-docs`" if args.method != "ties" else " --write-docs`"
    busy = ("" if max(load_start, load_end) < (os.cpu_count() or 1) else
            " (above the core count: other jobs shared the machine, the timings are indicative)")  # fmt: skip
    body = (
        f"Measured {stamp} on {machine()}, ray {_ray_version()}. Reproduce with {command}. "
        f"Whole `mergelab merge` commands (start-up included), one run each; the Ray cluster is "
        f"local (a head that runs no task plus 1 or 2 worker nodes of 1 CPU each, "
        f"`ray.cluster_utils.Cluster`), started before the timed command. Output shards of "
        + ", ".join(f"{SHARD_SIZE[s]} ({LABEL[s]})" for s in sizes)
        + f". 1-minute load average {load_start:.1f} at the start and {load_end:.1f} at the "
        f"end{busy}.\n\n{table(rows)}\n\n{costs(rows)}\n\n{projection(rows)}"
    )
    print(body)
    if args.write_docs:
        replace_docs_section("ray", body, heading="Merging on a Ray cluster")


def _ray_version() -> str:
    import ray

    return ray.__version__


if __name__ == "__main__":
    main()
