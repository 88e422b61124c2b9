"""Weight-space diagnostics between task vectors: cosine, L2, sign conflicts, (truncated) soft
sign dissimilarity, per tensor, per layer and whole model; reports; predictive power."""

from mergelab.diagnostics.metrics import (
    METRICS,
    DiagnosticsResult,
    TaskVectorMetrics,
    cosine_similarity,
    diagnose,
    keep_top_magnitudes,
    l2_distance,
    sign_conflict_rate,
    soft_sign_dissimilarity,
    truncated_soft_sign_dissimilarity,
)

__all__ = [
    "METRICS",
    "DiagnosticsResult",
    "TaskVectorMetrics",
    "cosine_similarity",
    "diagnose",
    "keep_top_magnitudes",
    "l2_distance",
    "sign_conflict_rate",
    "soft_sign_dissimilarity",
    "truncated_soft_sign_dissimilarity",
]
