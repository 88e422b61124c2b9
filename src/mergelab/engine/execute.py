"""Executes a merge plan tensor by tensor: read (prefetched) -> merge kernel -> write.

Reads of the next tensors overlap the current merge on a reader thread pool; writes happen on a
writer thread. At most `prefetch` tasks' inputs are in flight, so peak memory is bounded by a few
tensors, never a whole model.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from mergelab.errors import CheckpointError, MergeError
from mergelab.methods.registry import TensorMerge
from mergelab.plan.planner import MergePlan, TensorTask

Sink = Callable[[str, torch.Tensor], None]


@dataclass
class MergeReport:
    """What a merge did and how long each phase took (seconds; phases overlap in time)."""

    out_dir: str | None
    method: str
    tensors: int
    bytes_read: int
    bytes_written: int
    wall_seconds: float
    read_seconds: float = 0.0
    compute_seconds: float = 0.0
    write_seconds: float = 0.0
    wait_read_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def tensors_per_second(self) -> float:
        return self.tensors / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def gb_per_second(self) -> float:
        moved = self.bytes_read + self.bytes_written
        return moved / 1e9 / self.wall_seconds if self.wall_seconds else 0.0

    def profile_table(self) -> list[tuple[str, float]]:
        return [
            ("read (reader threads, overlapped)", self.read_seconds),
            ("waiting for reads (main thread)", self.wait_read_seconds),
            ("merge kernels", self.compute_seconds),
            ("write (writer thread, overlapped)", self.write_seconds),
            ("wall", self.wall_seconds),
        ]


def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: independent of tensor order, so results do not depend on scheduling."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def merge_one(
    plan: MergePlan,
    task: TensorTask,
    tensors: list[torch.Tensor],
    *,
    device: torch.device,
    seed: int,
) -> torch.Tensor:
    """Merge one output tensor from its input tensors (already read, in `task.inputs` order)."""
    if not task.is_float:
        first = tensors[0]
        for (key, name), other in zip(task.inputs[1:], tensors[1:]):
            if other.dtype != first.dtype or not torch.equal(other, first):
                raise MergeError(
                    f"tensor `{name}`: non-floating tensor differs between models "
                    f"{task.inputs[0][0]!r} and {key!r}; it cannot be merged"
                )
        return first.clone()
    compute_dtype = torch.float64 if plan.merge_dtype == torch.float64 else torch.float32
    cast = []
    for t in tensors:
        t = t.to(device, non_blocking=True)
        if plan.merge_dtype is not None and t.dtype != plan.merge_dtype:
            t = t.to(plan.merge_dtype)  # mergekit casts sources to `dtype` first
        cast.append(t.to(compute_dtype))
    base = cast[task.base_index] if task.base_index is not None else None
    others = [t for i, t in enumerate(cast) if i != task.base_index]
    generator = None
    if plan.method.randomized:
        generator = torch.Generator(device=device)
        generator.manual_seed(tensor_seed(seed, task.name))
    job = TensorMerge(
        tensors=others,
        base=base,
        model_params=[dict(p) for p in task.model_params],
        params=dict(task.params),
        generator=generator,
        name=task.name,
    )
    result = plan.method.kernel(job)
    if tuple(result.shape) != task.shape:
        raise MergeError(
            f"tensor `{task.name}`: method `{plan.method.name}` returned shape "
            f"{list(result.shape)}, expected {list(task.shape)}"
        )
    return result


def execute(
    plan: MergePlan,
    sink: Sink,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    allow_nonfinite: bool = False,
    progress: bool = True,
    prefetch: int = 2,
    out_dir: str | None = None,
) -> MergeReport:
    """Run every task of `plan`, handing each merged tensor (in its output dtype) to `sink`.

    Raises CheckpointError for unreadable inputs and MergeError for non-finite values (inputs, or
    outputs of a kernel) unless `allow_nonfinite`.
    """
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda was asked for but no CUDA device is available")
    start = time.perf_counter()
    timers = {"read": 0.0, "compute": 0.0, "write": 0.0, "wait": 0.0}
    lock = threading.Lock()
    bytes_read = 0
    bytes_written = 0

    def read_task(task: TensorTask) -> list[torch.Tensor]:
        t0 = time.perf_counter()
        out = []
        for key, name in task.inputs:
            source = plan.sources[key]
            tensor = source.get(name)
            if not allow_nonfinite and tensor.is_floating_point():
                if not bool(torch.isfinite(tensor).all()):
                    bad = int((~torch.isfinite(tensor)).sum())
                    raise MergeError(
                        f"tensor `{name}` of model {key!r} ({_file_of(source, name)}) holds "
                        f"{bad} NaN/Inf value(s); pass --allow-nonfinite to merge anyway"
                    )
            out.append(tensor)
        with lock:
            timers["read"] += time.perf_counter() - t0
        return out

    def write_task(name: str, tensor: torch.Tensor) -> None:
        t0 = time.perf_counter()
        sink(name, tensor)
        with lock:
            timers["write"] += time.perf_counter() - t0

    tasks = plan.tasks
    reader = ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="mergelab-read")
    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-write")
    pending_reads: deque[tuple[TensorTask, Future]] = deque()
    pending_writes: deque[Future] = deque()
    bar = _progress_bar(progress, plan)
    try:
        next_index = 0
        for _ in range(len(tasks)):
            while next_index < len(tasks) and len(pending_reads) <= prefetch:
                pending_reads.append((tasks[next_index], reader.submit(read_task, tasks[next_index])))
                next_index += 1
            task, fut = pending_reads.popleft()
            t0 = time.perf_counter()
            inputs = fut.result()
            timers["wait"] += time.perf_counter() - t0
            bytes_read += sum(t.numel() * t.element_size() for t in inputs)

            t0 = time.perf_counter()
            merged = merge_one(plan, task, inputs, device=device, seed=seed)
            if not allow_nonfinite and merged.is_floating_point():
                if not bool(torch.isfinite(merged).all()):
                    raise MergeError(
                        f"tensor `{task.name}`: method `{plan.method.name}` produced NaN/Inf "
                        "values from finite inputs"
                    )
            merged = merged.to(task.out_dtype)
            if merged.device.type != "cpu":
                merged = merged.cpu()
            timers["compute"] += time.perf_counter() - t0
            del inputs

            pending_writes.append(writer.submit(write_task, task.name, merged))
            bytes_written += task.out_nbytes
            while len(pending_writes) > 2 or (pending_writes and pending_writes[0].done()):
                pending_writes.popleft().result()
            if bar is not None:
                bar.advance(task.out_nbytes)
        while pending_writes:
            pending_writes.popleft().result()
    except BaseException:
        for _, fut in pending_reads:
            fut.cancel()
        raise
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
        writer.shutdown(wait=True, cancel_futures=True)
        if bar is not None:
            bar.close()
    return MergeReport(
        out_dir=out_dir,
        method=plan.method.name,
        tensors=len(tasks),
        bytes_read=bytes_read,
        bytes_written=bytes_written,
        wall_seconds=time.perf_counter() - start,
        read_seconds=timers["read"],
        compute_seconds=timers["compute"],
        write_seconds=timers["write"],
        wait_read_seconds=timers["wait"],
        notes=list(plan.notes),
    )


def _file_of(source, name: str) -> str:
    try:
        return str(source.file_of(name))
    except (AttributeError, KeyError, CheckpointError):
        return "in memory"


class _Bar:
    """A rich progress bar showing tensors, tensors/s and GB/s of output."""

    def __init__(self, plan: MergePlan):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn(f"merge ({plan.method.name})"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task = self._progress.add_task("merge", total=len(plan.tasks), rate="")
        self._start = time.perf_counter()
        self._count = 0
        self._bytes = 0
        self._progress.start()

    def advance(self, nbytes: int) -> None:
        self._count += 1
        self._bytes += nbytes
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        rate = f"{self._count / elapsed:.1f} tensors/s, {self._bytes / 1e9 / elapsed:.2f} GB/s"
        self._progress.update(self._task, advance=1, rate=rate)

    def close(self) -> None:
        self._progress.stop()


def _progress_bar(enabled: bool, plan: MergePlan) -> _Bar | None:
    return _Bar(plan) if enabled and plan.tasks else None
