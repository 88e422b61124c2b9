"""Evolutionary merge-recipe search (Akiba et al. 2024): CMA-ES (or TPE, random) through
optuna's ask/tell over a merge method's parameters per source and layer group (parameter
space) or over which source layers run in which order and scale (data-flow space), each trial
built in memory and scored by an evaluator, resumable from its study database."""

from mergelab.search.dataflow import DataflowSpace, load_routing, routed_model
from mergelab.search.space import Dimension, ParameterSpace, build_space
from mergelab.search.study import (
    SAMPLERS,
    SearchResult,
    TrialOutcome,
    load_evaluator,
    run_search,
)

__all__ = [
    "SAMPLERS", "DataflowSpace", "Dimension", "ParameterSpace", "SearchResult", "TrialOutcome", "build_space",
    "load_evaluator", "load_routing", "routed_model", "run_search",
]
