"""model_stock, nearswap, arcee_fusion, ram, ramplus_tl and passthrough: hand-computed values,
properties, declarations (mergekit 0.1.5's names and defaults) and a differential check
against it (mergekit missing fails the check: conftest.py)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from conftest import randn, run_kernel

from mergelab.methods import pairwise
from mergelab.methods.registry import get_method

T = torch.tensor


def ratio(k: int, cos: float) -> float:
    """Model Stock's interpolation ratio (Jang et al. 2024, eq. 3 generalised to k models)."""
    return k * cos / (1 + (k - 1) * cos)


# --- model_stock ---------------------------------------------------------------------------


def test_model_stock_symmetric_pair_follows_closed_form() -> None:
    # Offsets at +-30 degrees from the x axis: cos(theta) = cos(60 deg) = 0.5, t = 2/3, and the
    # average offset is (cos 30, 0), so the result is base + 2/3 * (sqrt3/2, 0).
    base = T([1.0, -2.0])
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    out = run_kernel("model_stock", [base + T([c, s]), base + T([c, -s])], base)
    assert ratio(2, 0.5) == pytest.approx(2 / 3)
    torch.testing.assert_close(out, base + T([1 / math.sqrt(3), 0.0]))


@pytest.mark.parametrize("angle_deg", [20.0, 75.0, 89.0])
def test_model_stock_symmetric_pair_any_angle(angle_deg: float) -> None:
    half = math.radians(angle_deg) / 2
    base = randn(3, seed=1)
    o1, o2 = T([math.cos(half), math.sin(half), 0.0]), T([math.cos(half), -math.sin(half), 0.0])
    out = run_kernel("model_stock", [base + 2 * o1, base + 2 * o2], base)
    t = ratio(2, math.cos(2 * half))
    torch.testing.assert_close(out, base + t * (o1 + o2))


def test_model_stock_three_models_closed_form() -> None:
    # Three unit offsets with pairwise cos 0.5 each (edges of a regular tetrahedron corner).
    base = torch.zeros(3)
    offsets = [T([1.0, 0.0, 0.0]), T([0.5, math.sqrt(3) / 2, 0.0])]
    offsets.append(T([0.5, 1 / (2 * math.sqrt(3)), math.sqrt(2 / 3)]))
    out = run_kernel("model_stock", offsets, base)
    torch.testing.assert_close(out, ratio(3, 0.5) * sum(offsets) / 3)  # ratio 0.75


def test_model_stock_identical_models_return_the_model() -> None:
    base, w = randn(4, 4, seed=1), randn(4, 4, seed=2)
    torch.testing.assert_close(run_kernel("model_stock", [w, w.clone(), w.clone()], base), w)


def test_model_stock_opposite_updates_keep_the_base() -> None:
    # k = 2, cos = -1: 1 + (k - 1) cos = 0, no finite ratio; mergekit keeps the base (the
    # average, base - d/2, would differ).
    base, d = randn(5, seed=1), T([1.0, 0.0, 2.0, 0.0, -1.0])
    torch.testing.assert_close(run_kernel("model_stock", [base + d, base - 2 * d], base), base)


def test_model_stock_filter_wise_uses_one_ratio_per_row() -> None:
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    base = torch.zeros(2, 2)
    # Row 0: +-30 degrees (cos 0.5, t = 2/3). Row 1: orthogonal offsets (cos 0, t = 0).
    w1 = T([[c, s], [1.0, 0.0]])
    w2 = T([[c, -s], [0.0, 1.0]])
    out = run_kernel("model_stock", [w1, w2], base, {"filter_wise": True})
    torch.testing.assert_close(out, T([[2 / 3 * c, 0.0], [0.0, 0.0]]))
    # Per tensor, the mean cos differs, so the two modes can be told apart.
    assert not torch.allclose(run_kernel("model_stock", [w1, w2], base), out)


def test_model_stock_filter_wise_1d_is_per_tensor() -> None:
    base = randn(6, seed=3)
    ws = [base + randn(6, seed=s) for s in (4, 5, 6)]
    torch.testing.assert_close(
        run_kernel("model_stock", ws, base, {"filter_wise": True}), run_kernel("model_stock", ws, base)
    )


# --- nearswap --------------------------------------------------------------------------------


def test_nearswap_hand_computed() -> None:
    # weight = clamp(t / |diff|, 0, 1) = (1, 0.2, 0.05) for t = 0.1.
    base, other = torch.zeros(3), T([0.05, 0.5, -2.0])
    out = run_kernel("nearswap", [other], base, {"t": 0.1})
    torch.testing.assert_close(out, T([0.05, 0.1, -0.1]))


def test_nearswap_t_zero_is_base_and_large_t_is_other() -> None:
    base, other = randn(4, 3, seed=1), randn(4, 3, seed=2)
    torch.testing.assert_close(run_kernel("nearswap", [other], base, {"t": 0.0}), base)
    torch.testing.assert_close(run_kernel("nearswap", [other], base, {"t": 1e6}), other)


def test_nearswap_identical_inputs_return_input() -> None:
    a = randn(3, 3)
    torch.testing.assert_close(run_kernel("nearswap", [a.clone()], a, {"t": 0.01}), a)


# --- arcee_fusion ----------------------------------------------------------------------------


def test_arcee_fusion_keeps_only_outlying_changes() -> None:
    # Every row of `other` is a permutation of the same 8 values, so every row has the same KL
    # divergence K > 0 against the uniform softmax of the zero base and importance = K * |value|.
    # Of the 32 sorted importances, indices 7, 15 and 23 give Q1 = 0.2K, median = 0.35K,
    # Q3 = 0.6K: threshold = 0.35K + 1.5 * 0.4K = 0.95K, so only the 5s pass (0.9 does not).
    values = T([0.1, 0.2, 0.3, 0.35, 0.45, 0.6, 0.9, 5.0])
    other = torch.stack([values.roll(2 * i) for i in range(4)])
    base = torch.zeros(4, 8)
    out = run_kernel("arcee_fusion", [other], base)
    torch.testing.assert_close(out, torch.where(other == 5.0, other, base))


def test_arcee_fusion_zero_threshold_keeps_zero_importance_changes() -> None:
    # Softmax ignores a constant shift, so a row moved by +1 has KL = 0 and importance 0; all
    # importances are 0, the threshold is 0, and `importance >= threshold` keeps the change.
    base = randn(4, 4, seed=1)
    other = base.clone()
    other[0] += 1.0
    torch.testing.assert_close(run_kernel("arcee_fusion", [other], base), other)


def test_arcee_fusion_takes_each_element_from_base_or_other() -> None:
    base = randn(16, 32, seed=1)
    other = base + randn(16, 32, seed=2)
    out = run_kernel("arcee_fusion", [other], base)
    from_base, from_other = out == base, out == other
    assert bool((from_base | from_other).all())
    assert bool((from_other & ~from_base).any()) and bool((from_base & ~from_other).any())


def test_arcee_fusion_sparse_changes_are_all_kept() -> None:
    # With at least 3/4 of the elements unchanged, Q1 = median = Q3 = 0, the threshold is 0 and
    # every element passes `importance >= threshold`: the result is `other` (as in mergekit).
    base = randn(8, 8, seed=1)
    other = base.clone()
    other[0, :4] += 1.0
    torch.testing.assert_close(run_kernel("arcee_fusion", [other], base), other)


def test_arcee_fusion_identical_inputs_return_input() -> None:
    a = randn(4, 8)
    torch.testing.assert_close(run_kernel("arcee_fusion", [a.clone()], a), a)


def test_arcee_fusion_large_tensor_samples_from_the_generator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Shrink the sample size so the sampled path runs on a small tensor.
    monkeypatch.setattr(pairwise, "FUSION_QUANTILE_SAMPLE", 500)
    base = torch.zeros(40, 50)
    other = randn(40, 50, seed=4)
    first = run_kernel("arcee_fusion", [other], base, seed=7)
    torch.testing.assert_close(run_kernel("arcee_fusion", [other], base, seed=7), first)
    outs = {tuple(run_kernel("arcee_fusion", [other], base, seed=s).flatten().tolist()) for s in range(5)}
    assert len(outs) > 1  # the sample, hence the threshold, depends on the seed


# --- ram / ramplus_tl ---------------------------------------------------------------------------

RAM_BASE = torch.zeros(4)
# Element 0 changed by both (mean), 1 by model 1 only, 2 by none, 3 below epsilon (dropped).
RAM_MODELS = [T([1.0, 2.0, 0.0, 1e-6]), T([3.0, 0.0, 0.0, 0.0])]


def test_ram_hand_computed() -> None:
    torch.testing.assert_close(run_kernel("ram", RAM_MODELS, RAM_BASE), T([2.0, 2.0, 0.0, 0.0]))


def test_ramplus_tl_hand_computed() -> None:
    # Model 1 changes 1 shared and 1 unique element: rho = 1, clamped to alpha = 0.2,
    # lambda = 1 + 0.1 * 0.2 = 1.02 on its unique element.
    out = run_kernel("ramplus_tl", RAM_MODELS, RAM_BASE)
    torch.testing.assert_close(out, T([2.0, 2.04, 0.0, 0.0]))
    out = run_kernel("ramplus_tl", RAM_MODELS, RAM_BASE, {"r": 0.5, "alpha": 0.9})
    torch.testing.assert_close(out, T([2.0, 2.9, 0.0, 0.0]))  # lambda = 1 + 0.5 * 0.9


def test_ramplus_tl_rho_below_alpha() -> None:
    # Model 1: 1 shared, 2 unique elements -> rho = 0.5 < alpha = 0.9, lambda = 1.25.
    models = [T([1.0, 2.0, 4.0]), T([3.0, 0.0, 0.0])]
    out = run_kernel("ramplus_tl", models, torch.zeros(3), {"r": 0.5, "alpha": 0.9})
    torch.testing.assert_close(out, T([2.0, 2.5, 5.0]))


@pytest.mark.parametrize("name", ["ram", "ramplus_tl"])
def test_ram_single_model_and_identical_models_return_the_model(name: str) -> None:
    base, w = randn(3, 5, seed=1), randn(3, 5, seed=2)
    torch.testing.assert_close(run_kernel(name, [w], base), w)
    torch.testing.assert_close(run_kernel(name, [w, w.clone(), w.clone()], base), w)


def test_ram_epsilon_sets_what_counts_as_changed() -> None:
    out = run_kernel("ram", RAM_MODELS, RAM_BASE, {"epsilon": 1.5})  # only |3| and |2| count
    torch.testing.assert_close(out, T([3.0, 2.0, 0.0, 0.0]))


# --- passthrough -----------------------------------------------------------------------------


def test_passthrough_copies_or_scales() -> None:
    a = randn(2, 3)
    torch.testing.assert_close(run_kernel("passthrough", [a]), a)
    torch.testing.assert_close(run_kernel("passthrough", [a], model_params=[{"scale": 0.5}]), a / 2)
    assert torch.equal(run_kernel("passthrough", [a], model_params=[{"scale": 0.0}]), torch.zeros(2, 3))


# --- declarations and validation -------------------------------------------------------------


# name: (base, min_models, max_models, {param: (default, per_model)}), from mergekit 0.1.5.
DECLARED = {
    "model_stock": ("required", 2, None, {"filter_wise": (False, False)}),
    "nearswap": ("required", 1, 1, {"t": (None, False)}),
    "arcee_fusion": ("required", 1, 1, {}),
    "ram": ("required", 1, None, {"epsilon": (1e-5, False)}),
    "ramplus_tl": (
        "required",
        1,
        None,
        {"r": (0.1, False), "alpha": (0.2, False), "epsilon": (1e-5, False)},
    ),
    # mergekit's scale defaults to None (no scaling); 1.0 gives the same tensor.
    "passthrough": ("none", 1, 1, {"scale": (1.0, True)}),
}


@pytest.mark.parametrize("name", sorted(DECLARED))
def test_declarations_match_mergekit(name: str) -> None:
    base, lo, hi, params = DECLARED[name]
    method = get_method(name)
    assert (method.base, method.min_models, method.max_models) == (base, lo, hi)
    assert {p.name: (p.default, p.per_model) for p in method.params} == params
    assert method.url and method.title


def test_only_arcee_fusion_is_randomised() -> None:
    assert [n for n in DECLARED if get_method(n).randomized] == ["arcee_fusion"]


@pytest.mark.parametrize(
    ("name", "param", "value"),
    [("ram", "epsilon", -1.0), ("ramplus_tl", "alpha", -0.1), ("ramplus_tl", "r", "big"),
     ("model_stock", "filter_wise", "yes"), ("nearswap", "t", None), ("passthrough", "scale", True)],
)  # fmt: skip
def test_bad_parameter_messages_name_the_parameter(name: str, param: str, value: Any) -> None:
    message = get_method(name).param(param).check(value)
    assert message is not None and f"`{param}`" in message


# --- differential check against mergekit (the `mergekit_methods` fixture of conftest.py) ---


def test_matches_mergekit(mergekit_methods: Any) -> None:
    ref = mergekit_methods
    for shape in ((6, 10), (12,), (3, 4, 5)):
        base = randn(*shape, seed=0)
        ws = [base + 0.1 * randn(*shape, seed=s) for s in (1, 2, 3)]
        for fw in (False, True):
            torch.testing.assert_close(
                run_kernel("model_stock", ws, base, {"filter_wise": fw}),
                ref("model_stock", ws, base, {"filter_wise": fw}),
            )
        for t in (0.01, 0.1, 1.0):
            torch.testing.assert_close(
                run_kernel("nearswap", ws[:1], base, {"t": t}), ref("nearswap", ws[:1], base, {"t": t})
            )
        sparse = [
            base + randn(*shape, seed=s) * (randn(*shape, seed=s + 9) > 0.3) for s in (4, 5, 6)
        ]
        torch.testing.assert_close(
            run_kernel("arcee_fusion", sparse[:1], base), ref("arcee_fusion", sparse[:1], base)
        )
        torch.testing.assert_close(run_kernel("ram", sparse, base), ref("ram", sparse, base))
        for params in ({}, {"r": 0.5, "alpha": 0.9}):
            torch.testing.assert_close(
                run_kernel("ramplus_tl", sparse, base, params), ref("ramplus_tl", sparse, base, params)
            )
        torch.testing.assert_close(
            run_kernel("passthrough", ws[:1], model_params=[{"scale": 0.5}]),
            ref("passthrough", ws[:1], per_input={"scale": [0.5]}),
        )


# --- every method of this assignment leaves its inputs untouched ------------------------------

ALL_CASES = [
    ("slerp", 1, True, {"t": 0.3}, {}),
    ("nuslerp", 2, True, {"nuslerp_flatten": False}, {"weight": 1.0}),
    ("multislerp", 3, True, {}, {"weight": 1.0}),
    ("karcher", 3, False, {}, {}),
    ("model_stock", 3, True, {"filter_wise": True}, {}),
    ("nearswap", 1, True, {"t": 0.5}, {}),
    ("arcee_fusion", 1, True, {}, {}),
    ("ram", 3, True, {}, {}),
    ("ramplus_tl", 3, True, {}, {}),
    ("passthrough", 1, False, {}, {"scale": 2.0}),
]


@pytest.mark.parametrize(("name", "count", "with_base", "params", "per_model"), ALL_CASES)
def test_kernels_do_not_modify_inputs(
    name: str, count: int, with_base: bool, params: dict[str, Any], per_model: dict[str, Any]
) -> None:
    base = randn(6, 7, seed=0) if with_base else None
    tensors = [randn(6, 7, seed=s) for s in range(1, count + 1)]
    before = [t.clone() for t in tensors] + ([base.clone()] if base is not None else [])
    out = run_kernel(name, tensors, base, params, [dict(per_model) for _ in tensors])
    after = tensors + ([base] if base is not None else [])
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert out.dtype == torch.float32 and bool(torch.isfinite(out).all())
