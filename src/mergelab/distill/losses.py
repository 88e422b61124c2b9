"""The distillation losses: pure torch functions of a student's and a teacher's outputs.

- on features: `cosine_feature_loss` (1 - cosine similarity, SAM-CLIP's loss on CLIP's
  embeddings) and `mse_feature_loss` (mean squared error per element);
- on logits: `kl_logit_loss`, Hinton et al.'s KL divergence between the softened teacher and
  student distributions, scaled by the temperature squared so that its gradients keep their
  size as the temperature changes (https://arxiv.org/abs/1503.02531).
Each returns the mean over the batch; `FEATURE_LOSSES` names the feature losses a config picks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional


def cosine_feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over rows of 1 - cos(student_i, teacher_i); both [batch, dim]."""
    return (1.0 - functional.cosine_similarity(student, teacher, dim=-1)).mean()


def mse_feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over every element of (student - teacher)^2; both [batch, dim]."""
    return functional.mse_loss(student, teacher)


FEATURE_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cosine": cosine_feature_loss,
    "mse": mse_feature_loss,
}


def kl_logit_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over the batch.

    Both [batch, classes]; `temperature` > 0 (above 1 softens both distributions, so the
    student also learns how the teacher ranks the wrong classes).
    """
    if temperature <= 0:
        raise ValueError(f"`temperature` must be positive; got {temperature}")
    student_log = functional.log_softmax(student_logits / temperature, dim=-1)
    teacher_log = functional.log_softmax(teacher_logits / temperature, dim=-1)
    kl = functional.kl_div(student_log, teacher_log, reduction="batchmean", log_target=True)
    return kl * temperature**2
