"""The linear-probe baseline of an evaluation: a probe on frozen features, its L2 strength chosen
on the validation split.

Kumar et al. 2022 (https://arxiv.org/abs/2202.10054) use the probe both as the baseline a
fine-tune must beat and as the head LP-FT fine-tunes under; the solver is the training layer's
(`mergelab.training.probe.fit_softmax_probe`), so both fit the same probe.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

PROBE_CS = (0.25, 1.0, 4.0)


@torch.no_grad()
def _accuracy(head: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    return float((head(features.to(head.weight.dtype)).argmax(-1) == labels).float().mean())


def select_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    validation_features: torch.Tensor,
    validation_labels: torch.Tensor,
    num_classes: int,
    cs: Sequence[float] = PROBE_CS,
) -> tuple[nn.Linear, float, float]:
    """The probe (`fit_softmax_probe`) whose L2 strength among `cs` scores best on the
    validation split (the first on ties); returns (probe, chosen c, validation accuracy)."""
    from mergelab.training.probe import fit_softmax_probe

    if not cs:
        raise ValueError("give at least one probe strength `c`")
    best: tuple[nn.Linear, float, float] | None = None
    for c in cs:
        probe = fit_softmax_probe(train_features, train_labels, num_classes, c=c)
        score = _accuracy(probe, validation_features.float(), validation_labels)
        if best is None or score > best[2]:
            best = (probe, c, score)
    return best
