"""LP-FT: fit a linear probe on frozen features, then fine-tune the encoder under that probe.

Kumar et al. 2022, "Fine-Tuning can Distort Pretrained Features and Underperform
Out-of-Distribution" (https://arxiv.org/abs/2202.10054): fine-tuning an encoder under a random
head first moves the features to fit the head; starting from a fitted linear probe (and here
keeping it frozen) changes the features less. For merging that matters: fine-tunes that stay
close to the shared pretrained features merge far better (see DATA.md's measurements: every
merge beat the probe with LP-FT, none did with heads trained from random initialisation).

Also here: saving and loading a fine-tuned encoder + head as a Hugging Face folder, and a cache
of such folders keyed by a hash of everything that produced them, built atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mergelab.errors import CheckpointError
from mergelab.eval.harness import Progress, pooled_features

# Bump when the meaning of a cached folder changes (layout, recipe code) so old ones are ignored.
CACHE_FORMAT = 1
HEAD_FILE = "head.safetensors"
RECIPE_FILE = "recipe.json"


@dataclass(frozen=True)
class LPFTRecipe:
    """Settings of one LP-FT run. Every field is part of the cache key.

    probe_c: inverse L2 strength of the logistic-regression probe (scikit-learn's `C`).
    freeze_word_embeddings: keep the token embedding table fixed; it holds half of MiniLM's
        parameters, rare tokens get noisy updates, and a frozen table is identical in every
        fine-tune, so merges need not reconcile it.
    """

    steps: int = 150
    batch_size: int = 16
    max_length: int = 64
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    probe_c: float = 1.0
    freeze_word_embeddings: bool = True
    seed: int = 0


# --- linear probe ---------------------------------------------------------------------------------


def fit_linear_probe(
    features: torch.Tensor, labels: Sequence[int], num_classes: int, *, c: float = 1.0
) -> nn.Linear:
    """Fit a multinomial logistic regression on raw `features`; return it as an `nn.Linear`.

    No feature scaler is folded into the head: standardising first blew up the weight of a
    near-constant feature and wrecked the later fine-tuning (DATA.md). A binary probe becomes
    two logits (-z/2, +z/2), whose softmax equals the probe's sigmoid(z).
    Raises ValueError when a class is absent from `labels`.
    """
    from sklearn.linear_model import LogisticRegression

    y = torch.as_tensor(labels).numpy()
    present = sorted(set(y.tolist()))
    if present != list(range(num_classes)):
        raise ValueError(f"the probe needs every class 0..{num_classes - 1}; labels hold {present}")
    x = features.detach().double().numpy()
    # lbfgs is deterministic: the same features give the same probe.
    model = LogisticRegression(C=c, max_iter=5000, tol=1e-6).fit(x, y)
    coef = torch.as_tensor(model.coef_, dtype=torch.float32)
    intercept = torch.as_tensor(model.intercept_, dtype=torch.float32)
    if num_classes == 2:
        coef = torch.cat([-coef / 2, coef / 2])
        intercept = torch.cat([-intercept / 2, intercept / 2])
    head = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(coef)
        head.bias.copy_(intercept)
    return head


# --- fine-tuning ----------------------------------------------------------------------------------


def word_embedding_parameter(encoder: nn.Module) -> nn.Parameter:
    """The token embedding table of a Hugging Face encoder."""
    get = getattr(encoder, "get_input_embeddings", None)
    embeddings = get() if get is not None else None
    if embeddings is None or not isinstance(embeddings, nn.Embedding):
        raise TypeError(f"{type(encoder).__name__} has no input embedding table to freeze")
    return embeddings.weight


def trainable_parameters(encoder: nn.Module, recipe: LPFTRecipe) -> list[nn.Parameter]:
    """Set `requires_grad` on `encoder` as `recipe` says; return the parameters to train."""
    for parameter in encoder.parameters():
        parameter.requires_grad_(True)
    if recipe.freeze_word_embeddings:
        word_embedding_parameter(encoder).requires_grad_(False)
    return [p for p in encoder.parameters() if p.requires_grad]


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """`steps` batches of indices into range(n): shuffled epochs, batches never span two."""
    if n < batch_size:
        raise ValueError(f"{n} training examples are fewer than batch_size={batch_size}")
    produced = 0
    while produced < steps:
        order = torch.randperm(n, generator=generator).tolist()
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]
            produced += 1
            if produced == steps:
                return


def finetune_under_head(
    encoder: nn.Module,
    head: nn.Linear,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int],
    recipe: LPFTRecipe,
    *,
    progress: Progress | None = None,
) -> list[float]:
    """Fine-tune `encoder` in place under the frozen `head`; return the loss of every step.

    The batch order and dropout are drawn from `recipe.seed` only (dropout through a forked
    global RNG, the only way to seed it, restored afterwards), so a run is reproducible.
    AdamW with a linear warm-up then linear decay to zero. The head's parameters and (per the
    recipe) the word embeddings end exactly as they started.
    """
    return finetune_classifier(
        encoder, head, tokenizer, texts, labels, recipe, head_learning_rate=None, progress=progress
    )


def finetune_classifier(
    encoder: nn.Module,
    head: nn.Linear,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int],
    recipe: LPFTRecipe,
    *,
    head_learning_rate: float | None = None,
    progress: Progress | None = None,
) -> list[float]:
    """Fine-tune `encoder` (and `head` unless `head_learning_rate` is None) in place.

    With `head_learning_rate=None` the head stays frozen (LP-FT's second stage); otherwise it is
    trained jointly with the encoder at its own learning rate (a head from random init needs a
    larger one than the pretrained encoder). Same schedule and seeding as `finetune_under_head`.
    Returns the loss of every step.
    """
    if len(texts) != len(labels):
        raise ValueError(f"{len(texts)} texts for {len(labels)} labels")
    train_head = head_learning_rate is not None
    head.requires_grad_(train_head)
    groups = [{"params": trainable_parameters(encoder, recipe), "lr": recipe.learning_rate}]
    if train_head:
        groups.append({"params": list(head.parameters()), "lr": head_learning_rate})
    optimizer = torch.optim.AdamW(groups, lr=recipe.learning_rate, weight_decay=recipe.weight_decay)

    def lr_factor(step: int) -> float:
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        remaining = recipe.steps - recipe.warmup_steps
        return max(0.0, (recipe.steps - step) / remaining) if remaining > 0 else 1.0

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(recipe.seed)
    label_tensor = torch.as_tensor(labels)
    losses: list[float] = []
    was_training = encoder.training
    encoder.train()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            for batch in _batches(len(texts), recipe.batch_size, recipe.steps, generator):
                tokens = tokenizer(
                    [texts[i] for i in batch],
                    padding=True,
                    truncation=True,
                    max_length=recipe.max_length,
                    return_tensors="pt",
                )
                features = pooled_features(encoder, tokens["input_ids"], tokens["attention_mask"])
                loss = nn.functional.cross_entropy(head(features), label_tensor[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                losses.append(loss.item())
                if progress is not None:
                    progress(1)
    finally:
        encoder.train(was_training)
        head.requires_grad_(False)
    return losses


# --- saving, loading, caching ----------------------------------------------------------------------


def save_head(head: nn.Linear, path: Path) -> None:
    """Write a linear head as safetensors (`weight` [classes, dim], `bias` [classes])."""
    save_file(
        {"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
        str(path),
    )


def load_head(path: Path) -> nn.Linear:
    """Read a head written by `save_head`."""
    if not path.is_file():
        raise CheckpointError(f"no classifier head at {path}")
    tensors = load_file(str(path))
    missing = sorted({"weight", "bias"} - set(tensors))
    if missing:
        raise CheckpointError(f"{path} lacks tensor(s) {missing}")
    num_classes, dim = tensors["weight"].shape
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        head.weight.copy_(tensors["weight"])
        head.bias.copy_(tensors["bias"])
    return head.requires_grad_(False)


def save_finetuned(
    folder: Path, encoder, tokenizer, head: nn.Linear, recipe: Mapping[str, Any]
) -> None:
    """Write `encoder` as a Hugging Face folder (safetensors + tokenizer) plus the head and the
    settings that produced them (`recipe.json`)."""
    encoder.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    save_head(head, folder / HEAD_FILE)
    (folder / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")


def cache_key(settings: Mapping[str, Any]) -> str:
    """A short stable hash of JSON-serialisable `settings` (key order does not matter)."""
    blob = json.dumps({"cache_format": CACHE_FORMAT, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def recipe_settings(recipe: LPFTRecipe) -> dict[str, Any]:
    return asdict(recipe)


def folder_fingerprint(folder: Path, names: Sequence[str] = ("config.json", "model.safetensors")):
    """Cheap identity of a checkpoint folder: size and hash of the first 64 KiB of each file.

    A safetensors file's first bytes are its header (names, shapes, dtypes, offsets), so this
    tells checkpoints apart without reading hundreds of megabytes.
    """
    parts: dict[str, str] = {}
    for name in names:
        path = Path(folder) / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        with path.open("rb") as handle:
            head = handle.read(1 << 16)
        parts[name] = f"{path.stat().st_size}:{hashlib.sha256(head).hexdigest()[:16]}"
    return parts


DONE_MARKER = ".complete"


def cached_folder(root: Path, name: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
    """Return `root/name`, building it first with `build(temporary_folder)` if absent.

    `build` writes into a fresh temporary folder next to the destination; only when it returns
    is a completion marker written and the folder renamed into place, so a crash mid-build
    leaves no folder that a later run would take as finished. Returns (folder, was_cached).
    """
    root = Path(root)
    final = root / name
    if (final / DONE_MARKER).is_file():
        return final, True
    root.mkdir(parents=True, exist_ok=True)
    if final.exists():
        # A folder without the marker is not ours to trust (older layout or manual copy).
        shutil.rmtree(final)
    temporary = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))
    try:
        build(temporary)
        (temporary / DONE_MARKER).write_text("")
        try:
            os.replace(temporary, final)
        except OSError:
            # Another process finished the same folder first; theirs is as good as ours.
            if not (final / DONE_MARKER).is_file():
                raise
            shutil.rmtree(temporary, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return final, False
