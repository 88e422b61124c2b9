"""RegMean for models too large for memory: one tensor at a time, from statistics on disk.

Collect each model's Grams once (`mergelab.stats.collect_grams(..., out_dir=...)`, or
`data_merge(..., stats_dir=...)`, possibly on another machine), then `regmean_from_disk` reads
one tensor of every checkpoint and, for a weight, its layer's Grams from each statistics folder,
solves RegMean's closed form and writes the result through the same atomic sharded writer as
`mergelab.merge`. Peak memory is about (models + 2) x the largest tensor plus models x the
largest Gram, whatever the size of the model.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mergelab.checkpoint import ShardedWriter, open_checkpoint
from mergelab.datamerge.common import module_of
from mergelab.datamerge.regmean import merge_tensor
from mergelab.errors import CheckpointError
from mergelab.stats._progress import progress_bar
from mergelab.stats.store import GramStore

# Non-weight files a merged checkpoint takes from the first source.
_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model")


@dataclass
class StreamingReport:
    tensors: int
    regmean_tensors: int
    seconds: float
    peak_tensor_bytes: int
    out_dir: Path


def regmean_from_disk(
    checkpoints: Sequence[str | os.PathLike],
    stats: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    alpha: float = 0.9,
    regularization: float = 1e-6,
    average_grams: bool = False,
    out_shard_size: int | str = "5GB",
    overwrite: bool = False,
    progress: bool = True,
) -> StreamingReport:
    """RegMean of `checkpoints` (folders or files) given each one's statistics folder.

    stats[i] holds checkpoint i's Grams (module names match the tensor names without their
    `.weight`). Tensors without Grams (biases, norms, layers that never ran) are averaged.
    Raises CheckpointError, before writing, when the checkpoints differ in keys or shapes, a
    statistics folder is missing or unreadable, or only some folders hold a layer's Grams.
    """
    if len(checkpoints) != len(stats):
        raise CheckpointError(
            f"give one statistics folder per checkpoint; got {len(stats)} for {len(checkpoints)}"
        )
    if len(checkpoints) < 2:
        raise CheckpointError("RegMean merges at least two checkpoints")
    readers = [open_checkpoint(p) for p in checkpoints]
    stores = [GramStore(s) for s in stats]
    start = time.perf_counter()
    try:
        names = readers[0].keys()
        problems = []
        for path, reader in zip(checkpoints[1:], readers[1:], strict=True):
            if set(reader.keys()) != set(names):
                diff = sorted(set(reader.keys()) ^ set(names))[:6]
                problems.append(f"{path} has different tensors from {checkpoints[0]}: {diff}")
                continue
            for name in names:
                if reader.shape(name) != readers[0].shape(name):
                    problems.append(
                        f"{path}: `{name}` has shape {list(reader.shape(name))}, "
                        f"{checkpoints[0]} {list(readers[0].shape(name))}"
                    )
        for name in names:
            owner, leaf = module_of(name)
            holders = [owner in s for s in stores]
            if leaf == "weight" and any(holders) and not all(holders):
                missing = [str(stats[i]) for i, h in enumerate(holders) if not h]
                problems.append(f"layer `{owner}` has Grams in some statistics folders but not {missing}")
        if problems:
            raise CheckpointError("; ".join(problems))
        entries = [(n, readers[0].shape(n), readers[0].dtype(n)) for n in names]
        writer = ShardedWriter(
            out_dir,
            entries,
            max_shard_size=out_shard_size,
            overwrite=overwrite,
            inputs=[Path(p) for p in checkpoints],
            metadata={"mergelab_method": "regmean"},
        )
        solved = 0
        peak = 0
        with writer, progress_bar("RegMean (streaming)", len(names), progress) as advance:
            for name in names:
                tensors = [r.get(name) for r in readers]
                owner, leaf = module_of(name)
                grams = [s.get(owner) for s in stores] if leaf == "weight" and owner in stores[0] else None
                merged = merge_tensor(
                    name,
                    tensors,
                    grams,
                    alpha=alpha,
                    regularization=regularization,
                    average_grams=average_grams,
                )
                solved += grams is not None
                held = sum(t.numel() * t.element_size() for t in tensors) + sum(
                    g.gram.numel() * 8 for g in grams or ()
                )
                peak = max(peak, held)
                writer.write(name, merged.to(readers[0].dtype(name)).contiguous())
                del tensors, grams, merged
                advance(1)
            root = readers[0].root
            if root is not None:
                for side in _SIDE_FILES:
                    if (root / side).is_file():
                        writer.copy_file(root / side, side)
            final = writer.commit()
    finally:
        for r in readers:
            r.close()
    return StreamingReport(
        tensors=len(names),
        regmean_tensors=solved,
        seconds=time.perf_counter() - start,
        peak_tensor_bytes=peak,
        out_dir=Path(final),
    )
