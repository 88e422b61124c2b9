"""`mergelab search run CONFIG --out DIR`: read a search config, load the sources once, run or
resume the study, write the best recipe.

The output folder holds the study database (`study.db`, unless `storage` names another
database) while the search runs, so a killed search resumes from it; `best.yaml` (a plain merge
config `mergelab merge` runs to the best trial's weights), `trials.csv` and `curve.png` are
written, each atomically, only when the search has finished.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

from mergelab.errors import ConfigError
from mergelab.fileio import write_atomic, write_text_atomic
from mergelab.search.dataflow import (
    DATAFLOW_KEYS,
    DataflowSpace,
    build_dataflow_space,
    routing_merge_config,
    source_layers,
)
from mergelab.search.dataflow import load_sources as load_dataflow_sources
from mergelab.search.space import ParameterSpace, build_space, load_checkpoints
from mergelab.search.study import (
    OBJECTIVES,
    SearchResult,
    TrialOutcome,
    check_sampler,
    default_sampler,
    load_evaluator,
    run_search,
)

SEARCH_KEYS = {"space", "evaluator", "trials", "sampler", "seed", "storage", "timeout_seconds",
               "objective"}
PARAMETER_KEYS = {"parameters", "layer_groups", "normalize_weights", "negative_weights", "start"}
SPACES = ("parameters", "dataflow")


def read_search_config(path: str | Path) -> tuple[dict, dict, ParameterSpace | DataflowSpace]:
    """(config with absolute model paths, search section, space); every problem of the
    section at once as a ConfigError naming the file."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"cannot read the search config: {exc}"], str(path)) from None
    if not isinstance(config, dict) or not isinstance(config.get("search"), dict):
        raise ConfigError(["search: a `search:` section is required (see docs/search.md)"], str(path))
    section = config["search"]
    kind = section.get("space", "parameters")
    allowed = SEARCH_KEYS | (DATAFLOW_KEYS if kind == "dataflow" else PARAMETER_KEYS)
    problems = [f"search.{k}: unknown key for a {kind} search; keys: {', '.join(sorted(allowed))}"
                for k in section if k not in allowed]
    if kind not in SPACES:
        problems.append(f"search.space: one of {', '.join(SPACES)}; got {kind!r}")
    if not isinstance(section.get("evaluator"), (str, dict)):
        problems.append("search.evaluator: give `module:function` (candidate -> score, higher "
                        "is better) or `{tasks: {TASK: FOLDER}, split: validation}`")
    objective = section.get("objective", "mean")
    if objective not in OBJECTIVES:
        problems.append(f"search.objective: one of {', '.join(OBJECTIVES)}; got {objective!r}")
    else:
        problems += check_sampler(section.get("sampler", default_sampler(objective)), objective)
    trials = section.get("trials", 100)
    if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
        problems.append(f"search.trials: a positive integer; got {trials!r}")
    if problems:
        raise ConfigError(problems, str(path))

    def absolute(model: str) -> str:
        p = Path(model).expanduser()
        return str(p if p.is_absolute() else (path.parent / p).resolve())

    config = dict(config)
    config["models"] = [
        {**m, "model": absolute(m["model"])} if isinstance(m, dict) else {"model": absolute(m)}
        for m in config.get("models") or []
    ]
    if config.get("base_model"):
        config["base_model"] = absolute(config["base_model"])
    try:
        if kind == "dataflow":
            space = _dataflow_space(config, section)
        else:
            space = build_space(config, section)
    except ConfigError as exc:
        raise ConfigError(exc.problems, str(path)) from None
    return config, section, space


def _dataflow_space(config: dict, section: dict) -> DataflowSpace:
    from mergelab.errors import MergeLabError

    names = [m["model"] for m in config["models"]]
    counts, problems = {}, []
    for name in names:
        try:
            counts[name] = source_layers(name)
        except MergeLabError as exc:
            problems.append(f"models: {exc}")
    if len(set(counts.values())) > 1:
        problems.append("models: the data-flow sources need as many layers each; got "
                        + ", ".join(f"{Path(n).name} {c}" for n, c in counts.items()))
    if problems:
        raise ConfigError(problems)
    return build_dataflow_space(config, section, next(iter(counts.values()), 0))


def load_sources(space) -> dict[str, dict[str, torch.Tensor]] | list:
    """Every source the space names, read into memory once: state dicts keyed by the config's
    paths (parameter space), or modules in `models` order (data-flow space)."""
    if isinstance(space, DataflowSpace):
        return load_dataflow_sources(space)
    return load_checkpoints(space.config)


def make_evaluator(spec, base_dir: Path):
    """(a name for the study's fingerprint, the evaluator) of `search.evaluator`: an importable
    `module:function`, or the evaluation layer's tasks (`mergelab.search.evaluators`)."""
    if isinstance(spec, dict):
        from mergelab.search.evaluators import TaskEvaluator

        return json.dumps(spec, sort_keys=True, default=str), TaskEvaluator(spec, base_dir)
    return spec, load_evaluator(spec)


def _evaluator_only(spec, base_dir: Path):
    return make_evaluator(spec, base_dir)[1]


def search_from_config(
    path: str | Path,
    out: str | Path,
    *,
    trials: int | None = None,
    storage: str | None = None,
    sampler: str | None = None,
    seed: int | None = None,
    workers: int = 1,
    ray_address: str | None = None,
    on_trial: Callable[[TrialOutcome, int, float | None], None] | None = None,
) -> SearchResult:
    """Run (or resume) the search of the config at `path` into the folder `out`; arguments
    given here override the config's `search:` section. workers > 1 or a `ray_address`: the
    trials run on Ray actors (`mergelab.search.parallel`), `workers` at a time."""
    import functools

    config, section, space = read_search_config(path)
    if workers < 1:
        raise ConfigError([f"--workers: at least 1; got {workers}"])
    evaluator_name, evaluate = make_evaluator(section["evaluator"], Path(path).parent)
    out = Path(out)
    sources = load_sources(space)
    seed = seed if seed is not None else section.get("seed", 0)
    objective = section.get("objective", "mean")
    pool = None
    if workers > 1 or ray_address is not None:
        from mergelab.search.parallel import RayWorkers

        factory = functools.partial(_evaluator_only, section["evaluator"], Path(path).parent)
        pool = RayWorkers(space, sources, factory, slots=workers, objective=objective, seed=seed,
                          address=ray_address)
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or section.get("storage") or f"sqlite:///{(out / 'study.db').resolve()}"
    result = run_search(
        space, sources, evaluate,
        storage=storage,
        trials=trials if trials is not None else section.get("trials", 100),
        sampler=sampler or section.get("sampler", default_sampler(objective)),
        seed=seed,
        evaluator_name=evaluator_name,
        timeout_seconds=section.get("timeout_seconds"),
        objective=objective,
        on_trial=on_trial,
        workers=pool,
    )
    write_outputs(result, out, space)
    return result


def write_outputs(result: SearchResult, out: Path, space) -> None:
    """best.yaml (parameter space; a data-flow search writes best_routing.yaml, and best.yaml
    as a passthrough config when no layer of the best routing is scaled), trials.csv and the
    plots, each atomically."""
    if isinstance(space, DataflowSpace):
        write_text_atomic(out / "best_routing.yaml",
                          yaml.safe_dump(result.best_config, sort_keys=False))
        merge_config = routing_merge_config(result.best_config)
        if merge_config is not None:
            write_text_atomic(out / "best.yaml", yaml.safe_dump(merge_config, sort_keys=False))
    else:
        write_text_atomic(out / "best.yaml", yaml.safe_dump(result.best_config, sort_keys=False))
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["trial", "value", "error", "scores", "config"])
    for t in result.trials:
        writer.writerow([t.number, "" if t.value is None else repr(t.value), t.error,
                         json.dumps(t.scores, sort_keys=True) if t.scores else "",
                         json.dumps(t.config, sort_keys=True)])
    write_text_atomic(out / "trials.csv", table.getvalue())
    if result.pareto:
        front = io.StringIO()
        writer = csv.writer(front)
        writer.writerow(["trial", "mean", "worst", "scores", "config"])
        for t in result.trials:
            if t.number in result.pareto:
                writer.writerow([t.number, repr(t.value), repr(min(t.scores.values())),
                                 json.dumps(t.scores, sort_keys=True), json.dumps(t.config, sort_keys=True)])
        write_text_atomic(out / "pareto.csv", front.getvalue())
    write_atomic(out / "curve.png", lambda temporary: _plot_curve(result, temporary))
    if isinstance(space, DataflowSpace):
        write_atomic(out / "routing.png",
                     lambda temporary: _plot_routing(result.best_config, temporary))
    else:
        write_atomic(out / "parameters.png",
                     lambda temporary: _plot_parameters(result.best_config, space, temporary))


def _plot_curve(result: SearchResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [t for t in result.trials if t.value is not None]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.scatter([t.number for t in done], [t.value for t in done], s=10, label="trial")
    best, running = [], float("-inf")
    for t in done:
        running = max(running, t.value)
        best.append(running)
    axes.step([t.number for t in done], best, where="post", color="C1", label="best so far")
    axes.set_xlabel("trial")
    axes.set_ylabel("score (higher is better)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_parameters(best: dict, space: ParameterSpace, path: Path) -> None:
    """The best recipe's searched values: per-model parameters against the layer group (one line
    per model), global parameters as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(d.parameter for d in space.dimensions))
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for axis, name in zip(axes[0], names):
        dims = [d for d in space.dimensions if d.parameter == name]
        if dims[0].model is None:
            axis.bar([name], [best.get("parameters", {}).get(name, float("nan"))])
        else:
            for entry in best["models"]:
                value = entry.get("parameters", {}).get(name)
                values = value if isinstance(value, list) else [value]
                axis.plot(range(len(values)), values, marker="o", label=Path(entry["model"]).name)
            axis.set_xlabel("layer group (anchor of the gradient)")
            axis.legend(fontsize=7)
        axis.set_ylim(dims[0].low, dims[0].high)
        axis.set_title(name)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_routing(best: dict, path: Path) -> None:
    """The best routing: the source layer run at each step (one colour per source) and the
    scale applied to its input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    body = best["routing"]
    layers = body["layers"]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(6, len(layers) * 0.3), 4.5), sharex=True)
    for k, name in enumerate(body["models"]):
        steps = [i for i, e in enumerate(layers) if e["model"] == k]
        top.scatter(steps, [layers[i]["layer"] for i in steps], label=Path(name).name, s=25)
    top.set_ylabel("source layer")
    top.legend(fontsize=7)
    bottom.bar(range(len(layers)), [e.get("scale", 1.0) for e in layers])
    bottom.axhline(1.0, color="grey", linewidth=0.8)
    bottom.set_ylabel("input scale")
    bottom.set_xlabel("step of the routed model")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
