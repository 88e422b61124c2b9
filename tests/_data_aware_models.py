"""A tiny seeded model zoo for the data-aware merge tests (embedding, grouped conv, norm, linears).

`tests/data/data_aware_golden.safetensors` holds what the pre-pipeline `data_merge` (its own
executor in mergelab.datamerge, before the statistics stage / plan / engine split) produced on
this zoo; tests/test_data_pipeline.py checks the pipeline reproduces it. Regenerate only if the
zoo itself changes (and say why in the commit).
"""

from __future__ import annotations

import copy

import torch
from conftest import word_ids
from torch import nn

from mergelab.stats.batches import TaskData

VOCAB, WIDTH, HIDDEN, FEATURES, CLASSES = 10, 6, 4, 3, 2
TASKS = ("a", "b", "c")


class Tiny(nn.Module):
    """ids [batch, tokens] -> features [batch, FEATURES]."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.conv = nn.Conv1d(WIDTH, WIDTH, 3, padding=1, groups=2)
        self.norm = nn.LayerNorm(WIDTH)
        self.fc = nn.Linear(WIDTH, HIDDEN)
        self.out = nn.Linear(HIDDEN, FEATURES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        x = torch.tanh(self.fc(self.norm(x)))
        return self.out(x).mean(1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_zoo(batches: int = 2, batch_size: int = 4, tokens: int = 5):
    """(base module, {task: fine-tuned state dict}, {task: TaskData with a head})."""
    torch.manual_seed(1234)
    base = Tiny().eval()
    finetuned, data = {}, {}
    for i, task in enumerate(TASKS):
        model = copy.deepcopy(base)
        with torch.no_grad():
            for j, p in enumerate(model.parameters()):
                p.add_(0.2 * torch.randn(p.shape, generator=_gen(100 * i + j)))
        finetuned[task] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        head = nn.Linear(FEATURES, CLASSES)
        with torch.no_grad():
            head.weight.copy_(torch.randn(CLASSES, FEATURES, generator=_gen(500 + i)))
            head.bias.copy_(torch.randn(CLASSES, generator=_gen(600 + i)))
        # Each task sees mostly its own tokens (so the embedding rows' counts differ).
        g = _gen(700 + i)
        rows = []
        for _ in range(batches):
            ids = torch.randint(0, VOCAB - 3, (batch_size, tokens), generator=g) + (i % 3)
            labels = torch.randint(0, CLASSES, (batch_size,), generator=g)
            rows.append((ids, labels))
        data[task] = TaskData(rows, head=head)
    return base, finetuned, data


# method -> parameters of the golden runs
GOLDEN_RUNS = {
    "regmean": {"alpha": 0.9},
    "regmean_plusplus": {"alpha": 0.7},
    "fisher": {"normalize": True},
}


def tiny_bert_folders(root):
    """Hugging Face BERT folders (base, m0, m1, twin; each with a `head.safetensors`) and a CSV
    task under `root`: what `mergelab merge` with a `data:` section reads."""
    import csv

    import transformers

    from mergelab.training.folder import save_head

    words = ["good", "bad", "fine", "awful", "film", "plot", "the", "was", "very"]
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = transformers.BertTokenizerFast(vocab=word_ids(vocab))
    config = transformers.BertConfig(
        vocab_size=len(words) + 5, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=16, max_position_embeddings=32,
    )
    torch.manual_seed(0)
    base = transformers.BertModel(config).eval()
    folders = {}
    for name, noise in (("base", 0.0), ("m0", 0.05), ("m1", 0.05), ("twin", 0.0)):
        model = transformers.BertModel(config)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.add_(noise * torch.randn(p.shape, generator=_gen(200 + i + len(name))))
        folder = root / name
        model.save_pretrained(folder, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        head = nn.Linear(8, 2)
        with torch.no_grad():
            head.weight.copy_(torch.randn(2, 8, generator=_gen(300 + len(name))))
            head.bias.zero_()
        save_head(head, folder / "head.safetensors")
        folders[name] = folder
    with (root / "task.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for j in range(24):
            writer.writerow([f"the film was very {words[j % 4]} {words[4 + j % 3]}", int(j % 4 in (0, 2))])
    return folders


def bert_config(root, folders, method, models=("m0", "m1"), **extra):
    """A `mergelab merge` config with a `data:` section over the tiny BERT folders."""
    return {
        "merge_method": method,
        "models": [{"model": str(folders[m])} for m in models],
        "base_model": str(folders["base"]),
        "data": {"task": str(root / "task.csv"), "examples": 12, "batch_size": 4},
        **extra,
    }


# method -> parameters of the golden `mergelab merge` runs on the tiny BERT
BERT_GOLDEN_RUNS = {"regmean": {"alpha": 0.8}, "fisher": {}}
