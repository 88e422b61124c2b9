"""The `mergelab distill` config: frozen pydantic models, validated (with every file it names)
before any model loads.

    seed: 0
    student: {init: ./pretrained}        # a model folder, or a merge config merged in memory
    teachers:
      - model: ft-reviews                # a folder `mergelab finetune` wrote (encoder + head)
        task: reviews.csv                # the teacher's data, as `mergelab eval --task` names it
        loss: {features: cosine, logits: kl, temperature: 2.0}
    replay: {data: sentiment, examples: 256, ratio: 0.3}   # the student init's own outputs
    stages:
      - {name: probe, steps: 50, train_backbone: false, head_learning_rate: 1e-2}
      - {name: distill, steps: 200, learning_rate: 2e-5, head_learning_rate: 1e-3}

Paths are relative to the config's folder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from mergelab.errors import ConfigError, MergeLabError, validation_problems
from mergelab.schema import StrictModel
from mergelab.training.settings import FinetuneSettings

FeatureLoss = Literal["cosine", "mse"]  # the keys of losses.FEATURE_LOSSES (a test checks)


class TeacherLoss(StrictModel):
    """What the student learns of one teacher."""

    features: FeatureLoss | None = Field(
        "cosine", description="Loss between the student's (projected) features and the teacher's "
        "mean-pooled features: cosine (1 - cosine similarity) or mse; null: none."
    )
    logits: Literal["kl"] | None = Field(
        "kl", description="Loss between the student head's and the teacher head's logits: kl "
        "(KL divergence at `temperature`, times its square); null: none."
    )
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the KL loss.")
    feature_weight: float = Field(1.0, ge=0, description="Weight of the feature loss.")
    logit_weight: float = Field(1.0, ge=0, description="Weight of the logit loss.")

    @model_validator(mode="after")
    def _learns_something(self) -> TeacherLoss:
        feature = self.features is not None and self.feature_weight > 0
        logit = self.logits is not None and self.logit_weight > 0
        if not (feature or logit):
            raise ValueError("the loss learns nothing from this teacher: give `features` or "
                             "`logits` with a positive weight")
        return self


class Teacher(StrictModel):
    """A frozen teacher and the data it is distilled on."""

    model: str = Field(description="A folder `mergelab finetune` wrote: encoder + head.safetensors.")
    task: str = Field(description="Its task, as `mergelab eval --task` names it (csv:PATH, "
                      "PATH.csv or a built-in text task); split by the seed the teacher records.")
    name: str | None = Field(None, description="The student's head for this teacher (default: "
                             "the teacher's task name).")
    examples: int | None = Field(None, ge=1, description="Use at most this many training texts, "
                                 "a random subset drawn from `seed` (default: the whole training "
                                 "split).")
    validation_examples: int | None = Field(1000, ge=1, description="Judge the student on at "
                                            "most this many validation texts, drawn as `examples` "
                                            "(null: all).")
    loss: TeacherLoss = Field(default_factory=TeacherLoss, description="What is distilled.")
    head: Literal["new", "teacher"] = Field(
        "new", description="The student's head for this teacher: new (randomly initialised, "
        "as SAM-CLIP's light heads), or teacher (a trainable copy of the teacher's own head, "
        "for a student whose features live where the teacher's do, e.g. one initialised from a "
        "merge of the teachers; needs equal feature widths).")


class Replay(StrictModel):
    """A memory of the student init's own inputs and outputs, replayed so it keeps its abilities."""

    data: str = Field(description="Texts: a task spec (its training split) or a .txt file, one "
                      "text per line.")
    examples: int = Field(256, ge=1, description="Texts kept in the memory: a .txt file's "
                          "first lines, or a random subset (from `seed`) of a task's training texts.")
    ratio: float = Field(0.3, gt=0, lt=1, description="Share of each step's loss that is the "
                         "replay loss (the rest is the teachers'); each step replays as many "
                         "texts as it distils.")
    loss: FeatureLoss = Field("cosine", description="Loss between the student's features and "
                              "the init's recorded ones.")
    model: str | None = Field(None, description="The model whose features on the replay texts "
                              "the student keeps: a model folder or a merge config, as "
                              "`student.init` (default: the student init itself). SAM-CLIP "
                              "replays the model the student starts from; a student initialised "
                              "from a merge can replay the pretrained model instead, to keep "
                              "what it could do before any fine-tuning.")


class Stage(StrictModel):
    """One stage of the schedule (SAM-CLIP: head probing, then multi-task distillation)."""

    name: str = Field(description="Shown in the progress bar and the report.")
    steps: int = Field(ge=1, description="Optimiser steps.")
    train_backbone: bool = Field(True, description="false: only the heads (and projections) "
                                 "train, the student's encoder is frozen.")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate of the encoder.")
    head_learning_rate: float = Field(1e-3, gt=0, description="Learning rate of heads and projections.")
    batch_size: int = Field(16, ge=1, description="Distilled texts per step.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps (below `steps`).")
    schedule: Literal["linear", "cosine", "constant"] = Field("constant", description="After warm-up.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's decoupled weight decay.")
    max_grad_norm: float | None = Field(None, gt=0, description="Clip the encoder's gradient norm.")

    def settings(self, seed: int) -> FinetuneSettings:
        """The training loop's settings of this stage (the heads always train: recipe joint)."""
        return FinetuneSettings.checked(
            recipe="joint", steps=self.steps, batch_size=self.batch_size,
            learning_rate=self.learning_rate, head_learning_rate=self.head_learning_rate,
            warmup_steps=self.warmup_steps, schedule=self.schedule, weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm, sampling="with_replacement",
            freeze=() if self.train_backbone else ("*",), seed=seed,
        )  # fmt: skip


DEFAULT_STAGES = (
    Stage(name="probe", steps=50, train_backbone=False, head_learning_rate=1e-2),
    Stage(name="distill", steps=200, learning_rate=2e-5, head_learning_rate=1e-3),
)


class Student(StrictModel):
    init: str = Field(description="A model folder, or a merge config (.yml/.yaml) merged in memory.")


class DistillConfig(StrictModel):
    """Several teachers into one student (see the module docstring)."""

    student: Student
    teachers: tuple[Teacher, ...] = Field(min_length=1, description="At least one teacher.")
    replay: Replay | None = Field(None, description="The replay memory (none: no replay).")
    stages: tuple[Stage, ...] = Field(DEFAULT_STAGES, min_length=1, description="In order.")
    seed: int = Field(0, ge=0, description="Seeds heads, batches, dropout and the draws of "
                      "training, validation and replay texts.")
    max_length: int | None = Field(None, ge=1, description="Student tokens per text (default: "
                                   "the largest a teacher records, else 64).")

    def fingerprint(self) -> str:
        """A hash of everything that decides the run (a checkpoint belongs to one config)."""
        import hashlib

        text = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _absolute_path(path: str, base: Path) -> str:
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else (base / candidate).resolve())


def _absolute_spec(spec: str, base: Path) -> str:
    """A task spec with its file made absolute (`csv:PATH`, `PATH.csv`, `PATH.txt`); a
    built-in task's name as is."""
    kind, _, rest = spec.partition(":")
    if rest and len(kind) > 1:
        return f"{kind}:{_absolute_path(rest, base)}"
    if "/" in spec or Path(spec).suffix:
        return _absolute_path(spec, base)
    return spec


def _with_absolute_paths(raw: dict, base: Path) -> dict:
    raw = dict(raw)
    if isinstance(raw.get("student"), dict) and isinstance(raw["student"].get("init"), str):
        raw["student"] = {**raw["student"], "init": _absolute_path(raw["student"]["init"], base)}
    if isinstance(raw.get("teachers"), list):
        teachers = []
        for teacher in raw["teachers"]:
            if isinstance(teacher, dict):
                teacher = dict(teacher)
                if isinstance(teacher.get("model"), str):
                    teacher["model"] = _absolute_path(teacher["model"], base)
                if isinstance(teacher.get("task"), str):
                    teacher["task"] = _absolute_spec(teacher["task"], base)
            teachers.append(teacher)
        raw["teachers"] = teachers
    if isinstance(raw.get("replay"), dict) and isinstance(raw["replay"].get("data"), str):
        raw["replay"] = {**raw["replay"], "data": _absolute_spec(raw["replay"]["data"], base)}
    if isinstance(raw.get("replay"), dict) and isinstance(raw["replay"].get("model"), str):
        raw["replay"] = {**raw["replay"], "model": _absolute_path(raw["replay"]["model"], base)}
    return raw


def read_distill_config(path: str | Path) -> DistillConfig:
    """Read and validate a distill config and every file it names, without loading a model.

    Raises ConfigError listing every problem (schema, stages, missing folders and heads,
    teachers whose head does not fit their encoder or their task, empty replay data).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read the distill config: {exc}", str(path)) from None
    if not isinstance(raw, dict):
        raise ConfigError("a distill config is a mapping (student, teachers, stages...)", str(path))
    try:
        config = DistillConfig(**_with_absolute_paths(raw, path.parent.absolute()))
    except ValidationError as error:
        raise ConfigError(validation_problems(error), str(path)) from None
    problems = check_config(config)
    if problems:
        raise ConfigError(problems, str(path))
    return config


def check_config(config: DistillConfig) -> list[str]:
    """Every problem of the files and values `config` names (empty: none), read without
    loading a model: stage settings, student init, teachers' folders, heads and tasks, replay."""
    problems = []
    for i, stage in enumerate(config.stages):
        try:
            stage.settings(config.seed)
        except ConfigError as error:
            problems += [f"`stages.{i}` ({stage.name}): {p}" for p in error.problems]
    names = [s.name for s in config.stages]
    if len(set(names)) != len(names):
        problems.append(f"`stages`: stage names must be unique; got {names}")
    problems += _check_student(config.student.init, "student.init")
    heads = []
    for i, teacher in enumerate(config.teachers):
        found, teacher_problems = _check_teacher(teacher)
        problems += [f"`teachers.{i}` ({teacher.model}): {p}" for p in teacher_problems]
        heads.append(found)
    named = [t.name or h for t, h in zip(config.teachers, heads) if (t.name or h)]  # h: the task
    duplicated = sorted({n for n in named if named.count(n) > 1})
    if duplicated:
        problems.append(f"`teachers`: two teachers would share the head name(s) {duplicated}; "
                        "give each a distinct `name`")
    if config.replay is not None:
        try:
            if not replay_texts(config.replay.data, 1):
                problems.append(f"`replay.data`: {config.replay.data} holds no text")
        except MergeLabError as error:
            problems.append(f"`replay.data`: {error}")
        if config.replay.model is not None:
            problems += _check_student(config.replay.model, "replay.model")
    return problems


def _check_student(init: str, key: str) -> list[str]:
    """Problems of a model folder or merge config named at `key` (`student.init`, ...)."""
    from mergelab.search.dataflow import architecture_folder

    try:
        folder = architecture_folder(init)
    except MergeLabError as error:
        return [f"`{key}`: {error}"]
    if not (folder / "config.json").is_file():
        return [f"`{key}`: {folder} is not a Hugging Face model folder (no config.json)"]
    return []


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise MergeLabError(f"cannot read {path}: {error}") from None
    return content if isinstance(content, dict) else {}


def head_shape(path: Path) -> tuple[int, int]:
    """(classes, dim) of a head file, read from its header (no tensor is loaded)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            shape = tuple(handle.get_slice("weight").get_shape())
    except (SafetensorError, OSError, KeyError) as error:
        raise MergeLabError(f"cannot read head {path}: {error}") from None
    if len(shape) != 2:
        raise MergeLabError(f"{path}: `weight` is {list(shape)}, not [classes, dim]")
    return shape[0], shape[1]


def _check_teacher(teacher: Teacher) -> tuple[str | None, list[str]]:
    """(the teacher's task name, its problems)."""
    from mergelab.checkpoint.heads import HEAD_FILE
    from mergelab.eval.sources import load_task

    folder = Path(teacher.model)
    problems = []
    if not (folder / "config.json").is_file():
        problems.append("not a Hugging Face model folder (no config.json)")
    head = folder / HEAD_FILE
    shape = None
    if not head.is_file():
        problems.append(f"no {HEAD_FILE}: a teacher is a folder `mergelab finetune` wrote")
    else:
        try:
            shape = head_shape(head)
        except MergeLabError as error:
            problems.append(str(error))
    task_name = None
    if (folder / "config.json").is_file() and shape is not None:
        hidden = _read_json(folder / "config.json").get("hidden_size")
        if isinstance(hidden, int) and hidden != shape[1]:
            problems.append(f"its head {head} reads {shape[1]} features; the encoder outputs "
                            f"{hidden} (hidden_size): the teacher's outputs do not match its head")
    try:
        task = load_task(teacher.task)
    except MergeLabError as error:
        problems.append(f"`task`: {error}")
    else:
        task_name = task.name
        if getattr(task, "modality", "text") != "text" or not hasattr(task, "num_classes"):
            problems.append(f"`task`: {teacher.task} is a {task.modality} task; distillation "
                            "reads labelled texts")
        elif shape is not None and shape[0] != task.num_classes:
            problems.append(f"its head outputs {shape[0]} classes; task {task.name!r} has "
                            f"{task.num_classes} {list(task.label_names)}")
    return task_name, problems


def teacher_splits(teacher: Teacher, task, split_seed: int, seed: int):
    """(train, validation) examples `teacher` is distilled and judged on: seeded draws (from
    `seed`, the config's) of at most `examples` / `validation_examples` of `task`'s splits
    drawn from `split_seed` (the teacher's). Not prefixes: a split keeps its source's order,
    often sorted by class."""
    from mergelab.eval.data import seeded_subset

    splits = task.splits(split_seed)
    return (seeded_subset(splits.train, teacher.examples, seed),
            seeded_subset(splits.validation, teacher.validation_examples, seed))  # fmt: skip


def replay_texts(spec: str, limit: int, seed: int = 0) -> list[str]:
    """`limit` replay texts: the first lines of a .txt file, or a random subset (drawn from
    `seed`) of a task's training texts."""
    from mergelab.eval.sources import load_task
    from mergelab.eval.tasks import read_utf8_file

    if spec.lower().endswith(".txt"):
        path = Path(spec)
        if not path.is_file():
            raise MergeLabError(f"no replay text file {path}")
        lines = [line.strip() for line in read_utf8_file(path, "replay texts").splitlines()]
        return [line for line in lines if line][:limit]
    task = load_task(spec)
    from mergelab.eval.data import seeded_subset

    train = task.splits(0).train
    if getattr(train, "texts", None) is None:
        raise MergeLabError(f"{spec} is a {task.modality} task; the replay memory holds texts")
    return list(seeded_subset(train, limit, seed).texts)
