"""Evolutionary merge-recipe search (Akiba et al. 2024, parameter space): CMA-ES (or TPE,
random) through optuna's ask/tell over a merge method's parameters per source and layer group,
each trial merged in memory and scored by an evaluator, resumable from its study database."""

from mergelab.search.space import Dimension, ParameterSpace, build_space
from mergelab.search.study import (
    SAMPLERS,
    SearchResult,
    TrialOutcome,
    load_evaluator,
    run_search,
)

__all__ = [
    "SAMPLERS", "Dimension", "ParameterSpace", "SearchResult", "TrialOutcome", "build_space",
    "load_evaluator", "run_search",
]
