"""The benchmark runner on the MLP zoo: grids, configs, selection on validation, docs section."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.cliutil import parse_seeds
from mergelab.errors import MergeLabError
from mergelab.eval.harness import AggregateRow, Spread, evaluate_model
from mergelab_bench.bench import (
    FINETUNED_ROW,
    PROBE_ROW,
    REPAIR_SUFFIX,
    GridPoint,
    aggregate,
    applicable_methods,
    grid,
    merge_config,
    merge_zoo,
    ordering_statement,
    replace_section,
    run_bench,
    run_seed,
)
from mergelab_bench.zoo.mlp import MLPZoo


@pytest.fixture(scope="module")
def built():
    return MLPZoo().build(recipe="lpft", seed=0)


def test_grid_is_a_cartesian_product_with_labels():
    points = grid({"lambda": [0.5, 1.0]}, {"density": [0.2, 0.4]})
    assert len(points) == 4
    assert points[0] == GridPoint({"lambda": 0.5}, {"density": 0.2})
    assert points[-1].label == "density 0.4, lambda 1"
    assert GridPoint().label == "defaults"


def test_merge_config_weights_and_base_only_where_declared():
    ties = merge_config("ties", GridPoint({"lambda": 1.0}, {"density": 0.5}), ["a", "b"])
    assert ties["base_model"] == "pretrained"
    assert ties["models"][0] == {"model": "a", "parameters": {"density": 0.5, "weight": 1.0}}
    tsv = merge_config("tsv", GridPoint({"lambda": 1.0}), ["a", "b"])
    assert tsv["models"][1]["parameters"] == {}  # TSV has no per-model weight
    linear = merge_config("linear", GridPoint(), ["a", "b"])
    assert "base_model" not in linear  # a plain average of the fine-tunes


def test_applicable_methods_for_five_models():
    run, skipped = applicable_methods(5)
    for name in ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della",
                 "model_stock", "tsv", "iso_c", "iso_cts", "pcb", "magmax"):
        assert name in run
    for name in ("slerp", "nuslerp", "nearswap", "passthrough"):
        assert name in skipped and name not in run
    assert all("needs" in why for name, why in skipped.items() if name in ("regmean", "fisher"))


def test_merges_match_hand_computed_results(built):
    average = merge_zoo(built, "linear", GridPoint())
    expected = sum(built.finetuned[t]["fc1.weight"] for t in built.tasks) / len(built.tasks)
    torch.testing.assert_close(average["fc1.weight"], expected)
    # Task arithmetic of one task at lambda 1 gives that fine-tune back.
    only = merge_zoo(built, "task_arithmetic", GridPoint({"lambda": 1.0}), tasks=["parity"])
    torch.testing.assert_close(only["fc2.weight"], built.finetuned["parity"]["fc2.weight"])


def test_run_seed_picks_the_best_validation_point(built):
    result = run_seed(built, ["task_arithmetic", "linear"])
    outcome = result.outcomes["task_arithmetic"]
    labels = [label for label, _ in outcome.grid_scores]
    assert labels == ["lambda 0.3", "lambda 0.6", "lambda 1"]
    best_label, best_score = max(outcome.grid_scores, key=lambda item: item[1])
    assert outcome.chosen == best_label and outcome.validation == best_score
    assert result.outcomes["linear"].grid_scores == []  # one point: no validation needed
    # Each fine-tune on its own task is the reference row; the probe is the cheap alternative.
    assert set(result.results[FINETUNED_ROW]) == set(built.tasks)
    assert sum(result.results[FINETUNED_ROW].values()) > sum(result.results[PROBE_ROW].values())


def test_run_seed_adds_repaired_rows_when_the_zoo_can_repair(built):
    import dataclasses

    seen = []

    class Repairing:
        """The MLP zoo's evaluator plus a stand-in repair: "repair" into the first fine-tune."""

        def correct(self, *args, **kwargs):
            return built.evaluator.correct(*args, **kwargs)

        def repair_batchnorm(self, merged, sources):
            seen.append(len(sources))
            return sources[0]

    zoo = dataclasses.replace(built, evaluator=Repairing())
    result = run_seed(zoo, ["task_arithmetic", "linear"])
    first = built.finetuned[built.tasks[0]]
    assert result.results["linear" + REPAIR_SUFFIX] == evaluate_model(
        built.evaluator, first, built.heads, tasks=list(built.tasks)
    )
    assert result.results["linear"] == run_seed(built, ["linear"]).results["linear"]
    repaired = result.outcomes["task_arithmetic" + REPAIR_SUFFIX]
    assert repaired.method == "task_arithmetic" and len(repaired.grid_scores) == 3
    assert seen and set(seen) == {len(built.tasks)}
    rows = {row.name for row in aggregate([result])}
    assert {"linear", "linear" + REPAIR_SUFFIX, "task_arithmetic" + REPAIR_SUFFIX} <= rows
    assert "linear" + REPAIR_SUFFIX not in run_seed(zoo, ["linear"], repair=False).results


def test_ordering_statement():
    def row(name, value):
        return AggregateRow(name, {}, Spread(value, 0.0, 1), None, None)

    holds = ordering_statement([row("ties", 0.8), row("task_arithmetic", 0.7), row("linear", 0.6)])
    assert "holds" in holds and "NOT" not in holds
    fails = ordering_statement([row("ties", 0.6), row("task_arithmetic", 0.7), row("linear", 0.6)])
    assert "does NOT hold" in fails
    assert "not checked" in ordering_statement([row("ties", 0.6)])


def test_replace_section_keeps_the_rest():
    doc = "# Benchmarks\n\nintro\n"
    once = replace_section(doc, "mlp", "table v1")
    assert once.startswith("# Benchmarks\n\nintro\n") and "table v1" in once
    twice = replace_section(once + "\n## other\ntext\n", "mlp", "table v2")
    assert "table v1" not in twice and twice.count("table v2") == 1 and "## other\ntext" in twice


def test_run_bench_writes_reports_and_docs_section(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Parity with mergekit\nkept\n")
    report = run_bench("mlp", recipes=["joint"], seeds=[0, 1], methods=["linear", "ties"],
                       out_dir=tmp_path / "out", docs_path=docs, command="mergelab bench run --zoo mlp",
                       progress=False, log=lambda _: None)
    names = [r.name for r in report.recipes["joint"]]
    assert names[:3] == ["pretrained + fine-tuned heads", PROBE_ROW, FINETUNED_ROW]
    assert names[3:] == ["linear", "ties"]
    assert report.recipes["joint"][2].normalised.mean == pytest.approx(1.0)
    text = docs.read_text()
    assert "## Parity with mergekit\nkept" in text
    assert "<!-- mergelab-bench:mlp:start -->" in text and "`mergelab bench run --zoo mlp`" in text
    assert "± " in text  # two seeds: a spread
    assert "Not applicable: " in text and "`slerp`" in text
    for kind in ("json", "md", "png"):
        assert (tmp_path / "out" / f"mlp-joint.{kind}").is_file()
    seed1 = json.loads((tmp_path / "out" / "mlp-joint-seed1.json").read_text())
    assert seed1["seed"] == 1 and set(seed1["results"]["ties"]) == {"parity", "low_high", "mod3", "loops"}


def test_run_bench_bad_input():
    with pytest.raises(MergeLabError, match="unknown merge method 'nope'"):
        run_bench("mlp", seeds=[0], methods=["nope"], log=lambda _: None)
    with pytest.raises(MergeLabError, match="does not apply to this zoo"):
        run_bench("mlp", seeds=[0], methods=["slerp"], log=lambda _: None)
    with pytest.raises(MergeLabError, match=r"unknown recipe\(s\) \['fast'\]"):
        run_bench("mlp", recipes=["fast"], seeds=[0], log=lambda _: None)
    with pytest.raises(MergeLabError, match="unknown zoo"):
        run_bench("imagenet", seeds=[0], log=lambda _: None)


def test_parse_seeds():
    assert parse_seeds("0,1") == [0, 1]
    assert parse_seeds("0-2") == [0, 1, 2]
    with pytest.raises(MergeLabError, match="not an integer"):
        parse_seeds("a")


def test_cli_bench_and_zoo_build(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "run", "--zoo", "mlp", "--seeds", "0", "--recipe", "lpft",
                                 "--methods", "linear", "--out", str(tmp_path), "--no-cache",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mlp-lpft.md").is_file()
    bad = runner.invoke(app, ["bench", "run", "--zoo", "mlp", "--seeds", "x"])
    assert bad.exit_code == 1 and "not an integer" in bad.output
    built = runner.invoke(app, ["zoo", "build", "--zoo", "mlp", "--seeds", "0", "--recipe", "joint"])
    assert built.exit_code == 0 and "4 tasks ready" in built.output


def test_modulated_methods_score_each_task_with_its_own_modulated_encoder(built):
    import mergelab

    result = run_seed(built, ["tall_masks", "emr", "task_arithmetic"], repair=False)
    for name in ("tall_masks", "emr"):
        outcome = result.outcomes[name]
        assert set(outcome.test) == set(built.tasks)
        assert outcome.extra_bytes_per_task > 0
    assert result.outcomes["task_arithmetic"].extra_bytes_per_task == 0
    # the emr row is each task's dense model (base + r_t m_t tau_uni) with that task's head
    sources = {"pretrained": built.pretrained, **{t: built.finetuned[t] for t in built.tasks}}
    merged = mergelab.merge_modulated(merge_config("emr", GridPoint(), list(built.tasks)), sources)
    for task in built.tasks:
        expected = evaluate_model(built.evaluator, merged.task_state_dict(task),
                                  {task: built.heads[task]}, tasks=[task])[task]  # fmt: skip
        assert result.results["emr"][task] == expected


def _smile_cost(k: int, tasks: int, top_k: int = 1, layers=((32, 64), (32, 32))) -> tuple[int, int, int]:
    """(extra parameters, upscaled MACs, base MACs) of SMILE on the MLP trunk's linear layers
    (out, in), by hand: per task a gate row (gate_k 1), U [out, k], S V^T [k, in] and a bias
    delta; per token the base product, the router's T projections and top_k experts."""
    extra = up = base = 0
    for out, inp in layers:
        rank = min(k, out, inp)
        extra += tasks * (inp + out * rank + rank * inp + out)
        up += out * inp + tasks * inp + top_k * rank * (out + inp)
        base += out * inp
    return extra, up, base


def test_smile_rows_are_one_routed_model_scored_with_each_tasks_head(built):
    from mergelab_bench.bench import (
        COST_COLUMN,
        EXTRA_COLUMN,
        bench_markdown,
        cost_columns,
        encoder_bytes,
    )

    result = run_seed(built, ["smile", "task_arithmetic"], repair=False)
    assert "smile" not in result.failures
    outcome = result.outcomes["smile"]
    assert set(outcome.test) == set(built.tasks)
    assert [label for label, _ in outcome.grid_scores] == ["k 8", "k 32"]
    assert outcome.chosen == max(outcome.grid_scores, key=lambda item: item[1])[0]
    # per-example outcomes for the intervals, one per test example of each task
    for task in built.tasks:
        bits = result.examples["smile"][task]
        assert len(bits) == len(built.evaluator.data(task, "test")[1])
        assert bits.count("1") / len(bits) == pytest.approx(outcome.test[task])
    # the cost of the chosen merge, against the hand count
    tasks = len(built.tasks)
    extra, up, base = _smile_cost(int(outcome.chosen.split()[1]), tasks)
    assert outcome.extra_parameters == extra > 0
    assert outcome.base_parameters == sum(t.numel() for t in built.pretrained.values())
    assert outcome.extra_bytes_per_task == 4 * extra // tasks
    assert outcome.macs_ratio == pytest.approx(up / base) and outcome.macs_ratio > 1
    plain = result.outcomes["task_arithmetic"]
    assert plain.extra_bytes_per_task == 0 and plain.macs_ratio == 1.0

    rows = aggregate([result])
    columns = cost_columns(rows, [result], encoder_bytes(built))
    share = 100 * outcome.extra_bytes_per_task / encoder_bytes(built)
    assert columns[EXTRA_COLUMN]["smile"] == f"{share:.1f}%"
    assert columns[COST_COLUMN]["smile"] == f"{up / base:.2f}x"
    assert columns[EXTRA_COLUMN]["task_arithmetic"] == "0" and columns[COST_COLUMN]["task_arithmetic"] == "1.00x"
    assert columns[EXTRA_COLUMN][FINETUNED_ROW] == "100%"
    text = bench_markdown("mlp", {"lpft": rows}, {"lpft": [result]}, {}, [0], 1.0, 0.0, "", built)
    assert f"| {EXTRA_COLUMN} | {COST_COLUMN} | chosen on validation |" in text
    smile_line = next(line for line in text.splitlines() if line.startswith("| smile |"))
    assert f"| {share:.1f}% | {up / base:.2f}x | {outcome.chosen} |" in smile_line
    assert f"`smile` {extra:,} extra parameters in all" in text


def test_smile_of_two_copies_of_one_fine_tune_at_full_rank_is_that_fine_tune(built, monkeypatch):
    """Two identical experts of full rank: whichever the router picks (top 2, weights
    renormalised to sum 1), each layer is W_0 x + (W_t - W_0) x + b_t, the fine-tuned layer; so
    the SMILE row scores every example as the fine-tuned row does. Distinct fine-tunes do not
    (the router sends some inputs to another task's expert)."""
    import dataclasses

    from mergelab_bench import bench

    monkeypatch.setitem(bench.GRIDS, "smile", [GridPoint({"k": 32, "top_k": 2})])
    tuned = built.finetuned["parity"]
    copies = dataclasses.replace(built, tasks=["parity", "low_high"],
                                 finetuned={"parity": tuned, "low_high": tuned})  # fmt: skip
    result = run_seed(copies, ["smile"], repair=False)
    assert result.examples["smile"] == result.examples[FINETUNED_ROW]
    assert result.results["smile"] == result.results[FINETUNED_ROW]
    assert result.outcomes["smile"].macs_ratio > 1
    distinct = run_seed(dataclasses.replace(built, tasks=["parity", "low_high"]), ["smile"], repair=False)
    assert distinct.examples["smile"] != distinct.examples[FINETUNED_ROW]


def test_upscaled_methods_need_an_evaluator_that_scores_modules(built):
    import dataclasses

    class StateDictsOnly:
        def correct(self, *args, **kwargs):
            return built.evaluator.correct(*args, **kwargs)

    result = run_seed(dataclasses.replace(built, evaluator=StateDictsOnly()), ["smile", "linear"], repair=False)
    assert "torch module" in result.failures["smile"] and "smile" not in result.results
    assert "linear" in result.results


def test_wemoe_rows_train_routers_on_unlabelled_inputs_and_untrained_is_task_arithmetic(built, monkeypatch):
    """WEMoE runs with the tasks' training inputs. Untrained (steps 0) its routers give every
    task vector lambda, so its row is task arithmetic at that lambda, example for example;
    trained, the row is another model with the same cost. On the MLP trunk (no MLP-block
    names) only `all_linear` upscales anything; by default the row fails with the reason."""
    from mergelab_bench import bench

    run, skipped = applicable_methods(len(built.tasks))
    assert "wemoe" in run and "regmean" in skipped
    default = run_seed(built, ["wemoe"], repair=False)
    assert "upscales no layer" in default.failures["wemoe"] and "wemoe" not in default.results

    monkeypatch.setitem(bench.GRIDS, "task_arithmetic", [GridPoint({"lambda": 0.3})])
    monkeypatch.setitem(bench.GRIDS, "wemoe", [GridPoint({"lambda": 0.3, "all_linear": True, "steps": 0})])
    untrained = run_seed(built, ["wemoe", "task_arithmetic"], repair=False)
    assert untrained.examples["wemoe"] == untrained.examples["task_arithmetic"]
    monkeypatch.setitem(bench.GRIDS, "wemoe", [
        GridPoint({"lambda": 0.3, "all_linear": True, "steps": 20, "lr": 0.01, "router_hidden": 0}),
    ])  # fmt: skip
    trained = run_seed(built, ["wemoe"], repair=False)
    assert trained.examples["wemoe"] != untrained.examples["wemoe"]
    outcome, tasks = trained.outcomes["wemoe"], len(built.tasks)
    # one-layer routers: per layer [out, in] T task vectors, T bias deltas, W_r [T, in], b_r [T]
    extra = sum(tasks * (out * inp + out + inp + 1) for out, inp in ((32, 64), (32, 32)))
    assert outcome.extra_parameters == extra
    assert outcome.macs_ratio > 1 + tasks


def test_a_zoos_method_settings_enter_every_grid_point():
    from dataclasses import replace as replaced

    from mergelab_bench.bench import GRIDS, grid_for
    from mergelab_bench.zoo.base import BuiltZoo

    built = BuiltZoo(zoo="z", recipe="lpft", seed=0, tasks=[], pretrained={}, finetuned={}, heads={},
                     probe_heads={}, evaluator=None, method_settings={"smile": {"top_k": 2}})  # fmt: skip
    points = grid_for("smile", built)
    assert [p.global_params for p in points] == [{"top_k": 2, **p.global_params} for p in GRIDS["smile"]]
    assert grid_for("ties", built) == grid_for("ties") == GRIDS["ties"]
    assert grid_for("smile", replaced(built, method_settings={})) == GRIDS["smile"]
