"""Sung et al.'s multimodal merging study in miniature: pre-train, merge, fine-tune, measure.

Sung et al. 2023, "An Empirical Study of Multimodal Model Merging" (EMNLP Findings,
https://arxiv.org/abs/2304.14933; code github.com/ylsung/vl-merging). The pipeline
(`run_recipe`), per seed:

1. seed pre-training: the modality-AGNOSTIC model (`mergelab_bench.multimodal.family`) on both
   modalities with VLMo's objectives: masked image modelling (pixels of 40% of the patches),
   masked language modelling (15% of the words), image-text contrast and image-text matching
   with hard negatives (Bao et al. 2022, https://arxiv.org/abs/2111.02358). Checkpoints part-way
   (`seed_fractions`) give shorter seeds.
2. modality-specific pre-training from each seed (`expand_to_specific`), same objectives: the
   vision experts see images, the language experts texts, the VL experts image-text pairs. A
   seed fraction of 0 is the paper's naive setting: experts initialised independently.
3. variants: the specific model itself (no merge, the upper bound); an agnostic model
   pre-trained from scratch for the same total steps; merges of the specific models' experts
   (`mergelab.merge_expert_groups`): interpolation, modality arithmetic
   (lambda picked by the merged model's pre-training validation loss), RegMean (Grams of every
   expert's own inputs, collected on the specific model), TIES.
4. every variant fine-tuned on four tasks (`mergelab_bench.multimodal.data`): image-text retrieval,
   VQA, NLVR2-style statements about two images, image classification; zero-shot retrieval
   is measured before fine-tuning.
5. weight metrics between the vision and language copies (cosine, L2, SSD, TSSD from
   `mergelab.diagnostics.metrics`, on raw weights and relative to the seed) per block and over
   the model, and their Spearman correlation with each merge's drop (the specific model's
   average score minus the merge's).

Pre-trained checkpoints and fine-tuning scores are cached under `$MERGELAB_CACHE/multimodal`
(default `~/.cache/mergelab/multimodal`), keyed by a hash of everything that produced them and
built atomically (`mergelab.training.cached_folder`). Results are written atomically as
`results.json` and `results.md`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mergelab.errors import MergeLabError
from mergelab.fileio import write_text_atomic
from mergelab.progress import progress_bar
from mergelab.training import FinetuneSettings, cache_key, cached_folder, train
from mergelab_bench.multimodal.data import (
    MASK_ID,
    SPECIAL_TOKENS,
    TASK_NAMES,
    ClassificationData,
    DataSettings,
    MultimodalData,
    NLVRData,
    PairData,
    VQAData,
    build_data,
    compatible,
    to_pixels,
)
from mergelab_bench.multimodal.family import (
    LANGUAGE,
    VISION,
    FamilyConfig,
    MultimodalTransformer,
    StateDict,
    agnostic_config,
    agnostic_name,
    build_model,
    expand_to_specific,
    expert_tensor_names,
)

# Bump when the meaning of a cached checkpoint or score changes (objectives, schedules, data).
RECIPE_VERSION = 1
# Bump when only downstream scores change (task data, fine-tuning, evaluation, validation losses):
# pre-trained checkpoints stay valid. 2: NLVR labels balanced per statement template, validation
# ITM negatives drawn uniformly.
SCORES_VERSION = 2
Log = Callable[[str], None]


# --- settings ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The family's shape; the vocabulary, text length and image size come from the data."""

    dim: int = 96
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    vl_layers: int = 1
    patch_size: int = 8
    embed_dim: int = 64


def _lineage(seed_fraction: float) -> str:
    return {0.0: "naive", 1.0: "seed"}.get(seed_fraction, f"seed x{seed_fraction:g}")


def specific_label(seed_fraction: float) -> str:
    """The row name of the modality-specific model pre-trained from a seed fraction."""
    return "modality-specific (no merge)" + ("" if seed_fraction == 1.0 else f", {_lineage(seed_fraction)}")


@dataclass(frozen=True)
class MergeRun:
    """One merge: which specific model (by seed fraction), the method and its parameters.

    method `modality_arithmetic` with `lambdas` picks lambda from that grid by the merged
    model's pre-training validation loss; `parameters` are passed as they are otherwise."""

    seed_fraction: float
    method: str
    parameters: tuple[tuple[str, float], ...] = ()
    lambdas: tuple[float, ...] = ()

    @property
    def label(self) -> str:
        where = _lineage(self.seed_fraction)
        shown = ", ".join(f"{k} {v:g}" for k, v in self.parameters)
        return f"{where} + {self.method}" + (f" ({shown})" if shown else "")


DEFAULT_MERGES = (
    MergeRun(0.0, "interpolation", (("alpha", 0.5),)),
    MergeRun(1.0, "interpolation", (("alpha", 0.5),)),
    MergeRun(1.0, "modality_arithmetic", lambdas=(0.3, 0.5, 0.7, 1.0)),
    MergeRun(1.0, "regmean", (("alpha", 0.9),)),
    MergeRun(1.0, "ties", (("density", 0.5), ("weight", 1.0))),
    MergeRun(0.5, "interpolation", (("alpha", 0.5),)),
    MergeRun(0.0, "regmean", (("alpha", 0.9),)),
)


@dataclass(frozen=True)
class RecipeSettings:
    """Everything a run depends on (all of it enters the cache keys).

    seed_steps: agnostic seed pre-training steps (seed fraction 1); specific_steps: the
    modality-specific stage after it; the agnostic-from-scratch variant trains
    seed_steps + specific_steps. seed_fractions: seeds (shares of seed_steps) from which a
    specific model is pre-trained; 0 is the naive setting (no seed). The first specific model
    of fraction 1 is the upper-bound row.
    """

    model: ModelShape = ModelShape()
    data: DataSettings = DataSettings()
    seed_steps: int = 600
    specific_steps: int = 600
    batch_size: int = 32
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    image_mask_ratio: float = 0.4
    text_mask_probability: float = 0.15
    seed_fractions: tuple[float, ...] = (0.0, 0.5, 1.0)
    merges: tuple[MergeRun, ...] = DEFAULT_MERGES
    gram_batches: int = 4
    finetune_steps: int = 150
    finetune_batch_size: int = 32
    finetune_learning_rate: float = 3e-4
    head_learning_rate: float = 1e-3
    eval_batch_size: int = 250
    tssd_top_k: float = 0.2

    def __post_init__(self) -> None:
        problems = []
        if self.seed_steps < 1 or self.specific_steps < 1 or self.finetune_steps < 1:
            problems.append("seed_steps, specific_steps and finetune_steps must be at least 1")
        if 1.0 not in self.seed_fractions:
            problems.append("seed_fractions must hold 1.0 (the full seed: the upper-bound row)")
        if any(not 0.0 <= f <= 1.0 for f in self.seed_fractions):
            problems.append(f"seed_fractions must lie in [0, 1]; got {self.seed_fractions}")
        empty = sorted(f for f in self.seed_fractions if f > 0 and round(f * self.seed_steps) == 0)
        if empty:
            problems.append(
                f"seed fractions {empty} give 0 of seed_steps={self.seed_steps} steps (use 0 for the naive setting)"
            )
        missing = sorted({m.seed_fraction for m in self.merges} - set(self.seed_fractions))
        if missing:
            problems.append(f"merges use seed fractions {missing} not in seed_fractions")
        if problems:
            raise MergeLabError("invalid RecipeSettings: " + "; ".join(problems))

    def family_config(self, vocab_size: int, modality_specific: bool) -> FamilyConfig:
        shape = asdict(self.model)
        return FamilyConfig(
            **shape,
            image_size=(self.data.canvas, self.data.canvas),
            vocab_size=vocab_size,
            max_text_length=self.data.max_text_length,
            modality_specific=modality_specific,
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["merges"] = [asdict(m) for m in self.merges]
        return out


def quick_settings() -> RecipeSettings:
    """Seconds-long settings for tests and CI: tiny model, 2 optimiser steps per stage, sklearn
    digits and Rotten Tomatoes only (no Debian data packages needed)."""
    return RecipeSettings(
        model=ModelShape(dim=32, depth=2, heads=2, mlp_ratio=2.0, vl_layers=1, patch_size=8, embed_dim=16),
        data=DataSettings(
            image_source="digits",
            text_sources=("rotten_tomatoes",),
            canvas=16,
            max_text_length=16,
            max_vocab=400,
            pretrain_images=96,
            pretrain_texts=96,
            validation_images=32,
            validation_texts=32,
            train_pool=96,
            test_pool=64,
            task_train=48,
            task_test=40,
            retrieval_pool=20,
        ),
        seed_steps=2,
        specific_steps=2,
        batch_size=8,
        gram_batches=1,
        finetune_steps=2,
        finetune_batch_size=8,
        eval_batch_size=64,
        merges=(
            MergeRun(0.0, "interpolation", (("alpha", 0.5),)),
            MergeRun(1.0, "interpolation", (("alpha", 0.5),)),
            MergeRun(1.0, "modality_arithmetic", lambdas=(0.5, 1.0)),
            MergeRun(1.0, "regmean", (("alpha", 0.9),)),
            MergeRun(1.0, "ties", (("density", 0.5), ("weight", 1.0))),
            MergeRun(0.5, "interpolation", (("alpha", 0.5),)),
        ),
    )


def full_settings() -> RecipeSettings:
    """The study's settings, sized for about 20 minutes per seed on 2 CPU cores."""
    return RecipeSettings()


# --- progress ------------------------------------------------------------------------------------


class Reporter:
    """One rich progress bar per stage (or nothing), plus a log line when a stage ends."""

    def __init__(self, enabled: bool, log: Log | None):
        self.enabled, self.log = enabled, log or (lambda _message: None)

    @contextmanager
    def stage(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        started = time.perf_counter()
        with progress_bar(description, total, self.enabled) as advance:
            yield advance
        self.log(f"{description}: {time.perf_counter() - started:.1f} s")


# --- pre-training objectives ---------------------------------------------------------------------


def trim_padding(ids: torch.Tensor) -> torch.Tensor:
    """Drop the trailing columns that are padding in every row: padded keys are masked out of
    attention anyway, so the real tokens' outputs do not change, and the batch costs less."""
    used = (ids != MultimodalTransformer.pad_id).any(dim=0).nonzero()
    return ids[:, : int(used.max()) + 1] if used.numel() else ids[:, :1]


def _mask_patches(batch: int, patches: int, ratio: float, generator: torch.Generator) -> torch.Tensor:
    """bool [batch, patches] with exactly max(1, round(ratio * patches)) True per row."""
    count = max(1, round(ratio * patches))
    ranks = torch.rand(batch, patches, generator=generator).argsort(dim=1).argsort(dim=1)
    return ranks < count


def mask_words(
    ids: torch.Tensor, probability: float, vocab_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: (input ids, targets with -100 where not predicted). Each word (special
    tokens excluded) is chosen with `probability` (at least one per batch); a chosen word becomes
    [MASK] 80% of the time, a random word 10%, stays 10%."""
    maskable = ids >= len(SPECIAL_TOKENS)
    chosen = (torch.rand(ids.shape, generator=generator) < probability) & maskable
    if not chosen.any() and maskable.any():
        first = maskable.reshape(-1).nonzero()[0]
        chosen.view(-1)[first] = True
    targets = torch.where(chosen, ids, torch.full_like(ids, -100))
    roll = torch.rand(ids.shape, generator=generator)
    random_words = torch.randint(len(SPECIAL_TOKENS), vocab_size, ids.shape, generator=generator)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(ids, MASK_ID), ids)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_words, inputs)
    return inputs, targets


def soft_contrastive_loss(logits: torch.Tensor, fits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE whose targets spread over every fitting caption/image (`fits` bool
    [images, texts]), not only the paired one: identical descriptions are not negatives."""
    fits = fits.float()
    image_to_text = -(fits / fits.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(fits / fits.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


def _hard_negatives(similarity: torch.Tensor, fits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each row, a column drawn with probability softmax(similarity) among non-fitting
    columns (VLMo's hard negatives); a row where everything fits draws uniformly."""
    weights = similarity.float().softmax(dim=1) * (~fits)
    empty = weights.sum(1) <= 0
    weights[empty] = 1.0
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def contrastive_logits(model: MultimodalTransformer, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    scale = model.logit_scale.exp().clamp(max=100.0)
    return scale * model.image_embedding(pixels) @ model.text_embedding(ids).T


def pretraining_losses(
    model: MultimodalTransformer,
    pairs: PairData,
    pair_index: torch.Tensor,
    texts: torch.Tensor,
    settings: RecipeSettings,
    generator: torch.Generator,
    hard_negatives: bool = True,
) -> dict[str, torch.Tensor]:
    """VLMo's four objectives on one batch: `mim`, `mlm`, `itc`, `itm` (scalar tensors).

    hard_negatives: ITM negatives drawn by the model's own image-text similarity (VLMo, for
    training); False draws them uniformly among the non-matching pairs, so that the ITM loss of
    different models is measured on the same negatives (validation)."""
    pixels = to_pixels(pairs.images.images[pair_index])
    captions = trim_padding(pairs.captions[pair_index])
    texts = trim_padding(texts)
    fits = compatible(pairs.images.attributes[pair_index], pairs.caption_says[pair_index])
    batch = pixels.shape[0]

    patch_mask = _mask_patches(batch, model.config.num_patches, settings.image_mask_ratio, generator)
    hidden = model(pixels=pixels, patch_mask=patch_mask)
    predicted = model.mim_head(hidden[:, 1:])[patch_mask]
    mim = F.mse_loss(predicted, model.patchify(pixels)[patch_mask] * 2 - 1)

    inputs, targets = mask_words(texts, settings.text_mask_probability, model.config.vocab_size, generator)
    hidden = model(input_ids=inputs)
    chosen = targets != -100
    mlm = F.cross_entropy(model.mlm_head(hidden[chosen]), targets[chosen])

    logits = contrastive_logits(model, pixels, captions)
    itc = soft_contrastive_loss(logits, fits)

    half = batch // 2
    with torch.no_grad():
        weights = logits if hard_negatives else torch.zeros_like(logits)
        negative_text = _hard_negatives(weights[:half], fits[:half], generator)
        negative_image = _hard_negatives(weights.T[half:], fits.T[half:], generator)
    image_rows = torch.cat([torch.arange(batch), torch.arange(half), negative_image])
    text_rows = torch.cat([torch.arange(batch), negative_text, torch.arange(half, batch)])
    matches = fits[image_rows, text_rows].long()
    joint = model.encode_pair(pixels[image_rows], captions[text_rows])
    itm = F.cross_entropy(model.itm_head(joint), matches)
    return {"mim": mim, "mlm": mlm, "itc": itc, "itm": itm}


class PretrainingExamples:
    """VLMo's pre-training batches as `Examples` of the one training loop (`mergelab.training`).

    The loop draws a batch of image-caption pairs; each loss also takes the next batch of the
    text-only stream and its masks from `generator`, the same stream the loop's batches come
    from, so batches, masks and negatives all follow from one seed. Every step's four losses
    are kept in `history`."""

    def __init__(self, data: MultimodalData, settings: RecipeSettings, generator: torch.Generator):
        self.pretraining = data.pretrain
        self.settings = settings
        self.generator = generator
        self.text_batches = _index_batches(self.pretraining.texts.shape[0], settings.batch_size, generator)
        self.history: list[dict[str, float]] = []

    def __len__(self) -> int:
        return len(self.pretraining.pairs)

    def loss(self, model: nn.Module, head: nn.Module | None, indices: torch.Tensor) -> torch.Tensor:
        losses = pretraining_losses(
            model, self.pretraining.pairs, indices, self.pretraining.texts[next(self.text_batches)],
            self.settings, self.generator,
        )
        self.history.append(_floats(losses))
        return sum(losses.values())


def pretraining_settings(settings: RecipeSettings, steps: int, seed: int) -> FinetuneSettings:
    """The one loop's settings for `steps` of pre-training: AdamW, every parameter trained,
    gradients clipped to norm 1, linear warm-up then cosine decay to 10% of the peak."""
    warmup = max(1, round(settings.warmup_fraction * steps))
    return FinetuneSettings.checked(
        steps=steps,
        batch_size=settings.batch_size,
        learning_rate=settings.learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=warmup if warmup < steps else 0,  # one step: the peak either way
        schedule="cosine",
        lr_floor=0.1,
        max_grad_norm=1.0,
        freeze_input_embeddings=False,
        seed=seed,
    )


def pretrain(
    model: MultimodalTransformer,
    data: MultimodalData,
    steps: int,
    settings: RecipeSettings,
    seed: int,
    *,
    snapshots: Sequence[int] = (),
    advance: Callable[[int], None] = lambda _n: None,
) -> tuple[dict[int, StateDict], list[dict[str, float]]]:
    """Train `model` in place for `steps` steps with the one training loop
    (`pretraining_settings`, `PretrainingExamples`).

    Returns the state dicts after each step count in `snapshots` (0 = before training) and the
    losses of every step. Batches and masks come from `seed` only.
    """
    generator = torch.Generator().manual_seed(seed)
    examples = PretrainingExamples(data, settings, generator)
    taken: dict[int, StateDict] = {}
    if 0 in snapshots:
        taken[0] = _clone_state(model)

    def snapshot(step: int) -> None:
        if step in snapshots:
            taken[step] = _clone_state(model)

    if steps > 0:
        train(
            model, examples, pretraining_settings(settings, steps, seed), generator=generator,
            progress=advance, description="pre-training", after_step=snapshot,
        )
    model.eval()
    return taken, examples.history


@torch.no_grad()
def validation_losses(model: MultimodalTransformer, data: MultimodalData, settings: RecipeSettings) -> dict[str, float]:
    """The four pre-training losses on the held-out pre-training data (fixed masks and
    negatives), and their sum as `total`: how well a merged model kept what pre-training
    taught, without any fine-tuning."""
    model.eval()
    generator = torch.Generator().manual_seed(12345)
    pairs, texts = data.pretrain.validation_pairs, data.pretrain.validation_texts
    size = min(128, len(pairs), texts.shape[0])
    sums: dict[str, float] = {}
    batches = 0
    for start in range(0, min(len(pairs), texts.shape[0]) - size + 1, size):
        index = torch.arange(start, start + size)
        losses = pretraining_losses(model, pairs, index, texts[index], settings, generator, hard_negatives=False)
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        batches += 1
    if batches == 0:
        raise MergeLabError("validation data smaller than one batch: raise validation_images/texts")
    out = {name: value / batches for name, value in sums.items()}
    out["total"] = sum(out.values())
    return out


def _index_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled epochs of index batches (a batch never spans two epochs)."""
    if n < batch_size:
        raise MergeLabError(f"{n} examples are fewer than one batch of {batch_size}")
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _clone_state(model: nn.Module) -> StateDict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _floats(losses: Mapping[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in losses.items()}


# --- downstream tasks ----------------------------------------------------------------------------


def _vqa_head(dim: int, answers: int) -> nn.Module:
    # VLMo's VQA classifier: widen, normalise, GELU, project onto the answers.
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(), nn.Linear(2 * dim, answers))


def _nlvr_head(dim: int) -> nn.Module:
    # VLMo's NLVR2 classifier on the two pairs' concatenated CLS vectors.
    return nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.LayerNorm(2 * dim), nn.GELU(), nn.Linear(2 * dim, 2))


def _retrieval_loss(model, head, data: PairData, index):
    fits = compatible(data.images.attributes[index], data.caption_says[index])
    pixels = to_pixels(data.images.images[index])
    return soft_contrastive_loss(contrastive_logits(model, pixels, trim_padding(data.captions[index])), fits)


def _vqa_logits(model, head, data: VQAData, index):
    return head(model.encode_pair(to_pixels(data.images.images[index]), trim_padding(data.questions[index])))


def _nlvr_logits(model, head, data: NLVRData, index):
    text = trim_padding(data.statements[index])
    first = model.encode_pair(to_pixels(data.first.images[index]), text)
    second = model.encode_pair(to_pixels(data.second.images[index]), text)
    return head(torch.cat([first, second], dim=1))


def _classification_logits(model, head, data: ClassificationData, index):
    return head(model.encode_image(to_pixels(data.images.images[index])))


@dataclass(frozen=True)
class DownstreamTask:
    """How the study trains and scores a model on one task: a head (None: the model's own
    contrastive heads), a training loss, and a test score in percent (with details). The task's
    data is an eval `Task`: `MultimodalData.task(name)`."""

    name: str
    metric: str
    make_head: Callable[[MultimodalTransformer, MultimodalData], nn.Module | None]
    loss: Callable[..., torch.Tensor]
    evaluate: Callable[..., dict[str, float]]


def _labels_of(data) -> torch.Tensor:
    return data.answers if isinstance(data, VQAData) else data.labels


def _classifier_task(name: str, metric: str, make_head, logits_fn) -> DownstreamTask:
    def loss(model, head, data, index):
        return F.cross_entropy(logits_fn(model, head, data, index), _labels_of(data)[index])

    @torch.no_grad()
    def evaluate(model, head, data, settings: RecipeSettings) -> dict[str, float]:
        correct = 0
        for index in torch.arange(len(data)).split(settings.eval_batch_size):
            predicted = logits_fn(model, head, data, index).argmax(1)
            correct += int((predicted == _labels_of(data)[index]).sum())
        return {"score": 100.0 * correct / len(data)}

    return DownstreamTask(name, metric, make_head, loss, evaluate)


@torch.no_grad()
def evaluate_retrieval(model: MultimodalTransformer, data: PairData, pool: int, batch_size: int = 250) -> dict[str, float]:
    """Recall@1/5 image->text and text->image, in percent, averaged over pools of `pool`
    consecutive test pairs. A hit is any candidate whose caption fits the image (every
    retrieval caption names class, size, position and tone), so indistinguishable duplicates do
    not count as misses. `score` is the mean of the four recalls."""
    model.eval()
    images = torch.cat([model.image_embedding(to_pixels(data.images.images[i])) for i in torch.arange(len(data)).split(batch_size)])
    texts = torch.cat([model.text_embedding(trim_padding(data.captions[i])) for i in torch.arange(len(data)).split(batch_size)])
    sums: dict[str, float] = {}
    pools = 0
    for start in range(0, len(data) - pool + 1, pool):
        span = slice(start, start + pool)
        fits = compatible(data.images.attributes[span], data.caption_says[span])
        for name, value in retrieval_recalls(images[span] @ texts[span].T, fits).items():
            sums[name] = sums.get(name, 0.0) + value
        pools += 1
    out = {k: 100.0 * v / pools for k, v in sums.items()}
    out["score"] = sum(out.values()) / len(out)
    return out


def retrieval_recalls(
    similarity: torch.Tensor, fits: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Recall@k (fractions) of image->text (`i2t_r{k}`: rows of `similarity` [images, texts])
    and text->image (`t2i_r{k}`: columns): the share of queries with a fitting candidate
    (`fits` bool, same shape) among their k most similar."""
    out = {}
    for k in ks:
        k_texts = min(k, similarity.shape[1])
        top_texts = similarity.topk(k_texts, dim=1).indices
        out[f"i2t_r{k}"] = fits.gather(1, top_texts).any(1).float().mean().item()
    for k in ks:
        k_images = min(k, similarity.shape[0])
        top_images = similarity.topk(k_images, dim=0).indices.T
        out[f"t2i_r{k}"] = fits.T.gather(1, top_images).any(1).float().mean().item()
    return out


DOWNSTREAM_TASKS: dict[str, DownstreamTask] = {
    "retrieval": DownstreamTask(
        "retrieval",
        "mean of recall@1/5 both ways",
        lambda model, data: None,
        _retrieval_loss,
        lambda model, head, data, settings: evaluate_retrieval(
            model, data, settings.data.retrieval_pool, settings.eval_batch_size
        ),
    ),
    "vqa": _classifier_task(
        "vqa", "accuracy", lambda model, data: _vqa_head(model.config.dim, len(data.answers)), _vqa_logits
    ),
    "nlvr": _classifier_task("nlvr", "accuracy", lambda model, data: _nlvr_head(model.config.dim), _nlvr_logits),
    "classification": _classifier_task(
        "classification",
        "accuracy",
        lambda model, data: nn.Linear(model.config.dim, data.num_classes),
        _classification_logits,
    ),
}
assert tuple(DOWNSTREAM_TASKS) == TASK_NAMES


def finetune_and_score(
    model: MultimodalTransformer,
    task: DownstreamTask,
    data: MultimodalData,
    settings: RecipeSettings,
    seed: int,
    advance: Callable[[int], None] = lambda _n: None,
) -> dict[str, float]:
    """Fine-tune a copy of `model` (all of it, plus a fresh head) on `task`'s training split by
    `finetune_settings`, then score it on the test split. Batches and the head's initialisation
    come from `seed`."""
    model = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = task.make_head(model, data)
    split = data.task(task.name).splits()
    train(model, _TaskExamples(task, split.train), finetune_settings(settings, seed), head=head,
          progress=advance, description=f"fine-tuning on {task.name}")  # fmt: skip
    model.eval()
    return task.evaluate(model, head, split.test, settings)


def finetune_settings(settings: RecipeSettings, seed: int) -> FinetuneSettings:
    """The downstream fine-tuning of every model: all of it plus a fresh head (at its own
    learning rate), AdamW with weight decay 0.01, 10% warm-up then linear decay, gradients
    clipped to norm 1."""
    steps = settings.finetune_steps
    return FinetuneSettings.checked(
        recipe="joint", steps=steps, batch_size=settings.finetune_batch_size,
        learning_rate=settings.finetune_learning_rate,
        head_learning_rate=settings.head_learning_rate, weight_decay=0.01,
        warmup_steps=min(max(1, steps // 10), steps - 1), schedule="linear", max_grad_norm=1.0,
        freeze_input_embeddings=False, seed=seed,
    )  # fmt: skip


class _TaskExamples:
    """A downstream task's training split as examples of the training loop."""

    def __init__(self, task: DownstreamTask, data):
        self.task, self.data = task, data

    def __len__(self) -> int:
        return len(self.data)

    def loss(self, model: nn.Module, head: nn.Module | None, indices: torch.Tensor) -> torch.Tensor:
        return self.task.loss(model, head, self.data, indices)


# --- weight metrics between the modality copies --------------------------------------------------


def _flat(state: Mapping[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([state[n].detach().float().reshape(-1) for n in names])


def modality_metrics(
    state: Mapping[str, torch.Tensor],
    config: FamilyConfig,
    seed_state: Mapping[str, torch.Tensor] | None,
    top_k: float,
) -> dict[str, Any]:
    """Cosine, L2, SSD and TSSD between the vision and language copies' linear weight
    matrices (attention qkv/proj, MLP fc1/fc2) of a specific model,
    per block (`blocks`, keyed by block index) and over every block (`model`), on the raw
    weights (`raw`) and, when `seed_state` is given, on the modality vectors W_m - W_seed
    (`seed`). Sung et al. propose these as predictors of how well a model merges."""
    from mergelab.diagnostics.metrics import (
        cosine_similarity,
        l2_distance,
        soft_sign_dissimilarity,
        truncated_soft_sign_dissimilarity,
    )

    # Only the linear maps' weight matrices: layer-norm gains start at 1 in every setting (even
    # the naive one) and would dominate cosine and L2 while saying nothing about relatedness.
    vision_names = [n for n in expert_tensor_names(config, VISION) if state[n].dim() == 2]
    language_names = [n for n in expert_tensor_names(config, LANGUAGE) if state[n].dim() == 2]

    def measure(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
        return {
            "cosine": cosine_similarity(a, b),
            "l2": l2_distance(a, b),
            "ssd": soft_sign_dissimilarity([a, b]),
            "tssd": truncated_soft_sign_dissimilarity([a, b], top_k),
        }

    def both(v_names: Sequence[str], l_names: Sequence[str]) -> dict[str, dict[str, float]]:
        v, lang = _flat(state, v_names), _flat(state, l_names)
        out = {"raw": measure(v, lang)}
        if seed_state is not None:
            base = _flat(seed_state, [agnostic_name(n) for n in v_names])
            out["seed"] = measure(v - base, lang - base)
        return out

    blocks = {}
    for block in range(config.depth):
        prefix = f"blocks.{block}."
        blocks[str(block)] = both(
            [n for n in vision_names if n.startswith(prefix)],
            [n for n in language_names if n.startswith(prefix)],
        )
    return {"blocks": blocks, "model": both(vision_names, language_names)}


# --- caching -------------------------------------------------------------------------------------

MODEL_FILE = "model.safetensors"
META_FILE = "meta.json"


def default_cache_root() -> Path:
    """`$MERGELAB_CACHE/multimodal` or `~/.cache/mergelab/multimodal` (outside the repository)."""
    env = os.environ.get("MERGELAB_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "mergelab") / "multimodal"


def _cached_states(
    root: Path | None, name: str, build: Callable[[], tuple[dict[str, StateDict], dict[str, Any]]]
) -> tuple[dict[str, StateDict], dict[str, Any], bool]:
    """(state dicts by file stem, meta, was_cached); built with `build` and stored atomically
    under `root/name` unless `root` is None (no cache)."""
    if root is None:
        states, meta = build()
        return states, meta, False
    produced: dict[str, Any] = {}

    def write(folder: Path) -> None:
        states, meta = build()
        produced.update(states=states, meta=meta)
        for stem, state in states.items():
            save_file({k: v.contiguous() for k, v in state.items()}, str(folder / f"{stem}.safetensors"))
        (folder / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")

    folder, was_cached = cached_folder(root, name, write)
    if not was_cached:
        return produced["states"], produced["meta"], False
    meta = json.loads((folder / META_FILE).read_text())
    states = {p.name.removesuffix(".safetensors"): load_file(str(p)) for p in sorted(folder.glob("*.safetensors"))}
    return states, meta, True


def _cached_json(root: Path | None, name: str, build: Callable[[], dict[str, Any]]) -> tuple[dict[str, Any], bool]:
    if root is None:
        return build(), False
    produced: dict[str, Any] = {}

    def write(folder: Path) -> None:
        produced.update(build())
        (folder / "result.json").write_text(json.dumps(produced, indent=1, sort_keys=True) + "\n")

    folder, was_cached = cached_folder(root, name, write)
    if not was_cached:
        return produced, False
    return json.loads((folder / "result.json").read_text()), True


# --- the pipeline --------------------------------------------------------------------------------


@dataclass
class Variant:
    """One row of the results table for one seed."""

    name: str
    kind: str  # "specific", "agnostic" or "merge"
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    zero_shot_retrieval: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    pretrain_seconds: float = 0.0
    merge_seconds: float = 0.0
    finetune_seconds: float = 0.0
    source_fraction: float | None = None
    method: str | None = None
    parameters: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def average(self) -> float:
        return sum(self.scores[t]["score"] for t in TASK_NAMES) / len(TASK_NAMES)


def _model_from_state(config: FamilyConfig, state: Mapping[str, torch.Tensor]) -> MultimodalTransformer:
    model = MultimodalTransformer(config)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _seed_steps(settings: RecipeSettings) -> dict[float, int]:
    return {f: round(f * settings.seed_steps) for f in settings.seed_fractions}


_NOT_IN_SCORE_KEY = ("merges", "seed_fractions", "gram_batches", "tssd_top_k", "seed_steps", "specific_steps")


def _score_model(
    name: str,
    model: MultimodalTransformer,
    data: MultimodalData,
    settings: RecipeSettings,
    seed: int,
    reporter: Reporter,
    cache_root: Path | None,
) -> tuple[dict[str, dict[str, float]], dict[str, float], dict[str, float], float]:
    """(fine-tuned scores per task, zero-shot retrieval, validation losses, seconds spent)."""
    from mergelab.eval.harness import state_dict_hash

    key = cache_key(
        {
            "stage": "scores",
            "version": RECIPE_VERSION,
            "scores_version": SCORES_VERSION,
            "weights": state_dict_hash(model.state_dict()),
            "specific": model.config.modality_specific,
            # What scores depend on besides the weights: data, fine-tuning, validation losses.
            "settings": {k: v for k, v in settings.to_dict().items() if k not in _NOT_IN_SCORE_KEY},
            "seed": seed,
        }
    )
    started = time.perf_counter()

    def build() -> dict[str, Any]:
        zero_shot = evaluate_retrieval(model, data.tasks["retrieval"].test, settings.data.retrieval_pool, settings.eval_batch_size)
        validation = validation_losses(model, data, settings)
        scores = {}
        total = settings.finetune_steps * len(TASK_NAMES)
        with reporter.stage(f"seed {seed}: fine-tune `{name}`", total) as advance:
            for index, task_name in enumerate(TASK_NAMES):
                scores[task_name] = finetune_and_score(
                    model, DOWNSTREAM_TASKS[task_name], data, settings, seed * 1000 + index, advance
                )
        return {"scores": scores, "zero_shot": zero_shot, "validation": validation,
                "seconds": time.perf_counter() - started}

    result, was_cached = _cached_json(cache_root, f"scores-{key}", build)
    if was_cached:
        reporter.log(f"seed {seed}: `{name}` scores from the cache")
    return result["scores"], result["zero_shot"], result["validation"], result["seconds"]


def _by_length(ids: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """(rows, length) groups of `ids` whose rows all have that many non-padding tokens (padding
    is trailing), so a batch of one group needs no padding at all."""
    lengths = (ids != MultimodalTransformer.pad_id).sum(dim=1)
    return [((lengths == n).nonzero().squeeze(1), int(n)) for n in torch.unique(lengths).tolist()]


def _gram_batches(data: MultimodalData, settings: RecipeSettings, seed: int) -> list[dict[str, torch.Tensor]]:
    """Each modality's pre-training inputs, as the specific model saw them: images (vision
    experts), texts (language experts), image-caption pairs (VL experts on top, V/L below).

    Texts are grouped by length so no batch holds padding: `collect_grams` sees every token
    of a batch, and pad positions (outputs nothing trains or reads) would otherwise make up over
    half of the language and VL copies' Gram rows."""
    generator = torch.Generator().manual_seed(seed)
    pairs, texts = data.pretrain.pairs, data.pretrain.texts
    size = settings.batch_size * 2
    batches: list[dict[str, torch.Tensor]] = []
    for _ in range(settings.gram_batches):
        images = torch.randint(0, len(pairs), (size,), generator=generator)
        words = torch.randint(0, texts.shape[0], (size,), generator=generator)
        batches.append({"pixels": to_pixels(pairs.images.images[images])})
        for rows, length in _by_length(texts[words]):
            batches.append({"input_ids": texts[words[rows], :length]})
        for rows, length in _by_length(pairs.captions[images]):
            chosen = images[rows]
            batches.append({"pixels": to_pixels(pairs.images.images[chosen]), "input_ids": pairs.captions[chosen, :length]})
    return batches


def _merge(
    run: MergeRun,
    specific: MultimodalTransformer,
    seed_state: StateDict | None,
    data: MultimodalData,
    settings: RecipeSettings,
    seed: int,
) -> tuple[StateDict, dict[str, float], list[str]]:
    """(merged agnostic state, the parameters used, notes) for one merge run."""
    from mergelab import merge_expert_groups
    from mergelab.methods import get_method

    state = {k: v.detach().clone() for k, v in specific.state_dict().items()}
    notes: list[str] = []
    grams = None
    if get_method(run.method).merges_with_grams:  # RegMean: each copy's Gram
        from mergelab.stats import collect_grams

        stats = collect_grams(specific, _gram_batches(data, settings, seed), layers=["blocks.*"])
        grams = stats.layers
        notes.append(
            f"Grams from {stats.examples} examples ({settings.gram_batches} draws of "
            f"{2 * settings.batch_size} per input kind, texts grouped by length: no padding)"
        )

    def merged_with(parameters: Mapping[str, float]) -> StateDict:
        return merge_expert_groups(
            state,
            preset="mergelab-mini",
            method=run.method,
            parameters=dict(parameters),
            seed=seed_state,
            grams=grams,
        )

    if run.lambdas:
        config = agnostic_config(specific.config)
        best: tuple[float, float, StateDict] | None = None
        losses = {}
        for value in run.lambdas:
            candidate = merged_with({**dict(run.parameters), "lambda": value})
            loss = validation_losses(_model_from_state(config, candidate), data, settings)["total"]
            losses[value] = loss
            if best is None or loss < best[0]:
                best = (loss, value, candidate)
        assert best is not None
        notes.append("lambda by validation loss: " + ", ".join(f"{k:g}: {v:.3f}" for k, v in losses.items()))
        return best[2], {**dict(run.parameters), "lambda": best[1]}, notes
    return merged_with(dict(run.parameters)), dict(run.parameters), notes


def run_seed(
    settings: RecipeSettings,
    data: MultimodalData,
    seed: int,
    *,
    reporter: Reporter,
    cache_root: Path | None,
) -> dict[str, Any]:
    """Steps 1-5 of the recipe for one seed; returns its part of the report."""
    stage_seconds: dict[str, float] = {}
    base_key = {
        "version": RECIPE_VERSION,
        "settings": {k: v for k, v in settings.to_dict().items() if not k.startswith("finetune") and k not in ("merges", "head_learning_rate", "gram_batches", "tssd_top_k", "eval_batch_size")},
        "seed": seed,
    }
    specific_cfg = settings.family_config(data.tokenizer.vocab_size, True)
    agnostic_cfg = agnostic_config(specific_cfg)
    fractions = sorted(settings.seed_fractions)
    steps_of = _seed_steps(settings)

    # 1. seed pre-training (one run; shorter seeds are its snapshots).
    seed_total = max(steps_of.values())

    def build_seed():
        model = build_model(agnostic_cfg, seed)
        started = time.perf_counter()
        with reporter.stage(f"seed {seed}: seed pre-training (agnostic)", seed_total) as advance:
            snaps, history = pretrain(model, data, seed_total, settings, seed, snapshots=sorted(set(steps_of.values())), advance=advance)
        states = {f"seed-{steps}": snaps[steps] for steps in sorted(set(steps_of.values()))}
        return states, {"seconds": time.perf_counter() - started, "losses_last": history[-1] if history else {}}

    seeds, seed_meta, _ = _cached_states(cache_root, f"seed-{cache_key({**base_key, 'stage': 'seed'})}", build_seed)
    stage_seconds["seed pre-training"] = seed_meta["seconds"]

    # 2. modality-specific pre-training from every seed fraction.
    specifics: dict[float, MultimodalTransformer] = {}
    specific_seconds: dict[float, float] = {}
    for fraction in fractions:
        steps = steps_of[fraction]

        def build_specific(fraction=fraction, steps=steps):
            if steps == 0:
                model = build_model(specific_cfg, seed + 7919)  # independent expert inits
            else:
                model = MultimodalTransformer(specific_cfg)
                model.load_state_dict(expand_to_specific(seeds[f"seed-{steps}"], specific_cfg), strict=True)
            started = time.perf_counter()
            label = "naive, no seed" if steps == 0 else f"seed of {steps} steps"
            with reporter.stage(f"seed {seed}: modality-specific pre-training ({label})", settings.specific_steps) as advance:
                snaps, history = pretrain(model, data, settings.specific_steps, settings, seed + 1 + steps, snapshots=[settings.specific_steps], advance=advance)
            return {"specific": snaps[settings.specific_steps]}, {
                "seconds": time.perf_counter() - started, "losses_last": history[-1]
            }

        key = cache_key({**base_key, "stage": "specific", "seed_steps_used": steps})
        states, meta, _ = _cached_states(cache_root, f"specific-{key}", build_specific)
        specifics[fraction] = _model_from_state(specific_cfg, states["specific"])
        specific_seconds[fraction] = meta["seconds"]
        stage_seconds[f"specific pre-training (seed fraction {fraction:g})"] = meta["seconds"]

    # 3b. the agnostic model from scratch, same total steps as seed + specific.
    scratch_steps = settings.seed_steps + settings.specific_steps

    def build_scratch():
        model = build_model(agnostic_cfg, seed + 104729)
        started = time.perf_counter()
        with reporter.stage(f"seed {seed}: agnostic pre-training from scratch", scratch_steps) as advance:
            snaps, history = pretrain(model, data, scratch_steps, settings, seed + 2, snapshots=[scratch_steps], advance=advance)
        return {"agnostic": snaps[scratch_steps]}, {"seconds": time.perf_counter() - started, "losses_last": history[-1]}

    states, scratch_meta, _ = _cached_states(cache_root, f"scratch-{cache_key({**base_key, 'stage': 'scratch'})}", build_scratch)
    scratch = _model_from_state(agnostic_cfg, states["agnostic"])
    stage_seconds["agnostic pre-training from scratch"] = scratch_meta["seconds"]

    # 4. score the variants.
    variants: list[Variant] = []
    finetune_total = 0.0

    def add(variant: Variant, model: MultimodalTransformer) -> None:
        nonlocal finetune_total
        variant.scores, variant.zero_shot_retrieval, variant.validation, variant.finetune_seconds = _score_model(
            variant.name, model, data, settings, seed, reporter, cache_root
        )
        finetune_total += variant.finetune_seconds
        variants.append(variant)

    # Every specific model is scored: the fraction-1 one is the upper bound, and each merge's
    # drop is measured against the specific model it was merged from (its own pre-training).
    for fraction in sorted(fractions, reverse=True):
        add(
            Variant(specific_label(fraction), "specific", source_fraction=fraction,
                    pretrain_seconds=(seed_meta["seconds"] if fraction > 0 else 0.0) + specific_seconds[fraction]),
            specifics[fraction],
        )
    add(
        Variant("modality-agnostic from scratch", "agnostic", pretrain_seconds=scratch_meta["seconds"]),
        scratch,
    )
    merge_total = 0.0
    for run in settings.merges:
        started = time.perf_counter()
        seed_state = seeds[f"seed-{steps_of[run.seed_fraction]}"] if run.seed_fraction > 0 else None
        with reporter.stage(f"seed {seed}: merge `{run.label}`", 1) as advance:
            merged, used, notes = _merge(run, specifics[run.seed_fraction], seed_state, data, settings, seed)
            advance(1)
        merge_seconds = time.perf_counter() - started
        merge_total += merge_seconds
        if run.lambdas:
            notes.append(f"chose lambda {used['lambda']:g}")
        variant = Variant(
            run.label,  # the same in every seed, whatever lambda validation picks
            "merge",
            pretrain_seconds=(seed_meta["seconds"] if run.seed_fraction > 0 else 0.0) + specific_seconds[run.seed_fraction],
            merge_seconds=merge_seconds,
            source_fraction=run.seed_fraction,
            method=run.method,
            parameters=used,
            notes=notes,
        )
        add(variant, _model_from_state(agnostic_cfg, merged))
    stage_seconds["merges"] = merge_total
    stage_seconds["fine-tuning and evaluation"] = finetune_total

    # 5. metrics between the modality copies, before any merge.
    metrics = {}
    for fraction in fractions:
        seed_state = seeds[f"seed-{steps_of[fraction]}"] if steps_of[fraction] > 0 else None
        metrics[f"{fraction:g}"] = modality_metrics(
            specifics[fraction].state_dict(), specific_cfg, seed_state, settings.tssd_top_k
        )
    return {
        "seed": seed,
        "variants": [asdict(v) | {"average": v.average} for v in variants],
        "metrics": metrics,
        "stage_seconds": stage_seconds,
        "parameters": {"specific": _count(specifics[1.0]), "agnostic": _count(scratch)},
    }


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- report --------------------------------------------------------------------------------------

METRIC_NAMES = ("cosine", "l2", "ssd", "tssd")


def correlations(per_seed: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Spearman's rho of each whole-model metric with the merge drop (the average of the
    specific model the merge was made from minus the merge's), over all merges of all seeds and
    over the interpolation merges alone. The metrics describe a specific model's copies, so
    merges made from one model share an x value. NaN where fewer than three merges or a
    constant column."""
    from scipy.stats import spearmanr

    rows = []
    for subset in ("all merges", "interpolation only"):
        for kind in ("raw", "seed"):
            for metric in METRIC_NAMES:
                xs, ys = [], []
                for seed_result in per_seed:
                    own = {v["source_fraction"]: v["average"] for v in seed_result["variants"] if v["kind"] == "specific"}
                    for v in seed_result["variants"]:
                        if v["kind"] != "merge" or (subset != "all merges" and v["method"] != "interpolation"):
                            continue
                        upper = own[v["source_fraction"]]
                        value = seed_result["metrics"][f"{v['source_fraction']:g}"]["model"].get(kind, {}).get(metric)
                        if value is None or not math.isfinite(value):
                            continue
                        xs.append(value)
                        ys.append(upper - v["average"])
                rho = p_value = float("nan")
                if len(xs) >= 3 and len(set(xs)) > 1 and len(set(ys)) > 1:
                    result = spearmanr(xs, ys)
                    rho, p_value = float(result.statistic), float(result.pvalue)
                rows.append({"subset": subset, "weights": kind, "metric": metric, "n": len(xs), "rho": rho, "p": p_value})
    return rows


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def markdown_report(report: Mapping[str, Any]) -> str:
    """The results as markdown: variants x tasks (mean over seeds, each seed in brackets when
    there are several), retrieval details, metrics per specific model, correlations, timings."""
    per_seed = report["seeds"]
    names = [v["name"] for v in per_seed[0]["variants"]]
    lines = [
        "## Results of the study in miniature (Sung et al. 2023)",
        "",
        f"Command: `{report.get('command', '')}`  ",
        f"Seeds: {', '.join(str(s['seed']) for s in per_seed)}; total wall time {report['wall_seconds']:.0f} s; "
        f"torch threads {report.get('threads')}  ",
        f"Data: {report['data_source']}  ",
        f"Model: {report['model_config']}; parameters: specific {per_seed[0]['parameters']['specific']:,}, "
        f"agnostic {per_seed[0]['parameters']['agnostic']:,}",
        "",
        "### Downstream scores after fine-tuning (test, %)",
        "",
        "Retrieval: mean of recall@1 and @5 in both directions; VQA, NLVR and classification: accuracy. "
        "Zero-shot: retrieval before fine-tuning. Val loss: summed pre-training losses on held-out data "
        "before fine-tuning. Seconds: pre-training of the model's lineage (from its cache entry), merge, "
        "fine-tuning + evaluation.",
        "",
        "| variant | retrieval | VQA | NLVR | classification | average | zero-shot retrieval | val loss "
        "| pretrain s | merge s | fine-tune s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(values: Sequence[float], digits: int = 1) -> str:
        text = _fmt(_mean(values), digits)
        return text + (f" ({' / '.join(_fmt(v, digits) for v in values)})" if len(values) > 1 else "")

    for name in names:
        rows = [next(v for v in s["variants"] if v["name"] == name) for s in per_seed]
        cells = [cell([r["scores"][t]["score"] for r in rows]) for t in TASK_NAMES]
        lines.append(
            f"| {name} | " + " | ".join(cells)
            + f" | {cell([r['average'] for r in rows])} | {cell([r['zero_shot_retrieval']['score'] for r in rows])} "
            f"| {cell([r['validation']['total'] for r in rows], 3)} | {_fmt(_mean([r['pretrain_seconds'] for r in rows]), 0)} "
            f"| {_fmt(_mean([r['merge_seconds'] for r in rows]), 1)} | {_fmt(_mean([r['finetune_seconds'] for r in rows]), 0)} |"
        )
    lines += ["", "### Retrieval details (after fine-tuning, mean over seeds)", "",
              "| variant | image->text R@1 | R@5 | text->image R@1 | R@5 |", "|---|---|---|---|---|"]
    for name in names:
        rows = [next(v for v in s["variants"] if v["name"] == name) for s in per_seed]
        lines.append(f"| {name} | " + " | ".join(
            _fmt(_mean([r["scores"]["retrieval"][k] for r in rows])) for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")
        ) + " |")
    lines += ["", "### Vision vs language copies before merging (whole model, mean over seeds)", "",
              "Over the linear weight matrices of every block (layer norms and biases left out). "
              "Raw: the weights themselves; seed: W_m - W_seed. TSSD keeps the top "
              f"{report['settings']['tssd_top_k']:.0%} magnitudes.", "",
              "| seed fraction | cosine | L2 | SSD | TSSD | cosine (seed) | L2 (seed) | SSD (seed) | TSSD (seed) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for fraction in per_seed[0]["metrics"]:
        model_metrics = [s["metrics"][fraction]["model"] for s in per_seed]
        values = [_fmt(_mean([m["raw"][k] for m in model_metrics]), 3) for k in METRIC_NAMES]
        values += [_fmt(_mean([m.get("seed", {}).get(k, float("nan")) for m in model_metrics]), 3) for k in METRIC_NAMES]
        lines.append(f"| {fraction} | " + " | ".join(values) + " |")
    lines += ["", "Per block (raw TSSD / seed TSSD, mean over seeds):", "",
              "| seed fraction | " + " | ".join(f"block {b}" for b in per_seed[0]["metrics"][next(iter(per_seed[0]["metrics"]))]["blocks"]) + " |",
              "|---|" + "---|" * len(per_seed[0]["metrics"][next(iter(per_seed[0]["metrics"]))]["blocks"])]
    for fraction in per_seed[0]["metrics"]:
        blocks = per_seed[0]["metrics"][fraction]["blocks"]
        cells = []
        for b in blocks:
            raw = _mean([s["metrics"][fraction]["blocks"][b]["raw"]["tssd"] for s in per_seed])
            rel = _mean([s["metrics"][fraction]["blocks"][b].get("seed", {}).get("tssd", float("nan")) for s in per_seed])
            cells.append(f"{_fmt(raw, 3)} / {_fmt(rel, 3)}")
        lines.append(f"| {fraction} | " + " | ".join(cells) + " |")
    lines += ["", "### Spearman correlation of each metric with the merge drop", "",
              "Drop = the average of the modality-specific model a merge was made from minus the merge's; a metric that predicts "
              "merge quality correlates positively (distances) or negatively (cosine). Few merges: read n.", "",
              "| merges | weights | metric | n | rho | p |", "|---|---|---|---|---|---|"]
    for row in report["correlations"]:
        lines.append(f"| {row['subset']} | {row['weights']} | {row['metric']} | {row['n']} | {_fmt(row['rho'], 2)} | {_fmt(row['p'], 3)} |")
    lines += ["", "### Wall time per stage (s)", "", "| stage | " + " | ".join(f"seed {s['seed']}" for s in per_seed) + " |",
              "|---|" + "---|" * len(per_seed)]
    for stage in per_seed[0]["stage_seconds"]:
        lines.append(f"| {stage} | " + " | ".join(_fmt(s["stage_seconds"].get(stage), 0) for s in per_seed) + " |")
    notes = [(s["seed"], v["name"], n) for s in per_seed for v in s["variants"] for n in v["notes"]]
    if notes:
        lines += ["", "### Notes", ""] + [f"- seed {seed}, {name}: {note}" for seed, name, note in notes]
    return "\n".join(lines) + "\n"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def run_recipe(
    settings: RecipeSettings,
    out_dir: str | os.PathLike,
    seeds: Sequence[int] = (0, 1),
    *,
    progress: bool = True,
    log: Log | None = None,
    cache_root: Path | None | str = "default",
    command: str = "",
) -> dict[str, Any]:
    """Run the whole study for each seed; write `results.json` and `results.md` into `out_dir`
    (each atomically) and return the report.

    cache_root: folder of cached checkpoints and scores; "default" = `default_cache_root()`;
        None = no cache (everything recomputed, nothing stored).
    Raises MergeLabError for invalid settings or missing data.
    """
    if not seeds:
        raise MergeLabError("give at least one seed")
    root = default_cache_root() if cache_root == "default" else (Path(cache_root) if cache_root else None)
    reporter = Reporter(progress, log)
    started = time.perf_counter()
    with reporter.stage("data: load, render, tokenize", 1) as advance:
        data = build_data(settings.data)
        advance(1)
    per_seed = [run_seed(settings, data, seed, reporter=reporter, cache_root=root) for seed in seeds]
    config = settings.family_config(data.tokenizer.vocab_size, True)
    report = {
        "command": command,
        "threads": torch.get_num_threads(),
        "settings": settings.to_dict(),
        "model_config": ", ".join(f"{k}={v}" for k, v in asdict(config).items() if k != "modality_specific"),
        "data_source": data.source,
        "vocab_size": data.tokenizer.vocab_size,
        "seeds": per_seed,
        "correlations": correlations(per_seed),
        "wall_seconds": time.perf_counter() - started,
    }
    report["markdown"] = markdown_report(report)
    out = Path(out_dir)
    write_text_atomic(out / "results.json", json.dumps(_json_safe(report), indent=1) + "\n")
    write_text_atomic(out / "results.md", report["markdown"])
    return report


def settings_with(settings: RecipeSettings, **changes: Any) -> RecipeSettings:
    """`settings` with some fields replaced (a convenience for callers and tests)."""
    return replace(settings, **changes)


__all__ = [
    "DOWNSTREAM_TASKS",
    "MergeRun",
    "ModelShape",
    "RecipeSettings",
    "correlations",
    "evaluate_retrieval",
    "finetune_and_score",
    "full_settings",
    "markdown_report",
    "modality_metrics",
    "pretrain",
    "pretraining_losses",
    "quick_settings",
    "retrieval_recalls",
    "run_recipe",
    "settings_with",
    "validation_losses",
]
