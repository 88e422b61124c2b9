"""Diagnostics: metric kernels against hand-computed values, properties, streaming over
checkpoints, the report and CLI, and the predictive study on a tiny fake zoo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import save_checkpoint
from safetensors.torch import save_file
from typer.testing import CliRunner

from mergelab.cli import app
from mergelab.diagnostics import metrics as metrics_module
from mergelab.diagnostics.metrics import (
    compare_task_vectors,
    cosine_similarity,
    diagnose,
    keep_top_magnitudes,
    l2_distance,
    layer_group,
    metric_sums,
    sign_conflict_rate,
    soft_sign_dissimilarity,
    truncated_soft_sign_dissimilarity,
)
from mergelab.diagnostics.report import write_report
from mergelab.errors import CheckpointError, ConfigError, MergeError
from mergelab_bench.metric_study import (
    MergeRecord,
    correlations,
    pairwise_study,
    pooled_summary,
    stratified_records,
    summarize,
)
from mergelab_bench.zoo.base import BuiltZoo
from mergelab_bench.zoo.base import Evaluator as ZooEvaluator

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --- hand-computed values -----------------------------------------------------------------------


def test_two_coordinate_example():
    a, b = t(1, -1), t(1, 1)
    # |1+1|/(1+1) = 1 and |-1+1|/(1+1) = 0: mean 0.5.
    assert soft_sign_dissimilarity([a, b]) == pytest.approx(0.5)
    assert sign_conflict_rate([a, b]) == pytest.approx(0.5)
    assert cosine_similarity(a, b) == pytest.approx(0.0)
    assert l2_distance(a, b) == pytest.approx(2.0)


def test_three_element_vectors_by_hand():
    x, y = t(3, -1, 0.2), t(-1, 2, 0.5)
    # terms: |2|/4, |1|/3, |0.7|/0.7 -> SSD = 1 - (1/2 + 1/3 + 1) / 3 = 7/18
    assert soft_sign_dissimilarity([x, y]) == pytest.approx(7 / 18, abs=1e-6)
    assert cosine_similarity(x, y) == pytest.approx(
        (-3 - 2 + 0.1) / math.sqrt(10.04 * 5.25), abs=1e-6
    )
    assert l2_distance(x, y) == pytest.approx(math.sqrt(16 + 9 + 0.09), abs=1e-5)
    assert sign_conflict_rate([x, y]) == pytest.approx(2 / 3)
    # top 50% keeps int(1.5) = 1 entry each: [3, 0, 0] and [0, 2, 0] never meet -> 0.
    assert truncated_soft_sign_dissimilarity([x, y], 0.5) == pytest.approx(0.0)
    # top 70% keeps 2 each: [3, -1, 0] and [-1, 2, 0] -> 1 - (2/4 + 1/3) / 2 = 7/12
    assert truncated_soft_sign_dissimilarity([x, y], 0.7) == pytest.approx(7 / 12, abs=1e-6)


def test_zeros_are_left_out_and_undefined_ratios_are_nan():
    x, y = t(1, 0, 0), t(0, 0, -2)
    # Only coordinates 0 and 2 count; each holds one non-zero entry, so each agrees with itself.
    assert soft_sign_dissimilarity([x, y]) == pytest.approx(0.0)
    assert math.isnan(sign_conflict_rate([x, y]))  # no coordinate where both are non-zero
    assert math.isnan(cosine_similarity(x, t(0, 0, 0)))
    assert math.isnan(soft_sign_dissimilarity([t(0, 0, 0), t(0, 0, 0)]))


def test_three_way_values_by_hand():
    vectors = [t(1, 1, 0), t(-1, 1, 0), t(1, 1, 2)]
    # terms: |1|/3, 3/3, 2/2 -> SSD = 1 - (1/3 + 1 + 1)/3 = 2/9
    assert soft_sign_dissimilarity(vectors) == pytest.approx(2 / 9, abs=1e-6)
    # coordinates with >= 2 non-zero entries: 0 (mixed signs) and 1 (agree); 2 has one entry.
    assert sign_conflict_rate(vectors) == pytest.approx(0.5)
    m = compare_task_vectors(vectors, top_k=1.0)
    # pair (0, 1): terms 0/2, 2/2 -> 0.5; pair (0, 2): 1, 1, 1 (coordinate 2 alone) -> 0.
    assert m.pair("ssd", 0, 1) == pytest.approx(0.5)
    assert m.pair("ssd", 0, 2) == pytest.approx(0.0)
    assert m.pair("sign_conflict", 0, 1) == pytest.approx(0.5)
    assert m.pair("sign_conflict", 0, 2) == pytest.approx(0.0)
    # pair (1, 2): terms 0/2, 2/2, 2/2 -> 1/3.
    assert m.pair("ssd", 1, 2) == pytest.approx(1 / 3)
    assert m.mean_pair("ssd") == pytest.approx((0.5 + 0.0 + 1 / 3) / 3)


def test_keep_top_magnitudes_matches_ties_trim():
    v = t(0.5, -4, 2, -1, 3)
    assert keep_top_magnitudes(v, 0.4).tolist() == [0, -4, 0, 0, 3]
    assert keep_top_magnitudes(v, 1.0).tolist() == v.tolist()
    assert v.tolist() == [0.5, -4, 2, -1, 3]  # the input is not modified
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="top_k"):
            keep_top_magnitudes(v, bad)


# --- properties ---------------------------------------------------------------------------------


def _random(n: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=g) for _ in range(n)]


def test_identical_and_opposite_vectors():
    (x,) = _random(1, 200)
    same = compare_task_vectors([x, x.clone()], top_k=0.3)
    assert same.cosine[0][1] == pytest.approx(1.0)
    assert same.l2[0][1] == pytest.approx(0.0)
    assert same.ssd[0][1] == pytest.approx(0.0)
    assert same.tssd[0][1] == pytest.approx(0.0)
    assert same.sign_conflict[0][1] == 0.0
    opposite = compare_task_vectors([x, -x], top_k=0.3)
    assert opposite.ssd[0][1] == pytest.approx(1.0)
    assert opposite.tssd[0][1] == pytest.approx(1.0)
    assert opposite.sign_conflict[0][1] == pytest.approx(1.0)
    assert opposite.cosine[0][1] == pytest.approx(-1.0)


def test_tssd_at_full_k_is_ssd_and_ssd_is_scale_invariant():
    vectors = _random(3, 500, seed=1)
    m = compare_task_vectors(vectors, top_k=1.0)
    assert m.all_tssd == pytest.approx(m.all_ssd)
    assert torch.tensor(m.tssd) == pytest.approx(torch.tensor(m.ssd))
    scaled = [2.5 * v for v in vectors]
    assert soft_sign_dissimilarity(scaled) == pytest.approx(m.all_ssd, abs=1e-6)
    # Independent random vectors: SSD is strictly between agreement (0) and cancellation (1).
    assert 0.1 < m.all_ssd < 0.9
    # Truncation makes the vectors meet less often: TSSD below SSD.
    assert compare_task_vectors(vectors, top_k=0.2).all_tssd < m.all_ssd


def test_pairwise_matrix_equals_pair_alone_and_two_way_equals_pair():
    vectors = _random(4, 300, seed=2)
    m = compare_task_vectors(vectors, top_k=0.25)
    for i, j in ((0, 1), (1, 3), (2, 3)):
        alone = compare_task_vectors([vectors[i], vectors[j]], top_k=0.25)
        for metric in ("cosine", "l2", "sign_conflict", "ssd", "tssd"):
            assert m.pair(metric, i, j) == pytest.approx(alone.pair(metric, 0, 1))
            assert m.pair(metric, j, i) == m.pair(metric, i, j)
        assert alone.all_ssd == pytest.approx(alone.ssd[0][1])
        assert alone.all_sign_conflict == pytest.approx(alone.sign_conflict[0][1])


def test_chunked_sums_equal_one_block(monkeypatch):
    vectors = _random(3, 1000, seed=3)
    whole = metric_sums(vectors).metrics()
    monkeypatch.setattr(metrics_module, "_CHUNK_ELEMENTS", 7)
    chunked = metric_sums(vectors).metrics()
    for metric in ("cosine", "l2", "sign_conflict", "ssd"):
        assert torch.tensor(chunked.matrix(metric)) == pytest.approx(
            torch.tensor(whole.matrix(metric))
        )
    assert chunked.all_ssd == pytest.approx(whole.all_ssd)


# --- streaming over models ---------------------------------------------------------------------


def _models(seed: int = 0, n: int = 3):
    g = torch.Generator().manual_seed(seed)
    base = {"embeddings.word_embeddings.weight": torch.randn(40, 6, generator=g)}
    for layer in range(2):
        base[f"encoder.layer.{layer}.dense.weight"] = torch.randn(6, 6, generator=g)
        base[f"encoder.layer.{layer}.dense.bias"] = torch.randn(6, generator=g)
    base["pooler.weight"] = torch.randn(6, 6, generator=g)
    base["position_ids"] = torch.arange(6)
    models = []
    for _ in range(n):
        sd = {}
        for name, value in base.items():
            if value.is_floating_point():
                # Layer 0's task vectors share a component, so layers differ measurably.
                shared = torch.randn(value.shape, generator=torch.Generator().manual_seed(99))
                weight = 1.0 if "layer.0" in name else 0.0
                value = value + 0.1 * torch.randn(value.shape, generator=g) + 0.1 * weight * shared
            sd[name] = value.clone()
        models.append(sd)
    return base, models


def _flat_task_vectors(base, models, names):
    return [torch.cat([(m[n] - base[n]).reshape(-1) for n in names]) for m in models]


def test_diagnose_totals_equal_the_concatenated_task_vectors():
    base, models = _models()
    models[2]["classifier.weight"] = torch.zeros(2, 6)
    result = diagnose(models, base, names=["a", "b", "c"], top_k=0.3)
    compared = [n for n in base if n != "position_ids"]
    assert list(result.tensors) == compared
    assert result.skipped == {
        "not floating point": ["position_ids"],
        "in c but not in the base": ["classifier.weight"],
    }
    # truncation="model": the top 30% of each whole task vector, as on the concatenation.
    flat = compare_task_vectors(_flat_task_vectors(base, models, compared), top_k=0.3)
    for metric in ("cosine", "l2", "sign_conflict", "ssd", "tssd"):
        assert torch.tensor(result.total.matrix(metric)) == pytest.approx(
            torch.tensor(flat.matrix(metric)), abs=1e-6
        )
    assert result.total.all_tssd == pytest.approx(flat.all_tssd, abs=1e-9)
    assert result.total.numel == sum(base[n].numel() for n in compared)
    assert list(result.groups) == [
        "embeddings.word_embeddings",
        "encoder.layer.0",
        "encoder.layer.1",
        "pooler",
    ]
    full = diagnose(models, base, top_k=1.0)  # TSSD at K = 100% is SSD, streaming too
    assert full.total.tssd == full.total.ssd and full.total.all_tssd == full.total.all_ssd
    assert full.total.ssd == result.total.ssd  # truncation does not touch the other metrics
    excluded = diagnose(models, base, top_k=0.3, exclude=["embeddings.*", "*.bias"])
    assert len(excluded.skipped["excluded by pattern"]) == 3
    assert "embeddings.word_embeddings" not in excluded.groups
    layer0 = ["encoder.layer.0.dense.weight", "encoder.layer.0.dense.bias"]
    per_layer = compare_task_vectors(_flat_task_vectors(base, models, layer0), top_k=1.0)
    assert result.groups["encoder.layer.0"].all_ssd == pytest.approx(per_layer.all_ssd)
    # The shared component makes layer 0's task vectors agree more than layer 1's.
    assert result.groups["encoder.layer.0"].all_ssd < result.groups["encoder.layer.1"].all_ssd


def test_diagnose_per_tensor_truncation_and_files_match_state_dicts(tmp_path: Path):
    base, models = _models(seed=4, n=2)
    result = diagnose(models, base, top_k=0.25, truncation="tensor")
    name = "encoder.layer.1.dense.weight"
    alone = compare_task_vectors([m[name] - base[name] for m in models], top_k=0.25)
    assert result.tensors[name].tssd[0][1] == pytest.approx(alone.tssd[0][1])
    # Through checkpoints on disk: the same numbers, labels from folder names.
    paths = []
    for label, sd in (("base", base), ("m1", models[0]), ("m2", models[1])):
        (tmp_path / label).mkdir()
        save_file(sd, str(tmp_path / label / "model.safetensors"))
        paths.append(tmp_path / label)
    from_files = diagnose(paths[1:], paths[0], top_k=0.25, truncation="tensor")
    assert from_files.models == ["m1", "m2"]
    for metric in ("ssd", "tssd", "cosine"):
        assert torch.tensor(from_files.total.matrix(metric)) == pytest.approx(
            torch.tensor(result.total.matrix(metric))
        )


def test_global_threshold_search_widens_when_the_sample_misses(monkeypatch):
    base, models = _models(seed=5, n=2)
    expected = diagnose(models, base, top_k=0.1)

    class MissingOnce(metrics_module.MagnitudeCutSearch):
        widened = 0

        def result(self):
            if not MissingOnce.widened:  # as if the sample's bracket missed the threshold
                self.candidates = []
                return None
            return super().result()

        def widen(self):
            MissingOnce.widened += 1
            super().widen()

    monkeypatch.setattr(metrics_module, "MagnitudeCutSearch", MissingOnce)
    widened = diagnose(models, base, top_k=0.1).total
    assert MissingOnce.widened >= 1
    assert widened.tssd[0][1] == pytest.approx(expected.total.tssd[0][1])
    flat = _flat_task_vectors(base, models, list(expected.tensors))
    assert widened.tssd[0][1] == pytest.approx(compare_task_vectors(flat, top_k=0.1).tssd[0][1])


def test_diagnose_bad_input():
    base, models = _models(n=2)
    with pytest.raises(ConfigError, match="at least two models"):
        diagnose(models[:1], base)
    with pytest.raises(ConfigError, match="top_k"):
        diagnose(models, base, top_k=0)
    with pytest.raises(ConfigError, match="truncation"):
        diagnose(models, base, truncation="layer")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unique"):
        diagnose(models, base, names=["x", "x"])
    with pytest.raises(CheckpointError, match="fine-tunes of this base"):
        diagnose([{"other": torch.zeros(3)}] * 2, base)
    broken = dict(models[1])
    broken["pooler.weight"] = torch.full((6, 6), math.nan)
    with pytest.raises(MergeError, match="model1.*pooler.weight"):
        diagnose([models[0], broken], base)
    with pytest.raises(CheckpointError, match="does not exist"):
        diagnose(["/nonexistent/a", "/nonexistent/b"], base)


def test_layer_group_names():
    assert layer_group("encoder.layer.3.attention.self.query.weight") == "encoder.layer.3"
    assert layer_group("model.layers.12.mlp.up_proj.weight") == "model.layers.12"
    assert layer_group("embeddings.LayerNorm.weight") == "embeddings.LayerNorm"
    assert layer_group("lm_head.weight") == "lm_head"


# --- report and CLI ---------------------------------------------------------------------------------


def test_cli_writes_a_report_with_heatmaps(tmp_path: Path):
    base, models = _models(seed=6, n=3)
    base_dir = save_checkpoint(tmp_path / "base", base)
    model_dirs = [save_checkpoint(tmp_path / name, m) for name, m in zip("xyz", models)]
    out = tmp_path / "report"
    args = ["diagnose", "report", *map(str, model_dirs), "--base", str(base_dir), "--out", str(out)]
    result = CliRunner().invoke(app, [*args, "--top-k", "0.3", "--html", "--no-progress"])
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {
        "report.md",
        "report.html",
        "metrics.json",
        "tensors.csv",
        "layers.png",
        "pairs.png",
        "layers_ssd.png",
        "layers_tssd.png",
    } <= names
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG_MAGIC
    report = (out / "report.md").read_text()
    assert "encoder.layer.1" in report and "![Per layer](layers.png)" in report
    assert "position_ids" in report  # skipped tensors are listed, not silently dropped
    saved = json.loads((out / "metrics.json").read_text())
    direct = diagnose(models, base, top_k=0.3)
    assert saved["total"]["all_tssd"] == pytest.approx(direct.total.all_tssd)
    assert saved["models"] == ["x", "y", "z"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]

    again = CliRunner().invoke(app, [*args, "--no-progress"])
    assert again.exit_code == 1 and "already exists" in " ".join(again.output.split())
    replaced = CliRunner().invoke(app, [*args, "--no-progress", "--overwrite"])
    assert replaced.exit_code == 0, replaced.output
    assert not (out / "report.html").exists()  # the old folder was replaced, not merged into


def test_report_is_atomic_when_writing_fails(tmp_path: Path, monkeypatch):
    base, models = _models(n=2)
    result = diagnose(models, base)
    from mergelab.diagnostics import report as report_module

    def explode(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report_module, "_write_tensor_csv", explode)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_report(result, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


# --- does a metric predict? -----------------------------------------------------------------------


def _records(outcomes, values, method="m", metric="ssd"):
    return [
        MergeRecord(tasks=(f"t{i}", "u"), method=method, metrics={metric: v}, outcome=o)
        for i, (v, o) in enumerate(zip(values, outcomes))
    ]


def test_spearman_on_monotone_relations():
    values = [0.1, 0.2, 0.35, 0.4, 0.8, 0.9]
    (c,) = correlations(_records([v**3 for v in values], values))  # monotone, not linear
    assert c.rho == pytest.approx(1.0) and c.n == 6
    assert c.verdict() == "predicts (strong)"
    (anti,) = correlations(_records([-v for v in values], values))
    assert anti.rho == pytest.approx(-1.0)
    assert anti.verdict().startswith("correlates against the expected direction")
    # cosine is expected to fall as the drop grows: rho -1 is the expected direction.
    (cos,) = correlations(_records([-v for v in values], values, metric="cosine"))
    assert cos.verdict() == "predicts (strong)"
    (flat,) = correlations(_records([0.5] * 6, values))
    assert math.isnan(flat.rho) and flat.verdict().startswith("undefined")
    (few,) = correlations(_records([1, 2, 3], [1, 2, 3]))
    assert few.verdict().startswith("too few")
    text = summarize([c, anti])
    assert "rho=+1.00" in text and "best predictor: SSD" in text


def test_pooling_recipes_separates_the_recipe_effect_from_the_ranking():
    # Within each recipe a larger L2 goes with a *smaller* drop, but the second recipe has both
    # larger L2 and larger drops: pooled raw values say "predicts", ranks within a recipe say
    # the opposite, exactly.
    small = _records([0.10 - 0.01 * v for v in range(1, 7)], list(range(1, 7)), metric="l2")
    large = _records([0.50 - 0.01 * v for v in range(1, 7)], [10 + v for v in range(1, 7)], metric="l2")
    groups = {"lpft": small, "joint": large}
    (raw,) = correlations([*small, *large])
    assert raw.rho > 0.5  # the expected direction, from the recipe effect alone
    ranked = stratified_records(groups)
    # Centred ranks: the smallest of six is -1, the largest +1, within each recipe.
    assert [r.metrics["l2"] for r in ranked[:6]] == pytest.approx([-1, -0.6, -0.2, 0.2, 0.6, 1])
    assert [r.outcome for r in ranked[:6]] == pytest.approx([1, 0.6, 0.2, -0.2, -0.6, -1])
    (within,) = correlations(ranked)
    assert within.rho == pytest.approx(-1.0) and within.n == 12
    assert within.verdict().startswith("correlates against the expected direction")
    text = pooled_summary(groups)
    assert "| lpft | 6 | 3.5000 | 0.0650 |" in text and "| joint | 6 | 13.5000 | 0.4650 |" in text
    assert "rho=+" in text.split("### Within")[0] and "rho=-1.00" in text.split("### Within")[1]


class _FakeEvaluator(ZooEvaluator):
    """Accuracy falls with the distance from the task's own fine-tuned encoder (as the share of
    2,000 examples classified right)."""

    def __init__(self, zoo_finetuned, heads):
        self.finetuned, self.heads, self.calls = zoo_finetuned, heads, 0

    def correct(self, encoder, head, task, split):
        return torch.arange(2000) < round(2000 * self.score(encoder, head, task, split))

    def score(self, encoder, head, task, split):
        assert head is self.heads[task] and split in ("validation", "test")
        self.calls += 1
        distance = sum(
            float((encoder[n] - self.finetuned[task][n]).square().sum()) for n in encoder
        )
        return 0.9 / (1.0 + distance) + (0.05 if split == "test" else 0.0)


def _fake_zoo() -> BuiltZoo:
    g = torch.Generator().manual_seed(7)
    pretrained = {
        "layers.0.weight": torch.randn(4, 4, generator=g),
        "layers.0.bias": torch.zeros(4),
    }
    finetuned = {}
    for task in ("a", "b", "c"):
        finetuned[task] = {
            n: v + 0.3 * torch.randn(v.shape, generator=g) for n, v in pretrained.items()
        }
    frozen = torch.randn(3, 4, generator=g)  # a tensor no fine-tune changes
    pretrained["embeddings.weight"] = frozen
    for sd in finetuned.values():
        sd["embeddings.weight"] = frozen.clone()
    finetuned["a_copy"] = {n: v.clone() for n, v in finetuned["a"].items()}
    tasks = list(finetuned)
    heads = {task: torch.nn.Linear(4, 2) for task in tasks}
    return BuiltZoo(
        zoo="fake",
        recipe="none",
        seed=0,
        tasks=tasks,
        pretrained=pretrained,
        finetuned=finetuned,
        heads=heads,
        probe_heads=heads,
        evaluator=_FakeEvaluator(finetuned, heads),
    )


def test_pairwise_study_on_a_fake_zoo():
    zoo = _fake_zoo()
    study = pairwise_study(zoo, methods=("task_arithmetic", "ties"))
    assert len(study.records) == 6 * 2  # 4 tasks -> 6 pairs, two methods
    twin = next(
        r for r in study.records if r.tasks == ("a", "a_copy") and r.method == "task_arithmetic"
    )
    # Two identical task vectors: SSD 0, and lambda 0.5 (chosen on validation) gives back the
    # fine-tuned encoder exactly, so nothing is lost.
    assert twin.metrics["ssd"] == pytest.approx(0.0)
    assert twin.metrics["cosine"] == pytest.approx(1.0)
    assert twin.details["parameters"]["lambda"] == 0.5
    assert twin.outcome == pytest.approx(0.0, abs=1e-5)
    others = [r for r in study.records if r.tasks != ("a", "a_copy")]
    assert all(r.outcome > 0.01 for r in others)
    assert {c.method for c in study.correlations} == {"task_arithmetic", "ties"}
    assert all(c.n == 6 for c in study.correlations)
    assert (
        "task_arithmetic" in study.summary and "| a + a_copy | task_arithmetic |" in study.table()
    )
    assert study.individual["a"] == pytest.approx(0.95)
    assert study.individual_intervals["a"].low < 0.95 < study.individual_intervals["a"].high
    low, high = twin.details["normalised_interval"]
    assert low < twin.details["normalised"] < high
    assert "Individual fine-tuned accuracy (95% bootstrap interval over test examples): a 0.950 [" in study.markdown()
    assert study.diagnostics.skipped == {"excluded by pattern": ["embeddings.weight"]}


def test_pairwise_study_bad_input():
    zoo = _fake_zoo()
    with pytest.raises(ConfigError, match="no parameter"):
        pairwise_study(
            zoo, methods=("task_arithmetic",), candidates={"task_arithmetic": [{"t": 1}]}
        )


def test_study_cli_on_a_registered_zoo(tmp_path: Path, monkeypatch):
    from mergelab_bench.zoo import registry

    class FakeZoo:
        name, recipes = "fake", ("none", "none2")

        def build(self, *, recipe: str, seed: int, progress: bool = True) -> BuiltZoo:
            return _fake_zoo()

    monkeypatch.setitem(registry._ZOOS, "fake-diagnostics", FakeZoo)
    out = tmp_path / "study.md"
    args = ["diagnose", "study", "--zoo", "fake-diagnostics", "--methods", "task_arithmetic"]
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\nearlier section\n")
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--docs", str(docs), "--no-progress"])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert "| a + a_copy | task_arithmetic |" in text and "Spearman" in text
    section = docs.read_text()
    assert section.startswith("# Benchmarks\n\nearlier section\n") and text in section
    both = CliRunner().invoke(app, [*args, "--recipe", "none,none2", "--docs", str(docs), "--no-progress"])
    assert both.exit_code == 0, both.output
    document = docs.read_text()
    for key in ("study:fake-diagnostics:none:0", "study:fake-diagnostics:none2:0",
                "study:fake-diagnostics:none+none2:0"):
        assert document.count(f"<!-- mergelab-bench:{key}:start -->") == 1
    assert "recipes pooled" in document and "### Within each recipe" in document
    unknown = CliRunner().invoke(app, ["diagnose", "study", "--zoo", "nope", "--no-progress"])
    assert unknown.exit_code == 1 and "unknown zoo" in unknown.output
