"""The search loop: optuna's ask/tell over a space (parameter or data-flow), resumable from its study.

Every trial builds its candidate from the sources (loaded once) in memory (`space.build`) and
scores the merged state dict with the evaluator (higher is better). An evaluator that raises
or returns a non-finite number fails its trial; the search goes on. The study lives in a
database (SQLite by default): a search killed at any moment resumes from it with every
finished trial kept, none repeated, and the trial that was running when it died recorded as
failed ("interrupted").
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from mergelab.errors import ConfigError, MergeLabError

Evaluator = Callable[[Mapping[str, torch.Tensor]], "float | Mapping[str, float]"]
SAMPLERS = ("cmaes", "tpe", "random", "nsga2")
OBJECTIVES = ("mean", "worst", "pareto")
PARETO = "pareto"  # two objectives: the mean and the worst task, maximised together
SINGLE_OBJECTIVE_SAMPLERS = ("cmaes",)


def default_sampler(objective: str) -> str:
    """CMA-ES (the paper's); NSGA-II for the two-objective Pareto mode, which CMA-ES lacks."""
    return "nsga2" if objective == PARETO else "cmaes"


def check_sampler(sampler: str, objective: str) -> list[str]:
    """Problems of a sampler/objective pair (empty when they fit)."""
    if sampler not in SAMPLERS:
        return [f"search.sampler: one of {', '.join(SAMPLERS)}; got {sampler!r}"]
    if objective == PARETO and sampler in SINGLE_OBJECTIVE_SAMPLERS:
        return [f"search.sampler: {sampler} optimises one objective; `objective: pareto` needs "
                "nsga2, tpe or random"]
    return []
STUDY_NAME = "mergelab-search"


@dataclass
class TrialOutcome:
    number: int
    value: float | None  # None: failed
    config: dict
    merge_seconds: float
    eval_seconds: float
    error: str = ""
    scores: dict[str, float] = field(default_factory=dict)  # per task, when the evaluator gives them


@dataclass
class SearchResult:
    best_value: float
    best_config: dict
    trials: list[TrialOutcome] = field(default_factory=list)  # every trial of the study
    completed: int = 0
    failed: int = 0
    pareto: list[int] = field(default_factory=list)  # trial numbers of the front (pareto mode)


def load_evaluator(spec: str) -> Evaluator:
    """`module:function` -> the function (called with a merged state dict, returns a float)."""
    module_name, _, attribute = str(spec).partition(":")
    if not module_name or not attribute:
        raise ConfigError([f"search.evaluator: `module:function`; got {spec!r}"])
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise ConfigError([f"search.evaluator: cannot import {spec!r}: {exc}"]) from None
    if not callable(function):
        raise ConfigError([f"search.evaluator: {spec!r} is not callable"])
    return function


def objective_value(raw, objective: str = "mean") -> tuple[float, dict[str, float]]:
    """(the trial's value, its per-task scores) from what the evaluator returned: a number, or
    a mapping task -> score reduced by `objective` ("mean": the average over tasks; "worst": the
    lowest task; "pareto": the average, the worst kept beside it as the second objective).
    Raises ValueError for an empty mapping or a non-number, or a number under "pareto"."""
    if isinstance(raw, Mapping):
        scores = {str(k): float(v) for k, v in raw.items()}
        if not scores:
            raise ValueError("the evaluator returned an empty mapping")
        values = list(scores.values())
        if objective == "worst":
            return min(values), scores
        return sum(values) / len(values), scores
    if objective == PARETO:
        raise ValueError("`objective: pareto` needs per-task scores: the evaluator returned one "
                         "number, not a mapping task -> score")
    return float(raw), {}


def search_fingerprint(space, evaluator: str, sampler: str, seed: int,
                       objective: str = "mean") -> str:
    """What makes a study this search's: the space (its config), evaluator, sampler, seed."""
    facts = {**space.fingerprint_facts(), "evaluator": evaluator, "sampler": sampler,
             "seed": seed, "objective": objective}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_sampler(name: str, seed: int, x0: Mapping[str, float] | None = None):
    """The optuna sampler `name`; CMA-ES's mean starts at `x0` (a space's start point: a
    parameter-space search's `start: config`), else at the cube's centre."""
    import optuna

    if name == "cmaes":
        # Akiba et al.'s setting is optuna's default on the unit cube: start at the centre
        # (0.5), sigma 1/6 of the range, population 4 + 3 ln(n).
        if not x0:
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
        import warnings

        # `x0` is deprecated since optuna 4.9 (removal planned for 6.0, above our pin <6);
        # `source_trials`, its successor, warm-starts from scored trials, not from a point.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*x0.*", category=FutureWarning)
            return optuna.samplers.CmaEsSampler(x0=dict(x0), seed=seed, warn_independent_sampling=False)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    raise ConfigError([f"search.sampler: one of {', '.join(SAMPLERS)}; got {name!r}"])


def open_study(storage: str, space, fingerprint: str, sampler, objectives: int = 1):
    """The study of this search in `storage`, created if absent. A study there that belongs to
    another search (another fingerprint) is refused, never reused or overwritten."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(
            study_name=STUDY_NAME, storage=storage, sampler=sampler,
            directions=["maximize"] * objectives, load_if_exists=True,
        )
    except Exception as exc:  # optuna raises several storage errors; name the storage
        raise MergeLabError(f"cannot open the study database {storage}: {exc}") from None
    owner = study.user_attrs.get("fingerprint")
    if owner is None and not study.trials:
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("dimensions", [d.label for d in space.dimensions])
    elif owner != fingerprint:
        raise MergeLabError(
            f"the study database {storage} holds another search (fingerprint {owner}, this one "
            f"{fingerprint}): give another --storage or --out, or delete it to start over"
        )
    return study


def _interrupted(study) -> int:
    """Mark the trials a killed run left RUNNING as failed; return how many."""
    import optuna

    stale = [t.number for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    for number in stale:
        study.tell(number, state=optuna.trial.TrialState.FAIL)
    return len(stale)


def evaluate_trial(
    config: dict,
    space,
    sources,
    evaluate: Evaluator,
    objective: str,
    seed: int,
) -> tuple[float | None, dict[str, float], str, float, float]:
    """One trial: build `config`'s candidate in memory (`space.build`: a merged state dict, or
    a routed model), score it. Returns (value or None when it failed, per-task scores, error,
    build seconds, evaluation seconds). Never raises for the evaluator's own errors: they fail
    the trial."""
    tick = time.perf_counter()
    value, error, merged_at, scores = None, "", tick, {}
    try:
        merged = space.build(config, sources, seed)
        merged_at = time.perf_counter()
        value, scores = objective_value(evaluate(merged), objective)
        if not math.isfinite(value):
            error, value = f"the evaluator returned {value}", None
    except Exception as exc:  # an evaluator's own error fails its trial, not the search
        error = f"{type(exc).__name__}: {exc}"
    done = time.perf_counter()
    return value, scores, error, merged_at - tick, (done - merged_at) if value is not None else 0.0


class LocalWorkers:
    """Trials run one at a time in this process (the default: no Ray)."""

    slots = 1

    def __init__(self, space, sources, evaluate: Evaluator, objective: str, seed: int):
        self._args = (space, sources, evaluate, objective, seed)
        self._done: list = []

    def submit(self, key, config: dict) -> None:
        self._done.append((key, evaluate_trial(config, *self._args)))

    def wait(self) -> list:
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        pass


def run_search(
    space,
    sources,
    evaluate: Evaluator | None,
    *,
    storage: str,
    trials: int,
    sampler: str = "cmaes",
    seed: int = 0,
    evaluator_name: str = "",
    timeout_seconds: float | None = None,
    objective: str = "mean",
    on_trial: Callable[[TrialOutcome, int, float | None], None] | None = None,
    workers=None,
) -> SearchResult:
    """Run (or resume) the search until `trials` trials have completed (or `timeout_seconds`
    passed, or as many trials as `trials` failed in this run); return the best recipe and
    every trial. `on_trial(outcome, completed, best)`
    is called after each trial. workers: where trials run (default `LocalWorkers`, one at a
    time here; `mergelab.search.parallel.RayWorkers` keeps `slots` trials in flight)."""
    import optuna

    if trials < 1:
        raise ConfigError([f"search.trials: at least 1; got {trials}"])
    if objective not in OBJECTIVES:
        raise ConfigError([f"search.objective: one of {', '.join(OBJECTIVES)}; got {objective!r}"])
    if check_sampler(sampler, objective):
        raise ConfigError(check_sampler(sampler, objective))
    fingerprint = search_fingerprint(space, evaluator_name, sampler, seed, objective)
    start = space.start_point()
    study = open_study(storage, space, fingerprint, make_sampler(sampler, seed, space.sampler_start()),
                       2 if objective == PARETO else 1)
    _interrupted(study)
    if start and not study.trials:
        # The first trial is the start itself (a data-flow search's host model as it is), so
        # the best found is never below it.
        study.enqueue_trial(start)
    pool = workers if workers is not None else LocalWorkers(space, sources, evaluate, objective, seed)
    complete = optuna.trial.TrialState.COMPLETE
    started = time.perf_counter()
    running: dict[int, tuple] = {}
    completed = sum(t.state == complete for t in study.trials)
    failed = 0  # in this run: as many failures as the budget ends the search
    try:
        while completed < trials or running:
            out_of_time = (timeout_seconds is not None and time.perf_counter() - started > timeout_seconds
                           or failed >= trials)
            # Ask no more trials than can still complete the budget.
            while not out_of_time and len(running) < pool.slots and completed + len(running) < trials:
                trial = study.ask()
                x = [trial.suggest_float(d.label, 0.0, 1.0) for d in space.dimensions]
                config = space.to_config(x)
                trial.set_user_attr("config", config)
                running[trial.number] = (trial, config)
                pool.submit(trial.number, config)
            if not running:
                break
            for number, (value, scores, error, merge_s, eval_s) in pool.wait():
                trial, config = running.pop(number)
                trial.set_user_attr("seconds", [merge_s, eval_s])  # build, evaluation
                if scores:
                    trial.set_user_attr("scores", scores)
                if value is None:
                    trial.set_user_attr("error", error)
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    failed += 1
                else:
                    study.tell(trial, [value, min(scores.values())] if objective == PARETO else value)
                    completed += 1
                if on_trial is not None:
                    outcome = TrialOutcome(number, value, config, merge_s, eval_s, error, scores)
                    on_trial(outcome, completed, _best_value(study))
    finally:
        pool.close()
    return _result(study)


def _best_value(study) -> float | None:
    import optuna

    values = [t.values[0] for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    return max(values) if values else None


def _result(study) -> SearchResult:
    import optuna

    outcomes = []
    for t in study.trials:
        if t.state not in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL):
            continue
        build_s, eval_s = t.user_attrs.get("seconds", (0.0, 0.0))
        outcomes.append(TrialOutcome(
            t.number, t.values[0] if t.state == optuna.trial.TrialState.COMPLETE else None,
            t.user_attrs.get("config", {}), float(build_s), float(eval_s),
            t.user_attrs.get("error", "interrupted (the run was killed mid-trial)")
            if t.state == optuna.trial.TrialState.FAIL else "",
            dict(t.user_attrs.get("scores", {})),
        ))
    completed = [o for o in outcomes if o.value is not None]
    if not completed:
        raise MergeLabError("no trial of the search completed: every evaluation failed "
                            f"(first error: {outcomes[0].error if outcomes else 'none ran'})")
    front: list[int] = []
    candidates = completed
    if len(study.directions) > 1:
        # The Pareto front of (mean, worst task); its best mean is the recipe written.
        front = sorted(t.number for t in study.best_trials)
        candidates = [o for o in completed if o.number in front]
    best = max(candidates, key=lambda o: (o.value, min(o.scores.values(), default=0.0), -o.number))
    return SearchResult(best.value, best.config, outcomes, len(completed),
                        len(outcomes) - len(completed), front)
