"""Spherical methods (slerp, nuslerp, multislerp, karcher): hand-computed values, properties,
declarations (mergekit 0.1.5's names and defaults) and a differential check
against it (mergekit missing fails the check: conftest.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import randn, run_kernel

from mergelab.errors import MergeError
from mergelab.methods.registry import get_method
from mergelab.methods.spherical import karcher_mean, nuslerp, slerp

R2 = math.sqrt(0.5)


def weights(*ws: float) -> list[dict[str, Any]]:
    return [{"weight": w} for w in ws]


T = torch.tensor


# --- slerp -------------------------------------------------------------------------------


def test_slerp_orthogonal_midpoint_is_scaled_diagonal() -> None:
    # theta = pi/2: both coefficients are sin(pi/4) / sin(pi/2) = 1/sqrt2.
    out = run_kernel("slerp", [T([0.0, 2.0])], base=T([2.0, 0.0]), params={"t": 0.5})
    torch.testing.assert_close(out, T([2 * R2, 2 * R2]))


def test_slerp_orthogonal_third() -> None:
    # t = 1/3, theta = pi/2: coefficients sin(pi/3) and sin(pi/6).
    out = slerp(1 / 3, T([1.0, 0.0, 0.0]), T([0.0, 0.0, 1.0]))
    torch.testing.assert_close(out, T([math.sqrt(3) / 2, 0.0, 0.5]))


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_slerp_ends(t: float) -> None:
    a, b = randn(4, 6, seed=1), randn(4, 6, seed=2)
    out = run_kernel("slerp", [b], base=a, params={"t": t})
    torch.testing.assert_close(out, a if t == 0.0 else b)


def test_slerp_identical_inputs_return_input() -> None:
    a = randn(3, 5)
    torch.testing.assert_close(run_kernel("slerp", [a.clone()], base=a, params={"t": 0.37}), a)


def test_slerp_keeps_unit_norm_and_angle_fraction() -> None:
    a, b = randn(50, seed=3), randn(50, seed=4)
    a, b = a / a.norm(), b / b.norm()
    theta = torch.acos(torch.dot(a, b))
    out = slerp(0.3, a, b)
    torch.testing.assert_close(out.norm(), torch.tensor(1.0))
    torch.testing.assert_close(torch.acos(torch.dot(a, out).clamp(-1, 1)), 0.3 * theta)


@pytest.mark.parametrize("factor", [3.0, -2.0])
def test_slerp_colinear_and_antipodal_fall_back_to_linear(factor: float) -> None:
    a = randn(2, 3)
    out = slerp(0.25, a, factor * a)
    torch.testing.assert_close(out, 0.75 * a + 0.25 * factor * a)


def test_slerp_zero_base_counts_as_orthogonal() -> None:
    # A zero tensor has no direction: its norm is taken as 1, cos = 0, theta = pi/2, so the
    # result is sin(t pi/2) * other (mergekit 0.1.5's behaviour).
    b = T([3.0, -4.0])
    out = slerp(0.5, torch.zeros(2), b)
    torch.testing.assert_close(out, math.sin(math.pi / 4) * b)


def test_slerp_extrapolates_beyond_one() -> None:
    out = slerp(2.0, T([1.0, 0.0]), T([0.0, 1.0]))  # rotate by 2 * 90 degrees
    torch.testing.assert_close(out, T([-1.0, 0.0]), atol=1e-6, rtol=0)


def test_slerp_empty_tensor() -> None:
    assert slerp(0.5, torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)


# --- nuslerp -----------------------------------------------------------------------------


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("row_wise", [True, False])
@pytest.mark.parametrize("with_base", [True, False])
def test_nuslerp_zero_weight_returns_other_model(
    flatten: bool, row_wise: bool, with_base: bool
) -> None:
    a, b = randn(4, 5, seed=1), randn(4, 5, seed=2)
    base = randn(4, 5, seed=3) if with_base else None
    params = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    torch.testing.assert_close(run_kernel("nuslerp", [a, b], base, params, weights(0.0, 2.0)), b)
    torch.testing.assert_close(run_kernel("nuslerp", [a, b], base, params, weights(5.0, 0.0)), a)


def test_nuslerp_flattened_matches_slerp_with_t_from_weights() -> None:
    a, b = randn(3, 4, seed=5), randn(3, 4, seed=6)
    out = run_kernel("nuslerp", [a, b], model_params=weights(1.0, 3.0))  # t = 3 / (1 + 3)
    torch.testing.assert_close(out, slerp(0.75, a, b))


def test_nuslerp_weights_summing_to_zero_use_midpoint() -> None:
    a, b = T([1.0, 0.0]), T([0.0, 1.0])
    out = run_kernel("nuslerp", [a, b], model_params=weights(1.0, -1.0))
    torch.testing.assert_close(out, T([R2, R2]))


def test_nuslerp_per_row_with_colinear_row() -> None:
    # Row 0 is orthogonal (spherical midpoint); row 1 is colinear (linear midpoint).
    a = T([[1.0, 0.0], [1.0, 0.0]])
    b = T([[0.0, 1.0], [2.0, 0.0]])
    expected = T([[R2, R2], [1.5, 0.0]])
    params = {"nuslerp_flatten": False}
    torch.testing.assert_close(run_kernel("nuslerp", [a, b], None, params, weights(1, 1)), expected)
    # row_wise interpolates vectors along dimension 0, i.e. the columns.
    params = {"nuslerp_flatten": False, "nuslerp_row_wise": True}
    out = run_kernel("nuslerp", [a.T.contiguous(), b.T.contiguous()], None, params, weights(1, 1))
    torch.testing.assert_close(out, expected.T)


def test_nuslerp_with_base_interpolates_task_vectors() -> None:
    base = T([1.0, 1.0])
    out = run_kernel("nuslerp", [T([2.0, 1.0]), T([1.0, 2.0])], base, model_params=weights(1, 1))
    torch.testing.assert_close(out, base + T([R2, R2]))


def test_nuslerp_row_wise_on_1d_tensor_is_whole_vector() -> None:
    a, b = randn(6, seed=7), randn(6, seed=8)
    torch.testing.assert_close(nuslerp(0.4, a, b, row_wise=True, flatten=False), nuslerp(0.4, a, b))


# --- multislerp --------------------------------------------------------------------------


def test_multislerp_orthogonal_pair_is_normalised_mean_times_mean_norm() -> None:
    # Unit directions (1,0) and (0,1), norms 2 and 4, equal weights: direction (1,1)/sqrt2,
    # length the weighted mean norm 3.
    out = run_kernel("multislerp", [T([2.0, 0.0]), T([0.0, 4.0])], model_params=weights(1, 1))
    torch.testing.assert_close(out, T([3 * R2, 3 * R2]))


def test_multislerp_unnormalised_weights_scale_the_norm() -> None:
    out = run_kernel(
        "multislerp",
        [T([1.0, 0.0]), T([0.0, 1.0])],
        params={"normalize_weights": False},
        model_params=weights(1, 1),
    )
    torch.testing.assert_close(out, T([2 * R2, 2 * R2]))


def test_multislerp_three_orthogonal_axes_with_base() -> None:
    base = T([1.0, 1.0, 1.0])
    tensors = [base + 2 * torch.eye(3)[i] for i in range(3)]
    out = run_kernel("multislerp", tensors, base, model_params=weights(1, 1, 1))
    torch.testing.assert_close(out, base + 2 / math.sqrt(3))


def test_multislerp_single_model_and_one_hot_weight_return_the_model() -> None:
    a, b = randn(3, 4, seed=1), randn(3, 4, seed=2)
    torch.testing.assert_close(run_kernel("multislerp", [a], model_params=weights(0.3)), a)
    torch.testing.assert_close(run_kernel("multislerp", [a, b], model_params=weights(0, 1)), b)


def test_multislerp_identical_inputs_return_input() -> None:
    a = randn(5, 2)
    out = run_kernel("multislerp", [a, a.clone(), a.clone()], model_params=weights(0.2, 0.5, 0.3))
    torch.testing.assert_close(out, a)


def test_multislerp_antipodal_pair_falls_back_to_linear() -> None:
    # Exactly representable values, so the task vectors are exactly antipodal.
    a, base = T([0.5, -1.0, 2.0, 0.25]), T([1.0, 2.0, 3.0, 4.0])
    out = run_kernel("multislerp", [base + a, base - a], base, model_params=weights(1, 1))
    torch.testing.assert_close(out, base)


def test_multislerp_with_every_task_vector_zero_returns_the_base() -> None:
    # a tensor no model changed (an unused pooler): the base, not an "antipodal" error
    base = randn(4, 3, seed=5)
    out = run_kernel("multislerp", [base.clone(), base.clone(), base.clone()], base,
              model_params=weights(0.2, 0.5, 0.3))
    torch.testing.assert_close(out, base)


def test_multislerp_zero_weighted_mean_of_three_is_an_error() -> None:
    a = T([1.0, 0.0])
    with pytest.raises(MergeError, match="weight"):
        run_kernel("multislerp", [a, -a, 2 * a], model_params=weights(1.0, 1.0, 0.0))


def test_multislerp_weights_summing_to_zero_is_an_error_naming_weight() -> None:
    with pytest.raises(MergeError, match=r"`weight`.*layer\.weight"):
        run_kernel("multislerp", [T([1.0, 0.0]), T([0.0, 1.0])], model_params=weights(1, -1))


# --- karcher -----------------------------------------------------------------------------


def test_karcher_identical_points_return_the_point() -> None:
    a = randn(3, 3)
    torch.testing.assert_close(run_kernel("karcher", [a, a.clone(), a.clone()]), a)


def test_karcher_single_model_is_returned() -> None:
    a = randn(4)
    torch.testing.assert_close(run_kernel("karcher", [a]), a)


def test_karcher_orthogonal_pair_is_geodesic_midpoint_times_mean_norm() -> None:
    out = run_kernel("karcher", [T([1.0, 0.0]), T([0.0, 3.0])])
    torch.testing.assert_close(out, T([2 * R2, 2 * R2]))


def test_karcher_mean_satisfies_first_order_condition() -> None:
    # At the Karcher mean the log maps of the points sum to zero; the Euclidean start does not.
    points = [randn(8, seed=s) + 2 for s in range(4)]
    units = [p / p.norm() for p in points]
    out = karcher_mean(points, [0.25] * 4, max_iter=100, tol=1e-7)
    mu = out / out.norm()

    def log_sum(at: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(at)
        for u in units:
            cos = torch.dot(at, u).clamp(-1, 1)
            theta = torch.acos(cos)
            total += theta / torch.sin(theta) * (u - cos * at)
        return total

    assert log_sum(mu).norm() < 1e-5
    start = karcher_mean(points, [0.25] * 4, max_iter=0)
    assert log_sum(start / start.norm()).norm() > 1e-4  # the test can tell the two apart
    torch.testing.assert_close(out.norm(), torch.stack([p.norm() for p in points]).mean())


def test_karcher_zero_point_gives_no_direction_but_counts_in_the_norm() -> None:
    out = run_kernel("karcher", [T([2.0, 0.0]), T([0.0, 2.0]), torch.zeros(2)])
    torch.testing.assert_close(out, 4 / 3 * T([R2, R2]))


def test_karcher_points_shorter_than_tol_only_count_in_the_norm() -> None:
    out = run_kernel("karcher", [T([2.0, 0.0]), T([0.0, 2.0]), T([0.5, 0.0])], params={"tol": 0.6})
    torch.testing.assert_close(out, 1.5 * T([R2, R2]))  # norm (2 + 2 + 0.5) / 3


def test_karcher_all_zero_gives_zero() -> None:
    assert torch.equal(run_kernel("karcher", [torch.zeros(3), torch.zeros(3)]), torch.zeros(3))


def test_karcher_max_iter_zero_is_normalised_euclidean_mean() -> None:
    a, b, c = T([1.0, 0.0, 0.0]), T([0.0, 1.0, 0.0]), T([R2, R2, 0.0])
    out = run_kernel("karcher", [a, b, c], params={"max_iter": 0})
    direction = (a + b + c) / (a + b + c).norm()
    torch.testing.assert_close(out, direction)


# --- declarations and validation -----------------------------------------------------------


# name: (base, min_models, max_models, {param: (default, per_model)}), from mergekit 0.1.5.
DECLARED = {
    "slerp": ("required", 1, 1, {"t": (None, False)}),
    "nuslerp": (
        "optional",
        2,
        2,
        {
            "weight": (None, True),
            "nuslerp_row_wise": (False, False),
            "nuslerp_flatten": (True, False),
        },
    ),
    "multislerp": (
        "optional",
        1,
        None,
        {"weight": (None, True), "normalize_weights": (True, False), "eps": (1e-8, False)},
    ),
    "karcher": ("none", 1, None, {"max_iter": (10, False), "tol": (1e-5, False)}),
}


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_declarations_match_mergekit(name: str) -> None:
    base, lo, hi, params = DECLARED[name]
    method = get_method(name)
    assert (method.base, method.min_models, method.max_models) == (base, lo, hi)
    assert {p.name: (p.default, p.per_model) for p in method.params} == params
    assert method.url and method.title and method.paper


@pytest.mark.parametrize(
    ("name", "param", "value"),
    [("karcher", "max_iter", -1), ("karcher", "max_iter", 2.5), ("karcher", "tol", -1.0),
     ("multislerp", "eps", -1e-3), ("slerp", "t", "half"), ("nuslerp", "nuslerp_flatten", 1)],
)  # fmt: skip
def test_bad_parameter_messages_name_the_parameter(name: str, param: str, value: Any) -> None:
    message = get_method(name).param(param).check(value)
    assert message is not None and f"`{param}`" in message


def test_slerp_t_is_not_range_limited_like_mergekit() -> None:
    assert get_method("slerp").param("t").check(1.5) is None


# --- differential check against mergekit (runs only where mergekit 0.1.5 is importable) ---


def test_matches_mergekit(mergekit_methods: Any) -> None:
    base = randn(6, 10, seed=0)
    a, b, c = (base + 0.1 * randn(6, 10, seed=s) for s in (1, 2, 3))
    for t in (0.0, 0.3, 1.0, 1.7):
        ref = mergekit_methods("slerp", [a], base, {"t": t})
        torch.testing.assert_close(run_kernel("slerp", [a], base, {"t": t}), ref)
    for with_base in (True, False):
        for flatten in (True, False):
            for row_wise in (True, False):
                params = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
                maybe_base = base if with_base else None
                ref = mergekit_methods(
                    "nuslerp", [a, b], maybe_base, params, {"weight": [0.3, 0.9]}
                )
                ours = run_kernel("nuslerp", [a, b], maybe_base, params, weights(0.3, 0.9))
                torch.testing.assert_close(ours, ref)
        for normalize in (True, False):
            params = {"normalize_weights": normalize}
            maybe_base = base if with_base else None
            ref = mergekit_methods(
                "multislerp", [a, b, c], maybe_base, params, {"weight": [0.4, 1.0, 0.6]}
            )
            ours = run_kernel("multislerp", [a, b, c], maybe_base, params, weights(0.4, 1.0, 0.6))
            torch.testing.assert_close(ours, ref)
    for points in ([a, b], [a, b, c], [a, -a + 0.01 * b, c], [a, torch.zeros_like(a)]):
        torch.testing.assert_close(run_kernel("karcher", points), mergekit_methods("karcher", points))
