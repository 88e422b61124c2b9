"""mergelab.training: the settings model, the loop, the recipes and `mergelab finetune`.

Tiny models built here (an MLP, a small conv net with BatchNorm, a 2-layer BERT from a config),
a few steps each: seconds. Bit-identity with the loops this layer replaced is in
test_training_golden.py.
"""

from __future__ import annotations

import csv
import json
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from typer.testing import CliRunner

from mergelab.errors import ConfigError
from mergelab.training import (
    FinetuneSettings,
    TensorExamples,
    TrainingError,
    finetune_classifier,
    fit_probe,
    load_head,
    random_head,
    read_recipe,
    train,
)
from mergelab.training.loop import index_batches, learning_rate_factor


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(n: int = 96, dim: int = 6, classes: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centres = torch.randn(classes, dim, generator=generator) * 2
    return centres[labels] + torch.randn(n, dim, generator=generator), labels


class Trunk(nn.Module):
    def __init__(self, dim: int = 6, hidden: int = 8):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, hidden)
        self.drop = nn.Dropout(0.2)  # dropout is seeded too

    def forward(self, x):
        return torch.relu(self.fc2(self.drop(torch.relu(self.fc1(x)))))


def trunk(seed: int = 0) -> Trunk:
    torch.manual_seed(seed)
    return Trunk()


SMALL = dict(steps=12, batch_size=16, learning_rate=1e-2, head_learning_rate=5e-2,
             warmup_steps=2, freeze_input_embeddings=False)  # fmt: skip


# --- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [("steps", 0), ("batch_size", 0), ("learning_rate", 0.0), ("head_learning_rate", -1.0),
     ("warmup_steps", -1), ("weight_decay", -0.1), ("probe_c", 0.0), ("probe_steps", 0),
     ("seed", -1), ("recipe", "sgd"), ("schedule", "step"), ("max_grad_norm", 0.0)],
)  # fmt: skip
def test_bad_settings_are_refused_with_the_field_name(field, value):
    with pytest.raises(ConfigError, match=rf"\n  - {field}: .*; got {re.escape(repr(value))}"):
        FinetuneSettings.checked(**{field: value})


def test_settings_report_every_problem_at_once_and_are_frozen():
    with pytest.raises(ConfigError) as error:
        FinetuneSettings.checked(steps=0, learning_rate=-1.0, stepz=3)
    assert {p.split(":")[0] for p in error.value.problems} == {"steps", "learning_rate", "stepz"}
    settings = FinetuneSettings()
    with pytest.raises(Exception, match="frozen"):
        settings.steps = 3
    assert settings.replace(steps=30).steps == 30 and settings.steps == 100
    # A run that would be warm-up from start to end is refused, naming both settings.
    with pytest.raises(ConfigError, match=r"`warmup_steps` \(10\) must be below `steps` \(10\)"):
        settings.replace(steps=10)
    assert settings.replace(steps=3, warmup_steps=0).steps == 3
    with pytest.raises(ConfigError, match="steps: "):
        settings.replace(steps=0)
    # Every field has a description (the CLI's help) and a default.
    for name, field in FinetuneSettings.model_fields.items():
        assert field.description, name
        assert not field.is_required(), name


def test_learning_rate_schedules_by_hand():
    linear = FinetuneSettings(steps=10, warmup_steps=2)
    assert [learning_rate_factor(s, linear) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]
    cosine = linear.replace(schedule="cosine")
    assert learning_rate_factor(6, cosine) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert learning_rate_factor(10, cosine) == pytest.approx(0.0)
    constant = linear.replace(schedule="constant", warmup_steps=0)
    assert {learning_rate_factor(s, constant) for s in range(10)} == {1.0}
    # A floor: the decay ends at lr_floor x the peak instead of zero (warm-up unchanged).
    floored = linear.replace(lr_floor=0.1)
    assert [learning_rate_factor(s, floored) for s in (0, 2, 6, 10)] == pytest.approx(
        [0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1]
    )
    floored_cosine = cosine.replace(lr_floor=0.1)
    assert learning_rate_factor(6, floored_cosine) == pytest.approx(0.1 + 0.9 * 0.5)
    assert learning_rate_factor(10, floored_cosine) == pytest.approx(0.1)
    with pytest.raises(ConfigError, match="lr_floor"):
        linear.replace(lr_floor=1.0)


def test_after_step_sees_every_update_in_order():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    examples = TensorExamples(torch.randn(8, 3), torch.randint(2, (8,)))
    seen: list[tuple[int, torch.Tensor]] = []
    settings = FinetuneSettings(recipe="joint", steps=3, batch_size=4, warmup_steps=0)
    losses = train(
        model, examples, settings, head=nn.Linear(2, 2),
        after_step=lambda step: seen.append((step, model.weight.detach().clone())),
    )  # fmt: skip
    assert [step for step, _ in seen] == [1, 2, 3] and len(losses) == 3
    # Each call comes after its update: the weights differ from one call to the next.
    assert not torch.equal(seen[0][1], seen[1][1]) and torch.equal(seen[-1][1], model.weight)


def test_batches_are_whole_epochs_or_drawn_with_replacement():
    settings = FinetuneSettings(steps=5, batch_size=4, warmup_steps=1)
    batches = list(index_batches(10, settings, torch.Generator().manual_seed(0)))
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    # Two batches per epoch of 10 (the last 2 are dropped); an epoch never repeats an index.
    for epoch in (batches[0:2], batches[2:4]):
        assert len(set(torch.cat(epoch).tolist())) == 8
    drawn = list(index_batches(3, settings.replace(sampling="with_replacement"),
                               torch.Generator().manual_seed(0)))  # fmt: skip
    assert len(drawn) == 5 and all(len(b) == 3 for b in drawn)
    with pytest.raises(TrainingError, match="batch_size"):
        next(index_batches(3, settings, torch.Generator()))


# --- the loop and the recipes --------------------------------------------------------------------


def test_same_seed_same_weights_other_seed_differs():
    x, y = blobs()
    examples = TensorExamples(x, y)
    base = trunk()
    runs = [finetune_classifier(base, examples, 3, FinetuneSettings(recipe="joint", seed=s, **SMALL))
            for s in (0, 0, 1)]  # fmt: skip
    first, again, other = (r.encoder.state_dict() for r in runs)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert runs[0].losses == runs[1].losses
    assert not all(torch.equal(first[k], other[k]) for k in first)
    # The input encoder is left untouched, and the global RNG too.
    state = torch.random.get_rng_state()
    finetune_classifier(base, examples, 3, FinetuneSettings(recipe="joint", **SMALL))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(v, trunk().state_dict()[k]) for k, v in base.state_dict().items())


def test_lpft_fits_the_probe_and_keeps_it_as_the_frozen_head():
    x, y = blobs()
    examples = TensorExamples(x, y)
    base = trunk()
    settings = FinetuneSettings(recipe="lpft", **SMALL)
    result = finetune_classifier(base, examples, 3, settings)
    probe = fit_probe(examples.features(base), y, 3, settings)
    assert torch.equal(result.probe.weight, probe.weight)
    assert torch.equal(result.head.weight, probe.weight) and torch.equal(result.head.bias, probe.bias)
    assert not any(p.requires_grad for p in result.head.parameters())
    moved = result.encoder.state_dict()
    assert not torch.equal(moved["fc1.weight"], base.state_dict()["fc1.weight"])


def test_joint_trains_a_head_from_random_init_drawn_from_the_seed():
    x, y = blobs()
    examples = TensorExamples(x, y)
    settings = FinetuneSettings(recipe="joint", seed=4, **SMALL)
    result = finetune_classifier(trunk(), examples, 3, settings)
    init = random_head(8, 3, torch.Generator().manual_seed(4))
    explicit = finetune_classifier(trunk(), examples, 3, settings, head=init)
    assert torch.equal(result.head.weight, explicit.head.weight)  # the default init is this one
    assert not torch.equal(result.head.weight, init.weight)  # and it trained
    assert result.probe is None
    assert sum(result.losses[-3:]) < sum(result.losses[:3])


def test_freeze_patterns_keep_parameters_and_typos_are_errors():
    x, y = blobs()
    base = trunk()
    settings = FinetuneSettings(recipe="joint", freeze=("fc1.*",), **SMALL)
    result = finetune_classifier(base, TensorExamples(x, y), 3, settings)
    after, before = result.encoder.state_dict(), base.state_dict()
    assert torch.equal(after["fc1.weight"], before["fc1.weight"])
    assert not torch.equal(after["fc2.weight"], before["fc2.weight"])
    assert all(p.requires_grad for p in result.encoder.parameters())  # flags restored
    with pytest.raises(TrainingError, match="fc3"):
        finetune_classifier(base, TensorExamples(x, y), 3, settings.replace(freeze=("fc3.*",)))


def test_batchnorm_statistics_frozen_by_default_updated_on_request():
    x, y = blobs()
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU())
    settings = FinetuneSettings(recipe="joint", **SMALL)
    frozen = finetune_classifier(model, TensorExamples(x, y), 3, settings).encoder
    assert torch.equal(frozen[1].running_mean, model[1].running_mean)
    updated = finetune_classifier(model, TensorExamples(x, y), 3,
                                  settings.replace(batchnorm_statistics="updated")).encoder
    assert not torch.equal(updated[1].running_mean, model[1].running_mean)
    assert not frozen.training and not updated.training


def test_a_diverging_loss_stops_training():
    class Exploding:
        def __len__(self):
            return 8

        def loss(self, model, head, indices):
            return model(torch.ones(1, 1)).sum() * float("nan")

    with pytest.raises(TrainingError, match="diverged at step 1"):
        train(nn.Linear(1, 1), Exploding(), FinetuneSettings(batch_size=4, steps=2, warmup_steps=1))


# --- mergelab finetune ---------------------------------------------------------------------------

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot", "the", "a"]


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory):
    """A 2-layer, hidden-32 BERT with random weights and a word-level tokenizer, saved."""
    pytest.importorskip("transformers")
    from conftest import save_tiny_bert

    folder = save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), WORDS)
    return folder


def _sentiment_csv(path, n: int = 48):
    generator = torch.Generator().manual_seed(0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(n):
            label = i % 2
            pool = WORDS[:3] if label else WORDS[3:6]
            picks = torch.randint(3, (3,), generator=generator).tolist()
            writer.writerow([" ".join(["the", "movie", *(pool[j] for j in picks)]),
                             "positive" if label else "negative"])  # fmt: skip


def _cli():
    from mergelab.cli import app

    return app


def test_finetune_command_text_end_to_end(tiny_bert_folder, tmp_path):
    from transformers import AutoModel

    _sentiment_csv(tmp_path / "reviews.csv")
    out = tmp_path / "ft"
    result = CliRunner().invoke(_cli(), [
        "finetune", "--task", f"csv:{tmp_path / 'reviews.csv'}", "--model", str(tiny_bert_folder),
        "--out-dir", str(out), "--steps", "4", "--batch-size", "8", "--warmup-steps", "1",
        "--learning-rate", "1e-3", "--max-length", "16", "--no-progress",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["split_sizes"] == {"train": 26, "validation": 7, "test": 7}
    assert 0.0 <= summary["finetuned_test_accuracy"] <= 1.0
    recipe = read_recipe(out)
    assert recipe["base_model"] == str(tiny_bert_folder)
    expected = FinetuneSettings(steps=4, batch_size=8, warmup_steps=1, learning_rate=1e-3)
    assert recipe["settings"] == expected.to_dict()  # every setting, recorded
    assert recipe["data"]["max_length"] == 16 and recipe["label_names"] == ["negative", "positive"]
    tuned = AutoModel.from_pretrained(out).state_dict()
    base = AutoModel.from_pretrained(tiny_bert_folder).state_dict()
    assert torch.equal(tuned["embeddings.word_embeddings.weight"],
                       base["embeddings.word_embeddings.weight"])  # fmt: skip
    assert not torch.equal(tuned["encoder.layer.0.attention.self.query.weight"],
                           base["encoder.layer.0.attention.self.query.weight"])  # fmt: skip
    assert load_head(out / "head.safetensors").weight.shape == (2, 32)
    # Same command, same seed: the same weights.
    again = tmp_path / "ft2"
    CliRunner().invoke(_cli(), [
        "finetune", "--task", f"csv:{tmp_path / 'reviews.csv'}", "--model", str(tiny_bert_folder),
        "--out-dir", str(again), "--steps", "4", "--batch-size", "8", "--warmup-steps", "1",
        "--learning-rate", "1e-3", "--max-length", "16", "--no-progress",
    ])  # fmt: skip
    first, second = load_file(str(out / "model.safetensors")), load_file(str(again / "model.safetensors"))
    assert all(torch.equal(first[k], second[k]) for k in first)
    # An existing output folder is refused, before any work.
    refused = CliRunner().invoke(_cli(), ["finetune", "--task", "sentiment", "--out-dir", str(out)])
    assert refused.exit_code == 1 and "already exists" in refused.output


def test_finetune_command_validates_settings_before_any_work(tmp_path):
    result = CliRunner().invoke(_cli(), [
        "finetune", "--task", "sentiment", "--model", str(tmp_path / "missing"),
        "--out-dir", str(tmp_path / "ft"), "--steps", "0", "--batch-size", "0",
    ])  # fmt: skip
    assert result.exit_code == 1
    assert "steps: " in result.output and "batch_size: " in result.output
    assert "missing" not in result.output and not (tmp_path / "ft").exists()


class TinyImageEncoder(nn.Module):
    """[B, 3, S, S] -> [B, 8]: a conv, BatchNorm, ReLU and global average pooling."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3))


def tiny_image_encoder() -> nn.Module:
    torch.manual_seed(0)
    return TinyImageEncoder()


def test_finetune_command_image_tasks_npz_and_digits(tmp_path):
    generator = np.random.default_rng(0)
    labels = np.arange(60) % 2
    images = (generator.integers(0, 60, (60, 8, 8)) + 150 * labels[:, None, None]).astype(np.uint8)
    np.savez(tmp_path / "bright.npz", images=images, labels=labels,
             label_names=np.array(["dark", "bright"]))  # fmt: skip
    factory = f"{__name__}:tiny_image_encoder"
    out = tmp_path / "ft"
    args = ["finetune", "--task", f"npz:{tmp_path / 'bright.npz'}", "--model", factory,
            "--out-dir", str(out), "--steps", "6", "--batch-size", "8", "--warmup-steps", "1",
            "--learning-rate", "1e-2", "--input-size", "8", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["split_sizes"] == {"train": 33, "validation": 9, "test": 9}
    assert summary["probe_test_accuracy"] > 0.8  # brightness separates the classes
    recipe = read_recipe(out)
    assert recipe["modality"] == "image" and recipe["encoder_factory"] == factory
    assert recipe["label_names"] == ["dark", "bright"] and recipe["data"]["input_size"] == 8
    tuned, base = load_file(str(out / "model.safetensors")), tiny_image_encoder().state_dict()
    assert torch.equal(tuned["bn.running_var"], base["bn.running_var"])  # statistics frozen
    assert not torch.equal(tuned["conv.weight"], base["conv.weight"])
    assert load_head(out / "head.safetensors").weight.shape == (2, 8)
    # Continue from the folder it wrote; a built-in image task by name.
    digits = tmp_path / "digits"
    args = ["finetune", "--task", "digits", "--model", str(out), "--out-dir", str(digits),
            "--steps", "2", "--batch-size", "16", "--warmup-steps", "1", "--input-size", "8",
            "--recipe", "joint", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(_cli(), args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["split_sizes"] == {"train": 1137, "validation": 300, "test": 360}
    assert read_recipe(digits)["base_model"] == str(out)
    missing = CliRunner().invoke(_cli(), ["finetune", "--task", "digits", "--out-dir", str(tmp_path / "x")])
    assert missing.exit_code == 1 and "--model" in missing.output


def test_progress_true_draws_a_bar_and_a_callback_counts_steps():
    x, y = blobs()
    settings = FinetuneSettings(recipe="joint", **SMALL)
    steps = []
    plain = finetune_classifier(trunk(), TensorExamples(x, y), 3, settings, progress=steps.append)
    assert steps == [1] * settings.steps
    with_bar = finetune_classifier(trunk(), TensorExamples(x, y), 3, settings, progress=True)
    assert with_bar.losses == plain.losses
