"""Write tests/data/training_golden.json: short seeded fine-tunes through the fine-tuning loops
as they were before `mergelab.training` (mergelab.finetune's text loop, the vision zoo's
`finetune_encoder`, the MLP zoo's `_train`, the multimodal study's `finetune_and_score`).

Run once, on CPU with one thread, from the commit that still had those loops:
    PYTHONPATH=src python tests/data/make_training_golden.py
tests/test_training_golden.py runs the same cases through `mergelab.training` and compares.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

WORDS = ["good", "great", "fine", "bad", "awful", "poor", "movie", "plot", "the", "a"]


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def tiny_bert(folder: Path):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    return BertModel(config), tokenizer


def toy_sentences(n: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(n):
        label = int(torch.randint(2, (1,), generator=generator))
        pool = WORDS[:3] if label else WORDS[3:6]
        picks = torch.randint(3, (3,), generator=generator).tolist()
        texts.append(" ".join(["the", "movie", *(pool[i] for i in picks)]))
        labels.append(label)
    return texts, labels


def text_cases(out: dict) -> None:
    import tempfile

    from mergelab.eval.harness import embed_texts
    from mergelab.finetune import LPFTRecipe, finetune_under_head, fit_linear_probe
    from mergelab_bench.zoo.text import finetune_text_task, quick_settings

    with tempfile.TemporaryDirectory() as folder:
        encoder, tokenizer = tiny_bert(Path(folder))
    encoder.eval()
    texts, labels = toy_sentences(48)
    probe = fit_linear_probe(embed_texts(encoder, tokenizer, texts, max_length=16), labels, 2)
    out["text_probe"] = {"head": tensor_digest(probe.state_dict())}
    settings = quick_settings(steps=6, batch_size=8, max_length=16, learning_rate=1e-3,
                              head_learning_rate=1e-2, warmup_steps=2)
    for recipe in ("lpft", "joint"):
        tuned, head, losses = finetune_text_task(
            encoder, tokenizer, texts, labels, probe, recipe=recipe, seed=3, settings=settings,
            task_name="toy",
        )
        out[f"text_{recipe}"] = {"encoder": tensor_digest(tuned.state_dict()),
                                 "head": tensor_digest(head.state_dict()), "losses": losses}
    # The demo's path: LP-FT with the recipe's own seed (not a per-task one).
    recipe = LPFTRecipe(steps=5, batch_size=8, max_length=16, learning_rate=1e-3, warmup_steps=1,
                        seed=1)
    model, head = copy.deepcopy(encoder), copy.deepcopy(probe)
    losses = finetune_under_head(model, head, tokenizer, texts, labels, recipe)
    out["text_demo"] = {"encoder": tensor_digest(model.state_dict()),
                        "head": tensor_digest(head.state_dict()), "losses": losses}


def vision_cases(out: dict) -> None:
    from mergelab_bench.zoo.mobilenet import MobileNetV2
    from mergelab_bench.zoo.vision import (
        PreparedSplit,
        VisionSettings,
        finetune_encoder,
        fit_softmax_probe,
        pooled_features,
        random_head,
    )

    torch.manual_seed(0)
    encoder = MobileNetV2(num_classes=None).eval()
    generator = torch.Generator().manual_seed(0)
    gray = torch.rand(40, 1, 16, 16, generator=generator)
    labels = torch.arange(40) % 3
    data = PreparedSplit(gray, labels)
    features = pooled_features(encoder, data)
    probe = fit_softmax_probe(features, labels, 3, c=1.0, max_iter=50)
    out["vision_probe"] = {"head": tensor_digest(probe.state_dict())}
    settings = VisionSettings(input_size=16, steps=5, batch_size=8, warmup_steps=2,
                              learning_rate=1e-3, head_learning_rate=1e-2, weight_decay=0.01)
    for recipe in ("lpft", "joint"):
        model = copy.deepcopy(encoder)
        stream = 2 * 1000 + 1
        if recipe == "lpft":
            head, train_head = copy.deepcopy(probe), False
        else:
            head, train_head = random_head(3, torch.Generator().manual_seed(stream)), True
        losses = finetune_encoder(model, head, data, settings, train_head=train_head, seed=stream)
        out[f"vision_{recipe}"] = {"encoder": tensor_digest(model.state_dict()),
                                   "head": tensor_digest(head.state_dict()), "losses": losses}


def mlp_cases(out: dict) -> None:
    from mergelab_bench.zoo.mlp import MLPZoo, MLPZooSettings

    settings = MLPZooSettings(train=300, validation=100, pretrain_steps=10, steps=12,
                              probe_steps=20)
    zoo = MLPZoo(settings)
    for recipe in ("lpft", "joint"):
        built = zoo.build(recipe=recipe, seed=1)
        out[f"mlp_{recipe}"] = {
            "pretrained": tensor_digest(built.pretrained),
            **{f"{t}.encoder": tensor_digest(built.finetuned[t]) for t in built.tasks},
            **{f"{t}.head": tensor_digest(built.heads[t].state_dict()) for t in built.tasks},
            **{f"{t}.probe": tensor_digest(built.probe_heads[t].state_dict()) for t in built.tasks},
        }


def multimodal_cases(out: dict) -> None:
    from mergelab_bench.multimodal import data as mmdata
    from mergelab_bench.multimodal.family import build_model
    from mergelab_bench.multimodal.recipe import DOWNSTREAM_TASKS, finetune_and_score, quick_settings

    settings = replace(quick_settings(), finetune_steps=4)
    data = mmdata.build_data(settings.data)
    model = build_model(settings.family_config(data.tokenizer.vocab_size, True), 0)
    for name, task in DOWNSTREAM_TASKS.items():
        seen = {}

        def evaluate(model, head, split, settings, seen=seen, task=task):
            seen["model"] = tensor_digest(model.state_dict())
            seen["head"] = tensor_digest(head.state_dict()) if head is not None else None
            return task.evaluate(model, head, split, settings)

        scores = finetune_and_score(model, replace(task, evaluate=evaluate), data, settings, seed=7)
        out[f"multimodal_{name}"] = {**seen, "scores": scores}


def main() -> None:
    torch.set_num_threads(1)
    out: dict = {"torch": torch.__version__}
    text_cases(out)
    vision_cases(out)
    mlp_cases(out)
    multimodal_cases(out)
    (HERE / "training_golden.json").write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
