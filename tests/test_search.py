"""Recipe search (mergelab.search): the parameter space, the study loop, its CLI, recovery from
SIGKILL and every bad input. Tiny checkpoints; a toy evaluator whose optimum is known."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_checkpoint
from safetensors.torch import load_file
from typer.testing import CliRunner

import mergelab
from mergelab.cli import app
from mergelab.errors import ConfigError, MergeLabError
from mergelab.search import build_space, run_search

LAYERS = 2


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"model.layers.{i}.mlp.weight": torch.randn(4, 4, generator=g) for i in range(LAYERS)}
    sd["model.embed_tokens.weight"] = torch.randn(6, 4, generator=g)
    return sd


EVALUATOR = '''
import os, signal
import torch
from safetensors.torch import load_file

TARGET = load_file(os.environ["SEARCH_TARGET"])
CALLS = [0]

def score(merged):
    """Minus the squared distance to a target state dict: the optimum is known."""
    return -float(sum((merged[n].float() - TARGET[n]).square().sum() for n in TARGET))

def per_layer(merged):
    """Scores per 'task' (one per layer): the search can maximise their mean or the worst."""
    return {n: -float((merged[n].float() - TARGET[n]).square().sum()) for n in TARGET}

def flaky(merged):
    CALLS[0] += 1
    if CALLS[0] == 2:
        raise RuntimeError("the evaluator broke")
    if CALLS[0] == 3:
        return float("nan")
    return score(merged)

def killer(merged):
    """SIGKILLs the process in the middle of its third trial (once: a marker file remembers)."""
    CALLS[0] += 1
    marker = os.environ["SEARCH_MARKER"]
    if CALLS[0] == 3 and not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return score(merged)
'''


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    base = _model(0)
    folders = {"base": save_checkpoint(tmp_path / "base", base)}
    for k in (1, 2):
        delta = _model(10 + k)
        folders[f"ft{k}"] = save_checkpoint(
            tmp_path / f"ft{k}", {n: base[n] + 0.1 * delta[n] for n in base}
        )
    # the target: task arithmetic at weights 0.7 / 0.2 (inside the searched ranges)
    target = {n: base[n] + 0.7 * 0.1 * _model(11)[n] + 0.2 * 0.1 * _model(12)[n] for n in base}
    save_file(target, str(tmp_path / "target.safetensors"))
    (tmp_path / "toy_evaluator.py").write_text(EVALUATOR)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SEARCH_TARGET", str(tmp_path / "target.safetensors"))
    monkeypatch.setenv("SEARCH_MARKER", str(tmp_path / "killed.marker"))
    return tmp_path, folders


def _config(folders, **search) -> dict:
    return {
        "merge_method": "task_arithmetic",
        "base_model": str(folders["base"]),
        "models": [{"model": str(folders["ft1"])}, {"model": str(folders["ft2"])}],
        "search": {
            "parameters": {"weight": {}},
            "evaluator": "toy_evaluator:score",
            "trials": 6,
            "sampler": "random",
            **search,
        },
    }


def test_space_maps_the_unit_cube_to_configs_by_hand():
    config = {"merge_method": "ties", "base_model": "b", "models": ["m1", "m2"]}
    space = build_space(config, {
        "parameters": {"weight": {}, "density": {"low": 0.2, "high": 1.0},
                       "lambda": {"low": 0.5, "high": 1.5}},
        "layer_groups": 2,
    })
    # weight and density: 2 models x 2 layer groups each; lambda: one global value
    assert space.size == 2 * 2 * 2 + 1
    assert [d.label for d in space.dimensions][:3] == ["m1.weight[0]", "m1.weight[1]", "m2.weight[0]"]
    x = [0.0, 1.0, 0.5, 0.25, 0.5, 0.5, 1.0, 0.0, 0.75]
    out = space.to_config(x)
    assert out["models"][0] == {"model": "m1", "parameters": {"weight": [0.0, 1.0], "density": [0.6, 0.6]}}
    assert out["models"][1] == {"model": "m2", "parameters": {"weight": [0.5, 0.25], "density": [1.0, 0.2]}}
    assert out["parameters"] == {"lambda": 1.25}
    assert "search" not in out
    # outside the cube is clamped to the range's ends
    assert space.to_config([2.0] * 9)["parameters"]["lambda"] == 1.5
    normalised = build_space(config, {"parameters": {"weight": {}}, "normalize_weights": True})
    weights = [m["parameters"]["weight"] for m in normalised.to_config([0.2, 0.6])["models"]]
    assert weights == [pytest.approx(0.25), pytest.approx(0.75)]
    negative = build_space(config, {"parameters": {"weight": {}}, "negative_weights": True})
    assert negative.dimensions[0].low == -1.0


def test_space_reports_every_bad_parameter_at_once():
    config = {"merge_method": "ties", "base_model": "b", "models": ["m1", "m2"]}
    with pytest.raises(ConfigError) as caught:
        build_space(config, {"parameters": {
            "densty": {}, "normalize": {}, "lambda": {}, "weight": {"low": 1.0, "high": 1.0},
            "density": {"low": 0.0, "high": 2.0},
        }, "layer_groups": 0})
    text = str(caught.value)
    assert "search.parameters.densty: `ties` has no parameter `densty`" in text
    assert "search.parameters.normalize: `normalize` is bool, not numeric" in text
    assert "search.parameters.lambda: `lambda` has no declared range; give `low` and `high`" in text
    assert "search.parameters.weight: the range [1, 1] is empty" in text
    assert "search.parameters.density: [0, 2] leaves `density`'s declared range (0, 1]" in text
    assert "search.layer_groups: a positive integer; got 0" in text
    with pytest.raises(ConfigError, match="merge_method"):
        build_space({"merge_method": "nope", "models": ["a"]}, {"parameters": {"weight": {}}})


def test_start_config_is_the_configs_own_point_by_hand():
    config = {"merge_method": "ties", "base_model": "b", "parameters": {"density": 0.6, "lambda": 1.25},
              "models": [{"model": "m1", "parameters": {"weight": 0.8, "density": 0.4}},
                         {"model": "m2", "parameters": {"weight": 0.2}}]}  # fmt: skip
    section = {"parameters": {"weight": {}, "density": {"low": 0.2, "high": 1.0},
                              "lambda": {"low": 0.5, "high": 1.5}}, "start": "config"}  # fmt: skip
    space = build_space(config, section)
    # the model's own value, else the config's global one; (value - low) / (high - low)
    assert space.start_point() == pytest.approx({
        "m1.weight[0]": 0.8, "m2.weight[0]": 0.2, "m1.density[0]": 0.25, "m2.density[0]": 0.5,
        "lambda[0]": 0.75})  # fmt: skip
    assert space.sampler_start() == space.start_point()
    x = [space.start_point()[d.label] for d in space.dimensions]
    back = space.to_config(x)
    assert [m["parameters"] for m in back["models"]] == [
        {"weight": pytest.approx(0.8), "density": pytest.approx(0.4)},
        {"weight": pytest.approx(0.2), "density": pytest.approx(0.6)}]  # fmt: skip
    assert back["parameters"]["lambda"] == pytest.approx(1.25)
    # the default start: none, and a study of either start is its own search
    centre = build_space(config, {**section, "start": "centre"})
    assert centre.start_point() is None and centre.sampler_start() is None
    assert centre.fingerprint_facts() != space.fingerprint_facts()
    # bad input: every problem at once, naming the key
    bad = {**config, "parameters": {"density": "high", "lambda": 3.0},
           "models": [{"model": "m1", "parameters": {"weight": [0.1, 0.2, 0.3]}}, "m2"]}  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        build_space(bad, {**section, "layer_groups": 2})
    text = str(caught.value)
    assert "`models[m1].parameters.weight` is a list of 3; the search has 2 layer group(s)" in text
    assert "`parameters.density`: a number is needed to start from; got 'high'" in text
    assert "`parameters.lambda` = 3 lies outside the searched range [0.5, 1.5]" in text
    with pytest.raises(ConfigError, match="search.start: one of centre, config; got 'middle'"):
        build_space(config, {**section, "start": "middle"})


def test_a_search_started_from_the_config_tries_it_first_and_cmaes_centres_on_it(setup):
    root, folders = setup
    import toy_evaluator

    from mergelab.search.run import load_sources, read_search_config

    config = _config(folders, sampler="cmaes", start="config")
    config["models"][0]["parameters"] = {"weight": 0.9}
    config["models"][1]["parameters"] = {"weight": 0.1}
    path = root / "start.yml"
    path.write_text(yaml.safe_dump(config))
    _, _, space = read_search_config(path)
    assert list(space.start_point().values()) == pytest.approx([0.9, 0.1])
    sources = load_sources(space)
    result = run_search(space, sources, toy_evaluator.score, storage=f"sqlite:///{root}/start.db",
                        trials=7, sampler="cmaes", seed=0, evaluator_name="toy_evaluator:score")  # fmt: skip
    trials = sorted(result.trials, key=lambda t: t.number)
    weights = [[m["parameters"]["weight"] for m in t.config["models"]] for t in trials]
    assert weights[0] == pytest.approx([0.9, 0.1])  # the first trial is the config itself
    # CMA-ES's first generation is drawn around the start (sigma 1/6), not the centre (0.5)
    first_generation = torch.tensor(weights[1:]).mean(dim=0).tolist()
    assert first_generation[0] > 0.7 and first_generation[1] < 0.3, weights
    assert result.best_value >= trials[0].value


def test_cli_search_writes_a_recipe_that_merge_reproduces(setup):
    root, folders = setup
    config = root / "search.yml"
    config.write_text(yaml.safe_dump(_config(folders)))
    runner = CliRunner()
    checked = runner.invoke(app, ["search", "validate", str(config)])
    assert checked.exit_code == 0, checked.output
    assert "2 searched coordinate(s)" in checked.output
    done = runner.invoke(app, ["search", "run", str(config), "--out", str(root / "out")])
    assert done.exit_code == 0, done.output
    assert "6 completed trial(s) (0 failed)" in " ".join(done.output.split())
    for name in ("best.yaml", "trials.csv", "curve.png", "parameters.png", "study.db"):
        assert (root / "out" / name).is_file(), name
    best = yaml.safe_load((root / "out" / "best.yaml").read_text())
    assert "search" not in best
    # the recipe re-run from disk gives the weights the best trial was scored on
    merged_dir = root / "merged"
    mergelab.merge(root / "out" / "best.yaml", merged_dir, progress=False)
    on_disk = load_file(str(next(merged_dir.glob("*.safetensors"))))
    sources = {str(f): load_file(str(f / "model.safetensors")) for f in folders.values()}
    in_memory = mergelab.merge_state_dicts(best, sources)
    assert on_disk.keys() == in_memory.keys()
    assert all(torch.equal(on_disk[n], in_memory[n]) for n in on_disk)
    import csv

    import toy_evaluator

    with (root / "out" / "trials.csv").open(newline="") as handle:
        trials = list(csv.DictReader(handle))
    assert len(trials) == 6
    best_value = max(float(row["value"]) for row in trials)
    assert toy_evaluator.score(on_disk) == pytest.approx(best_value, rel=1e-6)


def test_cmaes_search_approaches_the_known_optimum(setup):
    root, folders = setup
    from mergelab.search.run import load_sources, read_search_config

    config = root / "search.yml"
    config.write_text(yaml.safe_dump(_config(folders, sampler="cmaes")))
    merge_config, section, space = read_search_config(config)
    import toy_evaluator

    sources = load_sources(space)
    result = run_search(space, sources, toy_evaluator.score, storage=f"sqlite:///{root}/s.db",
                        trials=40, sampler="cmaes", seed=0, evaluator_name="toy_evaluator:score")
    weights = [m["parameters"]["weight"] for m in result.best_config["models"]]
    assert result.completed == 40
    assert weights[0] == pytest.approx(0.7, abs=0.1) and weights[1] == pytest.approx(0.2, abs=0.1)
    centre = toy_evaluator.score(mergelab.merge_state_dicts(space.to_config([0.5, 0.5]), sources))
    assert result.best_value > centre


def test_failed_evaluations_fail_their_trials_and_the_search_goes_on(setup):
    root, folders = setup
    from mergelab.search.run import search_from_config

    config = root / "search.yml"
    config.write_text(yaml.safe_dump(_config(folders, evaluator="toy_evaluator:flaky")))
    result = search_from_config(config, root / "out")
    assert result.completed == 6 and result.failed == 2
    errors = sorted(t.error for t in result.trials if t.value is None)
    assert errors == ["RuntimeError: the evaluator broke", "the evaluator returned nan"]
    assert all(math.isfinite(t.value) for t in result.trials if t.value is not None)
    # each trial's build and evaluation seconds are kept in the study (a resumed run has them)
    assert all(t.merge_seconds > 0 and t.eval_seconds > 0 for t in result.trials if t.value is not None)


def test_a_study_of_another_search_is_refused(setup):
    root, folders = setup
    from mergelab.search.run import search_from_config

    config = root / "search.yml"
    config.write_text(yaml.safe_dump(_config(folders, trials=2)))
    search_from_config(config, root / "out")
    config.write_text(yaml.safe_dump(_config(folders, trials=2, sampler="tpe")))
    with pytest.raises(MergeLabError, match="holds another search"):
        search_from_config(config, root / "out")
    # the first study is intact: the first search resumes as finished
    config.write_text(yaml.safe_dump(_config(folders, trials=2)))
    assert search_from_config(config, root / "out").completed == 2


def test_cli_search_bad_inputs_fail_before_any_trial(setup):
    root, folders = setup
    config = root / "search.yml"
    bad = _config(folders, evaluator="no_such_module:f", sampler="annealing", trials=0, stray=1)
    config.write_text(yaml.safe_dump(bad))
    done = CliRunner().invoke(app, ["search", "run", str(config), "--out", str(root / "out")])
    assert done.exit_code != 0
    text = " ".join(done.output.split())
    assert "search.stray: unknown key" in text
    assert "search.sampler: one of cmaes, tpe, random, nsga2; got 'annealing'" in text
    assert "search.trials: a positive integer; got 0" in text
    assert not (root / "out").exists()
    config.write_text(yaml.safe_dump(_config(folders, evaluator="no_such_module:f")))
    done = CliRunner().invoke(app, ["search", "run", str(config), "--out", str(root / "out")])
    assert done.exit_code != 0 and "cannot import 'no_such_module:f'" in " ".join(done.output.split())


def test_a_search_killed_mid_trial_resumes_with_no_trial_lost_or_repeated(setup):
    import optuna

    root, folders = setup
    config = root / "search.yml"
    config.write_text(yaml.safe_dump(_config(folders, evaluator="toy_evaluator:killer")))
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(root)!r})
        from mergelab.search.run import search_from_config
        result = search_from_config({str(config)!r}, {str(root / 'out')!r})
        print("completed", result.completed, "failed", result.failed)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(mergelab.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert not (root / "out" / "best.yaml").exists()  # nothing finished-looking
    second = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "completed 6 failed 1" in second.stdout
    study = optuna.load_study(study_name="mergelab-search", storage=f"sqlite:///{root}/out/study.db")
    states = [t.state for t in study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == 6
    assert states.count(optuna.trial.TrialState.FAIL) == 1  # the killed trial, recorded
    assert len({t.number for t in study.trials}) == len(study.trials) == 7
    # the two trials completed before the kill are kept, not re-run
    assert [t.state for t in study.trials[:2]] == [optuna.trial.TrialState.COMPLETE] * 2
    assert study.trials[2].state == optuna.trial.TrialState.FAIL
    assert (root / "out" / "best.yaml").is_file()


def test_objective_reduces_per_task_scores_by_hand():
    from mergelab.search.study import objective_value

    assert objective_value(0.5) == (0.5, {})
    assert objective_value({"a": 0.2, "b": 0.8}) == (0.5, {"a": 0.2, "b": 0.8})
    assert objective_value({"a": 0.2, "b": 0.8}, "worst")[0] == 0.2
    with pytest.raises(ValueError, match="empty mapping"):
        objective_value({})


def test_search_on_per_task_scores_records_them_and_maximises_the_worst(setup):
    root, folders = setup
    from mergelab.search.run import search_from_config

    config = root / "search.yml"
    config.write_text(yaml.safe_dump(_config(folders, evaluator="toy_evaluator:per_layer",
                                             objective="worst", trials=4)))
    result = search_from_config(config, root / "out")
    assert result.completed == 4
    for trial in result.trials:
        assert set(trial.scores) == {"model.layers.0.mlp.weight", "model.layers.1.mlp.weight",
                                     "model.embed_tokens.weight"}
        assert trial.value == pytest.approx(min(trial.scores.values()))
    config.write_text(yaml.safe_dump(_config(folders, objective="median")))
    with pytest.raises(ConfigError, match="search.objective: one of mean, worst, pareto; got 'median'"):
        search_from_config(config, root / "out2")


def test_pareto_mode_keeps_the_front_of_mean_and_worst_task(setup):
    root, folders = setup
    import csv

    from mergelab.search.run import search_from_config

    config = root / "search.yml"
    config.write_text(yaml.safe_dump(_config(folders, evaluator="toy_evaluator:per_layer",
                                             objective="pareto", sampler="nsga2", trials=8)))
    result = search_from_config(config, root / "out")
    points = {t.number: (t.value, min(t.scores.values())) for t in result.trials}
    assert all(t.value == pytest.approx(sum(t.scores.values()) / 3) for t in result.trials)

    def dominated(p):
        return any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points.values())

    # by hand: the front is exactly the non-dominated trials
    assert sorted(result.pareto) == sorted(n for n, p in points.items() if not dominated(p))
    rows = list(csv.DictReader((root / "out" / "pareto.csv").open()))
    assert sorted(int(r["trial"]) for r in rows) == sorted(result.pareto)
    assert result.best_value == max(points[n][0] for n in result.pareto)
    config.write_text(yaml.safe_dump(_config(folders, objective="pareto", sampler="cmaes")))
    with pytest.raises(ConfigError, match="cmaes optimises one objective"):
        search_from_config(config, root / "out2")
    config.write_text(yaml.safe_dump(_config(folders, objective="pareto", sampler="random")))
    with pytest.raises(MergeLabError, match="pareto` needs per-task scores"):
        search_from_config(config, root / "out3")  # a scalar evaluator fails every trial


def test_search_scores_trials_on_the_eval_layers_tasks_without_python(tmp_path):
    """`evaluator: {tasks: {csv:...: FOLDER}}`: each trial's encoder is scored with the
    folder's head on the task's validation split by the evaluation layer."""
    pytest.importorskip("transformers")
    from _data_aware_models import tiny_bert_folders

    from mergelab.eval.evaluator import ModelEvaluator
    from mergelab.eval.models import load_model, read_head
    from mergelab.eval.sources import load_task
    from mergelab.search.run import search_from_config
    from mergelab.search.space import load_checkpoints

    folders = tiny_bert_folders(tmp_path)
    task = f"csv:{tmp_path / 'task.csv'}"
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(folders["base"]),
        "models": [{"model": str(folders["m0"])}, {"model": str(folders["m1"])}],
        "search": {"parameters": {"weight": {}}, "trials": 3, "sampler": "random",
                   "evaluator": {"tasks": {task: str(folders["m0"])}, "split": "validation"}},
    }
    path = tmp_path / "search.yml"
    path.write_text(yaml.safe_dump(config))
    result = search_from_config(path, tmp_path / "out")
    assert result.completed == 3
    # the best value is the eval layer's validation accuracy of the best recipe's merge
    best = mergelab.merge_state_dicts(result.best_config, load_checkpoints(result.best_config))
    scored = ModelEvaluator(seed=0).evaluate_heads(
        load_model(folders["m0"]), best, {"task": read_head(folders["m0"] / "head.safetensors")},
        [load_task(task)], "validation")
    assert result.best_value == pytest.approx(scored["task"].score.value)
    config["search"]["evaluator"] = {"tasks": {task: str(tmp_path)}, "splt": "test"}
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as caught:
        search_from_config(path, tmp_path / "out2")
    assert "search.evaluator.splt: unknown key" in str(caught.value)


def test_ray_workers_find_the_same_best_recipe_as_a_sequential_run(setup):
    """Two local Ray actors against the driver alone, random sampler, same seed and budget: the
    same points are asked, so the same best recipe comes out (CMA-ES may differ: a generation's
    points then depend on which trials finished first)."""
    pytest.importorskip("ray")
    root, folders = setup
    from mergelab.search.run import search_from_config

    config = root / "search.yml"
    config.write_text(yaml.safe_dump(_config(folders, trials=6)))
    alone = search_from_config(config, root / "alone")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])
    try:
        on_ray = search_from_config(config, root / "ray", workers=2)
    finally:
        os.environ["PYTHONPATH"] = os.environ["PYTHONPATH"].split(os.pathsep, 1)[1]
    assert on_ray.completed == 6 and on_ray.failed == 0
    assert on_ray.best_config == alone.best_config
    assert on_ray.best_value == pytest.approx(alone.best_value)
    with pytest.raises(MergeLabError, match="cannot connect to the Ray cluster at '127.0.0.1:1'"):
        search_from_config(config, root / "nowhere", ray_address="127.0.0.1:1")
    assert not (root / "nowhere").exists()
