"""Merging one large tensor in blocks of rows, so memory stays bounded whatever its size.

A 128k x 8192 embedding of four models is 8 GB in bfloat16 and twice that in float32; merged whole
it would dominate peak memory. A method with a `Blockwise` form instead sees the tensor a block of
rows at a time: `prepare` makes whatever passes it needs (each pass reads the rows again, from the
page cache on a second pass), then `apply` merges each block, which is written at its offset.

The split into blocks depends on the tensor's shape only (never on memory settings), so a
randomised method's per-block random draws, and hence its result, depend only on the seed.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from mergelab.errors import MergeError
from mergelab.methods.registry import TensorMerge
from mergelab.plan.planner import MergePlan, TensorTask

# Elements of one tensor per block of rows. Tensors up to twice this are merged whole.
BLOCK_ELEMENTS = 1 << 21


def row_blocks(shape: Sequence[int]) -> list[tuple[int, int]] | None:
    """[start, stop) row ranges covering a tensor, or None when it is merged whole."""
    numel = math.prod(shape)
    if len(shape) == 0 or numel <= 2 * BLOCK_ELEMENTS or shape[0] < 2:
        return None
    row = numel // shape[0]
    per_block = max(1, BLOCK_ELEMENTS // row)
    return [(start, min(start + per_block, shape[0])) for start in range(0, shape[0], per_block)]


def block_seed(tensor_seed: int, block_index: int) -> int:
    return (tensor_seed * 31 + block_index * 1_000_000_007) % (2**63 - 1)


class TensorBlocks:
    """The `BlockAccess` of one task: reads row blocks of every input, casts, checks finiteness."""

    def __init__(
        self,
        plan: MergePlan,
        task: TensorTask,
        meta: TensorMerge,
        blocks: list[tuple[int, int]],
        *,
        device: torch.device,
        compute_dtype: torch.dtype,
        seed: int,
        check_finite: bool,
        on_read: Callable[[int], None],
    ):
        self.plan, self.task, self.meta, self._blocks = plan, task, meta, blocks
        self.shape = task.shape
        self.numel = task.numel
        self.device, self.compute_dtype = device, compute_dtype
        self.seed, self.check_finite, self._on_read = seed, check_finite, on_read
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mergelab-rows")
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    @property
    def ranges(self) -> list[tuple[int, int]]:
        return self._blocks

    def _read(self, start: int, stop: int) -> list[torch.Tensor]:
        out = []
        for key, name in self.task.inputs:
            rows = self.plan.sources[key].get_rows(name, start, stop)
            if self.check_finite:
                from mergelab.engine.execute import all_finite, nonfinite_error

                if not all_finite(rows):
                    raise nonfinite_error(self.plan, key, name, rows, row_offset=start)
            out.append(rows)
        self._on_read(sum(t.numel() * t.element_size() for t in out))
        return out

    def _as_merge(self, raw: list[torch.Tensor], start: int, index: int) -> TensorMerge:
        from mergelab.engine.execute import cast_inputs

        cast, writable = cast_inputs(self.plan, self.task, raw, self.device)
        base_index = self.task.base_index
        generator = None
        if self.meta.generator is not None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(block_seed(self.seed, index))
        return TensorMerge(
            tensors=[t for i, t in enumerate(cast) if i != base_index],
            base=cast[base_index] if base_index is not None else None,
            model_params=self.meta.model_params,
            params=self.meta.params,
            generator=generator,
            name=self.meta.name,
            row_start=start,
            writable=writable,
            depth=self.meta.depth,
        )

    def blocks(self) -> Iterator[TensorMerge]:
        """Every block in row order; the next block's read overlaps this one's merge."""
        pending: Future | None = None
        for index, (start, stop) in enumerate(self._blocks):
            if pending is None:
                pending = self._pool.submit(self._read, start, stop)
            raw = pending.result()
            pending = None
            if index + 1 < len(self._blocks):
                nxt = self._blocks[index + 1]
                pending = self._pool.submit(self._read, *nxt)
            yield self._as_merge(raw, start, index)
            del raw

    def rows(self, indices: Sequence[int]) -> TensorMerge:
        """A few whole rows (e.g. a sample), as one TensorMerge without a generator."""
        if not indices:
            raise MergeError(f"tensor `{self.task.name}`: empty row selection")
        parts: list[list[torch.Tensor]] = []
        for i in indices:
            parts.append(self._read(i, i + 1))
        raw = [torch.cat([p[j] for p in parts]) for j in range(len(self.task.inputs))]
        block = self._as_merge(raw, -1, 0)
        block.generator = None
        return block
