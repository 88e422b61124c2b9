"""The merge over a Ray cluster (`--ray-address`): the same bytes as a merge in one process,
on local clusters of one and two worker nodes started here; a worker killed mid-merge (SIGKILL)
and a node lost mid-merge still end in a complete, verified output; a driver killed mid-merge
leaves nothing that looks finished; an unreachable address, inputs a node cannot see and an
output folder only the driver sees are errors naming the address or path before any tensor is
merged. The shard assignment and the writer's shard hand-over are checked without Ray.

One cluster (a head without CPUs plus one or two 1-CPU worker nodes) serves the whole file;
the tests on one worker node come first, so the second node starts once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergelab import api
from mergelab.checkpoint import ShardedWriter, ShardFileWriter
from mergelab.engine.distributed import assign_shards
from mergelab.errors import CheckpointError

SRC = Path(__file__).resolve().parents[1] / "src"


# --------------------------------------------------------------------------- without Ray


def test_shards_are_assigned_longest_first_to_the_lightest_task():
    # By hand: 5 -> task 0; 4 -> task 1; 3 -> task 1 (4 < 5); 2 -> task 0 (5 < 7);
    # 1 -> task 0 (7 = 7: the lower task), so task 0 holds shards 0, 1, 3 (8 bytes), task 1
    # shards 2, 4 (7 bytes).
    assert assign_shards([5, 1, 4, 2, 3], 2) == [[0, 1, 3], [2, 4]]
    assert assign_shards([5, 1, 4, 2, 3], 1) == [[0, 1, 2, 3, 4]]
    assert assign_shards([3, 3, 3], 8) == [[0], [1], [2]]  # never more tasks than shards
    # Equal sizes alternate, whatever the count: deterministic.
    assert assign_shards([2, 2, 2, 2], 2) == [[0, 2], [1, 3]]
    assert assign_shards([], 3) == []
    with pytest.raises(ValueError, match="at least 1"):
        assign_shards([1], 0)


def _entries():
    return [(f"t{i}", (4, 3), torch.float32) for i in range(5)] + [("h", (8,), torch.bfloat16)]


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(shape, generator=g).to(dtype) for name, shape, dtype in _entries()}


def test_shards_written_elsewhere_are_the_same_bytes_and_are_checked(tmp_path):
    """Shards written by ShardFileWriters (as Ray workers do) and adopted are byte for byte
    the shards one ShardedWriter writes; a shard whose bytes changed after its receipt, or one
    never adopted, keeps the output from being committed."""
    tensors = _tensors()
    with ShardedWriter(tmp_path / "one", _entries(), max_shard_size=100) as writer:
        for name, tensor in tensors.items():
            writer.write(name, tensor)
        writer.commit()
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert len([f for f in files if f.endswith(".safetensors")]) == 3  # 48 + 48 > 100 bytes

    with ShardedWriter(tmp_path / "spread", _entries(), max_shard_size=100,
                       shards_elsewhere=True) as writer:  # fmt: skip
        layout = writer.layout
        assert not any(writer.tmp_dir.iterdir())  # no shard is written by this writer
        receipts = []
        for group in (layout.file_names[:1], layout.file_names[1:]):
            part = ShardFileWriter(layout, group)
            other = layout.names_of([f for f in layout.file_names if f not in group])[0]
            with pytest.raises(CheckpointError, match="is not in the output plan"):
                part.write(other, tensors[other])  # a tensor of a shard it does not write
            for name in reversed(layout.names_of(group)):  # any order
                part.write(name, tensors[name])
            receipts += part.finish()
        for receipt in receipts:
            writer.adopt(receipt)
        writer.commit()
    for name in files:
        assert (tmp_path / "spread" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name

    with ShardedWriter(tmp_path / "bad", _entries(), max_shard_size=100,
                       shards_elsewhere=True) as writer:  # fmt: skip
        part = ShardFileWriter(writer.layout, writer.layout.file_names)
        for name, tensor in tensors.items():
            part.write(name, tensor)
        first, *others = part.finish()
        shard = writer.tmp_dir / first.file_name
        data = bytearray(shard.read_bytes())
        data[-1] ^= 0x01  # one bit of the last tensor flipped after the worker's checksum
        shard.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match=rf"shard .*{first.file_name} does not check out: CRC-32"):
            writer.adopt(first)
        for receipt in others:
            writer.adopt(receipt)
        with pytest.raises(CheckpointError, match=r"2 planned tensor\(s\) were never written"):
            writer.commit()
        writer.abort()
    assert not (tmp_path / "bad").exists()
    with ShardedWriter(tmp_path / "own", _entries(), max_shard_size=100) as writer:
        with pytest.raises(CheckpointError, match="writes its own shards"):
            writer.adopt(first)
        writer.abort()


def test_an_unfinished_shard_writer_leaves_no_shard(tmp_path):
    with ShardedWriter(tmp_path / "out", _entries(), max_shard_size=100,
                       shards_elsewhere=True) as writer:  # fmt: skip
        part = ShardFileWriter(writer.layout, writer.layout.file_names[:1])
        part.write("t0", _tensors()["t0"])
        with pytest.raises(CheckpointError, match="never written"):
            part.finish()
        assert [p.name for p in writer.tmp_dir.iterdir()][0].endswith(".part")
        part.abort()
        assert not any(writer.tmp_dir.iterdir())
        writer.abort()


# --------------------------------------------------------------------------- the tiny model


def _save_model(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "torch_dtype": "bfloat16"}))
    return folder


def build_family(root: Path, rows: int = 64, layers: int = 4) -> dict:
    """A base and two fine-tune-like variants (bf16, seeded) and a TIES config over them;
    `rows` x 32 per weight, so an output shard size of `rows` x 32 x 2 x 2 holds two."""
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (rows, 32), "model.norm.weight": (32,)}
    for i in range(layers):
        shapes |= {f"model.layers.{i}.self_attn.q_proj.weight": (rows, 32),
                   f"model.layers.{i}.mlp.up_proj.weight": (rows, 32)}  # fmt: skip
    base = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
    folders = []
    for k in range(3):
        tensors = base if k == 0 else {n: t + torch.randn(t.shape, generator=g) * 0.01
                                       for n, t in base.items()}  # fmt: skip
        folders.append(_save_model(root / f"m{k}", {n: t.to(torch.bfloat16) for n, t in tensors.items()}))
    return {
        "merge_method": "dare_ties", "base_model": str(folders[0]), "dtype": "bfloat16",
        "parameters": {"lambda": 1.0},
        "models": [{"model": str(f), "parameters": {"weight": 0.5, "density": 0.6}} for f in folders[1:]],
    }  # fmt: skip


def assert_same_files(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("model-*.safetensors"))


# --------------------------------------------------------------------------- the cluster


class LocalCluster:
    """A head node without CPUs (it runs no task) and `ensure(n)` 1-CPU worker nodes."""

    def __init__(self, ray):
        from ray.cluster_utils import Cluster

        self.ray = ray
        # Lost nodes are noticed within about a second (Ray's default is about 15 s).
        config = {"health_check_period_ms": 200, "health_check_timeout_ms": 500,
                  "health_check_failure_threshold": 3}  # fmt: skip
        self.cluster = Cluster(initialize_head=True,
                               head_node_args={"num_cpus": 0, "_system_config": config})  # fmt: skip
        self.workers: list = []
        ray.init(address=self.cluster.address, log_to_driver=False)

    @property
    def address(self) -> str:
        return self.cluster.address

    def ensure(self, count: int) -> None:
        while len(self.workers) < count:
            self.workers.append(self.cluster.add_node(num_cpus=1))
        while len(self.workers) > count:
            self.cluster.remove_node(self.workers.pop())
        self.cluster.wait_for_nodes()

    def lose(self, node) -> None:
        self.workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def shutdown(self) -> None:
        self.ray.shutdown()
        self.cluster.shutdown()


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="ray is not installed: `pip install 'mergelab[ray]'`")
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(SRC), saved or ""])  # the nodes' workers
    local = LocalCluster(ray)
    yield local
    local.shutdown()
    if saved is None:
        del os.environ["PYTHONPATH"]
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """The tiny family, its single-process merge (the reference) and the shard size that gives
    it five output shards."""
    root = tmp_path_factory.mktemp("family")
    config = build_family(root / "in")
    # A config file naming its models relative to its folder (or, for a Ray worker, to the
    # driver's current folder): each worker resolves them as the driver does.
    config["base_model"] = "m0"
    config["models"][0]["model"], config["models"][1]["model"] = "./m1", "m2"
    (root / "in" / "merge.yml").write_text(yaml.safe_dump(config))
    api.merge(root / "in" / "merge.yml", root / "local", out_shard_size=64 * 32 * 2 * 2,
              progress=False)  # fmt: skip
    assert len(_shards(root / "local")) == 5
    return root, str(root / "in" / "merge.yml")


def _merge_workers() -> list[int]:
    """Pids of Ray workers running a merge task now (their process title names the task)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"ray::mergelab-merge-shards"):
                pids.append(int(proc.name))
    return pids


def _unfinished_parts(parent: Path) -> list[Path]:
    return [p for d in parent.glob(".out.partial-*") for p in d.glob(".*.part")]


def _stop_inside_a_shard(parent: Path, timeout: float = 90.0) -> list[int]:
    """Wait until a merge worker is writing a shard (its unfinished file exists), stop every
    merge worker (SIGSTOP) and return their pids once the file is seen to still be there, so
    the shard is stopped midway."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _unfinished_parts(parent):
            pids = _merge_workers()
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            if pids and _unfinished_parts(parent):
                return pids
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        time.sleep(0.001)
    raise AssertionError("no merge worker was seen writing a shard")


@pytest.mark.parametrize("retries", [3, 0], ids=["ray-retries", "driver-reassigns"])
def test_a_worker_killed_mid_merge_still_ends_in_a_complete_verified_output(
    cluster, family, tmp_path, monkeypatch, retries
):
    """Ray runs the killed task again; with Ray's retries off, the driver hands the task's
    shards out again itself, one task each, and says so."""
    from concurrent.futures import ThreadPoolExecutor

    from mergelab.engine import distributed

    root, config = family
    cluster.ensure(1)
    monkeypatch.setattr(distributed, "TASK_RETRIES", retries)

    with ThreadPoolExecutor(1) as pool:
        merging = pool.submit(api.merge, config, tmp_path / "out", out_shard_size=64 * 32 * 2 * 2,
                              progress=False, ray_address=cluster.address)  # fmt: skip
        stopped = _stop_inside_a_shard(tmp_path)
        assert not (tmp_path / "out").exists()
        for pid in stopped:
            os.kill(pid, signal.SIGKILL)
        report = merging.result(timeout=120)
    assert_same_files(root / "local", tmp_path / "out")  # the task ran again, in full
    assert not _unfinished_parts(tmp_path)
    reassigned = [n for n in report.notes if n.startswith("reassigned")]
    if retries:
        assert reassigned == []
    else:  # the one task held all five shards: each is now a task of its own
        assert reassigned == ["reassigned after a lost worker or a shard that did not check out: "
                              + ", ".join(_shards(root / "local"))]
        assert any("5 shard(s) in 1 task(s)" in n for n in report.notes)


def _node_of(node, pids: list[int]) -> bool:
    """Whether one of `pids` is a worker of `node` (a child of its raylet)."""
    raylets = {p.process.pid for p in node.all_processes.get("raylet", [])}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) in raylets:
            return True
    return False


def _driver(script: str, tmp_path: Path, *, private: Path | None = None) -> subprocess.Popen:
    """A driver process running `script`; with `private`, inside its own mount namespace where
    `private` is a tmpfs that no Ray node sees (storage only the driver sees)."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    (tmp_path / "driver.py").write_text(textwrap.dedent(script))
    command = [sys.executable, str(tmp_path / "driver.py")]
    if private is not None:
        private.mkdir(exist_ok=True)
        command = ["unshare", "-m", "sh", "-c", f'mount -t tmpfs none "{private}" && exec "$@"',
                   "driver", *command]  # fmt: skip
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)  # fmt: skip


def test_a_driver_killed_mid_merge_leaves_no_finished_looking_output(cluster, family, tmp_path):
    root, config = family
    cluster.ensure(1)
    driver = _driver(f"""
        from mergelab import api
        api.merge({config!r}, {str(tmp_path / "out")!r}, out_shard_size={64 * 32 * 2 * 2},
                  progress=False, ray_address={cluster.address!r})
    """, tmp_path)
    stopped = _stop_inside_a_shard(tmp_path)
    driver.kill()
    driver.wait()
    for pid in stopped:
        os.kill(pid, signal.SIGCONT)
    time.sleep(1.0)  # the job's workers, if still alive, may finish their shard meanwhile
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["driver.py"]
    # The next merge into the same folder clears what the dead driver left and completes.
    api.merge(config, tmp_path / "out", out_shard_size=64 * 32 * 2 * 2, progress=False,
              ray_address=cluster.address)  # fmt: skip
    assert_same_files(root / "local", tmp_path / "out")
    assert not list(tmp_path.glob(".out.partial-*"))


def test_an_unreachable_ray_address_is_an_error_naming_it(cluster, family, tmp_path):
    from typer.testing import CliRunner

    from mergelab.cli import app

    _, config = family
    done = CliRunner().invoke(app, ["merge", config, str(tmp_path / "out"),
                                    "--ray-address", "127.0.0.1:1", "--no-progress"])  # fmt: skip
    assert done.exit_code != 0
    assert "cannot connect to the Ray cluster at '127.0.0.1:1'" in " ".join(done.output.split())
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


@pytest.mark.parametrize("nodes", [1, 2])
def test_merge_on_ray_is_the_single_process_merge_byte_for_byte(
    cluster, family, tmp_path, monkeypatch, nodes
):
    root, config = family
    cluster.ensure(nodes)
    monkeypatch.chdir(root)  # the config's path relative to the driver's current folder
    report = api.merge(os.path.relpath(config, root), tmp_path / "out",
                       out_shard_size=64 * 32 * 2 * 2, progress=False,
                       ray_address=cluster.address)  # fmt: skip
    assert_same_files(root / "local", tmp_path / "out")
    assert report.tensors == 10
    assert any(f"5 shard(s) in {nodes} task(s) over {nodes} node(s) of {nodes}" in n
               for n in report.notes), report.notes  # fmt: skip
    assert not list(tmp_path.glob(".out*"))  # nothing left beside the output


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


def test_inputs_or_an_output_folder_only_the_driver_sees_are_errors_naming_them(cluster, family, tmp_path):
    if not _can_unshare():
        pytest.skip("giving the driver storage no Ray node sees needs a private mount namespace "
                    "(`unshare -m`), which this machine does not allow")  # fmt: skip
    root, config = family
    cluster.ensure(2)
    private = tmp_path / "private"
    driver = _driver(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_ray_merge import build_family
        from mergelab import api
        from mergelab.errors import MergeLabError

        hidden = build_family(Path({str(private)!r}) / "in", rows=8, layers=1)
        for config, out in ((hidden, {str(tmp_path / "out")!r}),
                            ({config!r}, {str(private / "out")!r})):
            try:
                api.merge(config, out, progress=False, ray_address={cluster.address!r})
            except MergeLabError as exc:
                print("ERROR", exc)
            print("EXISTS", Path(out).exists(), sorted(p.name for p in Path(out).parent.iterdir()))
    """, tmp_path, private=private)
    output, _ = driver.communicate(timeout=180)
    assert driver.returncode == 0, output
    first, second = output.split("ERROR")[1:]
    # Inputs on the driver's private storage: every node names every file it cannot see.
    for file in ("m0/model.safetensors", "m1/config.json", "m2/model.safetensors"):
        assert f"input {private / 'in' / file}: No such file or directory" in first, first
    assert first.count("  - node ") == 2 * 6  # two nodes, six files each
    assert "EXISTS False" in first and "out" not in first.split("EXISTS")[1]
    # An output folder on the driver's private storage.
    assert "output location" in second and str(private) in second, second
    assert "the probe file the driver wrote there is not visible" in second
    assert "EXISTS False ['in']" in second  # nothing merged, the partial folder removed
    assert not (tmp_path / "out").exists()


def test_a_node_lost_mid_merge_has_its_shards_merged_elsewhere(cluster, family, tmp_path):
    root, config = family
    cluster.ensure(2)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        merging = pool.submit(api.merge, config, tmp_path / "out", out_shard_size=64 * 32 * 2 * 2,
                              progress=False, ray_address=cluster.address)  # fmt: skip
        stopped = _stop_inside_a_shard(tmp_path)
        lost = next(n for n in cluster.workers if _node_of(n, stopped))
        cluster.lose(lost)  # its raylet and workers are killed (SIGKILL)
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass  # on the lost node
        report = merging.result(timeout=120)
    assert_same_files(root / "local", tmp_path / "out")
    assert not _unfinished_parts(tmp_path)
    assert report.tensors == 10
