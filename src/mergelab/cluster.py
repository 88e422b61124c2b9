"""The one way mergelab reaches a Ray cluster: connect (or start a local Ray), list the nodes
that run work, and check that every such node sees the same files as the driver.

Used by the merge over a cluster (`mergelab.engine.distributed`) and the parallel recipe search
(`mergelab.search.parallel`). Ray is an optional extra (`pip install 'mergelab[ray]'`) and is
imported only here and by the code that runs on the workers. Every failure is a MergeLabError
naming the address, node or path, raised before any work is handed out.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergelab.errors import MergeLabError

LOCAL = "local"  # --ray-address local: start a Ray on this machine for the one command
PROBE_TIMEOUT_S = 120.0


def import_ray(purpose: str):
    """The `ray` module, or a MergeLabError saying how to install it for `purpose`."""
    try:
        import ray
    except ImportError:
        raise MergeLabError(
            f"{purpose} needs Ray: `pip install 'mergelab[ray]'` (or run without --ray-address)"
        ) from None
    return ray


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a `HOST:PORT` (or `ray://HOST:PORT`) nothing listens on: Ray itself keeps
    retrying for about a minute before it gives up."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
            pass
    except (OSError, ValueError) as exc:
        raise MergeLabError(
            f"cannot connect to the Ray cluster at {address!r}: {exc} (is `ray start --head` "
            "running there, and is the port the GCS port, 6379 by default?)"
        ) from None


@contextmanager
def connect(address: str | None, *, purpose: str, num_cpus: int | None = None) -> Iterator[Any]:
    """Yield the `ray` module connected to a cluster; disconnect on leaving if we connected.

    address: "auto" (the cluster `ray start` runs on this machine, or RAY_ADDRESS), a GCS
        address "HOST:PORT", a Ray Client address "ray://HOST:PORT", or None / "local" to start
        a local Ray for the block with `num_cpus` CPUs (None: every core). When this process is
        already connected (`ray.init` was called before), that connection is used as it is (an
        address naming another cluster is then an error).
    purpose: what needs Ray, for the error messages ("the merge over a Ray cluster").

    Raises:
        MergeLabError: Ray not installed, or nothing reachable at `address` (named), before
            anything is started.
    """
    ray = import_ray(purpose)
    local = address in (None, LOCAL)
    if not local and address != "auto":
        check_reachable(address)
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if local or address in ("auto", current):
            yield ray
            return
        raise MergeLabError(f"this process is connected to the Ray cluster at {current!r} "
                            f"already; it cannot also use {address!r}")  # fmt: skip
    try:
        if local:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # ray raises ConnectionError, RuntimeError, ValueError...
        where = "a local Ray" if local else f"the Ray cluster at {address!r}"
        raise MergeLabError(f"cannot connect to {where}: {' '.join(str(exc).split())}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


@dataclass(frozen=True)
class Node:
    """A live node that can run tasks."""

    node_id: str
    address: str
    cpus: int

    def __str__(self) -> str:
        return f"node {self.address} ({self.node_id[:8]})"


def work_nodes(ray) -> list[Node]:
    """The live nodes with CPUs (those tasks can run on), in a stable order."""
    nodes = [
        Node(n["NodeID"], n.get("NodeManagerAddress", "?"), int(n["Resources"].get("CPU", 0)))
        for n in ray.nodes()
        if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) >= 1
    ]
    if not nodes:
        raise MergeLabError("the Ray cluster has no live node with a CPU to run tasks on")
    return sorted(nodes, key=lambda n: (n.address, n.node_id))


def _probe(files: dict[str, int], folder: str, token: str, driver_file: str, node_file: str):
    """Runs on one node: what it sees of the driver's files and of the shared folder."""
    problems = []
    for path, size in files.items():
        try:
            seen = os.stat(path).st_size
            with open(path, "rb") as handle:  # readable here, not only listed
                handle.read(8)
        except OSError as exc:
            problems.append(f"input {path}: {exc.strerror or exc}")
            continue
        if seen != size:
            problems.append(f"input {path}: {seen} bytes here, {size} on the driver")
    try:
        written = Path(folder, driver_file).read_text()
    except OSError as exc:
        written = f"<{exc.strerror or exc}>"
    if written != token:
        problems.append(
            f"output location {folder}: the probe file the driver wrote there is not visible "
            f"({written[:60]})"
        )
    else:
        try:
            Path(folder, node_file).write_text(token)
        except OSError as exc:
            problems.append(f"output location {folder}: cannot write a file: {exc.strerror or exc}")
    return problems


def check_shared_storage(ray, nodes: Sequence[Node], files: Sequence[str | os.PathLike],
                         folder: str | os.PathLike, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Check, with one small task per node, that every node sees `files` as the driver does
    (same sizes) and shares `folder` with it: the driver writes a random token there, each node
    reads it back and writes its own, which the driver then reads. A folder that only exists
    locally on every machine (a same-named /tmp) fails, as it should.

    Raises:
        MergeLabError: every problem of every node, each naming the node and the path.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    folder = Path(folder)
    sizes = {}
    for path in files:
        sizes[str(path)] = os.stat(path).st_size
    token = secrets.token_hex(8)
    driver_file = f".mergelab-probe-{token}"
    (folder / driver_file).write_text(token)
    probe = ray.remote(num_cpus=0, max_retries=0)(_probe)
    node_files = {node.node_id: f".mergelab-probe-{token}-{i}" for i, node in enumerate(nodes)}
    refs = {
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node.node_id, soft=False))
        .remote(sizes, str(folder), token, driver_file, node_files[node.node_id]): node
        for node in nodes
    }
    problems: list[str] = []
    try:
        ready, late = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        for ref in late:
            problems.append(f"{refs[ref]}: did not answer the storage probe within {timeout:.0f} s")
            ray.cancel(ref, force=True)
        for ref in ready:
            node = refs[ref]
            try:
                found = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - an import or runtime failure on the node
                found = [f"the probe task failed ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:300]}); is mergelab installed there?"]
            if not found:
                seen = folder / node_files[node.node_id]
                if not seen.is_file() or seen.read_text() != token:
                    found = [f"output location {folder}: the node wrote a probe file the "
                             "driver cannot see"]
            problems += [f"{node}: {p}" for p in found]
    finally:
        for name in (driver_file, *node_files.values()):
            (folder / name).unlink(missing_ok=True)
    if problems:
        raise MergeLabError(
            "the Ray cluster's nodes do not see the merge's files as the driver does (inputs and "
            "the output folder must be on storage every node sees):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
