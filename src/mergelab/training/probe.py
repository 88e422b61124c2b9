"""Linear probes: multinomial logistic regression on frozen features, as an `nn.Linear`.

The first stage of LP-FT (Kumar et al. 2022, https://arxiv.org/abs/2202.10054), and the cheap
alternative to fine-tuning a user has. Two solvers of the same objective (scikit-learn's
`LogisticRegression(C)`: C x summed cross-entropy + ||W||^2 / 2, bias not penalised), both
deterministic. No feature scaler is folded into the head: standardising first blew up the
weight of a near-constant feature and wrecked the later fine-tuning (DATA.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mergelab.training.settings import FinetuneSettings


def _check_classes(labels: Sequence[int] | torch.Tensor, num_classes: int) -> None:
    present = sorted(set(torch.as_tensor(labels).tolist()))
    if present != list(range(num_classes)):
        raise ValueError(f"the probe needs every class 0..{num_classes - 1}; labels hold {present}")


def fit_linear_probe(
    features: torch.Tensor, labels: Sequence[int] | torch.Tensor, num_classes: int, *, c: float = 1.0
) -> nn.Linear:
    """scikit-learn's lbfgs `LogisticRegression(C=c)` on raw `features`, as an `nn.Linear`.

    A binary probe becomes two logits (-z/2, +z/2), whose softmax equals the probe's
    sigmoid(z). Raises ValueError when a class is absent from `labels`.
    """
    from sklearn.linear_model import LogisticRegression

    _check_classes(labels, num_classes)
    y = torch.as_tensor(labels).numpy()
    x = features.detach().double().numpy()
    model = LogisticRegression(C=c, max_iter=5000, tol=1e-6).fit(x, y)
    coef = torch.as_tensor(model.coef_, dtype=torch.float32)
    intercept = torch.as_tensor(model.intercept_, dtype=torch.float32)
    if num_classes == 2:
        coef = torch.cat([-coef / 2, coef / 2])
        intercept = torch.cat([-intercept / 2, intercept / 2])
    head = nn.utils.skip_init(nn.Linear, features.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(coef)
        head.bias.copy_(intercept)
    return head


def fit_softmax_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    c: float = 1.0,
    max_iter: int = 500,
) -> nn.Linear:
    """scikit-learn's `LogisticRegression(C=c)` objective solved with full-batch L-BFGS in
    float64 (at most `max_iter` iterations), as an `nn.Linear`.

    Written in torch because scikit-learn's solver took over a minute on MobileNetV2's 1,280
    features; this takes a second. Raises ValueError when a class is absent from `labels`.
    """
    _check_classes(labels, num_classes)
    x = features.detach().double()
    y = labels.long()
    weight = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    # Dividing the objective by C * N keeps its scale independent of the data size.
    penalty = 1.0 / (2.0 * c * len(y))
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7,
        tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(x @ weight.T + bias, y) + penalty * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    head = nn.utils.skip_init(nn.Linear, x.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(weight.detach())
        head.bias.copy_(bias.detach())
    return head.requires_grad_(False)


def fit_probe(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, settings: FinetuneSettings
) -> nn.Linear:
    """The probe `settings` asks for (`probe_solver`, `probe_c`, `probe_steps`), frozen."""
    if settings.probe_solver == "sklearn":
        head = fit_linear_probe(features, labels, num_classes, c=settings.probe_c)
    else:
        head = fit_softmax_probe(
            features, torch.as_tensor(labels), num_classes, c=settings.probe_c,
            max_iter=settings.probe_steps,
        )  # fmt: skip
    return head.requires_grad_(False)
