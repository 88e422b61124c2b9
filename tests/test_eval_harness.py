"""Evaluation harness: accuracy tables, seeds aggregation, result cache, reports, task data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mergelab.errors import MergeLabError
from mergelab.eval.bootstrap import Interval, bootstrap_interval
from mergelab.eval.harness import (
    ResultCache,
    Spread,
    aggregate_rows,
    check_head,
    evaluate_model,
    markdown_table,
    state_dict_hash,
    summarise,
    write_report,
)
from mergelab.eval.tasks import (
    FORTUNES_DIR,
    WORDNET_DIR,
    get_task,
    parse_fortune_file,
    parse_wordnet_data_line,
    read_csv_task,
    resolve_task,
)

# --- figures ---------------------------------------------------------------------------------------


def test_summarise_and_aggregate_hand_computed():
    finetuned = {"a": 0.9, "b": 0.8}
    probe = {"a": 0.7, "b": 0.6}
    seed0 = summarise({"merge": {"a": 0.8, "b": 0.7}}, finetuned=finetuned, probe=probe)
    seed1 = summarise({"merge": {"a": 0.9, "b": 0.5}}, finetuned=finetuned, probe=probe)
    assert seed0[0].average == pytest.approx(0.75)
    assert seed0[0].normalised == pytest.approx((0.8 / 0.9 + 0.7 / 0.8) / 2)
    assert seed0[0].retained_gain == pytest.approx(0.5)  # (0.1/0.2 + 0.1/0.2) / 2
    assert seed1[0].retained_gain == pytest.approx((1.0 + -0.5) / 2)
    (row,) = aggregate_rows([seed0, seed1], {"merge": "lambda 1"})
    assert row.accuracy["a"].mean == pytest.approx(0.85)
    assert row.accuracy["a"].std == pytest.approx((2 * 0.05**2) ** 0.5)  # sample std of 0.8, 0.9
    assert row.average.mean == pytest.approx((0.75 + 0.7) / 2)
    assert row.retained_gain.mean == pytest.approx((0.5 + 0.25) / 2)
    assert row.note == "lambda 1"
    table = markdown_table([row])
    assert "| merge | 85.0 ± 7.1 | 60.0 ± 14.1 | **72.5 ± 3.5** |" in table


def test_spread_of_one_value_and_none():
    assert Spread.of([0.5]) == Spread(0.5, 0.0, 1)
    assert Spread.of([]) is None


def test_state_dict_hash_order_independent_and_sensitive():
    a = {"x": torch.arange(4.0), "y": torch.ones(2, 2)}
    b = {"y": torch.ones(2, 2), "x": torch.arange(4.0)}
    assert state_dict_hash(a) == state_dict_hash(b)
    c = {"x": torch.arange(4.0), "y": torch.tensor([[1.0, 1.0], [1.0, 1.0 + 1e-6]])}
    assert state_dict_hash(a) != state_dict_hash(c)
    assert state_dict_hash({"x": torch.arange(4.0)}) != state_dict_hash({"x": torch.arange(4.0).double()})


class CountingEvaluator:
    """accuracy = the encoder's `w` mean; counts calls."""

    fingerprint = "fake-v1"

    def __init__(self):
        self.calls = 0

    def num_classes(self, task: str) -> int:
        if task not in ("t1", "t2"):
            raise MergeLabError(f"unknown task {task!r}")
        return 2

    def accuracy(self, encoder, head, task, split):
        self.calls += 1
        return float(encoder["w"].mean())


def test_evaluate_model_caches_by_weights(tmp_path):
    ev = CountingEvaluator()
    cache = ResultCache(tmp_path)
    heads = {"t1": nn.Linear(3, 2), "t2": nn.Linear(3, 2)}
    encoder = {"w": torch.tensor([0.25, 0.75])}
    assert evaluate_model(ev, encoder, heads, cache=cache) == {"t1": 0.5, "t2": 0.5}
    assert ev.calls == 2
    assert evaluate_model(ev, {"w": torch.tensor([0.25, 0.75])}, heads, cache=cache)["t1"] == 0.5
    assert ev.calls == 2  # same weights: from the cache
    evaluate_model(ev, encoder, heads, split="validation", cache=cache)
    assert ev.calls == 4  # another split is another result
    assert evaluate_model(ev, {"w": torch.tensor([1.0, 1.0])}, heads, cache=cache)["t2"] == 1.0
    assert ev.calls == 6
    evaluate_model(ev, encoder, heads)  # no cache: always computed
    assert ev.calls == 8


def test_evaluate_model_bad_inputs():
    ev = CountingEvaluator()
    encoder = {"w": torch.ones(2)}
    with pytest.raises(MergeLabError, match=r"no head for task\(s\) \['t2'\]"):
        evaluate_model(ev, encoder, {"t1": nn.Linear(3, 2)}, tasks=["t1", "t2"])
    with pytest.raises(MergeLabError, match="head given for task 't1' outputs 5 classes; the task has 2"):
        evaluate_model(ev, encoder, {"t1": nn.Linear(3, 5)})
    with pytest.raises(MergeLabError, match="unknown task 'zz'"):
        evaluate_model(ev, encoder, {"zz": nn.Linear(3, 2)})
    check_head(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), 2, "t1")


def test_result_cache_ignores_unreadable_entries(tmp_path):
    cache = ResultCache(tmp_path)
    key = cache.key("a", "b")
    assert cache.get(key) is None
    cache.put(key, 0.75, task="t")
    assert cache.get(key) == (0.75, None)
    cache.put(key, 0.5, torch.tensor([True, False, False, True]), task="t")
    accuracy_, correct = cache.get(key)
    assert accuracy_ == 0.5 and correct.tolist() == [True, False, False, True]
    path = next(tmp_path.rglob("*.json"))
    path.write_text("{not json")
    assert cache.get(key) is None


def test_write_report_json_markdown_png(tmp_path):
    rows = summarise({"probe": {"a": 0.6, "b": 0.7}, "merge": {"a": 0.8, "b": 0.9}},
                     finetuned={"a": 0.9, "b": 0.95}, probe={"a": 0.6, "b": 0.7})
    agg = aggregate_rows([rows])
    paths = write_report(agg, tmp_path / "out", title="toy", facts={"seeds": [0]})
    payload = json.loads(paths["json"].read_text())
    assert payload["rows"][1]["model"] == "merge"
    assert payload["rows"][1]["average"]["mean"] == pytest.approx(0.85)
    assert "| merge | 80.0 | 90.0 | **85.0** |" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob("*.tmp*"))


# --- tasks -------------------------------------------------------------------------------------------


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mine.csv"
    path.write_text(text)
    return path


def test_csv_task_with_names_and_integers(tmp_path):
    task = read_csv_task(_csv(tmp_path, "text,label\nhello,pos\nbye,neg\nhi,pos\nno,neg\n"))
    assert task.name == "mine" and task.label_names == ("neg", "pos")
    assert task.load().labels == (1, 0, 1, 0)
    assert len(set(task.load().groups)) == 4
    ints = read_csv_task(_csv(tmp_path, "label,text,group\n1,a,g\n0,b,g\n2,c,h\n2,d,h\n1,e,h\n0,f,g\n"))
    assert ints.label_names == ("0", "1", "2") and ints.load().labels == (1, 0, 2, 2, 1, 0)
    assert ints.load().groups == ("g", "g", "h", "h", "h", "g")
    assert resolve_task(f"csv:{tmp_path / 'mine.csv'}").num_classes == 3


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("text,class\na,1\n", r"missing column\(s\) \['label'\]"),
        ("text,label\na,1\nb,x\n", "mixes integers and names"),
        ("text,label\na,0\nb,2\n", r"integer labels must be 0..K-1 .* got \[0, 2\]"),
        ("text,label\na,x\nb,x\n", "single class"),
        ("text,label\na,x\nb,\n", "line 3: empty `label`"),
        ("text,label\n", "no rows"),
    ],
)
def test_csv_task_bad_label_column(tmp_path, content, message):
    with pytest.raises(MergeLabError, match=message):
        read_csv_task(_csv(tmp_path, content))


def test_unknown_task_and_missing_csv(tmp_path):
    with pytest.raises(MergeLabError, match=r"unknown task 'nope'; give a built-in task \(.*sentiment.*\) or csv:PATH"):
        get_task("nope")
    with pytest.raises(MergeLabError, match="does not exist"):
        resolve_task(f"csv:{tmp_path / 'absent.csv'}")


def test_parse_fortune_file_and_wordnet_line():
    quotes = parse_fortune_file("First  one\nline two\n%\n\n%\nSecond\x07 one\n%\n")
    assert quotes == ["First one line two", "Second one"]
    line = '02084071 05 n 02 dog 0 domestic_dog 0 000 | a member of the genus Canis; "the dog barked"  \n'
    assert parse_wordnet_data_line(line) == (5, "n", "a member of the genus Canis")
    assert parse_wordnet_data_line("  1 This software and database is being provided\n") is None


@pytest.mark.skipif(not (FORTUNES_DIR / "science").is_file(), reason="Debian package fortunes not installed")
def test_fortune_task_loads():
    data = get_task("fortune").load()
    assert len(data) > 3000 and set(data.labels) == set(range(8))


@pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(), reason="Debian package wordnet-base not installed")
def test_wordnet_tasks_load():
    pos = get_task("pos").load()
    assert set(pos.labels) == {0, 1, 2, 3} and len(pos) > 100_000
    supersense = get_task("supersense").load()
    assert set(supersense.labels) == set(range(8))


class ExampleEvaluator:
    """Per-example outcomes: example i of task t is right when i < round(w * n)."""

    fingerprint = "examples-v1"

    def __init__(self, sizes):
        self.sizes, self.calls = sizes, 0

    def correct(self, encoder, head, task, split):
        self.calls += 1
        n = self.sizes[task]
        return torch.arange(n) < round(float(encoder["w"]) * n)


def test_evaluate_model_returns_and_caches_per_example_outcomes(tmp_path):
    ev = ExampleEvaluator({"a": 4, "b": 5})
    heads = {"a": nn.Linear(1, 2), "b": nn.Linear(1, 2)}
    cache = ResultCache(tmp_path)
    outcomes: dict = {}
    scores = evaluate_model(ev, {"w": torch.tensor(0.4)}, heads, cache=cache, examples=outcomes)
    assert scores == {"a": pytest.approx(0.5), "b": pytest.approx(0.4)}
    assert outcomes["a"].tolist() == [True, True, False, False]
    again: dict = {}
    evaluate_model(ev, {"w": torch.tensor(0.4)}, heads, cache=cache, examples=again)
    assert ev.calls == 2 and again["b"].tolist() == [True, True, False, False, False]
    with pytest.raises(MergeLabError, match="CountingEvaluator scores no single examples"):
        evaluate_model(CountingEvaluator(), {"w": torch.ones(2)}, {"t1": nn.Linear(3, 2)}, examples={})


class ModuleEvaluator(ExampleEvaluator):
    """ExampleEvaluator that also scores encoders given as modules (their `w` parameter)."""

    fingerprint = "fake-module-v1"

    def correct_module(self, module, head, task, split):
        return self.correct({"w": module.w.detach()}, head, task, split)


def test_evaluate_model_scores_a_module_uncached(tmp_path):
    ev = ModuleEvaluator({"a": 4, "b": 5})
    heads = {"a": nn.Linear(1, 2), "b": nn.Linear(1, 2)}
    module = nn.Module()
    module.w = nn.Parameter(torch.tensor(0.75))
    cache, outcomes = ResultCache(tmp_path), {}
    scores = evaluate_model(ev, module, heads, cache=cache, examples=outcomes)
    assert scores == {"a": pytest.approx(0.75), "b": pytest.approx(0.8)}
    assert outcomes["b"].tolist() == [True, True, True, True, False]
    evaluate_model(ev, module, heads, cache=cache)
    assert ev.calls == 4  # a module's results are not cached: its weights are not a state dict
    with pytest.raises(MergeLabError, match="ExampleEvaluator scores state dicts only"):
        evaluate_model(ExampleEvaluator({"a": 4}), module, {"a": nn.Linear(1, 2)})


def test_aggregate_rows_intervals_over_seeds_and_tasks():
    from mergelab.eval.bootstrap import bootstrap_interval, stratified_bootstrap_interval

    per_seed = [
        summarise({"m": {"a": 0.5, "b": 1.0}}),
        summarise({"m": {"a": 0.75, "b": 1.0}}),
    ]
    examples = [
        {"m": {"a": torch.tensor([1, 1, 0, 0]).bool(), "b": torch.ones(3).bool()}},
        {"m": {"a": torch.tensor([1, 1, 1, 0]).bool(), "b": torch.ones(3).bool()}},
    ]
    (row,) = aggregate_rows(per_seed, examples=examples)
    # each example's correctness averaged over the two seeds, then resampled
    assert row.accuracy["a"].interval == bootstrap_interval([1.0, 1.0, 0.5, 0.0])
    assert row.accuracy["a"].mean == pytest.approx(0.625) and row.accuracy["a"].n == 2
    assert row.accuracy["b"].interval.low == row.accuracy["b"].interval.high == 1.0
    assert row.average.interval == stratified_bootstrap_interval([[1.0, 1.0, 0.5, 0.0], [1.0] * 3])
    assert row.average.interval.low <= row.average.mean <= row.average.interval.high
    table = markdown_table([row])
    assert "62.5 ± 17.7 [" in table and "**81.2 ± 8.8 [" in table
    # a seed without outcomes: no interval claimed
    (bare,) = aggregate_rows(per_seed, examples=[examples[0], {}])
    assert bare.accuracy["a"].interval is None and bare.average.interval is None


def test_stratified_bootstrap_hand_checked():
    from mergelab.eval.bootstrap import stratified_bootstrap_interval

    # constant groups: every resample gives (1 + 0) / 2
    assert stratified_bootstrap_interval([[1, 1], [0, 0, 0]]) == Interval(0.5, 0.5, 0.95)
    # one group: the plain bootstrap of that group's mean, the same draws for the same seed
    assert stratified_bootstrap_interval([[0, 1, 1, 0, 1]], seed=3) == bootstrap_interval(
        [0, 1, 1, 0, 1], seed=3
    )
    # two groups of 0/1 with 2 examples each: mean of means lies on the grid {0, .25, ..., 1}
    wide = stratified_bootstrap_interval([[0, 1], [0, 1]], resamples=4000)
    assert wide.low == 0.0 and wide.high == 1.0
    with pytest.raises(ValueError, match="group 1 of the stratified bootstrap has no values"):
        stratified_bootstrap_interval([[1], []])
    with pytest.raises(ValueError, match="at least one group"):
        stratified_bootstrap_interval([])
