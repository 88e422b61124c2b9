"""The FusionBench kernel benchmark's own logic (benchmarks/fusionbench_kernels.py), without
FusionBench: the density that matches its top-k count, the relative difference, the seed
statistics of the randomised row, and how a row's outcome is judged against its expectation."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from fusionbench_kernels import (  # noqa: E402
    Case,
    Row,
    build_inputs,
    compare,
    family,
    fusionbench_kept,
    matched_density,
    mean_and_error,
    relative_difference,
    seed_statistics,
)


def test_matched_density_makes_mergelab_keep_fusionbench_s_count() -> None:
    # FusionBench keeps int(n K) + 1 of n entries; mergelab's magnitude trim keeps
    # max(1, int(density * n)). The matched density must land on the same count for every n
    # and K, whatever the float rounding of (count / n) * n.
    for numel in range(1, 3000, 7):
        for threshold in (0.1, 0.2, 0.3, 0.5, 0.7, 0.9):
            kept = fusionbench_kept(numel, threshold)
            assert kept == int(numel * threshold) + 1
            density = matched_density(numel, threshold)
            assert 0.0 < density <= 1.0
            assert max(1, int(density * numel)) == min(kept, numel), (numel, threshold)


def test_relative_difference_is_against_the_reference_s_largest_magnitude() -> None:
    reference = torch.tensor([2.0, -4.0, 1.0])
    assert relative_difference(reference.clone(), reference) == 0.0
    assert relative_difference(torch.tensor([2.0, -4.0, 2.0]), reference) == pytest.approx(0.25)
    assert relative_difference(torch.empty(0), torch.empty(0)) == 0.0


def test_seed_statistics_and_standard_errors() -> None:
    base = {"w": torch.zeros(4)}
    merged = {"seed0.w": torch.tensor([1.0, 0.0, 0.0, 0.0]), "seed1.w": torch.tensor([3.0, 4.0, 0.0, 0.0])}
    stats = seed_statistics(merged, base, list(merged))
    assert stats == {"seed0": (0.25, 1.0), "seed1": (0.5, 5.0)}
    mean, error = mean_and_error([1.0, 3.0])
    assert mean == 2.0 and error == pytest.approx(math.sqrt(2.0 / 2))


def _case(expect: str = "agree", check: str = "exact") -> Case:
    return Case("row", "fb", "runner", {}, "ml", merge=lambda sds: {}, expect=expect, check=check)


def _judged(case: Case, ml: dict, fb: dict, base: dict | None = None) -> Row:
    row = Row(case, ran=True)
    compare(row, ml, fb, base or {})
    return row


def test_an_expected_difference_that_vanishes_is_reported_as_unexpected() -> None:
    same = {"w": torch.ones(3)}
    assert _judged(_case(), same, same).status == "agree"
    assert _judged(_case("differ"), same, same).status == "UNEXPECTED agree"
    moved = {"w": torch.tensor([1.0, 1.0, 1.1])}
    assert _judged(_case("differ"), moved, same).status == "differ"
    failed = _judged(_case(), moved, same)
    assert failed.status == "UNEXPECTED differ" and "in w" in failed.problems[0]
    assert Row(_case()).status == "FAIL"  # never ran


def test_missing_keys_and_shapes_are_problems_not_crashes() -> None:
    row = _judged(_case(), {"a": torch.ones(2), "c": torch.ones(3)}, {"a": torch.ones(2), "b": torch.ones(2)})
    assert any("only FusionBench has b" in p for p in row.problems)
    assert any("only mergelab has c" in p for p in row.problems)
    row = _judged(_case(), {"a": torch.ones(2)}, {"a": torch.ones(3)})
    assert any("shape" in p for p in row.problems) and row.status == "UNEXPECTED differ"


def test_statistical_rows_compare_means_over_seeds() -> None:
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.zeros(400)}

    def draws(first_seed: int, keep: float) -> dict[str, torch.Tensor]:
        out = {}
        for seed in range(first_seed, first_seed + 10):
            mask = torch.rand(400, generator=gen) < keep
            out[f"seed{seed - first_seed}.w"] = torch.where(mask, 1.0, 0.0)
        return out

    alike = _judged(_case(check="statistical"), draws(0, 0.4), draws(10, 0.4), base)
    assert alike.status == "agree", alike.problems
    apart = _judged(_case(check="statistical"), draws(0, 0.4), draws(10, 0.6), base)
    assert apart.status == "UNEXPECTED differ"
    assert any("standard errors" in p for p in apart.problems)


def test_inputs_are_seeded_and_the_zero_family_keeps_the_task_vectors() -> None:
    first, again = build_inputs(0), build_inputs(0)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    plain, zero = family(first), family(first, "zero.")
    assert all(not v.any() for v in zero["base"].values())
    for name in plain["base"]:
        tau = plain["task1"][name] - plain["base"][name]
        assert torch.allclose(zero["task1"][name], tau)
        assert bool(tau.any())
