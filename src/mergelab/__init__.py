"""mergelab: merge neural networks' weights into one model."""

from mergelab.api import (
    merge,
    merge_expert_groups,
    merge_modulated,
    merge_state_dicts,
    merge_upscaled,
    moe,
    plan_merge,
)
from mergelab.datamerge import data_merge
from mergelab.errors import CheckpointError, ConfigError, MergeError, MergeLabError

__version__ = "0.1.0"

__all__ = [
    "data_merge",
    "merge",
    "merge_expert_groups",
    "merge_modulated",
    "merge_state_dicts",
    "merge_upscaled",
    "moe",
    "plan_merge",
    "CheckpointError",
    "ConfigError",
    "MergeError",
    "MergeLabError",
]
