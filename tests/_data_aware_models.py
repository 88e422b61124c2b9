"""A tiny seeded model zoo for the data-aware merge tests (embedding, grouped conv, norm, linears).

`tests/data/data_aware_golden.safetensors` holds what the pre-pipeline `data_merge` (its own
executor in mergelab.datamerge, before the statistics stage / plan / engine split) produced on
this zoo; tests/test_data_pipeline.py checks the pipeline reproduces it. Regenerate only if the
zoo itself changes (and say why in the commit).
"""

from __future__ import annotations

import copy

import torch
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
