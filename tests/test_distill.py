"""Merging by distillation (mergelab.distill): the loss formulas by hand, a student that learns
its teachers (one of another width), the replay memory, resuming after a kill between stages,
bad input reported at once before any model loads, and `mergelab distill` + `mergelab eval` on
its output. Tiny BERTs fine-tuned here; nothing loads from a hub."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from typer.testing import CliRunner

transformers = pytest.importorskip("transformers")

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot", "song", "book"]
POOLS = {
    "reviews": {"negative": ["bad", "awful", "poor"], "positive": ["good", "great", "fine"]},
    "topics": {"film": ["movie", "plot", "good"], "music": ["song", "great", "bad"],
               "reading": ["book", "fine", "poor"]},
}  # fmt: skip
TINY = {"batch_size": 8, "warmup_steps": 0, "learning_rate": 1e-3,
        "head_learning_rate": 1e-2}  # fmt: skip


def _bert(folder, hidden: int, seed: int):
    """A 2-layer BERT of width `hidden` (random weights from `seed`) with a word tokenizer."""
    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", *WORDS]
    # a vocabulary mapping (transformers 5 reads a bare `vocab_file` as all-unknown tokens)
    tokenizer = transformers.BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=2 * hidden,
                                     max_position_embeddings=32)  # fmt: skip
    transformers.BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _csv(path, pools, n=90):
    from conftest import write_task_csv

    return write_task_csv(path, pools, n)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """base (width 16), a teacher per task fine-tuned from it, and a wide teacher (width 24,
    another initialisation) on the reviews task."""
    from mergelab.training import FinetuneSettings, finetune_to_folder

    root = tmp_path_factory.mktemp("distill")
    base = _bert(root / "base", 16, 0)
    wide = _bert(root / "wide-base", 24, 1)
    tasks = {name: _csv(root / f"{name}.csv", pools) for name, pools in POOLS.items()}
    settings = FinetuneSettings(recipe="joint", steps=30, batch_size=8, warmup_steps=0,
                                learning_rate=3e-3, head_learning_rate=3e-2)  # fmt: skip
    folders = {"base": base, **tasks}
    for name, task in tasks.items():
        finetune_to_folder(str(task), root / f"ft-{name}", settings, model=base, progress=False)
        folders[f"ft-{name}"] = root / f"ft-{name}"
    finetune_to_folder(str(tasks["reviews"]), root / "ft-wide", settings, model=wide, progress=False)
    folders["ft-wide"] = root / "ft-wide"
    folders["root"] = root
    return folders


def load_task_texts(path):
    from mergelab.eval.sources import load_task

    return load_task(str(path)).splits(0).train.texts


def _config(path, teachers, *, replay=None, stages=None, init="base", **extra):
    config = {"student": {"init": init}, "teachers": teachers, "seed": 0, **extra}
    if replay is not None:
        config["replay"] = replay
    config["stages"] = stages or [
        {"name": "probe", "steps": 15, "train_backbone": False, **{**TINY, "head_learning_rate": 5e-2}},
        {"name": "distill", "steps": 40, **{**TINY, "learning_rate": 3e-3, "head_learning_rate": 3e-2}},
    ]  # fmt: skip
    path.write_text(yaml.safe_dump(config))
    return path


# --- loss formulas ---------------------------------------------------------------------------------


def test_feature_losses_by_hand():
    from mergelab.distill.losses import cosine_feature_loss, mse_feature_loss

    student = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    teacher = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    # cosines 0 and 1 -> losses 1 and 0
    assert cosine_feature_loss(student, teacher).item() == pytest.approx(0.5)
    # squared errors 1, 4, 1, 1 over 4 elements
    assert mse_feature_loss(student, teacher).item() == pytest.approx(7 / 4)


def test_config_names_every_feature_loss():
    import typing

    from mergelab.distill.config import FeatureLoss
    from mergelab.distill.losses import FEATURE_LOSSES

    assert set(typing.get_args(FeatureLoss)) == set(FEATURE_LOSSES)


def test_kl_loss_by_hand():
    from mergelab.distill.losses import kl_logit_loss

    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax: 3/4, 1/4
    expected = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kl_logit_loss(student, teacher, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # at T = 2 the teacher's probabilities are sqrt(3)/(1+sqrt(3)) and 1/(1+sqrt(3)); times T^2
    p = math.sqrt(3) / (1 + math.sqrt(3))
    soft = p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5)
    assert kl_logit_loss(student, teacher, 2.0).item() == pytest.approx(4 * soft, rel=1e-6)
    assert kl_logit_loss(teacher, teacher, 3.0).item() == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="temperature"):
        kl_logit_loss(student, teacher, 0.0)


def test_batch_loss_mixes_teachers_and_replay_by_hand():
    """A batch's loss is (1 - ratio) x the texts' teachers' losses (weighted by their share of
    the batch) + ratio x the replay loss, as the module says."""
    from mergelab.distill.config import TeacherLoss
    from mergelab.distill.examples import (
        DistillExamples,
        ReplayMemory,
        StudentHeads,
        TeacherTargets,
        teacher_loss,
    )
    from mergelab.distill.losses import cosine_feature_loss

    class Tokens:  # a "tokenizer" whose texts are their own features
        def __call__(self, texts, **_):
            ids = torch.tensor([[float(t) for t in text.split()] for text in texts])
            return {"input_ids": ids, "attention_mask": torch.ones(len(texts), 1, dtype=torch.long)}

    class Identity(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"last_hidden_state": input_ids.unsqueeze(1)})()

    a = TeacherTargets("a", ["1 0", "0 1"], torch.tensor([[1.0, 1.0], [0.0, 1.0]]),
                       torch.tensor([[2.0, 0.0], [0.0, 2.0]]), TeacherLoss(temperature=1.0))
    b = TeacherTargets("b", ["1 1"], torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.0, 0.0]]),
                       TeacherLoss(features="mse", logits=None))  # fmt: skip
    heads = StudentHeads(2, [a, b], torch.Generator().manual_seed(0))
    assert set(heads.projections) == {"b"}  # b is 3 wide, the student 2
    replay = ReplayMemory(["2 0"], torch.tensor([[0.0, 1.0]]), ratio=0.25)
    examples = DistillExamples(Tokens(), [a, b], max_length=4, replay=replay)
    indices = torch.tensor([0, 2, 1])  # a's first, b's, a's second
    got = examples.loss(Identity(), heads, indices)
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    distilled = (2 / 3) * teacher_loss(heads, a, x[[0, 2]], torch.tensor([0, 1])) + (
        1 / 3) * teacher_loss(heads, b, x[[1]], torch.tensor([0]))  # fmt: skip
    replayed = cosine_feature_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    assert got.item() == pytest.approx((0.75 * distilled + 0.25 * replayed).item(), rel=1e-6)
    examples.replay_active = False
    assert examples.loss(Identity(), heads, indices).item() == pytest.approx(distilled.item(), rel=1e-6)


# --- the student learns, resumes, and is scored --------------------------------------------------


def test_student_learns_both_teachers_and_eval_scores_it(zoo, tmp_path):
    from mergelab.cli import app
    from mergelab.distill import distill

    config = _config(tmp_path / "distill.yml", [
        {"model": str(zoo["ft-reviews"]), "task": str(zoo["reviews"])},
        {"model": str(zoo["ft-topics"]), "task": f"csv:{zoo['topics']}"},
    ], init=str(zoo["base"]))  # fmt: skip
    report = distill(config, tmp_path / "student", progress=False)
    rises = []
    for task in ("reviews", "topics"):
        after_probe, final = report["stages"][0]["validation"][task], report["student"][task]
        init = report["init"][task]
        # distilling the backbone moves the student's features towards the teacher's and its
        # predictions to the teacher's, beyond what the heads alone reach
        assert final["feature_cosine"] > init["feature_cosine"] + 0.2, (task, init, final)
        assert final["agreement"] >= max(0.9, after_probe["agreement"]), (task, after_probe, final)
        rises.append(final["agreement"] - after_probe["agreement"])
    assert sum(rises) > 0.2, rises
    losses = report["stages"][1]["losses"]
    assert sum(losses[-10:]) < sum(losses[:10])
    out = tmp_path / "student"
    manifest = json.loads((out / "heads.json").read_text())
    assert set(manifest["heads"]) == {"reviews", "topics"}
    assert manifest["heads"]["topics"]["label_names"] == ["film", "music", "reading"]
    result = CliRunner().invoke(app, ["eval", str(out), "--task", str(zoo["reviews"]), "--task",
                                      str(zoo["topics"]), "--json", "--limit", "50"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert '"reviews"' in result.output and '"topics"' in result.output
    exported = tmp_path / "reviews-classifier"
    result = CliRunner().invoke(app, ["export", str(out), "--task", "reviews", "--out", str(exported)])
    assert result.exit_code == 0, result.output
    assert json.loads((exported / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}


def test_teacher_of_another_width_gets_a_projection_and_replay_keeps_the_init(zoo, tmp_path):
    from mergelab.distill import distill

    teachers = [{"model": str(zoo["ft-wide"]), "task": str(zoo["reviews"]),
                 "loss": {"features": "mse", "logits": "kl", "temperature": 1.0}}]  # fmt: skip
    stages = [{"name": "distill", "steps": 30, **{**TINY, "learning_rate": 3e-3}}]
    replay = {"data": str(zoo["topics"]), "examples": 40, "ratio": 0.5}
    without = distill(_config(tmp_path / "a.yml", teachers, stages=stages, init=str(zoo["base"])),
                      tmp_path / "without", progress=False)  # fmt: skip
    with_replay = distill(_config(tmp_path / "b.yml", teachers, stages=stages, replay=replay,
                                  init=str(zoo["base"])), tmp_path / "with", progress=False)  # fmt: skip
    assert without["teachers"]["reviews"]["projection"] is True
    assert (tmp_path / "with" / "projections" / "reviews.safetensors").is_file()
    assert with_replay["texts_seen"] == 2 * without["texts_seen"]
    # the ablation: on the replay texts, the replayed student's features stay closer to the
    # init's than those of the student distilled without replay
    from mergelab.distill.config import replay_texts
    from mergelab.eval.harness import embed_texts
    from mergelab.eval.models import load_model

    texts = replay_texts(str(zoo["topics"]), 40, 0)  # the replayed texts (config seed 0)
    assert set(texts) <= set(load_task_texts(zoo["topics"])) and len(texts) == 40
    init = load_model(zoo["base"])
    reference = embed_texts(init.encoder, init.tokenizer, texts, max_length=16)

    def kept(folder):
        student = load_model(folder)
        features = embed_texts(student.encoder, student.tokenizer, texts, max_length=16)
        return torch.nn.functional.cosine_similarity(features, reference).mean().item()

    assert kept(tmp_path / "with") == pytest.approx(with_replay["student"]["replay_cosine"], abs=1e-4)
    assert kept(tmp_path / "with") > kept(tmp_path / "without") + 0.02


def test_head_teacher_starts_the_student_head_as_a_copy_of_the_teachers(zoo, tmp_path):
    """`head: teacher`: a student initialised from the teacher itself predicts as the teacher
    before any step (agreement 1); a new head does not; a wider teacher's head is refused."""
    from mergelab.distill import distill
    from mergelab.errors import MergeLabError

    stages = [{"name": "probe", "steps": 1, "train_backbone": False, **TINY}]
    teacher = {"model": str(zoo["ft-topics"]), "task": str(zoo["topics"])}
    copied = distill(_config(tmp_path / "a.yml", [{**teacher, "head": "teacher"}], stages=stages,
                             init=str(zoo["ft-topics"])), tmp_path / "copied", progress=False)
    new = distill(_config(tmp_path / "b.yml", [teacher], stages=stages, init=str(zoo["ft-topics"])),
                  tmp_path / "new", progress=False)
    assert copied["init"]["topics"]["agreement"] == 1.0
    assert copied["init"]["topics"]["feature_cosine"] == pytest.approx(1.0, abs=1e-5)
    assert new["init"]["topics"]["agreement"] < 0.9
    wide = {"model": str(zoo["ft-wide"]), "task": str(zoo["reviews"]), "head": "teacher"}
    with pytest.raises(MergeLabError, match="`head: teacher` copies its head, which reads 24 "
                       "features; the student outputs 16"):
        distill(_config(tmp_path / "c.yml", [wide], stages=stages, init=str(zoo["base"])),
                tmp_path / "wide", progress=False)
    assert not (tmp_path / "wide").exists()


def test_replay_model_replays_another_models_features(zoo, tmp_path):
    """`replay.model`: the memory holds that model's features (here the pretrained base, for a
    student initialised from a fine-tune), so at the init the replay cosine is the cosine
    between the two models' features; a model of another width is refused."""
    from mergelab.distill import distill
    from mergelab.distill.config import replay_texts
    from mergelab.errors import MergeLabError
    from mergelab.eval.harness import embed_texts
    from mergelab.eval.models import load_model

    stages = [{"name": "probe", "steps": 1, "train_backbone": False, **TINY}]
    teachers = [{"model": str(zoo["ft-reviews"]), "task": str(zoo["reviews"])}]
    replay = {"data": str(zoo["topics"]), "examples": 20, "ratio": 0.3}
    own = distill(_config(tmp_path / "a.yml", teachers, stages=stages, replay=replay,
                          init=str(zoo["ft-reviews"])), tmp_path / "own", progress=False)
    other = distill(_config(tmp_path / "b.yml", teachers, stages=stages, init=str(zoo["ft-reviews"]),
                            replay={**replay, "model": str(zoo["base"])}), tmp_path / "other",
                    progress=False)  # fmt: skip
    assert own["init"]["replay_cosine"] == pytest.approx(1.0, abs=1e-5)
    texts = replay_texts(str(zoo["topics"]), 20, 0)
    student, base = load_model(zoo["ft-reviews"]), load_model(zoo["base"])
    expected = torch.nn.functional.cosine_similarity(
        embed_texts(student.encoder, student.tokenizer, texts, max_length=16),
        embed_texts(base.encoder, base.tokenizer, texts, max_length=16)).mean().item()
    assert expected < 0.999
    assert other["init"]["replay_cosine"] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(MergeLabError, match="`replay.model` .* outputs 24 features, the student 16"):
        distill(_config(tmp_path / "c.yml", teachers, stages=stages, init=str(zoo["base"]),
                        replay={**replay, "model": str(zoo["ft-wide"])}), tmp_path / "wide",
                progress=False)  # fmt: skip
    assert not (tmp_path / "wide").exists()


def test_teacher_and_replay_texts_are_seeded_draws_not_prefixes(zoo, tmp_path):
    """A task file sorted by class: `examples` and `validation_examples` draw from every class
    (a prefix would hold one), from the config's seed, and the replay draw likewise."""
    from mergelab.distill.config import read_distill_config, replay_texts
    from mergelab.distill.run import _load_teacher

    rows = sorted((zoo["reviews"]).read_text().splitlines()[1:], key=lambda r: r.rsplit(",", 1)[1])
    sorted_csv = tmp_path / "sorted.csv"
    sorted_csv.write_text("\n".join(["text,label", *rows]) + "\n")
    teachers = [{"model": str(zoo["ft-reviews"]), "task": str(sorted_csv), "examples": 12,
                 "validation_examples": 8}]  # fmt: skip

    def drawn(seed):
        settings = read_distill_config(_config(tmp_path / f"s{seed}.yml", teachers, seed=seed,
                                               init=str(zoo["base"])))  # fmt: skip
        teacher = _load_teacher(settings.teachers[0], settings)
        return teacher.targets.texts, teacher.validation.labels.tolist()

    texts, labels = drawn(0)
    negative, positive = set(POOLS["reviews"]["negative"]), set(POOLS["reviews"]["positive"])
    assert len(texts) == 12 and len(labels) == 8
    assert any(set(t.split()) & negative for t in texts) and any(set(t.split()) & positive for t in texts)
    assert set(labels) == {0, 1}
    assert drawn(0)[0] == texts and drawn(1)[0] != texts
    replayed = replay_texts(str(sorted_csv), 12, 0)
    assert any(set(t.split()) & negative for t in replayed) and any(set(t.split()) & positive for t in replayed)
    assert replay_texts(str(sorted_csv), 12, 0) == replayed != replay_texts(str(sorted_csv), 12, 1)


def test_student_from_a_merge_config(zoo, tmp_path):
    from mergelab.distill import distill

    merge = tmp_path / "merge.yml"
    merge.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo["ft-reviews"]), "parameters": {"weight": 0.5}},
                   {"model": str(zoo["ft-topics"]), "parameters": {"weight": 0.5}}],
    }))  # fmt: skip
    config = _config(tmp_path / "d.yml", [{"model": str(zoo["ft-reviews"]), "task": str(zoo["reviews"])}],
                     stages=[{"name": "probe", "steps": 3, "train_backbone": False, **TINY}],
                     init=str(merge))  # fmt: skip
    report = distill(config, tmp_path / "student", progress=False)
    assert report["student_init"] == str(merge)
    # the backbone was frozen: the student encoder is the in-memory merge, bit for bit
    from mergelab.search.dataflow import load_source

    merged = load_source(str(merge)).state_dict()
    saved = transformers.AutoModel.from_pretrained(tmp_path / "student").state_dict()
    assert all(torch.equal(merged[k], saved[k]) for k in merged)


def test_killed_between_stages_resumes_at_the_stage_it_reached(zoo, tmp_path, monkeypatch):
    import mergelab.distill.run as run

    teachers = [{"model": str(zoo["ft-reviews"]), "task": str(zoo["reviews"])}]
    stages = [{"name": "probe", "steps": 4, "train_backbone": False, **TINY},
              {"name": "distill", "steps": 4, **TINY}]  # fmt: skip
    config = _config(tmp_path / "d.yml", teachers, stages=stages, init=str(zoo["base"]),
                     replay={"data": str(zoo["topics"]), "examples": 20, "ratio": 0.3})  # fmt: skip
    reference = run.distill(config, tmp_path / "reference", progress=False)

    real_train, calls = run.train, []

    def killed_in_second_stage(*args, description, **kwargs):
        calls.append(description)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train(*args, description=description, **kwargs)

    monkeypatch.setattr(run, "train", killed_in_second_stage)
    out = tmp_path / "student"
    with pytest.raises(KeyboardInterrupt):
        run.distill(config, out, progress=False)
    assert not out.exists() and (run.state_folder(out) / "00-probe" / "stage.json").is_file()
    monkeypatch.setattr(run, "train", real_train)
    calls.clear()

    counted = []
    monkeypatch.setattr(run, "train", lambda *a, description, **k: counted.append(description)
                        or real_train(*a, description=description, **k))  # fmt: skip
    resumed = run.distill(config, out, progress=False)
    assert counted == ["distill: distill"]  # the probe stage was not run again
    assert [s["resumed"] for s in resumed["stages"]] == [True, False]
    assert resumed["stages"][1]["losses"] == reference["stages"][1]["losses"]
    assert resumed["student"] == reference["student"]
    assert not run.state_folder(out).exists()

    # checkpoints of another config are refused, not silently reused
    monkeypatch.setattr(run, "train", killed_in_second_stage)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        run.distill(config, tmp_path / "other", progress=False)
    other = _config(tmp_path / "other.yml", teachers, stages=stages, init=str(zoo["base"]), seed=1)
    from mergelab.errors import MergeLabError

    with pytest.raises(MergeLabError, match="another config"):
        run.distill(other, tmp_path / "other", progress=False)


# --- bad input ------------------------------------------------------------------------------------


def test_every_config_problem_at_once_before_any_model_loads(zoo, tmp_path, monkeypatch):
    import mergelab.eval.models as models
    from mergelab.distill import read_distill_config
    from mergelab.errors import ConfigError

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    (tmp_path / "empty.txt").write_text("\n\n")
    config = _config(tmp_path / "bad.yml", [
        {"model": str(zoo["base"]), "task": str(zoo["reviews"])},                  # no head
        {"model": str(zoo["ft-topics"]), "task": str(zoo["reviews"])},             # 3 classes vs 2
        {"model": str(zoo["ft-reviews"]), "task": str(zoo["reviews"]),
         "loss": {"features": None, "logits": None}},                             # learns nothing
    ], init=str(tmp_path / "missing"), replay={"data": str(tmp_path / "empty.txt"), "ratio": 0.3},
       stages=[{"name": "s", "steps": 2, "warmup_steps": 5}])  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        read_distill_config(config)
    text = str(caught.value)
    assert "teachers.2.loss" in text and "learns nothing" in text
    config = _config(tmp_path / "bad2.yml", [
        {"model": str(zoo["base"]), "task": str(zoo["reviews"])},
        {"model": str(zoo["ft-topics"]), "task": str(zoo["reviews"])},
    ], init=str(tmp_path / "missing"), replay={"data": str(tmp_path / "empty.txt"), "ratio": 0.3,
                                               "model": str(tmp_path / "gone")},
       stages=[{"name": "s", "steps": 2, "warmup_steps": 5}])  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        read_distill_config(config)
    problems = caught.value.problems
    text = "\n".join(problems)
    assert "no head.safetensors" in text
    assert "outputs 3 classes" in text and "'reviews' has 2" in text
    assert "student.init" in text and "no config.json" in text
    assert "replay.data" in text and "holds no text" in text
    assert "warmup_steps" in text
    assert "share the head name(s) ['reviews']" in text  # two teachers of one task
    assert "`replay.model`" in text and "gone" in text
    assert len(problems) == 7, problems


def test_cli_refuses_bad_input_and_an_existing_output(zoo, tmp_path):
    from mergelab.cli import app

    bad = tmp_path / "bad.yml"
    bad.write_text(yaml.safe_dump({"student": {"init": str(zoo["base"])}, "teachers": [],
                                   "replay": {"data": "x.txt", "ratio": 1.5}}))  # fmt: skip
    result = CliRunner().invoke(app, ["distill", str(bad), "--out", str(tmp_path / "s")])
    assert result.exit_code == 1
    flat = " ".join(result.output.split())
    assert "teachers" in flat and "replay.ratio" in flat
    (tmp_path / "s").mkdir()
    good = _config(tmp_path / "good.yml", [{"model": str(zoo["ft-reviews"]), "task": str(zoo["reviews"])}],
                   init=str(zoo["base"]))  # fmt: skip
    result = CliRunner().invoke(app, ["distill", str(good), "--out", str(tmp_path / "s")])
    assert result.exit_code == 1 and "already exists" in result.output


def test_the_docs_config_is_a_valid_config():
    from pathlib import Path

    from mergelab.distill.config import DistillConfig

    page = (Path(__file__).resolve().parents[1] / "docs" / "distill.md").read_text()
    block = page.split("```yaml\n", 1)[1].split("```", 1)[0]
    config = DistillConfig(**yaml.safe_load(block))
    assert [s.name for s in config.stages] == ["probe", "distill"]
    assert config.replay is not None and config.replay.ratio == 0.3
