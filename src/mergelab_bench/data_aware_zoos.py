"""Data-aware merges on the benchmark zoos: each zoo's encoder module and task data as TaskData.

The zoo interface (mergelab_bench.zoo.base.BuiltZoo) scores state dicts; data-aware methods also need
the encoder as a module and batches of each task's inputs. This adapter knows the three zoos:
`mlp` (tensor inputs), `text` (tokenised MiniLM batches, mean-pooled features) and `vision`
(MobileNetV2 images, pooled features). The task head comes from the zoo.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mergelab.errors import MergeLabError
from mergelab.stats.batches import TaskData
from mergelab_bench.zoo.base import BuiltZoo

SPLITS = ("train", "validation", "test")
# Optimisers whose papers learn on the unlabeled test inputs themselves (transductive).
TRANSDUCTIVE = ("adamerging",)


def _chunks(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


# The seed of the examples drawn from each split (the same for every method and zoo seed).
DRAW_SEED = 0


def _draw(n: int, examples: int) -> torch.Tensor:
    from mergelab.eval.data import seeded_indices

    return seeded_indices(n, examples, DRAW_SEED)


class ZooData:
    """`module()`: the encoder architecture holding the pretrained weights;
    `task_data(task, split, examples, batch_size)`: `examples` examples of that split, a random
    subset drawn from a fixed seed (the zoos' splits keep their sources' order, often sorted by
    class, so a prefix would be biased)."""

    def __init__(self, built: BuiltZoo):
        self.built = built
        self._module: nn.Module | None = None
        self._tokenizer = None
        if built.zoo not in ("mlp", "text", "vision"):
            raise MergeLabError(f"no data-aware adapter for zoo {built.zoo!r} (mlp, text, vision)")

    def module(self) -> nn.Module:
        if self._module is None:
            zoo = self.built.zoo
            if zoo == "mlp":
                from mergelab_bench.zoo.mlp import MLPEncoder

                module = MLPEncoder(self.built.evaluator.settings.hidden)
            elif zoo == "text":
                from mergelab.training.to_folder import load_text_encoder

                self._tokenizer, module = load_text_encoder()
            else:
                from mergelab_bench.zoo.vision import encoder_from_state_dict

                module = encoder_from_state_dict(self.built.pretrained)
            module.load_state_dict(self.built.pretrained, strict=False)
            self._module = module.eval()
        return self._module

    def _forward(self) -> Callable | None:
        if self.built.zoo == "text":
            from mergelab.stats.text import pooled_forward

            return pooled_forward
        return None  # the mlp and vision encoders return features when called

    def task_data(self, task: str, split: str, examples: int, batch_size: int = 32) -> TaskData:
        if split not in SPLITS:
            raise MergeLabError(f"unknown split {split!r}; use {', '.join(SPLITS)}")
        ev = self.built.evaluator
        zoo = self.built.zoo
        if zoo == "mlp":
            x, y = ev.data(task, split)
            chosen = _draw(len(y), examples)
            batches = _chunks(x[chosen], y[chosen], batch_size)
        elif zoo == "vision":
            part = ev.data.split(task, split)
            chosen = _draw(len(part), examples)
            batches = _chunks(part.batch(chosen), part.labels[chosen], batch_size)
        else:
            from mergelab.eval.data import seeded_subset
            from mergelab.stats.text import text_batches

            self.module()
            texts = seeded_subset(ev.split(task, split), examples, DRAW_SEED)
            batches = text_batches(
                self._tokenizer, texts.texts, texts.labels,
                batch_size=batch_size, max_length=ev._settings.max_length,
            )
        return TaskData(batches, head=self.built.heads[task], forward=self._forward())


def merge_zoo_with_data(
    built: BuiltZoo,
    method: str,
    *,
    examples: int = 256,
    batch_size: int = 32,
    split: str | None = None,
    seed: int = 0,
    **params,
):
    """A data-aware merge of a built zoo's fine-tuned encoders (what the benchmark runner calls).

    split: where the inputs come from; default "test" (unlabeled) for AdaMerging's optimiser,
        its paper's transductive protocol, and "train" for every other method (statistics of
        RegMean, RegMean++, Fisher; ProDistill's few training examples).
    Returns the `DataMergeResult` (its `state_dict` holds every encoder tensor).
    """
    from mergelab.datamerge import data_merge
    from mergelab.methods import get_method

    adapter = ZooData(built)
    tasks = list(built.tasks)
    chosen = split or ("test" if get_method(method).optimiser in TRANSDUCTIVE else "train")
    data = {t: adapter.task_data(t, chosen, examples, batch_size) for t in tasks}
    result = data_merge(
        method,
        adapter.module(),
        {t: built.finetuned[t] for t in tasks},
        data,
        base_state_dict=built.pretrained,
        fisher_target="sample",
        generator=torch.Generator().manual_seed(seed),
        **params,
    )
    result.state_dict = {**built.pretrained, **result.state_dict}
    return result
