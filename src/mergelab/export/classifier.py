"""Export one task of a model folder as a transformers sequence-classification folder.

The folder `mergelab finetune` or `mergelab merge` wrote holds an encoder and one or more task
heads (`mergelab.checkpoint.heads`). `export_classifier` writes, for one task: `config.json`
(the encoder's, plus `num_labels`, `id2label`/`label2id`, `architectures` and an `auto_map` to
the bundled `modeling_mergelab.py`), `model.safetensors` (`encoder.*` and `classifier.*`), the
tokenizer (its `model_max_length` set to the length the head was trained with), a model card
and `modeling_mergelab.py` itself, which computes exactly what `mergelab eval` scores (mean
pooling of the last hidden states, then the head). Load it with
`AutoModelForSequenceClassification.from_pretrained(OUT, trust_remote_code=True)` (the code
is the folder's own file; nothing is fetched) or `pipeline("text-classification", ...)`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mergelab.checkpoint.card import CARD_FILE, classifier_card
from mergelab.checkpoint.heads import TaskHead, choose_head, folder_heads
from mergelab.errors import MergeLabError
from mergelab.fileio import atomic_folder

MODELING_FILE = "modeling_mergelab.py"
CLASS_NAME = "MeanPooledForSequenceClassification"


def _head_of(folder: Path, task: str | None) -> TaskHead:
    heads = folder_heads(folder)
    if not heads:
        raise MergeLabError(
            f"{folder} holds no task head (no head.safetensors nor heads.json): export a folder "
            "`mergelab finetune` wrote, or a merge of such folders"
        )
    if task is None:
        if len(heads) > 1:
            raise MergeLabError(
                f"{folder} holds heads {sorted(h.name for h in heads)}: pass --task NAME"
            )
        return heads[0]
    return choose_head(heads, task, folder)


def export_classifier(
    folder: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    task: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the encoder of `folder` with the head of `task` as a transformers
    sequence-classification folder at `out_dir` (atomically).

    task: a head's name or task name (None: the folder's only head).
    Returns what was written (task, labels, source of the head, out_dir).
    Raises MergeLabError, before anything is written, for a folder without a Hugging Face
    text encoder and tokenizer, a missing or ambiguous head, a head whose width is not the
    encoder's, or an existing `out_dir` without `overwrite`.
    """
    from transformers import AutoConfig, AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from mergelab.export import modeling_mergelab

    hf_logging.set_verbosity_error()
    folder, out_dir = Path(folder), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise MergeLabError(f"{out_dir} already exists (pass overwrite=True to replace it)")
    if out_dir.resolve() == folder.resolve():
        raise MergeLabError(f"{out_dir} is the folder being exported; choose another")
    if not (folder / "config.json").is_file():
        raise MergeLabError(
            f"{folder} has no config.json: export writes Hugging Face text encoders (image "
            "folders of a `module:function` encoder are not exported)"
        )
    head = _head_of(folder, task)
    if head.facts.get("modality", "text") != "text":
        raise MergeLabError(f"head {head.name!r} is for {head.facts['modality']} inputs; "
                            "export writes text classifiers")  # fmt: skip
    tensors = _read_head_tensors(head)
    num_labels, width = tensors["weight"].shape
    labels = list(head.label_names) or [f"LABEL_{i}" for i in range(num_labels)]
    if len(labels) != num_labels:
        raise MergeLabError(
            f"head {head.name!r} ({head.path}) has {num_labels} rows but {len(labels)} label "
            f"names {labels}"
        )
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        encoder = AutoModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise MergeLabError(f"cannot load the encoder and tokenizer in {folder}: {error}") from None
    hidden = getattr(config, "hidden_size", None)
    if hidden != width:
        raise MergeLabError(
            f"head {head.name!r} ({head.path}) takes {width} features; the encoder in {folder} "
            f"has hidden_size {hidden}"
        )
    config.num_labels = num_labels
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    config.architectures = [CLASS_NAME]
    config.auto_map = {"AutoModelForSequenceClassification": f"{MODELING_FILE[:-3]}.{CLASS_NAME}"}
    model = modeling_mergelab.MeanPooledForSequenceClassification(config)
    model.encoder.load_state_dict(encoder.state_dict(), strict=True)
    with torch.no_grad():
        model.classifier.weight.copy_(tensors["weight"])
        model.classifier.bias.copy_(tensors["bias"])
    max_length = head.facts.get("max_length")
    if isinstance(max_length, int):
        tokenizer.model_max_length = max_length
    summary = {"task": head.task, "head": head.name, "labels": labels, "source": head.source,
               "model": str(folder), "max_length": max_length, "out_dir": str(out_dir)}  # fmt: skip
    with atomic_folder(out_dir, overwrite=overwrite) as temporary:
        model.eval().save_pretrained(temporary, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
        shutil.copyfile(modeling_mergelab.__file__, temporary / MODELING_FILE)
        card = classifier_card(task=head.task, head=head.name, source=head.source,
                               model=str(folder), labels=labels, max_length=max_length)  # fmt: skip
        (temporary / CARD_FILE).write_text(card, encoding="utf-8")
    return summary


def _read_head_tensors(head: TaskHead) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(head.path))
    except (SafetensorError, OSError) as error:
        raise MergeLabError(f"cannot read head {head.path}: {error}") from None
    if set(tensors) < {"weight", "bias"} or tensors["weight"].dim() != 2:
        raise MergeLabError(
            f"{head.path} is not a linear head: needs `weight` [classes, dim] and `bias` [classes]"
        )
    return {k: tensors[k].float() for k in ("weight", "bias")}
