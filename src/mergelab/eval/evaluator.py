"""Score a model on a task: metrics with bootstrap confidence intervals; never a merge.

`Evaluator` is the protocol (a model and a task in, a `TaskResult` out); `ModelEvaluator` is the
implementation for `Classifier`s on text and image tasks and `LanguageModel`s on perplexity
tasks, with the linear-probe baseline (`evaluate_probe`). Test scores come from the test split,
anything chosen (the probe's strength) from the validation split.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from mergelab.errors import MergeLabError
from mergelab.eval.bootstrap import CONFIDENCE, RESAMPLES, Interval, bootstrap_interval
from mergelab.eval.data import LabelledImages, LabelledTexts, seeded_subset
from mergelab.eval.harness import check_head, embed_texts
from mergelab.eval.models import Classifier, LanguageModel, Model, load_model
from mergelab.eval.probe import PROBE_CS, select_probe
from mergelab.eval.task import Task

# At most this many examples per split are scored (a seeded random subset of a larger split).
# 2,000 keeps at least 1,000 test examples wherever a split has them: at 80% accuracy the 95%
# interval is then about +-1.8 points, against +-2.5 with 1,000 and +-8 with 100.
DEFAULT_LIMIT = 2000


@dataclass(frozen=True)
class Score:
    """A metric's value on `examples` examples and its bootstrap interval."""

    metric: str
    value: float
    interval: Interval
    examples: int

    def format(self) -> str:
        """`85.0% [82.1, 87.9]` for accuracies (percent), `35.21 [33.02, 37.90]` otherwise."""
        if self.metric == "accuracy":
            low, high = 100 * self.interval.low, 100 * self.interval.high
            return f"{100 * self.value:.1f}% [{low:.1f}, {high:.1f}]"
        return f"{self.value:.2f} [{self.interval.low:.2f}, {self.interval.high:.2f}]"


@dataclass(frozen=True)
class TaskResult:
    """One model's score on one task's split (plus facts such as the probe's strength)."""

    model: str
    task: str
    split: str
    score: Score
    facts: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "model": self.model,
            "task": self.task,
            "split": self.split,
            "metric": self.score.metric,
            "value": self.score.value,
            "low": self.score.interval.low,
            "high": self.score.interval.high,
            "confidence": self.score.interval.confidence,
            "examples": self.score.examples,
            **self.facts,
        }


class Evaluator(Protocol):
    """Scores a model on a task's split; it never merges or trains the model."""

    def evaluate(self, model, task: Task, split: str = "test") -> TaskResult: ...


class ModelEvaluator:
    """Scores `Classifier`s (text and image tasks) and `LanguageModel`s (perplexity tasks).

    limit: at most this many examples of each split (`DEFAULT_LIMIT`; None: all), a seeded
        random subset of a larger split.
    seed: draws the task's splits, the subset and the bootstrap resamples.
    resamples, confidence: of the percentile-bootstrap intervals (over examples).
    batch_size, max_length: of the forward passes (texts truncated to max_length tokens).
    probe_cs: L2 strengths the linear probe tries; the validation split picks one.
    Features are cached per (encoder, task, split), so a model scored with two heads (its own
    and a probe) runs once.
    """

    def __init__(
        self,
        *,
        limit: int | None = DEFAULT_LIMIT,
        seed: int = 0,
        resamples: int = RESAMPLES,
        confidence: float = CONFIDENCE,
        batch_size: int = 64,
        max_length: int = 128,
        probe_cs: Sequence[float] = PROBE_CS,
    ):
        if limit is not None and limit < 1:
            raise MergeLabError(f"`limit` must be a positive number of examples; got {limit}")
        self.limit = limit
        self.seed = seed
        self.resamples = resamples
        self.confidence = confidence
        self.batch_size = batch_size
        self.max_length = max_length
        self.probe_cs = tuple(probe_cs)
        self._splits: dict[int, tuple[Task, object]] = {}
        # Features of one encoder (held, so that its id is not reused): (task id, split) -> [n, d].
        self._encoder: nn.Module | None = None
        self._features: dict[tuple[int, str], torch.Tensor] = {}

    def clear(self) -> None:
        """Forget cached features (call after changing an encoder's weights in place)."""
        self._encoder, self._features = None, {}

    # --- data -----------------------------------------------------------------------------------

    def examples(self, task: Task, split: str):
        """The examples of `task`'s `split` that are scored: at most `limit`, seeded."""
        key = id(task)
        if key not in self._splits:
            # The task is kept alongside so that its id is not reused while cached.
            self._splits[key] = (task, task.splits(self.seed))
        return seeded_subset(self._splits[key][1].get(split), self.limit, self.seed)

    @staticmethod
    def _labels(data) -> torch.Tensor:
        return torch.as_tensor(data.labels, dtype=torch.long)

    # --- classifiers ----------------------------------------------------------------------------

    @torch.no_grad()
    def features(self, model: Classifier, task: Task, split: str) -> torch.Tensor:
        """[n, dim] features (or logits, for a model without head) of the scored examples."""
        if model.encoder is not self._encoder:
            self._encoder, self._features = model.encoder, {}
        key = (id(task), split)
        if key in self._features:
            return self._features[key]
        data = self.examples(task, split)
        if task.modality == "text":
            if model.tokenizer is None:
                raise MergeLabError(f"task {task.name!r} holds texts; the model has no tokenizer")
            features = embed_texts(
                model.encoder, model.tokenizer, data.texts,
                max_length=self.max_length, batch_size=self.batch_size,
            )  # fmt: skip
        elif task.modality == "image":
            if not isinstance(data, LabelledImages):
                raise MergeLabError(f"task {task.name!r} holds no images")
            if model.tokenizer is not None:
                raise MergeLabError(
                    f"{model.name} is a text encoder; task {task.name!r} holds images"
                )
            features = self._image_features(model, data)
        else:
            raise MergeLabError(
                f"task {task.name!r} is a {task.modality} task; a Classifier scores text and "
                "image tasks"
            )
        self._features[key] = features.float()
        return self._features[key]

    def _image_features(self, model: Classifier, data: LabelledImages) -> torch.Tensor:
        encoder = model.encoder
        was_training = encoder.training
        encoder.eval()
        device = next(iter(encoder.parameters()), torch.empty(0)).device
        chunks = []
        try:
            for start in range(0, len(data), self.batch_size):
                pixels = data.pixels(slice(start, start + self.batch_size))
                if model.preprocess is not None:
                    pixels = model.preprocess(pixels)
                chunks.append(_pooled(encoder(pixels.to(device))).cpu())
        finally:
            encoder.train(was_training)
        return torch.cat(chunks)

    def _accuracy(self, model_name: str, task: Task, split: str, logits: torch.Tensor,
                  labels: torch.Tensor, facts: dict | None = None) -> TaskResult:  # fmt: skip
        if logits.shape[-1] != len(task.label_names):
            raise MergeLabError(
                f"the model outputs {logits.shape[-1]} classes; task {task.name!r} has "
                f"{len(task.label_names)} ({', '.join(task.label_names)})"
            )
        correct = (logits.argmax(dim=-1) == labels).double()
        interval = bootstrap_interval(
            correct, resamples=self.resamples, confidence=self.confidence, seed=self.seed
        )
        score = Score("accuracy", float(correct.mean()), interval, len(correct))
        return TaskResult(model_name, task.name, split, score, dict(facts or {}))

    @torch.no_grad()
    def _evaluate_classifier(self, model: Classifier, task: Task, split: str) -> TaskResult:
        if model.head is not None:
            check_head(model.head, len(task.label_names), task.name)
        features = self.features(model, task, split)
        logits = model.head(features) if model.head is not None else features
        return self._accuracy(model.name, task, split, logits,
                              self._labels(self.examples(task, split)))  # fmt: skip

    def linear_probe(self, model: Classifier, task: Task) -> tuple[nn.Linear, float, float]:
        """A linear probe on `model`'s frozen features: fit on the training split, its L2
        strength chosen on validation. Returns (probe, c, validation accuracy)."""
        train = self.examples(task, "train")
        labels = self._labels(train)
        missing = sorted(set(range(len(task.label_names))) - set(labels.tolist()))
        if missing:
            names = [task.label_names[k] for k in missing]
            raise MergeLabError(
                f"task {task.name!r}: the training split has no example of {names}; "
                "the probe needs every class"
            )
        return select_probe(
            self.features(model, task, "train"), labels,
            self.features(model, task, "validation"),
            self._labels(self.examples(task, "validation")),
            len(task.label_names), self.probe_cs,
        )  # fmt: skip

    @torch.no_grad()
    def evaluate_probe(self, model: Classifier, task: Task, split: str = "test",
                       name: str | None = None) -> TaskResult:  # fmt: skip
        """`model`'s encoder with a linear probe (see `linear_probe`) in place of its head."""
        probe, c, validation = self.linear_probe(model, task)
        features = self.features(model, task, split)
        return self._accuracy(
            name or f"{model.name} + linear probe", task, split, probe(features),
            self._labels(self.examples(task, split)),
            {"probe_c": c, "probe_validation_accuracy": validation},
        )  # fmt: skip

    # --- language models ------------------------------------------------------------------------

    def _evaluate_language_model(self, model: LanguageModel, task: Task, split: str) -> TaskResult:
        from mergelab.eval.perplexity import line_losses

        if task.metric != "perplexity":
            raise MergeLabError(
                f"{model.name} is a causal language model; it scores perplexity tasks "
                f"(perplexity:PATH), not the {task.modality} task {task.name!r}"
            )
        data = self.examples(task, split)
        if not isinstance(data, LabelledTexts) or len(data) == 0:
            raise MergeLabError(f"task {task.name!r} has no {split} lines to score")
        nll, tokens = line_losses(
            model.model, model.tokenizer, data.texts,
            max_length=self.max_length, batch_size=self.batch_size,
        )  # fmt: skip
        if float(tokens.sum()) == 0:
            raise MergeLabError(
                f"task {task.name!r}: every {split} line is a single token; nothing to predict"
            )
        mean = bootstrap_interval(
            nll, tokens, resamples=self.resamples, confidence=self.confidence, seed=self.seed
        )
        value = math.exp(float(nll.sum() / tokens.sum()))
        # exp is increasing: the interval of the mean loss maps onto perplexity's.
        interval = Interval(math.exp(mean.low), math.exp(mean.high), mean.confidence)
        facts = {"tokens": int(tokens.sum())}
        return TaskResult(model.name, task.name, split, Score("perplexity", value, interval, len(data)), facts)

    # --- the protocol ---------------------------------------------------------------------------

    def evaluate(self, model: Model | nn.Module | str | os.PathLike, task: Task,
                 split: str = "test") -> TaskResult:  # fmt: skip
        """Score `model` on `task`'s `split`.

        model: a `Classifier` or `LanguageModel`, a model folder (see `models.load_model`), or
            a torch module giving logits from image pixels.
        Raises MergeLabError when model and task do not fit (class counts, modality).
        """
        if isinstance(model, (str, os.PathLike)):
            model = load_model(model)
        elif isinstance(model, nn.Module):
            model = Classifier(model, name=type(model).__name__)
        if isinstance(model, LanguageModel):
            return self._evaluate_language_model(model, task, split)
        if task.metric == "perplexity":
            raise MergeLabError(
                f"task {task.name!r} is scored by perplexity; give a causal language model"
            )
        return self._evaluate_classifier(model, task, split)

    def evaluate_heads(
        self,
        template: Classifier,
        state_dict: Mapping[str, torch.Tensor],
        heads: Mapping[str, nn.Module],
        tasks: Sequence[Task],
        split: str = "test",
    ) -> dict[str, TaskResult]:
        """Score an encoder given as a state dict (loaded into a copy of `template`'s encoder)
        with each task's own head, as the benchmark zoos store fine-tunes and merges.

        Raises MergeLabError for a task without a head or a state dict that does not fit.
        """
        missing = [t.name for t in tasks if t.name not in heads]
        if missing:
            raise MergeLabError(f"no head for task(s) {missing}; heads given for {sorted(heads)}")
        model = Classifier.from_state_dict(template, state_dict, name=template.name)
        results = {}
        for task in tasks:
            model.head = heads[task.name]
            results[task.name] = self.evaluate(model, task, split)
        return results


def _pooled(output) -> torch.Tensor:
    """Features [B, D] from an image module's output: a tensor (flattened), or a Hugging Face
    output's `pooler_output`, else its mean last hidden state over tokens."""
    if isinstance(output, torch.Tensor):
        return output.flatten(1)
    pooled = getattr(output, "pooler_output", None)
    if pooled is not None:
        return pooled.flatten(1)
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is None:
        raise MergeLabError("the image model's output is neither a tensor nor a Hugging Face output")
    return hidden.mean(dim=1) if hidden.dim() == 3 else hidden.flatten(2).mean(dim=2)
