"""A merge spread over a Ray cluster: the one executor, `execute`, run over subsets of shards.

The output's shard plan (the same as a single-process merge's) is cut into groups balanced by
size (`assign_shards`); each group is one Ray task. A task plans the config again on its node
(the same validation over the same files; its plan must match the driver's, tensor for
tensor), keeps the tasks of its shards, opens only their input tensors, runs `execute` into a
`ShardFileWriter` (the same headers and offsets as the driver's writer, hence the same bytes)
and returns one receipt per shard (size, CRC-32). The driver checks every shard against its
receipt (`ShardedWriter.adopt`: size, header, CRC-32 read back) as its task returns; the caller
then writes the side files and the index and commits, which renames the folder into place.

A task whose worker dies is retried by Ray (`max_retries`, which covers a lost node too: Ray
runs it again elsewhere); when the retries are spent, or a shard does not check out, its shards
are handed out again, one task each, to whatever nodes are left (`reassign_rounds` times). An
error of the merge itself (a NaN in an input, a config that plans differently on a node) is not
retried: it is raised as it is, the temporary folder removed by the writer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Protocol

from mergelab.checkpoint.writer import ShardedWriter, ShardFileWriter, ShardLayout, ShardReceipt
from mergelab.cluster import Node
from mergelab.engine.execute import MergeReport, execute
from mergelab.errors import CheckpointError, MergeError, MergeLabError
from mergelab.plan.planner import MergePlan
from mergelab.progress import progress_bar

# Ray runs a task again this many times when its worker or node dies; then the driver hands
# the task's shards out anew, one task each, up to REASSIGN_ROUNDS times per shard.
TASK_RETRIES = 3
REASSIGN_ROUNDS = 2


class PlanRecipe(Protocol):
    """How a worker gets the driver's plan: plans the same config over the same files
    (picklable; `mergelab.api` gives one per config)."""

    def open(self) -> MergePlan: ...
    def close(self, plan: MergePlan) -> None: ...


def assign_shards(sizes: Sequence[int], tasks: int) -> list[list[int]]:
    """Split shards (their byte sizes) into at most `tasks` groups of near-equal total size.

    Longest first, each to the group with the least bytes so far (the lowest-numbered group on
    a tie): a deterministic greedy whose largest group is within 4/3 of the best possible.
    Returns the shard indices of each non-empty group, ascending, groups ordered by their first
    shard.
    """
    if tasks < 1:
        raise ValueError(f"tasks must be at least 1; got {tasks}")
    groups: list[list[int]] = [[] for _ in range(min(tasks, len(sizes)))]
    totals = [0] * len(groups)
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(len(groups)), key=lambda g: (totals[g], g))
        groups[target].append(index)
        totals[target] += sizes[index]
    return sorted((sorted(g) for g in groups if g), key=lambda g: g[0])


def plan_fingerprint(plan: MergePlan) -> str:
    """A digest of what the plan writes and from what: tensor names, shapes, dtypes, inputs and
    parameters, in order. Equal on every node that sees the same config and files."""
    digest = hashlib.sha256()
    for t in plan.tasks:
        digest.update(repr((t.name, t.shape, str(t.out_dtype), t.inputs, t.base_index,
                            t.model_params, t.params, t.copied, t.is_float)).encode())  # fmt: skip
    return digest.hexdigest()


@dataclass
class ShardsDone:
    """What one Ray task hands back: a receipt per shard, where it ran, its merge report."""

    receipts: list[ShardReceipt]
    node_id: str
    pid: int
    report: MergeReport


def merge_shards(
    recipe: PlanRecipe,
    layout: ShardLayout,
    file_names: Sequence[str],
    fingerprint: str,
    options: dict[str, Any],
) -> ShardsDone:
    """Runs on a worker: merge the tensors of shards `file_names` into the shared temporary
    folder with the one executor. `options` are `execute`'s (device, seed, allow_nonfinite,
    workers)."""
    import ray

    plan = recipe.open()
    try:
        if plan_fingerprint(plan) != fingerprint:
            raise MergeError(
                f"the config plans differently on node {ray.get_runtime_context().get_node_id()} "
                "than on the driver: are the inputs the same files there (same versions)?"
            )
        names = set(layout.names_of(file_names))
        subset = dataclasses.replace(plan, tasks=[t for t in plan.tasks if t.name in names])
        with ShardFileWriter(layout, file_names) as writer:
            report = execute(subset, writer, progress=False, **options)
            receipts = writer.finish()
    finally:
        recipe.close(plan)
    return ShardsDone(receipts, ray.get_runtime_context().get_node_id(), os.getpid(), report)


@dataclass
class _Progress:
    retried: list[str] = field(default_factory=list)
    nodes: set[str] = field(default_factory=set)
    reports: list[MergeReport] = field(default_factory=list)


def execute_on_cluster(
    plan: MergePlan,
    writer: ShardedWriter,
    recipe: PlanRecipe,
    ray,
    nodes: Sequence[Node],
    *,
    device: str = "cpu",
    seed: int = 0,
    allow_nonfinite: bool = False,
    progress: bool = True,
    out_dir: str | None = None,
    cpus_per_task: int = 1,
    max_retries: int | None = None,
    reassign_rounds: int | None = None,
) -> MergeReport:
    """Merge `plan` into `writer` (made with ``shards_elsewhere=True``) on Ray tasks, one per
    group of shards (as many groups as the `nodes` have CPUs for, at most one per shard);
    returns when every shard is adopted (verified on driver threads as its task returns). The
    caller writes the side files and commits. `max_retries` / `reassign_rounds`: TASK_RETRIES /
    REASSIGN_ROUNDS by default.
    Raises the merge's own error as it is; a MergeError when a shard cannot be merged after
    every retry and reassignment (naming it and why)."""
    start = time.perf_counter()
    max_retries = TASK_RETRIES if max_retries is None else max_retries
    reassign_rounds = REASSIGN_ROUNDS if reassign_rounds is None else reassign_rounds
    layout = writer.layout
    files = writer.plan.filenames
    slots = max(1, sum(node.cpus for node in nodes) // cpus_per_task)
    groups = assign_shards(writer.plan.sizes, slots)
    options = dict(device=device, seed=seed, allow_nonfinite=allow_nonfinite,
                   workers=cpus_per_task)  # fmt: skip
    fingerprint = plan_fingerprint(plan)
    remote = ray.remote(merge_shards).options(
        num_cpus=cpus_per_task, num_gpus=1 if str(device).startswith("cuda") else 0,
        max_retries=max_retries, name="mergelab-merge-shards",
    )  # fmt: skip
    recipe_ref, layout_ref = ray.put(recipe), ray.put(layout)
    pending: dict[Any, tuple[str, ...]] = {}
    rounds = dict.fromkeys(files, 0)
    state = _Progress()

    def submit(names: Sequence[str]) -> None:
        ref = remote.remote(recipe_ref, layout_ref, list(names), fingerprint, options)
        pending[ref] = tuple(names)

    def reassign(names: Sequence[str], why: str) -> None:
        for name in names:
            rounds[name] += 1
            if rounds[name] > reassign_rounds:
                raise MergeError(
                    f"shard {name} of {writer.out_dir} could not be merged on the Ray cluster "
                    f"after {max_retries} retries and {reassign_rounds} reassignments: {why}"
                )
            state.retried.append(name)
            submit([name])

    for group in groups:
        submit([files[i] for i in group])
    # Shards are read back and checked on driver threads (zlib releases the GIL) while the
    # remaining tasks run.
    checks = ThreadPoolExecutor(max_workers=max(1, min(os.cpu_count() or 1, 8)),
                                thread_name_prefix="mergelab-verify")  # fmt: skip
    checking: dict[Future, str] = {}
    with progress_bar(f"merge on Ray ({plan.method.name})", len(files),
                      progress and bool(files), unit="shards", transient=False) as advance:  # fmt: skip
        try:
            while pending or checking:
                if pending:
                    ready, _ = ray.wait(list(pending), num_returns=1,
                                        timeout=0.05 if checking else None)  # fmt: skip
                else:
                    wait(checking, return_when=FIRST_COMPLETED)
                    ready = []
                for ref in ready:
                    names = pending.pop(ref)
                    try:
                        done: ShardsDone = ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        cause = exc.cause
                        if isinstance(cause, MergeLabError):
                            raise cause from None
                        raise MergeError(f"merging shards {list(names)} failed on the Ray "
                                         f"cluster: {exc}") from None  # fmt: skip
                    except ray.exceptions.RayError as exc:  # the worker or its node was lost
                        reassign(names, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
                        continue
                    state.nodes.add(done.node_id)
                    state.reports.append(done.report)
                    for receipt in done.receipts:
                        checking[checks.submit(writer.adopt, receipt)] = receipt.file_name
                for future in [f for f in checking if f.done()]:
                    name = checking.pop(future)
                    try:
                        future.result()
                    except CheckpointError as exc:
                        reassign([name], str(exc))
                        continue
                    advance(1)
        except BaseException:
            for ref in pending:
                try:
                    ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - already finished or its node gone
                    pass
            raise
        finally:
            checks.shutdown(wait=True, cancel_futures=True)
    reports = state.reports
    notes = list(plan.notes) + [
        f"merged on Ray: {len(files)} shard(s) in {len(groups)} task(s) over "
        f"{len(state.nodes)} node(s) of {len(nodes)}; every shard's size, header and CRC-32 "
        "checked by the driver"
    ]
    if state.retried:
        notes.append(f"reassigned after a lost worker or a shard that did not check out: "
                     f"{', '.join(sorted(set(state.retried)))}")  # fmt: skip
    return MergeReport(
        out_dir=out_dir,
        method=plan.method.name,
        tensors=len(plan.tasks),
        bytes_read=sum(r.bytes_read for r in reports),
        bytes_written=sum(r.bytes_written for r in reports),
        wall_seconds=time.perf_counter() - start,
        read_seconds=sum(r.read_seconds for r in reports),
        compute_seconds=sum(r.compute_seconds for r in reports),
        write_seconds=sum(r.write_seconds for r in reports),
        wait_read_seconds=sum(r.wait_read_seconds for r in reports),
        notes=notes,
    )
