"""Evaluation: tasks, evaluators and multi-task result tables.

- `task.Task`: the protocol every task follows (name, label names, modality, metric, splits);
  its variants `tasks.TextTask`, `images.ImageTask`, `perplexity.PerplexityTask`,
  `task.FixedSplitsTask`, over the containers of `data` (`LabelledTexts`, `LabelledImages`,
  `Splits`);
- `sources.load_task(spec)`: the task a user names (built-in, csv:, npz:, images:, perplexity:);
- `evaluator.ModelEvaluator`: scores a `models.Classifier` or `models.LanguageModel` (or a model
  folder) on a task, every score with a `bootstrap` confidence interval; never merges;
- `harness`: embeddings, multi-seed tables and reports, the result cache of the benchmark zoos;
- `run` and `cli`: `mergelab eval`.
"""
