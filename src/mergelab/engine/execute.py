"""Executes a merge plan tensor by tensor: read -> merge kernel -> write.

A few tensors are in flight at once (one per worker thread), each read, merged and handed to a
writer thread; large tensors are merged in blocks of rows. Peak memory is bounded by a few
tensors' worth, never a whole model.
"""

from __future__ import annotations

import os
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Protocol

import torch

from mergelab.engine.blocks import TensorBlocks, row_blocks
from mergelab.engine.memory import tune_allocator
from mergelab.engine.vocabulary import remap_vocabulary
from mergelab.errors import CheckpointError, MergeError
from mergelab.methods.registry import ModulatedTensor, TensorMerge, Upscaled
from mergelab.plan.planner import MergePlan, TensorTask
from mergelab.progress import progress_bar


class Sink(Protocol):
    """Where merged tensors go: a checkpoint writer, or a dict for in-memory merges."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...
    def write_rows(self, name: str, row_start: int, rows: torch.Tensor) -> None: ...


class ModulatorSink(Protocol):
    """Where a modulated method's per-task masks go (mergelab.modulators.writer)."""

    def add(
        self,
        name: str,
        models: list[str],
        merged: torch.Tensor,
        base: torch.Tensor,
        masks: list[torch.Tensor],
        sums: list[dict[str, float]],
    ) -> None: ...


class ExtrasSink(Protocol):
    """Where an upscaling method's extra tensors go (mergelab.upscale.writer)."""

    def add(self, name: str, params: dict, result: Upscaled) -> None: ...


class MemorySink:
    """Collects merged tensors in a dict (tensors merged by blocks are assembled here)."""

    def __init__(self, plan: MergePlan):
        self.tensors: dict[str, torch.Tensor] = {}
        self._shapes = {t.name: (t.shape, t.out_dtype) for t in plan.tasks}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor

    def write_rows(self, name: str, row_start: int, rows: torch.Tensor) -> None:
        if name not in self.tensors:
            shape, dtype = self._shapes[name]
            self.tensors[name] = torch.empty(shape, dtype=dtype)
        self.tensors[name][row_start : row_start + rows.shape[0]] = rows


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


def compute_dtype_of(plan: MergePlan) -> torch.dtype:
    """Kernels work in float32 (float64 when the config asks for it): STYLE.md, practice 5."""
    return torch.float64 if plan.merge_dtype == torch.float64 else torch.float32


def _meta(plan: MergePlan, task: TensorTask, seed: int, device: torch.device) -> TensorMerge:
    generator = None
    if plan.method.randomized:
        generator = torch.Generator(device=device)
        generator.manual_seed(tensor_seed(seed, task.name))
    return TensorMerge(
        tensors=[],
        base=None,
        model_params=[dict(p) for p in task.model_params],
        params=dict(task.params),
        generator=generator,
        name=task.name,
        depth=task.depth,
    )


# Integer buffers that count something rather than hold weights: models trained separately differ
# in them, and any one value is as good as another, so the base's (or first model's) is kept.
_COUNTERS = ("num_batches_tracked",)


def _copy_non_float(task: TensorTask, tensors: list[torch.Tensor]) -> torch.Tensor:
    first = tensors[task.base_index or 0]
    if task.name.endswith(_COUNTERS):
        return first.clone()
    for (key, name), other in zip(task.inputs, tensors):
        if other.dtype != first.dtype or not torch.equal(other, first):
            raise MergeError(
                f"tensor `{name}`: non-floating tensor differs between models "
                f"{task.inputs[task.base_index or 0][0]!r} and {key!r}; it cannot be merged"
            )
    return first.clone()


def read_statistics(plan: MergePlan, task: TensorTask) -> list[dict[str, torch.Tensor]] | None:
    """The statistics of each non-base input of `task`, read from the plan's stores (None when
    the task has none). Read as stored: Grams stay float64, whatever the merge dtype."""
    if not task.statistics:
        return None
    out = []
    for ref in task.statistics:
        if ref is None:
            raise MergeError(f"tensor `{task.name}`: statistics of only some sources")
        store, entry = ref
        out.append(plan.statistics[store].read(entry))
    return out


def merge_one(
    plan: MergePlan,
    task: TensorTask,
    tensors: list[torch.Tensor],
    *,
    device: torch.device,
    seed: int,
    statistics: list[dict[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Merge one output tensor whole from its input tensors (in `task.inputs` order) and, for
    a method reading statistics, each non-base input's statistics (`read_statistics`)."""
    if task.constant is not None:
        return task.constant.to(device)
    if not task.is_float:
        return _copy_non_float(task, tensors)
    cast, writable = cast_inputs(plan, task, tensors, device)
    if task.assembly is not None:
        return _checked(plan, task, assemble(task, cast, seed), task.shape)
    if task.vocabulary is not None:
        cast, writable = remap_vocabulary(task.vocabulary, cast), True
    if task.copied:
        return cast[0]  # outside every expert group: written as read (through the merge dtype)
    job = _job(plan, task, cast, writable, device, seed)
    if statistics is not None:
        job.statistics = [{k: v.to(device) for k, v in s.items()} for s in statistics]
    return _checked(plan, task, plan.method.kernel(job), task.shape)


def _job(
    plan: MergePlan,
    task: TensorTask,
    cast: list[torch.Tensor],
    writable: bool,
    device: torch.device,
    seed: int,
) -> TensorMerge:
    """The kernel's input for one tensor from its cast inputs: the base held apart."""
    job = _meta(plan, task, seed, device)
    job.base = cast[task.base_index] if task.base_index is not None else None
    job.tensors = [t for i, t in enumerate(cast) if i != task.base_index]
    job.writable = writable
    return job


def takes_extras(task: TensorTask) -> bool:
    """Whether a modulated or upscaling method's richer kernel merges this tensor (its masks or
    extras then come with it): a float tensor merged from its inputs as they are; copied,
    assembled, constant and vocabulary-remapped tensors take the plain path and get none."""
    return (task.is_float and not task.copied and task.constant is None
            and task.assembly is None and task.vocabulary is None)  # fmt: skip


def assemble(task: TensorTask, tensors: list[torch.Tensor], seed: int) -> torch.Tensor:
    """A task's `assembly`: its inputs scaled (and noised, from a generator seeded by the merge
    seed, the tensor and the input), concatenated per group and the groups stacked."""
    spec = task.assembly
    assert spec is not None
    parts = []
    for i, tensor in enumerate(tensors):
        if spec.noise[i]:
            gen = torch.Generator(device=tensor.device)
            gen.manual_seed(tensor_seed(seed, f"{task.name}#{i}"))
            tensor = tensor + torch.randn(tensor.shape, generator=gen, device=tensor.device,
                                          dtype=tensor.dtype) * spec.noise[i]
        if spec.scales[i] != 1.0:
            tensor = tensor * spec.scales[i]
        parts.append(tensor)
    groups = [torch.cat([parts[i] for i in group], dim=0) for group in spec.groups]
    return torch.stack(groups) if spec.stack else groups[0]


def merge_one_with_extras(
    plan: MergePlan,
    task: TensorTask,
    tensors: list[torch.Tensor],
    kernel: Callable[[TensorMerge], ModulatedTensor | Upscaled],
    *,
    device: torch.device,
    seed: int,
) -> ModulatedTensor | Upscaled:
    """One float tensor through a method's richer kernel (`Modulation.kernel`: shared weights,
    masks, rescaler terms; `Upscaling.kernel`: shared weights and extra tensors), for a
    tensor that `takes_extras`."""
    cast, writable = cast_inputs(plan, task, tensors, device)
    result = kernel(_job(plan, task, cast, writable, device, seed))
    _checked(plan, task, result.merged, task.shape)
    return result


def cast_inputs(
    plan: MergePlan, task: TensorTask, tensors: list[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor], bool]:
    """Inputs on the merge device in the compute dtype (via the config's `dtype`, as mergekit),
    and whether every non-base one is a tensor of our own (safe to overwrite in place)."""
    compute_dtype = compute_dtype_of(plan)
    cast, writable = [], True
    for i, ((key, _), original) in enumerate(zip(task.inputs, tensors)):
        t = original.to(device, non_blocking=True)
        if plan.merge_dtype is not None and t.dtype != plan.merge_dtype:
            t = t.to(plan.merge_dtype)  # mergekit casts sources to `dtype` first
        t = t.to(compute_dtype)
        own = t is not original or getattr(plan.sources[key], "returns_copies", False)
        if i != task.base_index:
            writable &= own
        cast.append(t)
    return cast, writable


def _checked(
    plan: MergePlan, task: TensorTask, result: torch.Tensor, shape: tuple[int, ...]
) -> torch.Tensor:
    if tuple(result.shape) != tuple(shape):
        raise MergeError(
            f"tensor `{task.name}`: method `{plan.method.name}` returned shape "
            f"{list(result.shape)}, expected {list(shape)}"
        )
    return result


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every entry is finite. A float32 sum is NaN/Inf if any entry is, and cheaper
    than an element-wise test; only when the sum overflows is the exact test run."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    if bool(torch.isfinite(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())


def nonfinite_error(
    plan: MergePlan, key: str, name: str, tensor: torch.Tensor, row_offset: int = 0
) -> MergeError:
    bad = int((~torch.isfinite(tensor)).sum())
    where = f" (in rows from {row_offset})" if row_offset else ""
    return MergeError(
        f"tensor `{name}` of model {key!r} ({_file_of(plan.sources[key], name)}) holds "
        f"{bad} NaN/Inf value(s){where}; pass --allow-nonfinite to merge anyway"
    )


def merge_blockwise(
    plan: MergePlan,
    task: TensorTask,
    ranges: list[tuple[int, int]],
    sink: Sink,
    *,
    device: torch.device,
    seed: int,
    allow_nonfinite: bool,
    on_read: Callable[[int], None],
) -> None:
    """Merge one large tensor block by block with the method's `Blockwise` form."""
    blockwise = plan.method.blockwise
    assert blockwise is not None
    meta = _meta(plan, task, seed, device)
    access = TensorBlocks(
        plan,
        task,
        meta,
        ranges,
        device=device,
        compute_dtype=compute_dtype_of(plan),
        seed=tensor_seed(seed, task.name),
        check_finite=not allow_nonfinite,
        on_read=on_read,
    )
    try:
        state = blockwise.prepare(access) if blockwise.prepare is not None else None
        for block in access.blocks():
            rows = block.tensors[0].shape[0] if block.tensors else block.base.shape[0]
            merged = blockwise.apply(block, state)
            merged = _checked(plan, task, merged, (rows, *task.shape[1:]))
            _check_output(plan, task, merged, allow_nonfinite)
            merged = merged.to(task.out_dtype)
            if merged.device.type != "cpu":
                merged = merged.cpu()
            sink.write_rows(task.name, block.row_start, merged)
    finally:
        access.close()


def _check_output(
    plan: MergePlan, task: TensorTask, merged: torch.Tensor, allow_nonfinite: bool
) -> None:
    if not allow_nonfinite and not all_finite(merged):
        raise MergeError(
            f"tensor `{task.name}`: method `{plan.method.name}` produced NaN/Inf values from "
            "finite inputs"
        )


class _WriteQueue:
    """Hands writes to one writer thread, so writing overlaps the next merge; at most
    `max_pending` writes wait (each holds its merged tensor in memory)."""

    def __init__(self, sink: Sink, on_write: Callable[[float], None], max_pending: int = 2):
        self._sink, self._on_write, self._max = sink, on_write, max_pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-write")
        self._pending: deque[Future] = deque()
        self._lock = threading.Lock()

    def _timed(self, fn: Callable, *args) -> None:
        t0 = time.perf_counter()
        fn(*args)
        self._on_write(time.perf_counter() - t0)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._submit(self._sink.write, name, tensor)

    def write_rows(self, name: str, row_start: int, rows: torch.Tensor) -> None:
        self._submit(self._sink.write_rows, name, row_start, rows)

    def _submit(self, fn: Callable, *args) -> None:
        # Called from several merge threads: the deque is shared, results are awaited outside
        # the lock, oldest first (so a failed write reports its own error).
        future = self._pool.submit(self._timed, fn, *args)
        with self._lock:
            self._pending.append(future)
            finished = []
            while len(self._pending) > self._max or (self._pending and self._pending[0].done()):
                finished.append(self._pending.popleft())
        for done in finished:
            done.result()

    def flush(self) -> None:
        while True:
            with self._lock:
                if not self._pending:
                    return
                future = self._pending.popleft()
            future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def execute(
    plan: MergePlan,
    sink: Sink,
    *,
    device: str | torch.device = "cpu",
    seed: int = 0,
    allow_nonfinite: bool = False,
    progress: bool = True,
    out_dir: str | None = None,
    workers: int | None = None,
    modulators: ModulatorSink | None = None,
    extras: ExtrasSink | None = None,
) -> MergeReport:
    """Run every task of `plan`, handing each merged tensor (in its output dtype) to `sink`.

    `workers` tensors (default: one per core, at most 4; 1 on a GPU) are read and merged at once,
    so one's reads overlap another's merge; writes go to a writer thread. Tensors larger than
    `blocks.BLOCK_ELEMENTS` (x2) whose method has a `Blockwise` form are merged block by block.
    `modulators`: for a modulated method (`MergeMethod.modulation`), receives each merged float
    tensor's per-task masks and rescaler terms (without it such a method writes its shared
    weights alone). `extras`: the same for an upscaling method's extra tensors
    (`MergeMethod.upscaling`).
    Raises CheckpointError for unreadable inputs and MergeError for non-finite values (inputs, or
    outputs of a kernel) unless `allow_nonfinite`.
    """
    device = torch.device(device)
    if plan.awaits_statistics:
        raise MergeError(
            f"method `{plan.method.name}` reads {', '.join(plan.method.statistics)} statistics, "
            "which this plan lacks: run the statistics stage first (mergelab.merge and "
            "mergelab.data_merge do; see mergelab.plan.stages)"
        )
    if plan.method.optimiser is not None:
        raise MergeError(
            f"method `{plan.method.name}` is optimised: execute its optimiser's output plan "
            "(mergelab.plan.stages.prepare_plan)"
        )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeError("--device cuda was asked for but no CUDA device is available")
    tune_allocator()
    if plan.method.warm_up is not None and device.type == "cpu":
        threading.Thread(
            target=plan.method.warm_up, name="mergelab-warm-up", daemon=True
        ).start()
    start = time.perf_counter()
    timers = {"read": 0.0, "compute": 0.0, "write": 0.0, "wait": 0.0}
    counters = {"read": 0}
    lock = threading.Lock()

    def add(key: str, seconds: float) -> None:
        with lock:
            timers[key] += seconds

    def count_read(nbytes: int) -> None:
        with lock:
            counters["read"] += nbytes

    # Modulated and upscaled tensors are merged whole: their masks or extras come with them.
    modulating = modulators is not None and plan.method.modulation is not None
    upscaling = extras is not None and plan.method.upscaling is not None
    blocked = {
        t.name: ranges
        for t in plan.tasks
        if t.is_float and not t.copied and t.vocabulary is None and t.assembly is None
        and t.constant is None and plan.method.blockwise is not None
        and not (modulating or upscaling)
        and (plan.method.blockwise.applies is None
             or plan.method.blockwise.applies(t.name, t.shape, t.params))
        and (ranges := row_blocks(t.shape)) is not None
    }

    def read_task(task: TensorTask) -> tuple[list[torch.Tensor], list | None] | None:
        if task.name in blocked:
            return None  # read block by block when its turn comes
        t0 = time.perf_counter()
        out = []
        for key, name in task.inputs:
            tensor = plan.sources[key].get(name)
            if not allow_nonfinite and not all_finite(tensor):
                raise nonfinite_error(plan, key, name, tensor)
            out.append(tensor)
        statistics = read_statistics(plan, task)
        nbytes = sum(t.numel() * t.element_size() for t in out)
        for entry in statistics or ():
            nbytes += sum(v.numel() * v.element_size() for v in entry.values())
        count_read(nbytes)
        add("read", time.perf_counter() - t0)
        return out, statistics

    tasks = plan.tasks
    if workers is None:
        workers = 1 if device.type != "cpu" else max(1, min(os.cpu_count() or 1, 4))
    writes = _WriteQueue(sink, lambda seconds: add("write", seconds))

    def run_task(task: TensorTask) -> None:
        if task.name in blocked:
            merge_blockwise(
                plan, task, blocked[task.name], writes, device=device, seed=seed,
                allow_nonfinite=allow_nonfinite, on_read=count_read,
            )
            return
        inputs, statistics = read_task(task)
        t0 = time.perf_counter()
        modulated = upscaled = None
        if modulating and takes_extras(task):
            assert plan.method.modulation is not None
            modulated = merge_one_with_extras(plan, task, inputs, plan.method.modulation.kernel,
                                              device=device, seed=seed)  # fmt: skip
            merged = modulated.merged
        elif upscaling and takes_extras(task):
            assert plan.method.upscaling is not None
            upscaled = merge_one_with_extras(plan, task, inputs, plan.method.upscaling.kernel,
                                             device=device, seed=seed)  # fmt: skip
            merged = upscaled.merged
        else:
            merged = merge_one(plan, task, inputs, device=device, seed=seed, statistics=statistics)
        _check_output(plan, task, merged, allow_nonfinite)
        merged = merged.to(task.out_dtype)
        if merged.device.type != "cpu":
            merged = merged.cpu()
        if modulated is not None:
            models = [key for i, (key, _) in enumerate(task.inputs) if i != task.base_index]
            modulators.add(task.name, models, merged, inputs[task.base_index], modulated.masks,
                           modulated.sums)  # fmt: skip
        if upscaled is not None:
            extras.add(task.name, dict(task.params), upscaled)
        del inputs, statistics, modulated, upscaled
        add("compute", time.perf_counter() - t0)
        writes.write(task.name, merged)

    bars = ExitStack()
    advance = bars.enter_context(progress_bar(
        f"merge ({plan.method.name})", len(plan.tasks), progress and bool(plan.tasks),
        unit="tensors", transient=False,
    ))
    bytes_written = 0
    merge_started = time.perf_counter()
    # Several tensors are merged at once, each on one thread: the serial parts of the kernels
    # (selection, Python) then overlap, which beats splitting every op across threads.
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mergelab-merge")
    running: dict[Future, TensorTask] = {}
    threads_before = torch.get_num_threads()
    if workers > 1:
        torch.set_num_threads(1)
    try:
        queue = deque(tasks)
        while queue or running:
            while queue and len(running) < workers:
                task = queue.popleft()
                running[pool.submit(run_task, task)] = task
            t0 = time.perf_counter()
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            add("wait", time.perf_counter() - t0)
            for fut in done:
                task = running.pop(fut)
                fut.result()
                bytes_written += task.out_nbytes
                elapsed = max(time.perf_counter() - merge_started, 1e-9)
                advance(1, note=f"{bytes_written / 1e9 / elapsed:.2f} GB/s")
        writes.flush()
    except BaseException:
        for fut in running:
            fut.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        writes.close()
        torch.set_num_threads(threads_before)
        bars.close()
    return MergeReport(
        out_dir=out_dir,
        method=plan.method.name,
        tensors=len(tasks),
        bytes_read=counters["read"],
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


