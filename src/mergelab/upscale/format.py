"""The `upscaled/` folder of a merged checkpoint: an upscaling method's extra tensors.

A merge with an upscaling method (SMILE, WEMoE; `MergeMethod.upscaling`) writes an ordinary checkpoint
of the shared weights (SMILE: the base's) plus::

    upscaled/upscaled.json          the manifest (below)
    upscaled/extras/extras.safetensors   tensor `<name>:<key>` for each extra of tensor `<name>`

SMILE's extras: for a linear layer's `<layer>.weight` with T tasks, `gate` [T * gate_k, in]
(each task's top right singular vectors), `u` [T, out, k] and `svh` [T, k, in] (each low-rank
expert U_i and S_i V_i^T); for its `<layer>.bias`, `bias` [T, out] (each task's bias delta).
WEMoE's (shared weights: the task-arithmetic merge): for an upscaled `<layer>.weight`,
`task_vectors` [T, out, in] and its router `router_in` [H, in], `router_in_bias` [H],
`router_out` [T, H] ([T, in] when H is 0), `router_out_bias` [T]; for its bias, `bias` [T, out].

Manifest fields: `format` ("mergelab-upscaled"), `version` (1), `method` (a registry name:
its declaration says which modules take extras and how they run), `tasks` (the merged models),
`tensors`: per tensor with extras its `shape`, `extras` ({key: shape}), `active` (false: zeros
standing for a layer no fine-tune changed, which stays the base layer) and `params` (the
run-time parameters, e.g. `top_k`); and `cost`: `base_parameters`, `extra_parameters`, and
the multiply-adds per token of the upscaled linear layers against the same layers of one
model (`upscaled_macs`, `base_macs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from mergelab.checkpoint.format import read_side_manifest
from mergelab.errors import CheckpointError
from mergelab.methods.registry import Upscaling

FOLDER = "upscaled"
MANIFEST = "upscaled.json"
EXTRAS_FILE = "extras.safetensors"
EXTRAS_PATH = f"extras/{EXTRAS_FILE}"
FORMAT = "mergelab-upscaled"
VERSION = 1


def extra_name(tensor: str, key: str) -> str:
    return f"{tensor}:{key}"


def read_manifest(folder: Path) -> dict:
    """Read and check `folder/upscaled/upscaled.json`; CheckpointError naming the file."""
    path = folder / FOLDER / MANIFEST
    raw = read_side_manifest(path, FORMAT, VERSION, "upscaling")
    problems = []
    tensors = raw.get("tensors")
    if not isinstance(tensors, dict) or not all(
        isinstance(v, dict) and isinstance(v.get("extras"), dict) for v in tensors.values()
    ):
        problems.append("`tensors` must map names to {shape, extras, active, params}")
    if not isinstance(raw.get("method"), str):
        problems.append("no `method`")
    if problems:
        raise CheckpointError(f"{path}: " + "; ".join(problems))
    return raw


def _numel(shape) -> int:
    return math.prod(int(size) for size in shape)


def base_parameter_count(planned: Sequence[tuple[str, tuple[int, ...], object, int, dict]]) -> int:
    """The parameters of one model: every planned tensor's entries (the manifest's
    `cost.base_parameters`)."""
    return sum(_numel(shape) for _, shape, _, _, _ in planned)


def is_layer_record(name: str) -> bool:
    """Whether a manifest record is an upscaled layer's weight (a linear layer's or a pointwise
    convolution's), not the bias beside it."""
    return name.endswith(".weight")


def upscaled_cost(
    upscaling: Upscaling, records: dict[str, dict], base_parameters: int
) -> dict[str, int]:
    """The manifest's `cost` of merged `records` (its `tensors` entries, `active` set):
    `base_parameters`, `extra_parameters` (the entries of every active record's extras), and
    the multiply-adds per token of the upscaled linear layers (`upscaled_macs`) against the
    same layers of one model (`base_macs`), from the method's `Upscaling.cost`."""
    extra = upscaled_macs = base_macs = 0
    for name, record in records.items():
        if not record["active"]:
            continue
        extra += sum(_numel(shape) for shape in record["extras"].values())
        if is_layer_record(name):
            shapes = {k: tuple(v) for k, v in record["extras"].items()}
            up, base = upscaling.cost(tuple(record["shape"]), shapes, record["params"])
            upscaled_macs, base_macs = upscaled_macs + up, base_macs + base
    return {"base_parameters": base_parameters, "extra_parameters": extra,
            "upscaled_macs": upscaled_macs, "base_macs": base_macs}  # fmt: skip


def planned_records(
    upscaling: Upscaling, planned: Sequence[tuple[str, tuple[int, ...], object, int, dict]]
) -> dict[str, dict]:
    """The manifest's `tensors` entries (with `active` false until merged) for the planned
    tensors (name, shape, dtype, number of merged models, params): those the method's `shapes`
    gives extras. A layer's `.bias` extras go to its `.weight`'s module at load time, so a bias
    whose weight gets none (a norm's) gets none either."""
    planned = list(planned)
    with_extras = {
        name for name, shape, _, count, params in planned
        if name.endswith(".weight") and upscaling.shapes(name, shape, count, params)
    }  # fmt: skip
    records: dict[str, dict] = {}
    for name, shape, _, count, params in planned:
        shapes = upscaling.shapes(name, shape, count, params)
        if not shapes or (
            name.endswith(".bias") and f"{name[: -len('.bias')]}.weight" not in with_extras
        ):
            continue
        records[name] = {
            "shape": list(shape),
            "extras": {k: list(v) for k, v in shapes.items()},
            "active": False,
            "params": {p: params[p] for p in upscaling.forward_params if p in params},
        }
    return records
