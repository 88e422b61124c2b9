"""Merge methods: one module per family, all declared in one registry (see registry.py)."""

from importlib import import_module

from mergelab.methods.registry import (
    MergeMethod,
    Param,
    TensorMerge,
    get_method,
    list_methods,
    register,
)

# Each module registers its methods on import. Add a new family here.
_FAMILIES = (
    "linear",
    "task_arithmetic",
    "modality",
    "spherical",
    "model_stock",
    "pairwise",
    "ram",
    "passthrough",
    "tsv",
    "iso",
    "magmax",
    "expo",
    "pcb",
    "lines",
    "tall_masks",
    "wudi",
    "emr",
    "smile",
    "wemoe",
    "data_aware",
)
for _family in _FAMILIES:
    import_module(f"mergelab.methods.{_family}")

__all__ = ["MergeMethod", "Param", "TensorMerge", "get_method", "list_methods", "register"]
