"""A user's own task, end to end, through the command line only: fine-tune two models on the
user's CSVs, merge them (TIES and task arithmetic), score every model and the merges with
`mergelab eval` (the merge carries the sources' heads), export one task and load it with
transformers. Tiny BERT and tiny CSVs built here; nothing loads from a hub."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot", "song", "book"]


def _cli(args):
    from mergelab.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _flat(output: str) -> str:
    return " ".join(output.split())


def _tiny_bert(folder):
    from conftest import save_tiny_bert

    return save_tiny_bert(folder, ["the", *WORDS])


def _task_csv(path, pools: dict[str, list[str]], n: int = 60):
    from conftest import write_task_csv

    return write_task_csv(path, pools, n)


WALK_THROUGH = Path(__file__).resolve().parents[1] / "docs" / "your_task.md"
# Appended to the walk-through's `mergelab finetune` lines: a few steps suit the tiny model.
TINY_TRAINING = ["--steps", "6", "--batch-size", "8", "--warmup-steps", "1", "--learning-rate", "1e-3",
                 "--no-progress"]  # fmt: skip


def walk_through_blocks(page: Path) -> list[tuple[str, str]]:
    """The page's fenced code blocks, in order, as (language, text)."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w+)\n(.*?)```", page.read_text(), re.S)]


@pytest.fixture(scope="module")
def road(tmp_path_factory):
    """docs/your_task.md run as written (its YAML files written, its `mergelab` commands run in
    order, in a folder holding `pretrained/`, `reviews.csv` and `topics.csv`)."""
    import os
    import shlex

    root = tmp_path_factory.mktemp("road")
    base = _tiny_bert(root / "pretrained")
    reviews = _task_csv(root / "reviews.csv", {"negative": WORDS[3:6], "positive": WORDS[:3]})
    topics = _task_csv(root / "topics.csv", {"film": ["movie", "plot", "good"],
                                             "music": ["song", "fine", "bad"],
                                             "reading": ["book", "great", "poor"]})  # fmt: skip
    blocks = walk_through_blocks(WALK_THROUGH)
    previous = Path.cwd()
    os.chdir(root)
    try:
        for language, text in blocks:
            if language == "yaml":
                name = text.splitlines()[0].removeprefix("# ").strip()
                (root / name).write_text(text)
            elif language == "bash":
                for line in text.splitlines():
                    if not line.startswith("mergelab "):
                        continue
                    args = shlex.split(line.split("#", 1)[0])[1:]
                    if args[0] == "finetune":
                        args += TINY_TRAINING
                    if args[0] == "merge":
                        args += ["--no-progress"]
                    outcome = _cli(args)
                    assert outcome.exit_code == 0, (line, outcome.output)
    finally:
        os.chdir(previous)
    tuned = {name: root / name for name in ("ft-reviews", "ft-topics")}
    merges = {"ties": root / "merged-ties", "task_arithmetic": root / "merged-ta"}
    assert all(folder.is_dir() for folder in (*tuned.values(), *merges.values()))
    return root, base, {"reviews": reviews, "topics": topics}, tuned, merges


def test_the_walk_through_loads_its_export_with_the_python_it_shows(road, monkeypatch):
    root = road[0]
    (code,) = [text for language, text in walk_through_blocks(WALK_THROUGH) if language == "python"]
    monkeypatch.chdir(root)
    scope: dict = {}
    exec(compile(code, str(WALK_THROUGH), "exec"), scope)
    (prediction,) = scope["classify"]("the good great movie")
    assert prediction["label"] in ("negative", "positive") and 0.5 <= prediction["score"] <= 1.0


def _by_hand(folder, head_file, texts, max_length):
    """Mean-pooled features of `folder`'s encoder through the head at `head_file`."""
    from safetensors.torch import load_file

    encoder = transformers.AutoModel.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    head = load_file(str(head_file))
    tokens = tokenizer(list(texts), padding=True, truncation=True, max_length=max_length,
                       return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        hidden = encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).float()
    return ((hidden * mask).sum(1) / mask.sum(1)) @ head["weight"].T + head["bias"]


def test_a_merge_carries_every_sources_head_with_its_labels(road):
    root, _, _, tuned, merges = road
    for merged in merges.values():
        manifest = json.loads((merged / "heads.json").read_text())
        heads = manifest["heads"]
        assert set(heads) == {"reviews", "topics"}
        assert heads["reviews"]["label_names"] == ["negative", "positive"]
        assert heads["topics"]["label_names"] == ["film", "music", "reading"]
        assert heads["topics"]["source"] == "ft-topics"  # as the config names it
        assert heads["reviews"]["base_model"] == str((root / "pretrained").resolve())
        for name, source in (("reviews", "ft-reviews"), ("topics", "ft-topics")):
            copied = (merged / heads[name]["file"]).read_bytes()
            assert copied == (tuned[source] / "head.safetensors").read_bytes()


def test_mergelab_eval_scores_a_merge_on_each_task_with_its_own_head(road):
    from mergelab.eval.sources import load_task

    root, base, tasks, tuned, merges = road
    merged = merges["ties"]
    outcome = _cli(["eval", merged, "--task", tasks["reviews"], "--task", f"csv:{tasks['topics']}",
                    "--json"])  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.output)
    assert report["base"] == str((root / "pretrained").resolve())  # recorded by the fine-tunes
    rows = {(r["model"], r["task"]): r for r in report["results"]}
    assert set(rows) == {(m, t) for m in ("merged-ties", "pretrained + linear probe")
                         for t in ("reviews", "topics")}  # fmt: skip
    recipe = json.loads((tuned["ft-topics"] / "recipe.json").read_text())
    test = load_task(str(tasks["topics"])).splits(recipe["data"]["split_seed"]).test
    logits = _by_hand(merged, merged / "heads" / "topics.safetensors", test.texts,
                      recipe["data"]["max_length"])  # fmt: skip
    expected = (logits.argmax(-1) == torch.tensor(test.labels)).float().mean().item()
    assert rows[("merged-ties", "topics")]["value"] == pytest.approx(expected)
    assert rows[("merged-ties", "topics")]["examples"] == len(test)
    # What was read and used is said: rows read, the split, nothing truncated at the recorded length.
    assert rows[("merged-ties", "topics")]["rows"] == {"read": 60, "train": 33, "validation": 9, "test": 9}
    assert rows[("merged-ties", "topics")]["truncated"] == 0
    # The same score as naming the source's head file.
    by_file = _cli(["eval", merged, "--task", tasks["topics"], "--head",
                    tuned["ft-topics"] / "head.safetensors", "--json", "--no-baselines"])  # fmt: skip
    assert json.loads(by_file.output)["results"][0]["value"] == pytest.approx(expected)
    # A task the merge has no head for is an error naming the heads it has.
    other = _task_csv(root / "other.csv", {"a": WORDS[:3], "b": WORDS[3:6]})
    missing = _cli(["eval", merged, "--task", other])
    assert missing.exit_code == 1
    assert "no head for task 'other'" in _flat(missing.output)
    assert "['reviews', 'topics']" in _flat(missing.output)


def test_every_model_of_the_road_is_scored_without_python(road):
    _, _, tasks, tuned, merges = road
    for folder in (*tuned.values(), *merges.values()):
        own = "reviews" if folder.name == "ft-reviews" else "topics"
        outcome = _cli(["eval", folder, "--task", tasks[own], "--json", "--no-baselines"])
        assert outcome.exit_code == 0, (folder, outcome.output)
        (row,) = json.loads(outcome.output)["results"]
        assert row["task"] == own and row["low"] <= row["value"] <= row["high"]


def test_export_one_task_loads_and_runs_with_transformers(road, tmp_path):
    root, _, tasks, _, merges = road
    merged, out = merges["task_arithmetic"], tmp_path / "reviews-classifier"
    made = _cli(["export", merged, "--task", "reviews", "--out", out])
    assert made.exit_code == 0, made.output
    assert {"config.json", "model.safetensors", "modeling_mergelab.py", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    texts = ["the good great movie", "the awful plot", "the poor fine song"]
    with torch.no_grad():
        logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    expected = _by_hand(merged, merged / "heads" / "reviews.safetensors", texts, 64)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)
    classify = transformers.pipeline("text-classification", model=str(out), tokenizer=tokenizer,
                                     trust_remote_code=True)  # fmt: skip
    assert classify(texts[0])[0]["label"] == ["negative", "positive"][int(expected[0].argmax())]
    # Several heads and no --task; an existing output; a folder without heads: refused.
    ambiguous = _cli(["export", merged, "--out", tmp_path / "x"])
    assert ambiguous.exit_code == 1 and "pass --task NAME" in _flat(ambiguous.output)
    again = _cli(["export", merged, "--task", "reviews", "--out", out])
    assert again.exit_code == 1 and "pass --overwrite" in _flat(again.output)
    headless = _cli(["export", root / "pretrained", "--out", tmp_path / "y"])
    assert headless.exit_code == 1 and "holds no task head" in _flat(headless.output)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# --- what the road records and writes ---------------------------------------------------------


def test_recipe_records_the_rows_splits_truncation_and_base_actually_used(road):
    root, base, tasks, tuned, _ = road
    recipe = json.loads((tuned["ft-reviews"] / "recipe.json").read_text())
    data, summary = recipe["data"], recipe["summary"]
    assert recipe["base_model"] == str(base.resolve()) == summary["base_model"]
    sizes = summary["split_sizes"]
    assert sizes == {"train": 33, "validation": 9, "test": 9}  # 55/15/15% of 60 rows
    assert data["rows"] == {"read": 60, "used": 51, "unused": 9, "why_unused": data["rows"]["why_unused"]}
    assert "55/15/15%" in data["rows"]["why_unused"] and summary["rows"] == data["rows"]
    # The default max length follows the data: texts of 4 words are 6 tokens with [CLS]/[SEP].
    assert data["max_length"] == 8 and "95th percentile" in data["max_length_rule"]
    assert data["truncated"] == {"train": 0, "validation": 0, "test": 0, "share": 0.0}


def test_truncation_at_a_given_max_length_is_counted_and_reported(road, tmp_path):
    root, base, tasks, _, _ = road
    out = tmp_path / "ft"
    made = _cli(["finetune", "--task", tasks["reviews"], "--model", base, "--out", out, "--steps", 2,
                 "--warmup-steps", 0, "--max-length", 5, "--no-progress"])  # fmt: skip
    assert made.exit_code == 0, made.output
    data = json.loads((out / "recipe.json").read_text())["data"]
    # Every text is 6 tokens: all cut at 5.
    assert data["truncated"] == {"train": 33, "validation": 9, "test": 9, "share": 1.0}
    assert data["max_length_rule"] == "given (--max-length)"
    scored = _cli(["eval", out, "--task", tasks["reviews"], "--no-baselines"])
    assert "9 of 9 test texts (100%) are longer than 5 tokens and were truncated" in _flat(scored.output)
    too_long = _cli(["finetune", "--task", tasks["reviews"], "--model", base, "--out", tmp_path / "x",
                     "--max-length", 64, "--steps", 2, "--warmup-steps", 0])  # fmt: skip
    assert too_long.exit_code == 1 and "exceeds what" in _flat(too_long.output) and "(32 tokens)" in too_long.output
    assert not (tmp_path / "x").exists()


def test_training_options_reach_the_settings(road, tmp_path):
    from safetensors.torch import load_file

    root, base, tasks, _, _ = road
    out = tmp_path / "ft"
    made = _cli(["finetune", "--task", tasks["reviews"], "--model", base, "--out", out, "--steps", 3,
                 "--warmup-steps", 1, "--batch-size", 4, "--learning-rate", "1e-2",
                 "--train-input-embeddings", "--freeze", "encoder.layer.0.*", "--probe-c", 0.5,
                 "--schedule", "cosine", "--no-progress"])  # fmt: skip
    assert made.exit_code == 0, made.output
    settings = json.loads((out / "recipe.json").read_text())["settings"]
    assert settings["batch_size"] == 4 and settings["warmup_steps"] == 1 and settings["probe_c"] == 0.5
    assert settings["freeze_input_embeddings"] is False and settings["freeze"] == ["encoder.layer.0.*"]
    tuned, original = load_file(str(out / "model.safetensors")), load_file(str(base / "model.safetensors"))
    word = "embeddings.word_embeddings.weight"
    assert not torch.equal(tuned[word], original[word])  # trained, as asked
    frozen = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(tuned[frozen], original[frozen])
    assert not torch.equal(tuned["encoder.layer.1.attention.self.query.weight"],
                           original["encoder.layer.1.attention.self.query.weight"])  # fmt: skip


def test_finetuned_folders_hold_every_buffer_their_base_has(road, tmp_path):
    """A base whose weights hold `embeddings.position_ids` (as the packaged MiniLM's do, and
    recent transformers no longer save): the fine-tune holds it too, so its merge warns of
    nothing missing."""
    from safetensors.torch import load_file, save_file

    root, base, tasks, _, _ = road
    old_base = tmp_path / "old-base"
    shutil.copytree(base, old_base)
    weights = load_file(str(old_base / "model.safetensors"))
    weights["embeddings.position_ids"] = torch.arange(32).unsqueeze(0)
    save_file(weights, str(old_base / "model.safetensors"), metadata={"format": "pt"})
    for name in ("a", "b"):
        made = _cli(["finetune", "--task", tasks["reviews"], "--model", old_base, "--out", tmp_path / name,
                     "--steps", 2, "--warmup-steps", 0, "--seed", len(name), "--no-progress"])  # fmt: skip
        assert made.exit_code == 0, made.output
        tuned = load_file(str(tmp_path / name / "model.safetensors"))
        assert torch.equal(tuned["embeddings.position_ids"], weights["embeddings.position_ids"])
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump({"merge_method": "task_arithmetic", "base_model": str(old_base),
                                      "models": [{"model": m, "parameters": {"weight": 0.5}} for m in "ab"]}))  # fmt: skip
    merged = _cli(["merge", config, tmp_path / "merged", "--no-progress"])
    assert merged.exit_code == 0 and "missing" not in merged.output, merged.output


def test_written_folders_have_normal_permissions(road):
    import os
    import stat

    mask = os.umask(0o022)
    os.umask(mask)
    _, _, _, tuned, merges = road
    for folder in (tuned["ft-reviews"], merges["ties"]):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask, folder
        for path in folder.rglob("*"):
            expected = (0o777 if path.is_dir() else 0o666) & ~mask
            assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_a_merge_writes_a_model_card(road):
    from mergelab import __version__

    _, _, _, _, merges = road
    card = (merges["ties"] / "README.md").read_text()
    assert card.startswith("---\nbase_model: ./pretrained\n") and "tags: [merge, mergelab, ties]" in card
    assert f"Merged with mergelab {__version__} by `ties` (TIES-Merging" in card
    assert "- `ft-reviews`\n- `ft-topics`" in card
    assert "| topics | topics | film, music, reading | `ft-topics` |" in card
    assert "```yaml\nmerge_method: ties\n" in card and "density: 0.5" in card


def test_messages_are_not_wrapped_when_output_is_not_a_terminal(road, tmp_path):
    root, _, _, _, merges = road
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "and-deeper" / "absent.csv"
    outcome = _cli(["eval", merges["ties"], "--task", f"csv:{deep}"])
    assert outcome.exit_code == 1 and str(deep) in outcome.output  # the path in one piece
    assert len(outcome.output.strip().splitlines()) == 1


class TinyImageEncoder(torch.nn.Module):
    """[B, 3, S, S] -> [B, 8]: a conv, ReLU and global average pooling."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def tiny_image_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return TinyImageEncoder()


def test_a_merge_of_image_finetunes_is_scored_per_task_without_python(tmp_path):
    """Image fine-tunes (an encoder from a `module:function` factory, no config.json): their
    merge records the factory and input size with the heads, and eval scores it on each task."""
    import numpy as np

    generator = np.random.default_rng(0)
    labels = np.arange(60) % 2
    bright = (generator.integers(0, 60, (60, 8, 8)) + 150 * labels[:, None, None]).astype(np.uint8)
    np.savez(tmp_path / "bright.npz", images=bright, labels=labels)
    stripes = generator.integers(0, 60, (60, 8, 8)).astype(np.uint8)
    stripes[labels == 1, ::2] += 150
    np.savez(tmp_path / "stripes.npz", images=stripes, labels=labels)
    factory = f"{__name__}:tiny_image_encoder"
    for name in ("bright", "stripes"):
        made = _cli(["finetune", "--task", f"npz:{tmp_path / name}.npz", "--model", factory, "--out",
                     tmp_path / f"ft-{name}", "--steps", 4, "--batch-size", 8, "--warmup-steps", 1,
                     "--input-size", 8, "--no-progress"])  # fmt: skip
        assert made.exit_code == 0, made.output
    config = tmp_path / "merge.yml"
    config.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": f"ft-{n}", "parameters": {"weight": 0.5}} for n in ("bright", "stripes")]}))  # fmt: skip
    assert _cli(["merge", config, tmp_path / "merged", "--no-progress"]).exit_code == 0
    heads = json.loads((tmp_path / "merged" / "heads.json").read_text())["heads"]
    assert heads["bright"]["encoder_factory"] == factory and heads["stripes"]["input_size"] == 8
    outcome = _cli(["eval", tmp_path / "merged", "--task", f"npz:{tmp_path / 'bright.npz'}",
                    "--task", f"npz:{tmp_path / 'stripes.npz'}", "--json"])  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    rows = json.loads(outcome.output)["results"]
    assert {(r["model"], r["task"]) for r in rows} == {(m, t) for m in ("merged", "pretrained + linear probe")
                                                      for t in ("bright", "stripes")}  # fmt: skip
    assert all(r["low"] <= r["value"] <= r["high"] for r in rows)


def test_eval_card_puts_the_scores_into_the_model_card_once(road, tmp_path):
    root, _, tasks, _, merges = road
    merged = tmp_path / "merged"
    shutil.copytree(merges["ties"], merged)
    # The merge's own card (the walk-through's `--card` already added a section to it).
    card = (merged / "README.md").read_text().split("<!-- mergelab eval -->")[0]
    assert "## Configuration" in card
    for specs in ((tasks["reviews"], tasks["topics"]), (tasks["reviews"],)):
        outcome = _cli(["eval", merged, *(a for spec in specs for a in ("--task", spec)), "--card", "--json"])
        assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.output)
    written = (merged / "README.md").read_text()
    assert written.startswith(card) and written.count("## Evaluation") == 1
    own = next(r for r in report["results"] if r["model"] == "merged")
    assert f"| merged | {own['value']:.1%} [{100 * own['low']:.1f}, {100 * own['high']:.1f}] |" in written
    assert "topics" not in written.split("## Evaluation")[1]  # the second run replaced the first
