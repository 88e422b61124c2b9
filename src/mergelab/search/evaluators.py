"""Evaluators a search config names without Python: the evaluation layer's tasks.

`search.evaluator` may be a mapping instead of `module:function`:

    evaluator:
      tasks:                 # task spec (as `mergelab eval --task`) -> the fine-tuned folder
        csv:./reviews.csv: ./ft-reviews      # whose head scores the merged encoder on it
        sentiment: ./ft-sentiment
      split: validation      # choices are made on validation, never on test
      limit: 500             # examples per task (a seeded subset; null: all)
      seed: 0                # of the task's split (default: each fine-tune's recorded one)

Each trial loads the merged state dict into a copy of the first folder's encoder (a data-flow
search's routed model is scored as it is) and scores it with each task's own head
(`ModelEvaluator.evaluate_heads`); the score per task is its accuracy (or minus its
perplexity), reduced by `search.objective`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from mergelab.errors import ConfigError, MergeLabError

TASK_EVALUATOR_KEYS = {"tasks", "split", "limit", "seed"}


class TaskEvaluator:
    """Scores a merged encoder state dict on the evaluation layer's tasks (see the module)."""

    def __init__(self, section: Mapping, base_dir: Path):
        from mergelab.eval.evaluator import DEFAULT_LIMIT, ModelEvaluator
        from mergelab.eval.models import Classifier, load_model, read_head, read_recipe
        from mergelab.eval.sources import load_task

        problems = [f"search.evaluator.{k}: unknown key; keys: {', '.join(sorted(TASK_EVALUATOR_KEYS))}"
                    for k in section if k not in TASK_EVALUATOR_KEYS]
        tasks = section.get("tasks")
        if not isinstance(tasks, Mapping) or not tasks:
            problems.append("search.evaluator.tasks: a mapping task spec -> fine-tuned folder")
            tasks = {}
        self.split = section.get("split", "validation")
        if self.split not in ("validation", "test", "train"):
            problems.append(f"search.evaluator.split: validation, test or train; got {self.split!r}")
        if problems:
            raise ConfigError(problems)
        folders = {}
        for spec, folder in tasks.items():
            path = Path(folder).expanduser()
            path = path if path.is_absolute() else (base_dir / path).resolve()
            if not (path / "head.safetensors").is_file():
                problems.append(f"search.evaluator.tasks.{spec}: {path} has no head.safetensors "
                                "(a folder `mergelab finetune` wrote)")
            folders[spec] = path
        if problems:
            raise ConfigError(problems)
        try:
            self.tasks = [load_task(spec) for spec in folders]
        except MergeLabError as exc:
            raise ConfigError([f"search.evaluator.tasks: {exc}"]) from None
        first = next(iter(folders.values()))
        template = load_model(first)
        if not isinstance(template, Classifier):
            raise ConfigError([f"search.evaluator.tasks: {first} is not a classifier folder"])
        self.template = template
        self.heads = {task.name: read_head(folder / "head.safetensors")
                      for task, folder in zip(self.tasks, folders.values())}
        seed = section.get("seed")
        if seed is None:
            recorded = read_recipe(first).get("data", {}).get("split_seed", 0)
            seed = recorded if isinstance(recorded, int) else 0
        self.evaluator = ModelEvaluator(limit=section.get("limit", DEFAULT_LIMIT), seed=seed)

    def __call__(self, candidate: Mapping[str, torch.Tensor] | nn.Module) -> dict[str, float]:
        """Per-task scores of a merged encoder state dict (parameter space) or of an encoder
        module (a data-flow space's routed model)."""
        from mergelab.eval.models import Classifier

        self.evaluator.clear()  # a new encoder every trial
        if isinstance(candidate, nn.Module):
            model = Classifier(candidate, None, self.template.tokenizer, self.template.preprocess,
                               self.template.name)
            results = {}
            for task in self.tasks:
                model.head = self.heads[task.name]
                results[task.name] = self.evaluator.evaluate(model, task, self.split)
        else:
            results = self.evaluator.evaluate_heads(self.template, candidate, self.heads,
                                                    self.tasks, self.split)
        return {name: _higher_is_better(result) for name, result in results.items()}


def _higher_is_better(result) -> float:
    value = float(result.score.value)
    return -value if result.score.metric == "perplexity" else value
