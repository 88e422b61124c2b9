"""Modality-specific -> modality-agnostic merging (Sung et al. 2023): expert groups inside one model.

`groups`: name-pattern groups of weight copies, presets, the group methods and the planner that
runs them on the streaming engine (`mergelab merge` with an `expert_groups:` config section, or
`merge_expert_groups` in memory).
"""

from mergelab.multimodal.groups import (
    GROUP_METHODS,
    PRESETS,
    ExpertGroup,
    merge_expert_groups,
    plan_expert_groups,
)

__all__ = ["GROUP_METHODS", "PRESETS", "ExpertGroup", "merge_expert_groups", "plan_expert_groups"]
