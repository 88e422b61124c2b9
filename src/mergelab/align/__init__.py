"""Align and merge models trained from different initialisations.

* permutation specs: derived with torch.fx (`derive_spec`: MLPs, CNNs with BatchNorm, ResNets,
  transformer blocks built from nn.MultiheadAttention), declared by hand
  (`PermutationSpec.build`), or written once for an architecture (`bert_spec`: Hugging Face BERT);
* Git Re-Basin (Ainsworth et al. 2023): `weight_matching`, `activation_matching`,
  `align_to_reference` (then merge the aligned state dicts with any core method);
* ZipIt! (Stoica et al. 2024): `zip_models` (full or partial zipping, any number of models);
* repair: `reset_batchnorm`, `repair_rescale` (REPAIR, Jordan et al. 2023).
"""

from mergelab.align.derive import derive_spec, register_rule
from mergelab.align.features import JointMoments, collect_moments
from mergelab.align.matching import (
    activation_matching,
    align_to_reference,
    solve_assignment,
    weight_matching,
    weight_matching_many,
)
from mergelab.align.repair import repair_rescale, reset_batchnorm
from mergelab.align.spec import (
    AlignError,
    PermutationSpec,
    Probe,
    Segment,
    Space,
    invert,
    permute_state_dict,
    random_permutations,
)
from mergelab.align.specs import bert_spec
from mergelab.align.zipit import (
    MultiHeadModel,
    SpaceMerge,
    permute_match,
    zip_match,
    zip_models,
    zip_state_dicts,
)

__all__ = [
    "AlignError",
    "JointMoments",
    "MultiHeadModel",
    "PermutationSpec",
    "Probe",
    "Segment",
    "Space",
    "SpaceMerge",
    "activation_matching",
    "align_to_reference",
    "bert_spec",
    "collect_moments",
    "derive_spec",
    "invert",
    "permute_match",
    "permute_state_dict",
    "random_permutations",
    "register_rule",
    "repair_rescale",
    "reset_batchnorm",
    "solve_assignment",
    "weight_matching",
    "weight_matching_many",
    "zip_match",
    "zip_models",
    "zip_state_dicts",
]
