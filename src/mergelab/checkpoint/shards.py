"""Pure helpers for output sharding: size parsing and the shard planner.

Nothing here touches the disk or torch, so every rule can be tested with lists of ints standing
in for tensor sizes (as huggingface_hub tests its `split_state_dict_into_shards_factory`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"

# Decimal multipliers follow mergekit's `parse_kmb` (K, M, B = thousand, million, billion) and
# huggingface_hub's `parse_size_to_int` (KB, MB, GB, TB); binary ones are the IEC units.
# mergekit's default `out_shard_size` is "5B" and its writer compares it to bytes
# (numel * element_size), so "5B" means 5e9 bytes here too, not 5 bytes.
_UNITS: dict[str, int] = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "b": 10**9,
    "g": 10**9,
    "t": 10**12,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(size: int | str) -> int:
    """Parse a shard size into bytes.

    Args:
        size: a positive int (bytes) or a string such as ``"5GB"``, ``"2GiB"``, ``"500MB"``,
            ``"1.5GB"`` or mergekit's ``"5B"`` (billion bytes). Units are case-insensitive.

    Returns:
        The size in bytes (fractions rounded down), at least 1.

    Raises:
        ValueError: naming the bad value and the accepted forms.
    """
    accepted = "a positive integer (bytes) or a string like '5GB', '2GiB', '500MB' or '5B' (5e9)"
    if isinstance(size, bool):
        raise ValueError(f"shard size must be {accepted}; got {size!r}")
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"shard size must be {accepted}; got {size}")
        return size
    if not isinstance(size, str):
        raise ValueError(f"shard size must be {accepted}; got {type(size).__name__} {size!r}")
    match = _SIZE_RE.match(size)
    if match is None or match.group(2).lower() not in _UNITS:
        units = "K, M, B (1e9), G, T, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        raise ValueError(f"shard size must be {accepted} (units: {units}); got {size!r}")
    number, unit = match.groups()
    value = int(Fraction(number) * _UNITS[unit.lower()])
    if value <= 0:
        raise ValueError(f"shard size must be at least 1 byte; got {size!r}")
    return value


@dataclass(frozen=True)
class ShardPlan:
    """Which output file holds which tensor.

    Attributes:
        filenames: shard file names in order (``model.safetensors`` alone when one shard).
        names_by_shard: for each shard, the tensor names it holds, in the order given.
        sizes: bytes of tensor data per shard (headers not counted).
        shard_of: tensor name -> shard file name (read-only).
        total_size: bytes of tensor data over all shards (the index's ``metadata.total_size``).
    """

    filenames: tuple[str, ...]
    names_by_shard: tuple[tuple[str, ...], ...]
    sizes: tuple[int, ...]
    shard_of: Mapping[str, str]
    total_size: int

    @property
    def is_sharded(self) -> bool:
        """True when more than one file is written, so an index file is needed."""
        return len(self.filenames) > 1


def shard_file_name(index: int, count: int) -> str:
    """Hugging Face's shard name, e.g. ``model-00002-of-00005.safetensors`` (index from 0)."""
    if count == 1:
        return SINGLE_FILE_NAME
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def plan_shards(entries: Sequence[tuple[str, int]], max_shard_size: int) -> ShardPlan:
    """Split tensors into shards of at most `max_shard_size` bytes, keeping their order.

    Same greedy rule as huggingface_hub's ``split_state_dict_into_shards_factory``, so a merged
    model is sharded exactly as ``save_pretrained`` would shard it: tensors are taken in order;
    one that would tip the current shard over the limit starts a new shard; one larger than the
    limit alone gets a shard of its own, placed before the shard being filled (which stays
    open for the tensors after it). No bin packing: predictable beats slightly fewer files.

    Args:
        entries: ``(tensor name, size in bytes)`` in the order to write them. Names are unique.
        max_shard_size: the limit in bytes (see `parse_size`), at least 1.

    Returns:
        A `ShardPlan`. No entries gives a plan with no files.

    Raises:
        ValueError: a duplicate name, a negative size or a non-positive limit (all reported).
    """
    if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int):
        raise ValueError(f"max_shard_size must be an int number of bytes; got {max_shard_size!r}")
    if max_shard_size <= 0:
        raise ValueError(f"max_shard_size must be at least 1 byte; got {max_shard_size}")
    problems: list[str] = []
    seen: set[str] = set()
    for name, size in entries:
        if name in seen:
            problems.append(f"tensor {name!r} is listed twice")
        seen.add(name)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            problems.append(f"tensor {name!r} has invalid size {size!r}")
    if problems:
        raise ValueError("cannot plan shards:\n" + "\n".join(f"  - {p}" for p in problems))

    shards: list[list[tuple[str, int]]] = []
    current: list[tuple[str, int]] = []
    current_size = 0
    for name, size in entries:
        if size > max_shard_size:
            shards.append([(name, size)])
            continue
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append((name, size))
        current_size += size
    if current:
        shards.append(current)

    count = len(shards)
    filenames = tuple(shard_file_name(i, count) for i in range(count))
    names_by_shard = tuple(tuple(name for name, _ in shard) for shard in shards)
    sizes = tuple(sum(size for _, size in shard) for shard in shards)
    shard_of = {name: filenames[i] for i, names in enumerate(names_by_shard) for name in names}
    return ShardPlan(
        filenames=filenames,
        names_by_shard=names_by_shard,
        sizes=sizes,
        shard_of=MappingProxyType(shard_of),
        total_size=sum(sizes),
    )
