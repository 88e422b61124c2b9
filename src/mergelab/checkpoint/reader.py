"""Lazy checkpoint reading: safetensors (single or sharded) and torch ``.bin`` (weights only).

`open_checkpoint` reads and validates every header and index up front, which is cheap (a few
kilobytes per shard) and turns a corrupt download into an error before a long merge starts.
Tensor data is read only by `CheckpointReader.get`, one tensor at a time.
"""

from __future__ import annotations

import json
import os
import pickle
import threading
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open

from mergelab.checkpoint.format import read_header
from mergelab.errors import CheckpointError

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
BIN_SINGLE = "pytorch_model.bin"
BIN_INDEX = "pytorch_model.bin.index.json"
_BIN_SUFFIXES = (".bin", ".pt", ".pth")

# Output projections that Hugging Face models tie to the input embedding, and the names that
# embedding has across architectures. A checkpoint saved with tied weights stores only one of
# each pair (save_pretrained drops the duplicate), so a merge must find the other under its
# alias. Each group pairs outputs with inputs; lookup works in both directions.
_CAUSAL_LM_OUTPUTS = ("lm_head.weight",)
_CAUSAL_LM_INPUTS = (
    "model.embed_tokens.weight",  # Llama, Mistral, Qwen, Gemma, Phi-3, ...
    "transformer.wte.weight",  # GPT-2, GPT-J, Falcon (older), CodeGen
    "wte.weight",  # GPT-2 checkpoints saved without the "transformer." prefix
    "model.decoder.embed_tokens.weight",  # OPT, BART-style decoders
    "transformer.word_embeddings.weight",  # BLOOM, Falcon
    "transformer.embd.wte.weight",  # Phi-1
    "model.language_model.embed_tokens.weight",  # Gemma 3, LLaVA-style wrappers
    "language_model.model.embed_tokens.weight",  # older multimodal wrappers
    "shared.weight",  # T5 (tied only when tie_word_embeddings is true)
)
_MASKED_LM_OUTPUTS = ("cls.predictions.decoder.weight", "lm_head.decoder.weight")
_MASKED_LM_INPUT_SUFFIX = "embeddings.word_embeddings.weight"  # bert., roberta., electra., ...


@dataclass(frozen=True)
class _Entry:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    offset: int | None = None  # absolute byte offset of the data in a safetensors file


class CheckpointReader:
    """Read-only view of one checkpoint's tensors; metadata in memory, data read on demand.

    Thread-safe: `get` may be called from several prefetch threads at once.
    """

    # Every tensor `get`/`get_rows` returns is a fresh copy the caller owns.
    returns_copies = True

    def __init__(
        self,
        path: Path,
        root: Path | None,
        entries: dict[str, _Entry],
        torch_files: dict[Path, dict[str, torch.Tensor]] | None = None,
    ):
        self.path = path
        self.root = root
        self._entries = entries
        self._keys = list(entries)
        # Only for .bin checkpoints: the mmap-backed state dict of each file.
        self._torch_files = torch_files or {}
        self._config: dict | None = None
        self._config_loaded = False
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self._keys)} tensors)"

    # -- metadata, answered without reading tensor data ---------------------------------------

    def keys(self) -> list[str]:
        """Tensor names in file order (shards in index order, then offset order within each)."""
        return list(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise TensorNotFoundError(f"tensor {name!r} is not in checkpoint {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor `name`."""
        return self._entry(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """Stored dtype of tensor `name`."""
        return self._entry(name).dtype

    def nbytes(self, name: str) -> int:
        """Bytes of tensor `name`'s data as stored."""
        return self._entry(name).nbytes

    def file_of(self, name: str) -> Path:
        """The file holding tensor `name`."""
        return self._entry(name).file

    # -- data -----------------------------------------------------------------------------------

    def get(self, name: str) -> torch.Tensor:
        """Read tensor `name` now (and nothing else) and return it on the CPU.

        Safetensors data is read with plain file reads into a fresh tensor rather than through
        a memory map: the tensor owns its memory, nothing of the file stays mapped (so pages
        read for one tensor do not stay resident in this process after the caller drops it),
        the cost per tensor does not grow with the header size, and a file truncated after
        opening gives an error instead of a SIGBUS.

        Raises:
            CheckpointError: naming the file and tensor when the data cannot be read (e.g. the
                file was truncated after it was opened).
        """
        entry = self._entry(name)
        self._check_open()
        if entry.file in self._torch_files:
            try:
                # clone() reads the data now and detaches it from the mapped file.
                return self._torch_files[entry.file][name].clone()
            except (OSError, RuntimeError) as exc:
                raise CheckpointError(f"{entry.file}: cannot read tensor {name!r}: {exc}") from exc
        return _read_exact(entry, name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Read rows [start, stop) of tensor `name` (its leading dimension) and nothing else.

        Rows of a row-major tensor are contiguous on disk, so this is one read; the engine uses
        it to merge large tensors block by block in bounded memory.
        """
        entry = self._entry(name)
        self._check_open()
        if not entry.shape or not 0 <= start <= stop <= entry.shape[0]:
            raise CheckpointError(
                f"{entry.file}: rows [{start}, {stop}) are outside tensor {name!r} of shape "
                f"{list(entry.shape)}"
            )
        if entry.file in self._torch_files:
            return self._torch_files[entry.file][name][start:stop].clone()
        return _read_exact(entry, name, (start, stop))

    def get_slice(self, name: str, index: Any) -> torch.Tensor:
        """Read only part of tensor `name` (e.g. ``index=slice(0, 100)`` for 100 embedding rows).

        Safetensors files go through ``safe_open(...).get_slice``, which reads only the bytes
        the slice needs; ``.bin`` checkpoints slice the mapped tensor.
        """
        entry = self._entry(name)
        self._check_open()
        if entry.file in self._torch_files:
            return self._torch_files[entry.file][name][index].clone()
        try:
            with safe_open(entry.file, framework="pt", device="cpu") as handle:
                # clone(): detach the result from the file mapping, which then closes.
                return handle.get_slice(name)[index].clone()
        except Exception as exc:  # safetensors raises its own SafetensorError and OSError
            raise CheckpointError(f"{entry.file}: cannot read tensor {name!r}: {exc}") from exc

    def _check_open(self) -> None:
        if self._closed:
            raise CheckpointError(f"checkpoint {self.path} was closed")

    # -- tied weights and config ----------------------------------------------------------------

    def resolve(self, name: str) -> str | None:
        """`name` if present; else the tied alias of it that this checkpoint stores; else None.

        An output projection (``lm_head.weight``, ``cls.predictions.decoder.weight``, ...) and
        the input embedding it is tied to are interchangeable, in both directions, unless
        config.json sets ``tie_word_embeddings: false`` (then None).
        """
        return resolve_tied(name, self._entries, self._keys, self.config())

    def config(self) -> dict | None:
        """The parsed config.json beside the weights, or None when there is none."""
        with self._lock:
            if not self._config_loaded:
                self._config = _load_config(self.root)
                self._config_loaded = True
            return self._config

    # -- lifetime -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """Whether `close` was called (further reads raise)."""
        return self._closed

    def close(self) -> None:
        """Release mapped ``.bin`` files; further reads raise. Safe to call twice."""
        self._closed = True
        self._torch_files = {}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class TensorNotFoundError(CheckpointError, KeyError):
    """A tensor name that the checkpoint does not hold (also a KeyError, as for a dict)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


def _read_exact(
    entry: _Entry, name: str, rows: tuple[int, int] | None = None
) -> torch.Tensor:
    """Read a safetensors tensor's bytes (or rows [start, stop) of it) straight into a new
    tensor, with no intermediate copy."""
    shape, skip, nbytes = entry.shape, 0, entry.nbytes
    if rows is not None:
        start, stop = rows
        row_bytes = entry.nbytes // entry.shape[0] if entry.shape[0] else 0
        shape = (stop - start, *entry.shape[1:])
        skip, nbytes = start * row_bytes, (stop - start) * row_bytes
    tensor = torch.empty(shape, dtype=entry.dtype)
    if nbytes == 0:
        return tensor
    assert entry.offset is not None
    # Safetensors data is little-endian, as is every platform torch ships for.
    buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
    done = 0
    try:
        # Unbuffered: readinto() fills the tensor's memory directly. One handle per call keeps
        # concurrent reads from prefetch threads independent.
        with open(entry.file, "rb", buffering=0) as handle:
            handle.seek(entry.offset + skip)
            while done < nbytes:
                count = handle.readinto(buffer[done:])
                if not count:
                    raise CheckpointError(
                        f"{entry.file}: truncated data for tensor {name!r}: got {done} of "
                        f"{nbytes} bytes (the file changed or was cut after it was opened)"
                    )
                done += count
    except OSError as exc:
        raise CheckpointError(f"{entry.file}: cannot read tensor {name!r}: {exc}") from exc
    return tensor


def resolve_tied(
    name: str, present: Container[str], keys: Iterable[str], config: dict | None
) -> str | None:
    """`name` if `present`; else the tied alias of it that the checkpoint stores; else None.

    An output projection and the input embedding it is tied to are interchangeable, in both
    directions, unless `config` (config.json) sets ``tie_word_embeddings: false``.
    """
    if name in present:
        return name
    if not _ties_embeddings(config):
        return None
    for candidate in _tied_aliases(name):
        if candidate in present:
            return candidate
    if name in _MASKED_LM_OUTPUTS:
        # BERT-family embeddings sit under a model-specific prefix (bert., roberta., ...).
        for key in keys:
            if key == _MASKED_LM_INPUT_SUFFIX or key.endswith("." + _MASKED_LM_INPUT_SUFFIX):
                return key
    return None


def _ties_embeddings(config: dict | None) -> bool:
    config = config or {}
    # Multimodal wrappers keep the language model's setting in text_config.
    for scope in (config, config.get("text_config") or {}):
        if isinstance(scope, dict) and scope.get("tie_word_embeddings") is False:
            return False
    return True


def _tied_aliases(name: str) -> tuple[str, ...]:
    if name in _CAUSAL_LM_OUTPUTS:
        return _CAUSAL_LM_INPUTS
    if name in _CAUSAL_LM_INPUTS:
        return _CAUSAL_LM_OUTPUTS
    if name == _MASKED_LM_INPUT_SUFFIX or name.endswith("." + _MASKED_LM_INPUT_SUFFIX):
        return _MASKED_LM_OUTPUTS
    return ()


def _load_config(root: Path | None) -> dict | None:
    if root is None:
        return None
    path = root / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot parse config: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: config is not a JSON object")
    return config


# -- opening --------------------------------------------------------------------------------------


def open_checkpoint(path: str | os.PathLike) -> CheckpointReader:
    """Open a checkpoint folder or weights file for lazy reading, validating it up front.

    Args:
        path: a folder holding ``model.safetensors``, ``model.safetensors.index.json`` + shards,
            ``pytorch_model.bin`` or ``pytorch_model.bin.index.json`` + shards (looked for in
            that order, as transformers does; else a lone ``*.safetensors.index.json`` or
            ``*.safetensors``); or one ``.safetensors`` / ``.bin`` / ``.index.json`` file.

    Returns:
        A `CheckpointReader`; use it as a context manager or call `close`.

    Raises:
        CheckpointError: naming the file (and tensor) for a missing path, a corrupt or truncated
            header, an index naming a missing shard or a tensor its shard lacks, a ``.bin``
            holding pickled code (refused: never unpickled), or a folder with no weights.
    """
    given = Path(path).expanduser()
    if not given.exists():
        raise CheckpointError(f"checkpoint {given} does not exist")
    resolved = given.resolve()
    if resolved.is_dir():
        weights = _find_weights(resolved)
        root = resolved
    else:
        weights = resolved
        root = resolved.parent

    name = weights.name
    if name.endswith(".index.json"):
        entries, torch_files = _open_index(weights)
    elif name.endswith(".safetensors"):
        entries, torch_files = _open_safetensors(weights), {}
    elif name.endswith(_BIN_SUFFIXES):
        state = _load_torch_file(weights)
        entries, torch_files = _torch_entries(weights, state), {weights: state}
    else:
        raise CheckpointError(
            f"{weights}: unknown checkpoint file type (expected .safetensors, .bin, .pt, .pth "
            "or .index.json)"
        )
    return CheckpointReader(resolved, root, entries, torch_files)


def _find_weights(folder: Path) -> Path:
    for candidate in (SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX):
        if (folder / candidate).is_file():
            return folder / candidate
    # Non-standard names (adapter_model.safetensors, consolidated.safetensors, ...) are accepted
    # only when unambiguous: two candidates could be two different models.
    for pattern in ("*.safetensors.index.json", "*.safetensors"):
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise CheckpointError(
                f"{folder}: several candidate weight files ({names}) and no "
                f"{SAFE_INDEX} to say how they fit together"
            )
    raise CheckpointError(
        f"{folder}: no weights found; looked for {SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE}, "
        f"{BIN_INDEX}, or a single *.safetensors / *.safetensors.index.json"
    )


def _open_safetensors(path: Path) -> dict[str, _Entry]:
    header = read_header(path)
    return {
        r.name: _Entry(path, r.shape, r.dtype, r.nbytes, header.data_start + r.begin)
        for r in header.tensors
    }


def _open_index(index_path: Path) -> tuple[dict[str, _Entry], dict[Path, dict[str, torch.Tensor]]]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index_path}: cannot parse index: {exc}") from exc
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(f"{index_path}: index has no 'weight_map' of tensor -> file names")

    folder = index_path.parent
    by_file: dict[str, list[str]] = {}
    for tensor, file_name in weight_map.items():
        by_file.setdefault(file_name, []).append(tensor)

    problems: list[str] = []
    shard_paths: dict[str, Path] = {}
    for file_name in sorted(by_file):
        shard = (folder / file_name).resolve()
        if folder not in shard.parents:
            problems.append(f"shard {file_name!r} points outside the checkpoint folder")
        elif not shard.is_file():
            names = by_file[file_name]
            problems.append(
                f"shard {file_name} is missing (it should hold {len(names)} tensor(s), "
                f"e.g. {names[0]!r})"
            )
        else:
            shard_paths[file_name] = shard
    if problems:
        raise CheckpointError(f"{index_path}: " + "; ".join(problems))

    entries: dict[str, _Entry] = {}
    torch_files: dict[Path, dict[str, torch.Tensor]] = {}
    for file_name, shard in shard_paths.items():
        if shard.name.endswith(".safetensors"):
            in_file = _open_safetensors(shard)
        else:
            state = _load_torch_file(shard)
            torch_files[shard] = state
            in_file = _torch_entries(shard, state)
        wanted = set(by_file[file_name])
        missing = sorted(wanted - in_file.keys())
        if missing:
            shown = ", ".join(repr(m) for m in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise CheckpointError(
                f"{index_path} lists tensor(s) {shown}{more} in {shard}, which does not hold them"
            )
        # File order: shards sorted by name (HF numbering), tensors by offset within each.
        entries.update((name, entry) for name, entry in in_file.items() if name in wanted)
    return entries, torch_files


def _load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a torch pickle with the weights-only unpickler; never run code from the file."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            # Pre-1.6 (non-zip) torch files cannot be memory-mapped: read them whole instead.
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise CheckpointError(
                f"{path}: refused: the file contains pickled code (objects other than tensors), "
                "which could run arbitrary commands when loaded; convert it to safetensors from "
                f"a trusted environment. Detail: {str(exc).splitlines()[0]}"
            ) from None
        raise CheckpointError(f"{path}: corrupt torch checkpoint: {exc}") from exc
    except Exception as exc:  # torch raises RuntimeError/EOFError/... for damaged files
        raise CheckpointError(f"{path}: cannot read torch checkpoint: {exc}") from exc
    return _state_dict_of(path, state)


def _state_dict_of(path: Path, state: object) -> dict[str, torch.Tensor]:
    if isinstance(state, dict) and not all(isinstance(v, torch.Tensor) for v in state.values()):
        # Training checkpoints often wrap the weights: {"state_dict": {...}, "epoch": 3}.
        for key in ("state_dict", "model", "module"):
            inner = state.get(key)
            if isinstance(inner, dict) and inner:
                state = inner
                break
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a state dict (found {type(state).__name__})")
    bad = sorted(str(k) for k, v in state.items() if not isinstance(v, torch.Tensor))
    if bad or not all(isinstance(k, str) for k in state):
        shown = ", ".join(bad[:5]) or "non-string keys"
        raise CheckpointError(f"{path}: not a state dict of tensors (non-tensor entries: {shown})")
    return state


def _torch_entries(path: Path, state: dict[str, torch.Tensor]) -> dict[str, _Entry]:
    return {
        name: _Entry(path, tuple(t.shape), t.dtype, t.numel() * t.element_size())
        for name, t in state.items()
    }
