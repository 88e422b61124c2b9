"""`mergelab.distill.distill`: several frozen teachers into one student, stage by stage, on the
one training loop, checkpointed after every stage (a killed run resumes at the stage it reached).

The order of work: the config and every file it names are checked (`read_distill_config`);
each teacher is loaded once, its outputs on its training and validation texts recorded, and
dropped; the student init is loaded (a folder, or a merge config merged in memory, as the
search's data-flow sources are) and its own outputs on the replay texts recorded; then each
stage runs `mergelab.training.train` over `DistillExamples`. The output folder, written
atomically, is a Hugging Face encoder with one head per teacher (`heads/`, `heads.json`, as a
merge of fine-tunes holds them: `mergelab eval OUT --task ...` scores each task with its head),
the projections onto wider or narrower teachers (`projections/`), the config and
`distill_report.json`.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from mergelab.distill.config import DistillConfig, read_distill_config, replay_texts, teacher_splits
from mergelab.distill.examples import DistillExamples, ReplayMemory, StudentHeads, TeacherTargets
from mergelab.errors import MergeLabError
from mergelab.training.loop import train

REPORT_FILE = "distill_report.json"
CONFIG_FILE = "distill_config.yml"
PROJECTIONS_DIR = "projections"
STATE_FINGERPRINT = "fingerprint.json"
STUDENT_WEIGHTS = "student.safetensors"
HEADS_WEIGHTS = "heads.safetensors"
STAGE_FILE = "stage.json"
DEFAULT_MAX_LENGTH = 64


@dataclass
class _Validation:
    """A teacher's validation texts, labels and its own outputs on them."""

    texts: list[str]
    labels: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor


@dataclass
class _Teacher:
    targets: TeacherTargets
    validation: _Validation
    head: Any  # mergelab.checkpoint.heads.TaskHead (names, classes, facts) of the teacher
    task: Any
    model: str
    max_length: int


def state_folder(out: Path) -> Path:
    """Where a run writing `out` keeps its stage checkpoints (removed once `out` is written)."""
    return out.parent / f".{out.name}.distill-state"


def distill(
    config: str | Path, out: str | Path, *, overwrite: bool = False, restart: bool = False,
    progress: bool = True,
) -> dict[str, Any]:  # fmt: skip
    """Distil the teachers of the distill config at `config` into one student at `out`.

    overwrite: replace an existing `out` (atomically). restart: discard the checkpoints of an
    earlier, unfinished run of this output (by default it resumes after its last finished
    stage, when its config is the same). Returns the report (also in `out/distill_report.json`).
    Raises ConfigError (every problem at once) before any model loads, MergeLabError for
    inputs found bad while loading (a teacher whose features do not fit its head).
    """
    started = time.perf_counter()
    config_path = Path(config)
    settings = read_distill_config(config_path)
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise MergeLabError(f"{out} already exists; choose a new folder or pass overwrite=True")
    state = state_folder(out)
    if restart and state.exists():
        shutil.rmtree(state)
    done = _finished_stages(state, settings)

    teachers = [_load_teacher(t, settings) for t in settings.teachers]
    encoder, tokenizer, architecture = _load_student(settings.student.init)
    max_length = settings.max_length or max(t.max_length for t in teachers)
    student_dim = _embed(encoder, tokenizer, teachers[0].targets.texts[:1], max_length).shape[1]
    replay = None
    if settings.replay is not None:
        texts = replay_texts(settings.replay.data, settings.replay.examples, settings.seed)
        replay = ReplayMemory(texts, _replay_targets(settings.replay.model, encoder, tokenizer,
                                                     texts, max_length, student_dim),
                              settings.replay.ratio, settings.replay.loss)  # fmt: skip
    heads = StudentHeads(student_dim, [t.targets for t in teachers],
                         torch.Generator().manual_seed(settings.seed))  # fmt: skip
    examples = DistillExamples(tokenizer, [t.targets for t in teachers], max_length=max_length,
                               replay=replay)  # fmt: skip
    init = _validate(encoder, tokenizer, heads, teachers, replay, max_length)

    stages = []
    for index, stage in enumerate(settings.stages):
        folder = state / f"{index:02d}-{stage.name}"
        if index < len(done):
            stages.append({**done[index], "resumed": True})
            if index == len(done) - 1:
                _load_stage(folder, encoder, heads)
            continue
        _write_fingerprint(state, settings)
        stage_seed = settings.seed + index
        examples.replay_active = replay is not None and stage.train_backbone
        examples.generator = torch.Generator().manual_seed(stage_seed)
        began = time.perf_counter()
        losses = train(encoder, examples, stage.settings(stage_seed), head=heads,
                       progress=progress, description=f"distill: {stage.name}")  # fmt: skip
        record = {
            "name": stage.name, "steps": stage.steps, "train_backbone": stage.train_backbone,
            "losses": losses, "loss_first10": _mean(losses[:10]), "loss_last10": _mean(losses[-10:]),
            "validation": _validate(encoder, tokenizer, heads, teachers, replay, max_length),
            "seconds": time.perf_counter() - began,
            "texts_seen": stage.steps * stage.batch_size * (2 if examples.replay_active else 1),
        }  # fmt: skip
        _save_stage(folder, encoder, heads, record)
        stages.append({**record, "resumed": False})

    report = {
        "config": str(config_path.absolute()),
        "student_init": settings.student.init,
        "seed": settings.seed,
        "max_length": max_length,
        "teachers": {
            t.targets.name: {
                "model": t.model, "task": t.task.name, "train_texts": len(t.targets.texts),
                "validation_texts": len(t.validation.texts),
                "teacher_validation_accuracy": _accuracy(t.validation.logits, t.validation.labels),
                "projection": t.targets.name in heads.projections,
            } for t in teachers
        },
        "replay": None if replay is None else {
            "data": settings.replay.data, "texts": len(replay.texts), "ratio": replay.ratio,
            "loss": replay.loss,
        },
        "init": init,
        "stages": stages,
        "student": stages[-1]["validation"],
        "texts_seen": sum(s["texts_seen"] for s in stages),
        "seconds": time.perf_counter() - started,
    }  # fmt: skip
    _write_output(out, overwrite, encoder, tokenizer, architecture, heads, teachers, settings, report)
    shutil.rmtree(state, ignore_errors=True)
    return report


# --- loading -------------------------------------------------------------------------------------


def _load_teacher(teacher, settings: DistillConfig) -> _Teacher:
    from mergelab.checkpoint.heads import folder_heads
    from mergelab.eval.models import Classifier, load_model
    from mergelab.eval.sources import load_task

    head_info = folder_heads(teacher.model)[0]
    task = load_task(teacher.task)
    if head_info.label_names and tuple(head_info.label_names) != tuple(task.label_names):
        raise MergeLabError(f"teacher {teacher.model}: its head's classes are "
                            f"{list(head_info.label_names)}; task {task.name!r} has "
                            f"{list(task.label_names)} (in this order)")  # fmt: skip
    split_seed = int(head_info.facts.get("split_seed", 0))
    max_length = int(head_info.facts.get("max_length", DEFAULT_MAX_LENGTH))
    train, validation = teacher_splits(teacher, task, split_seed, settings.seed)
    texts = list(train.texts)
    model = load_model(teacher.model)
    if not isinstance(model, Classifier) or model.head is None or model.tokenizer is None:
        raise MergeLabError(f"teacher {teacher.model} is not a text encoder with a head")

    def outputs(batch: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        features = _embed(model.encoder, model.tokenizer, batch, max_length)
        if features.shape[1] != model.head.in_features:
            raise MergeLabError(f"teacher {teacher.model}: its encoder outputs {features.shape[1]} "
                                f"features, its head reads {model.head.in_features}: the "
                                "teacher's outputs do not match its head")  # fmt: skip
        with torch.no_grad():
            return features, model.head(features)

    features, logits = outputs(texts)
    validation_texts = list(validation.texts)
    validation_features, validation_logits = outputs(validation_texts)
    name = teacher.name or task.name
    return _Teacher(
        TeacherTargets(name, texts, features, logits, teacher.loss,
                       head=model.head if teacher.head == "teacher" else None),
        _Validation(validation_texts,
                    torch.as_tensor(validation.labels),
                    validation_features, validation_logits),
        head_info, task, teacher.model, max_length,
    )  # fmt: skip


def _load_student(init: str) -> tuple[nn.Module, Any, Path]:
    """The student's encoder (a folder, or a merge config merged in memory), its tokenizer and
    the folder its architecture comes from."""
    from transformers import AutoTokenizer

    from mergelab.search.dataflow import architecture_folder, load_source

    folder = architecture_folder(init)
    try:
        encoder = load_source(init)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise MergeLabError(f"the student cannot load its init {init}: {error}") from None
    return encoder, tokenizer, folder


def _replay_targets(model: str | None, student, tokenizer, texts: list[str], max_length: int,
                    student_dim: int):
    """The replayed features: the student init's own on `texts`, or (`replay.model`) another
    model's, which must be `student_dim` wide (the replay loss compares them directly)."""
    if model is None:
        return _embed(student, tokenizer, texts, max_length)
    other, other_tokenizer, _ = _load_student(model)
    targets = _embed(other, other_tokenizer, texts, max_length)
    if targets.shape[1] != student_dim:
        raise MergeLabError(f"`replay.model` {model} outputs {targets.shape[1]} features, the "
                            f"student {student_dim}: the replay loss compares them "
                            "directly, so they must be as wide")  # fmt: skip
    return targets


def _embed(encoder: nn.Module, tokenizer, texts: list[str], max_length: int) -> torch.Tensor:
    from mergelab.eval.harness import embed_texts

    return embed_texts(encoder, tokenizer, texts, max_length=max_length)


# --- judging -------------------------------------------------------------------------------------


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float | None:
    return float((logits.argmax(-1) == labels).float().mean()) if labels.numel() else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@torch.no_grad()
def _validate(encoder, tokenizer, heads: StudentHeads, teachers, replay, max_length) -> dict:
    """Per teacher, on its validation split: the student's accuracy, its agreement with the
    teacher (same arg-max) and the cosine of its projected features to the teacher's; on the
    replay memory, the cosine of the student's features to the init's."""
    result: dict[str, Any] = {}
    for teacher in teachers:
        name, validation = teacher.targets.name, teacher.validation
        if not validation.texts:
            result[name] = None
            continue
        features = _embed(encoder, tokenizer, validation.texts, max_length)
        logits = heads.heads[name](features)
        cosine = nn.functional.cosine_similarity(heads.project(name, features), validation.features)
        result[name] = {
            "student_accuracy": _accuracy(logits, validation.labels),
            "teacher_accuracy": _accuracy(validation.logits, validation.labels),
            "agreement": float((logits.argmax(-1) == validation.logits.argmax(-1)).float().mean()),
            "feature_cosine": float(cosine.mean()),
        }
    if replay is not None:
        features = _embed(encoder, tokenizer, replay.texts, max_length)
        result["replay_cosine"] = float(nn.functional.cosine_similarity(features, replay.features).mean())
    return result


# --- checkpoints and output ----------------------------------------------------------------------


def _finished_stages(state: Path, settings: DistillConfig) -> list[dict]:
    """The records of the stages an earlier run of this output finished, in order (empty when
    none). Raises MergeLabError for checkpoints of another config."""
    if not state.exists():
        return []
    fingerprint = state / STATE_FINGERPRINT
    try:
        recorded = json.loads(fingerprint.read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if recorded != settings.fingerprint():
        raise MergeLabError(f"{state} holds the checkpoints of an unfinished run of another config "
                            "(or of an unreadable one); pass restart=True to discard them")
    done = []
    for index, stage in enumerate(settings.stages):
        path = state / f"{index:02d}-{stage.name}" / STAGE_FILE
        if not path.is_file():
            break
        done.append(json.loads(path.read_text(encoding="utf-8")))
    return done


def _write_fingerprint(state: Path, settings: DistillConfig) -> None:
    from mergelab.fileio import write_text_atomic

    if not (state / STATE_FINGERPRINT).is_file():
        write_text_atomic(state / STATE_FINGERPRINT, json.dumps({"fingerprint": settings.fingerprint()}))


def _save_stage(folder: Path, encoder: nn.Module, heads: StudentHeads, record: dict) -> None:
    from safetensors.torch import save_file

    from mergelab.fileio import write_folder_atomic

    def fill(temporary: Path) -> None:
        save_file({k: v.detach().contiguous() for k, v in encoder.state_dict().items()},
                  str(temporary / STUDENT_WEIGHTS))  # fmt: skip
        save_file({k: v.detach().contiguous() for k, v in heads.state_dict().items()},
                  str(temporary / HEADS_WEIGHTS))  # fmt: skip
        (temporary / STAGE_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")

    write_folder_atomic(folder, fill, overwrite=True)


def _load_stage(folder: Path, encoder: nn.Module, heads: StudentHeads) -> None:
    from safetensors.torch import load_file

    try:
        encoder.load_state_dict(load_file(str(folder / STUDENT_WEIGHTS)))
        heads.load_state_dict(load_file(str(folder / HEADS_WEIGHTS)))
    except (OSError, RuntimeError) as error:
        raise MergeLabError(f"cannot resume from the checkpoint {folder}: {error}; pass "
                            "restart=True to start over") from None


def _write_output(out, overwrite, encoder, tokenizer, architecture, heads, teachers, settings, report):
    from mergelab.checkpoint.heads import HEADS_MANIFEST, TaskHead, head_file_name, heads_manifest
    from mergelab.fileio import atomic_folder
    from mergelab.training.folder import carry_base_tensors, save_head

    written = []
    with atomic_folder(out, overwrite=overwrite) as folder:
        encoder.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        carry_base_tensors(folder, architecture, {name for name, _ in encoder.named_buffers()})
        (folder / "heads").mkdir()
        for teacher in teachers:
            name = teacher.targets.name
            save_head(heads.heads[name], folder / head_file_name(name))
            facts = {**teacher.head.facts, "max_length": report["max_length"],
                     "distilled_from": teacher.model}  # fmt: skip
            written.append(TaskHead(name, teacher.task.name, folder / head_file_name(name),
                                    tuple(teacher.task.label_names), teacher.model, facts))  # fmt: skip
        if heads.projections:
            from safetensors.torch import save_file

            (folder / PROJECTIONS_DIR).mkdir()
            for name, projection in heads.projections.items():
                save_file({"weight": projection.weight.detach().contiguous(),
                           "bias": projection.bias.detach().contiguous()},
                          str(folder / PROJECTIONS_DIR / f"{Path(head_file_name(name)).name}"))  # fmt: skip
        (folder / HEADS_MANIFEST).write_text(json.dumps(heads_manifest(written), indent=2) + "\n",
                                             encoding="utf-8")  # fmt: skip
        (folder / CONFIG_FILE).write_text(yaml.safe_dump(settings.model_dump(mode="json"),
                                                         sort_keys=False), encoding="utf-8")  # fmt: skip
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
