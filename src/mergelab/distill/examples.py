"""What the one training loop distils on: the teachers' texts with their recorded outputs, and
the replay memory.

`DistillExamples` is an `Examples` (mergelab.training.examples): the loop draws indices into
the teachers' training texts (all teachers' texts, one index space) and asks for the loss of
a batch. The teachers are frozen, so their outputs are computed once, before training
(`TeacherTargets`); so are the student init's outputs on the replay texts. A batch's loss is

    (1 - ratio) * mean over its texts of the loss of the text's teacher
    + ratio * replay loss on as many replay texts, drawn from the examples' own generator

with the teacher's loss `feature_weight * features(project(s), t) + logit_weight * kl(head(s),
teacher logits)`; `StudentHeads` holds the head (and, where the widths differ, the learned
projection) of every teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mergelab.distill.config import TeacherLoss
from mergelab.distill.losses import FEATURE_LOSSES, kl_logit_loss
from mergelab.eval.harness import pooled_features


@dataclass
class TeacherTargets:
    """One teacher's training texts and its frozen outputs on them.

    features: [N, teacher_dim] mean-pooled features; logits: [N, classes] its head's logits.
    head: the teacher's head, when the student's head for it starts as a copy of it (config
        `head: teacher`); None: a new head.
    """

    name: str
    texts: list[str]
    features: torch.Tensor
    logits: torch.Tensor
    loss: TeacherLoss
    head: nn.Module | None = None

    def __post_init__(self):
        n = len(self.texts)
        if self.features.shape[0] != n or self.logits.shape[0] != n:
            raise ValueError(f"teacher {self.name!r}: {n} texts, {self.features.shape[0]} feature "
                             f"rows, {self.logits.shape[0]} logit rows")


class StudentHeads(nn.Module):
    """The student's head per teacher (features -> the teacher's classes) and, for a teacher
    whose features are not as wide as the student's, a linear projection onto them."""

    def __init__(self, student_dim: int, teachers: Sequence[TeacherTargets], generator: torch.Generator):
        """Raises MergeLabError for a teacher whose head is to be copied (`TeacherTargets.head`)
        while its features are not as wide as the student's."""
        import copy

        from mergelab.errors import MergeLabError
        from mergelab.training.recipes import random_head

        super().__init__()
        self.heads = nn.ModuleDict()
        self.projections = nn.ModuleDict()
        for teacher in teachers:
            teacher_dim = teacher.features.shape[1]
            if teacher.head is not None:
                if teacher_dim != student_dim:
                    raise MergeLabError(
                        f"teacher {teacher.name!r}: `head: teacher` copies its head, which reads "
                        f"{teacher_dim} features; the student outputs {student_dim}. Use `head: "
                        "new` (a new head, with a learned projection onto the teacher's features)")
                head = copy.deepcopy(teacher.head).float()
                head.requires_grad_(True)
                self.heads[teacher.name] = head
            else:
                self.heads[teacher.name] = random_head(student_dim, teacher.logits.shape[1], generator)
            if teacher_dim != student_dim:
                self.projections[teacher.name] = random_head(student_dim, teacher_dim, generator)

    def project(self, name: str, features: torch.Tensor) -> torch.Tensor:
        """`features` in the teacher `name`'s feature space (as they are at equal widths)."""
        return self.projections[name](features) if name in self.projections else features


def teacher_loss(
    heads: StudentHeads, teacher: TeacherTargets, student_features: torch.Tensor,
    indices: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """The loss of the student's features [B, dim] on `teacher`'s texts at `indices` [B]."""
    loss = teacher.loss
    total = student_features.new_zeros(())
    if loss.features is not None and loss.feature_weight > 0:
        projected = heads.project(teacher.name, student_features)
        total = total + loss.feature_weight * FEATURE_LOSSES[loss.features](
            projected, teacher.features[indices]
        )
    if loss.logits is not None and loss.logit_weight > 0:
        logits = heads.heads[teacher.name](student_features)
        total = total + loss.logit_weight * kl_logit_loss(
            logits, teacher.logits[indices], loss.temperature
        )
    return total


@dataclass
class ReplayMemory:
    """Texts and the student init's own features on them [N, dim], replayed with `ratio`."""

    texts: list[str]
    features: torch.Tensor
    ratio: float
    loss: str = "cosine"


class DistillExamples:
    """The teachers' texts as one index space, plus the replay memory (see the module docstring).

    replay_active: whether a step also replays (off while only heads train: the encoder, and
        so the replay loss, does not move then).
    """

    def __init__(
        self, tokenizer, teachers: Sequence[TeacherTargets], *, max_length: int,
        replay: ReplayMemory | None = None, generator: torch.Generator | None = None,
    ):  # fmt: skip
        self.tokenizer, self.teachers, self.max_length = tokenizer, list(teachers), max_length
        self.replay = replay
        self.replay_active = replay is not None
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        owner, local = [], []
        for t, teacher in enumerate(self.teachers):
            owner += [t] * len(teacher.texts)
            local += list(range(len(teacher.texts)))
        self.owner, self.local = torch.tensor(owner), torch.tensor(local)

    def __len__(self) -> int:
        return int(self.owner.numel())

    def features(self, model: nn.Module, texts: Sequence[str]) -> torch.Tensor:
        """The student's mean-pooled features of `texts` (with gradients)."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt")  # fmt: skip
        return pooled_features(model, tokens["input_ids"], tokens["attention_mask"])

    def loss(self, model: nn.Module, head: nn.Module | None, indices: torch.Tensor) -> torch.Tensor:
        if not isinstance(head, StudentHeads):
            raise TypeError("DistillExamples trains a StudentHeads")
        owners, locals_ = self.owner[indices], self.local[indices]
        texts = [self.teachers[o].texts[i] for o, i in zip(owners.tolist(), locals_.tolist())]
        features = self.features(model, texts)
        total = features.new_zeros(())
        for t, teacher in enumerate(self.teachers):
            mine = owners == t
            if mine.any():
                share = mine.float().mean()
                total = total + share * teacher_loss(head, teacher, features[mine], locals_[mine])
        if not (self.replay_active and self.replay is not None):
            return total
        replay = self.replay
        drawn = torch.randint(len(replay.texts), (len(indices),), generator=self.generator)
        replayed = self.features(model, [replay.texts[i] for i in drawn.tolist()])
        replay_loss = FEATURE_LOSSES[replay.loss](replayed, replay.features[drawn])
        return (1.0 - replay.ratio) * total + replay.ratio * replay_loss
