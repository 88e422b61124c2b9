"""Activation and gradient statistics through hooks on any torch module (see DESIGN.md).

Gram matrices of layer inputs (RegMean), diagonal Fisher information (Fisher merging), and the
batch conventions shared by the data-aware merges.
"""

from mergelab.stats.batches import DataError, TaskData, with_head
from mergelab.stats.fisher import FisherStats, collect_fisher
from mergelab.stats.gram import GramStats, LayerGram, collect_grams, estimate_gram_bytes
from mergelab.stats.store import GramStore, load_fisher, load_grams, save_fisher, save_grams

__all__ = [
    "DataError",
    "FisherStats",
    "GramStats",
    "GramStore",
    "LayerGram",
    "TaskData",
    "collect_fisher",
    "collect_grams",
    "estimate_gram_bytes",
    "load_fisher",
    "load_grams",
    "save_fisher",
    "save_grams",
    "with_head",
]
