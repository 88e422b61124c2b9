"""Merging by distillation: several frozen teachers into one student (SAM-CLIP's recipe).

    report = distill("distill.yml", "./student")      # `mergelab distill distill.yml --out ./student`

`config`: the YAML and its validation; `losses`: the pure loss functions; `examples`: the
teachers' recorded outputs and the replay memory as the training loop's `Examples`; `run`: the
stages, their checkpoints and the output folder. See docs/distill.md.
"""

from mergelab.distill.config import DistillConfig, Replay, Stage, Teacher, read_distill_config
from mergelab.distill.losses import cosine_feature_loss, kl_logit_loss, mse_feature_loss
from mergelab.distill.run import distill

__all__ = [
    "DistillConfig", "Replay", "Stage", "Teacher", "cosine_feature_loss", "distill",
    "kl_logit_loss", "mse_feature_loss", "read_distill_config",
]  # fmt: skip
