"""Linear and generalised task arithmetic (TIES, DARE, breadcrumbs, DELLA, SCE) kernels.

Hand-computed values on tiny tensors, properties on larger seeded ones, parameter declarations
against mergekit 0.1.5, and (when mergekit is importable) a differential check against it.
"""

from __future__ import annotations

import pytest
import torch

from mergelab.errors import ConfigError, MergeError
from mergelab.methods import get_method
from mergelab.methods.registry import TensorMerge, resolve_defaults
from mergelab.methods.sparsify import (
    breadcrumbs_prune_,
    della_keep_probabilities,
    della_params_problem,
    kth_smallest,
    largest_mask,
    magnitude_prune_,
    random_prune_,
    smallest_mask,
)
from mergelab.methods.task_arithmetic import (
    agreement_mask,
    elect_sign,
    sce_selection_mask,
    task_vectors,
)

T = torch.tensor
GTA_METHODS = (
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
)
RANDOM_METHODS = ("dare_ties", "dare_linear", "della", "della_linear")


def merge(
    name: str,
    tensors: list[torch.Tensor],
    base: torch.Tensor | None = None,
    per_model: list[dict] | None = None,
    seed: int | None = 0,
    **global_params,
) -> torch.Tensor:
    """Run a registered method's kernel as the engine would (defaults filled, base removed)."""
    method = get_method(name)
    per_model = per_model or [{} for _ in tensors]
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return method.kernel(
        TensorMerge(
            tensors=[t.float() for t in tensors],
            base=None if base is None else base.float(),
            model_params=[resolve_defaults(method.model_params, p) for p in per_model],
            params=resolve_defaults(method.global_params, global_params),
            generator=generator,
            name="model.layers.0.weight",
        )
    )


def weights(*values: float, **extra) -> list[dict]:
    return [{"weight": v, **extra} for v in values]


def stable_top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Reference: the first k indices of a stable descending sort, as a mask."""
    order = torch.sort(values.reshape(-1), descending=True, stable=True).indices
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(values.shape)


# --- declarations -------------------------------------------------------------------------------

# mergekit 0.1.5: (per-model params with defaults, global params with defaults)
MERGEKIT_SPECS = {
    "linear": ({"weight": None}, {"normalize": True}),
    "task_arithmetic": (
        {"weight": None, "density": 1.0},
        {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0},
    ),
    "ties": (
        {"weight": None, "density": 1.0},
        {"int8_mask": False, "normalize": True, "rescale": False, "lambda": 1.0},
    ),
    "dare_ties": (
        {"weight": None, "density": 1.0},
        {"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0},
    ),
    "dare_linear": (
        {"weight": None, "density": 1.0},
        {"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0},
    ),
    "breadcrumbs": (
        {"weight": None, "density": 1.0, "gamma": 0.01},
        {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0},
    ),
    "breadcrumbs_ties": (
        {"weight": None, "density": 1.0, "gamma": 0.01},
        {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 1.0},
    ),
    "della": (
        {"weight": None, "density": 1.0, "epsilon": 0.15},
        {"int8_mask": False, "normalize": True, "rescale": True, "lambda": 1.0},
    ),
    "della_linear": (
        {"weight": None, "density": 1.0, "epsilon": 0.15},
        {"int8_mask": False, "normalize": False, "rescale": True, "lambda": 1.0},
    ),
    "sce": ({}, {"select_topk": 1.0, "int8_mask": False}),
}


@pytest.mark.parametrize("name", sorted(MERGEKIT_SPECS))
def test_declaration_matches_mergekit(name):
    method = get_method(name)
    per_model, global_ = MERGEKIT_SPECS[name]
    assert {p.name: p.default for p in method.model_params} == per_model
    assert {p.name: p.default for p in method.global_params} == global_
    assert method.base == ("none" if name == "linear" else "required")
    assert method.randomized == (name in RANDOM_METHODS)
    assert method.url.startswith("https://arxiv.org/abs/")


@pytest.mark.parametrize(
    ("name", "param", "value"),
    [
        ("ties", "density", 1.3),
        ("dare_ties", "density", -0.1),
        ("breadcrumbs", "gamma", 1.5),
        ("della", "epsilon", -0.2),
        ("sce", "select_topk", 2.0),
    ],
)
def test_out_of_range_parameter_message_names_it(name, param, value):
    declared = get_method(name).param(param)
    problem = declared.check(value)
    assert problem is not None and f"`{param}`" in problem and declared.range_text() in problem


@pytest.mark.parametrize("name", ["ties", "dare_ties", "dare_linear", "breadcrumbs", "della"])
def test_a_density_of_zero_that_keeps_nothing_is_refused(name):
    density = get_method(name).param("density")
    assert density.check(0.0) == "`density` must be in (0, 1]; got 0.0 (density 0 makes the method a no-op)"
    assert density.check(1e-3) is None and density.check(1.0) is None


def test_parameter_types_checked():
    ties = get_method("ties")
    assert ties.param("density").check(0.5) is None
    assert "`normalize`" in ties.param("normalize").check(1)
    assert "`weight`" in ties.param("weight").check("a lot")
    assert ties.param("weight").check(-2.0) is None  # negative weights are allowed
    assert ties.param("lambda").check(3.0) is None


def test_della_epsilon_must_keep_probabilities_inside_unit_interval():
    assert della_params_problem(0.5, 0.15) is None
    assert della_params_problem(1.0, 0.9) is None  # no sampling at density 1, as in mergekit
    problem = della_params_problem(0.9, 0.15)
    assert problem is not None and "`epsilon`" in problem and "`density`" in problem
    check = get_method("della").check_model_params
    assert check({"weight": 1.0, "density": 0.5, "epsilon": 0.15}) is None
    assert "`epsilon`" in check({"weight": 1.0, "density": 0.2, "epsilon": 0.25})
    assert get_method("ties").check_model_params is None
    # The kernel re-checks, in case a caller skipped the planner.
    with pytest.raises(ConfigError, match="epsilon"):
        merge(
            "della",
            [T([1.0, 2.0, 3.0])],
            T([0.0, 0.0, 0.0]),
            weights(1.0, density=0.1, epsilon=0.1),
        )


# --- selection helpers --------------------------------------------------------------------------


@pytest.mark.parametrize("numel", [10, 70_000, 300_000])
def test_kth_smallest_equals_kthvalue(numel):
    generator = torch.Generator().manual_seed(numel)
    cases = [
        torch.randn(numel, generator=generator),
        torch.randint(0, 7, (numel,), generator=generator).float(),  # heavy ties
        torch.arange(numel, dtype=torch.float32).remainder(512),  # structured layout
    ]
    for values in cases:
        for k in {1, numel // 3, numel // 2 + 1, numel - 1, numel}:
            assert kth_smallest(values, k) == torch.kthvalue(values, k).values


@pytest.mark.parametrize("numel", [12, 100_000])
def test_largest_and_smallest_mask_break_ties_like_a_stable_sort(numel):
    values = torch.randint(0, 5, (numel,), generator=torch.Generator().manual_seed(1)).float()
    for k in (0, 1, numel // 4, numel // 2, numel):
        assert torch.equal(largest_mask(values, k), stable_top_k(values, k))
        order = torch.sort(values, stable=True).indices
        expected = torch.zeros(numel, dtype=torch.bool)
        expected[order[:k]] = True
        assert torch.equal(smallest_mask(values, k), expected)


# --- pruning steps ------------------------------------------------------------------------------


def test_magnitude_prune_keeps_top_k_and_ties_by_index():
    # |.| = [2, 1, 2, 3]: top 2 are 3 and the first 2 (index 0 beats index 2 on the tie).
    assert torch.equal(magnitude_prune_(T([-2.0, 1.0, 2.0, 3.0]), 0.5, False), T([-2.0, 0, 0, 3.0]))
    # Any positive density keeps at least one entry; density 0 keeps none.
    assert torch.equal(magnitude_prune_(T([1.0, -5.0, 2.0]), 0.01, False), T([0, -5.0, 0]))
    assert torch.equal(magnitude_prune_(T([1.0, -5.0, 2.0]), 0.0, False), T([0.0, 0, 0]))


def test_magnitude_prune_rescale_preserves_l1():
    pruned = magnitude_prune_(T([4.0, -3.0, 1.0, -0.5]), 0.5, True)
    torch.testing.assert_close(pruned, T([4.0, -3.0, 0, 0]) * (8.5 / 7.0))


def test_breadcrumbs_prune_drops_top_gamma_and_bottom():
    delta = T([5.0, -1.0, 3.0, -4.0, 2.0])
    # 5 entries, density 0.6 -> keep 3; gamma 0.2 -> drop the 1 largest (5) and the 1 smallest (-1).
    assert torch.equal(
        breadcrumbs_prune_(delta.clone(), 0.6, 0.2, False), T([0, 0, 3.0, -4.0, 2.0])
    )
    # gamma too large for the density: outlier removal shrinks so that 4 entries stay.
    assert torch.equal(
        breadcrumbs_prune_(delta.clone(), 0.8, 0.4, False), T([0, -1.0, 3.0, -4.0, 2.0])
    )
    # gamma 0 is plain magnitude pruning.
    assert torch.equal(breadcrumbs_prune_(delta.clone(), 0.4, 0.0, False), T([5.0, 0, 0, -4.0, 0]))
    ten = torch.arange(1.0, 11.0)
    kept = breadcrumbs_prune_(ten.clone(), 0.5, 0.1, False)
    assert torch.equal(kept, T([0, 0, 0, 0, 5.0, 6.0, 7.0, 8.0, 9.0, 0]))


def test_breadcrumbs_matches_stable_sort_window_on_ties():
    delta = torch.randint(-4, 5, (80_000,), generator=torch.Generator().manual_seed(2)).float()
    kept, outliers = int(0.3 * delta.numel()), int(0.05 * delta.numel())
    small = delta.numel() - kept - outliers
    order = torch.sort(delta.abs(), stable=True).indices
    expected = torch.zeros_like(delta)
    window = order[small : small + kept]
    expected[window] = delta[window]
    assert torch.equal(breadcrumbs_prune_(delta.clone(), 0.3, 0.05, False), expected)


def test_random_prune_keeps_density_fraction_and_rescales():
    delta = torch.ones(200_000)
    delta[::2] = -1.0
    generator = torch.Generator().manual_seed(0)
    pruned = random_prune_(delta.clone(), 0.3, True, generator)
    kept = pruned != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.005
    # L1 rescale: every survivor is scaled by numel / kept (about 1 / density), sign kept.
    scale = delta.numel() / kept.sum().item()
    torch.testing.assert_close(pruned[kept], delta[kept] * scale)
    assert abs(scale - 1 / 0.3) < 0.05
    unscaled = random_prune_(delta.clone(), 0.3, False, torch.Generator().manual_seed(0))
    assert torch.equal(unscaled[kept], delta[kept]) and torch.equal(unscaled != 0, kept)


def test_random_prune_extremes():
    delta = T([1.0, -2.0, 3.0])
    assert torch.equal(random_prune_(delta.clone(), 1.0, True, None), delta)
    assert torch.equal(random_prune_(delta.clone(), 0.0, True, None), T([0.0, 0.0, 0.0]))


def test_della_probabilities_linear_in_magnitude_rank():
    probs = della_keep_probabilities(T([0.1, -0.4, 0.3, 0.2, -0.5]), density=0.5, epsilon=0.2)
    torch.testing.assert_close(probs, T([0.3, 0.6, 0.5, 0.4, 0.7]))
    # 2-d tensors rank within each row; a single-entry row gets `density`.
    rows = della_keep_probabilities(T([[3.0, -1.0], [0.5, 2.0]]), 0.5, 0.1)
    torch.testing.assert_close(rows, T([[0.6, 0.4], [0.4, 0.6]]))
    torch.testing.assert_close(
        della_keep_probabilities(T([[7.0], [1.0]]), 0.5, 0.1), T([[0.5], [0.5]])
    )


def test_della_keeps_large_magnitudes_more_often():
    base = torch.zeros(400, 500)
    delta = torch.linspace(0.01, 1.0, 500).repeat(400, 1)
    merged = merge(
        "della_linear", [delta], base, weights(1.0, density=0.4, epsilon=0.3), rescale=False
    )
    kept = (merged != 0).float()
    assert abs(kept.mean().item() - 0.4) < 0.01
    assert abs(kept[:, :50].mean().item() - 0.13) < 0.03  # p ~ 0.1 .. 0.16
    assert abs(kept[:, -50:].mean().item() - 0.67) < 0.03  # p ~ 0.64 .. 0.7


# --- sign election ------------------------------------------------------------------------------


def test_elect_sign_sum_versus_count():
    deltas = T([[5.0, -1.0, 0.0], [-1.0, -1.0, 0.0], [-1.0, 3.0, 0.0]])
    assert torch.equal(elect_sign(deltas, "sum"), T([1.0, 1.0, 1.0]))  # mass wins; 0 -> +1
    assert torch.equal(elect_sign(deltas, "count"), T([-1.0, -1.0, 1.0]))  # head count wins
    agree = agreement_mask(deltas, elect_sign(deltas, "sum"))
    assert agree.tolist() == [[True, False, False], [False, False, False], [False, True, False]]


# --- methods: hand-computed ---------------------------------------------------------------------

BASE4 = T([1.0, 1.0, 1.0, 1.0])
A4 = T([2.0, 0.0, 1.0, 3.0])  # delta [1, -1, 0, 2]
B4 = T([1.0, 3.0, 0.0, 1.0])  # delta [0, 2, -1, 0]


def test_linear_hand_computed():
    a, b = T([1.0, 2.0, 3.0]), T([3.0, 2.0, 1.0])
    assert torch.equal(merge("linear", [a, b], per_model=weights(1.0, 3.0)), T([2.5, 2.0, 1.5]))
    assert torch.equal(
        merge("linear", [a, b], per_model=weights(1.0, 3.0), normalize=False), T([10.0, 8.0, 6.0])
    )
    # A base tensor passed to linear is ignored (it only supplies config files).
    assert torch.equal(
        merge("linear", [a, b], T([9.0, 9, 9]), weights(1.0, 3.0)), T([2.5, 2.0, 1.5])
    )


def test_linear_weight_one_returns_that_model_and_zero_sum_is_an_error():
    a, b = T([1.0, -2.0, 3.5]), T([7.0, 0.5, -1.0])
    assert torch.equal(merge("linear", [a, b], per_model=weights(0.0, 1.0)), b)
    assert torch.equal(merge("linear", [a], per_model=weights(2.5)), a)
    with pytest.raises(MergeError, match="`weight`"):
        merge("linear", [a, b], per_model=weights(1.0, -1.0))


def test_task_arithmetic_hand_computed():
    result = merge("task_arithmetic", [A4, B4], BASE4, weights(0.5, 1.0))
    assert torch.equal(result, T([1.5, 2.5, 0.0, 2.0]))  # base + [0.5, 1.5, -1, 1]
    normalized = merge("task_arithmetic", [A4, B4], BASE4, weights(0.5, 1.0), normalize=True)
    torch.testing.assert_close(normalized, BASE4 + T([0.5, 1.5, -1.0, 1.0]) / 1.5)
    scaled = merge("task_arithmetic", [A4, B4], BASE4, weights(0.5, 1.0), **{"lambda": 2.0})
    assert torch.equal(scaled, T([2.0, 4.0, -1.0, 3.0]))
    # Weights summing to 0 are not divided by (mergekit treats |sum| < 1e-8 as 1).
    zero = merge("task_arithmetic", [A4, B4], BASE4, weights(1.0, -1.0), normalize=True)
    assert torch.equal(zero, BASE4 + T([1.0, -3.0, 1.0, 2.0]))


def test_ties_hand_computed():
    base = torch.zeros(4)
    a, b = T([4.0, -3.0, 1.0, -0.5]), T([-2.0, 1.0, 2.0, 3.0])
    # trim (density 0.5): a -> [4, -3, 0, 0]; b -> [-2, 0, 0, 3] (tie |-2| = |2|: lower index).
    # weights 1, 3: [4, -3, 0, 0] and [-6, 0, 0, 9]; elected signs [-, -, +, +].
    per_model = weights(1.0, 3.0, density=0.5)
    assert torch.equal(merge("ties", [a, b], base, per_model), T([-2.0, -3.0, 0.0, 3.0]))
    assert torch.equal(
        merge("ties", [a, b], base, per_model, normalize=False), T([-6.0, -3.0, 0.0, 9.0])
    )
    # With equal weights the elected signs are [+, -, +, +].
    assert torch.equal(
        merge("ties", [a, b], base, weights(1.0, 1.0, density=0.5)), T([4.0, -3.0, 0.0, 3.0])
    )
    # int8_mask only saves memory in mergekit: same numbers.
    assert torch.equal(
        merge("ties", [a, b], base, per_model, int8_mask=True),
        merge("ties", [a, b], base, per_model),
    )


def test_ties_rescale_and_lambda():
    base = torch.zeros(4)
    a = T([4.0, -3.0, 1.0, -0.5])
    out = merge("ties", [a], base, weights(2.0, density=0.5), rescale=True, **{"lambda": 0.5})
    # trim -> [4, -3, 0, 0] * 8.5/7; weight 2 then normalised by 2; lambda 0.5.
    torch.testing.assert_close(out, T([4.0, -3.0, 0.0, 0.0]) * (8.5 / 7.0) * 0.5)


def test_breadcrumbs_and_breadcrumbs_ties_hand_computed():
    base = torch.zeros(5)
    a = T([5.0, -1.0, 3.0, -4.0, 2.0])
    b = T([-1.0, -2.0, -3.0, 4.0, 0.5])
    per_model = weights(1.0, 1.0, density=0.6, gamma=0.2)
    # a -> [0, 0, 3, -4, 2]; b (|.| 1, 2, 3, 4, 0.5) -> drop 4 and 0.5 -> [-1, -2, -3, 0, 0]
    assert torch.equal(
        merge("breadcrumbs", [a, b], base, per_model), T([-1.0, -2.0, 0.0, -4.0, 2.0])
    )
    # Sign election: sums [-1, -2, 0, -4, 2] -> signs [-, -, +, -, +]; normalize is off by default.
    assert torch.equal(
        merge("breadcrumbs_ties", [a, b], base, per_model), T([-1.0, -2.0, 3.0, -4.0, 2.0])
    )
    assert torch.equal(
        merge(
            "breadcrumbs_ties",
            [a, b],
            base,
            weights(2.0, 1.0, density=0.6, gamma=0.2),
            normalize=True,
        ),
        T([-1.0, -2.0, 3.0, -4.0, 2.0]),
    )


def test_dare_reproducible_from_generator():
    base, a = torch.zeros(6), T([1.0, -2.0, 3.0, -4.0, 5.0, -6.0])
    out = merge("dare_linear", [a], base, weights(1.0, density=0.5), rescale=False, seed=7)
    # the mask is uniform draws below the density, from the given generator only
    keep = torch.rand(6, generator=torch.Generator().manual_seed(7)) < 0.5
    assert torch.equal(out, a * keep)


def test_sce_hand_computed():
    base = torch.zeros(3)
    a, b = T([1.0, -2.0, 0.5]), T([3.0, 1.0, -0.5])
    # mean squares 21/12 and 41/12 -> weights 21/62, 41/62; signs [+, -, +].
    torch.testing.assert_close(merge("sce", [a, b], base), T([72 / 31, -2.0, 0.5]))
    # Variances over models [1, 2.25, 0.25]; top 50% of 3 nonzero -> int(1.5) = 1 entry.
    torch.testing.assert_close(merge("sce", [a, b], base, select_topk=0.5), T([0.0, -2.0, 0.0]))
    # top 70% -> 2 entries [0, 1]; weights from the masked vectors: 1/3 and 2/3.
    torch.testing.assert_close(merge("sce", [a, b], base, select_topk=0.7), T([7 / 3, -2.0, 0.0]))
    selection = sce_selection_mask(torch.stack([a, b]), 0.7)
    assert selection.tolist() == [True, True, False]


def test_sce_single_model_selects_nothing_like_mergekit():
    # With one model every variance is 0, so select_topk < 1 keeps nothing: the base comes back.
    base, a = T([1.0, 2.0]), T([3.0, -1.0])
    assert torch.equal(merge("sce", [a], base, select_topk=0.5), base)
    assert torch.equal(merge("sce", [a], base), a)


# --- methods: properties ------------------------------------------------------------------------


def _random_sources(count: int, shape=(16, 24), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    return base, [base + torch.randn(shape, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("name", [*GTA_METHODS, "linear", "sce"])
def test_identical_models_return_the_model(name):
    base, (model,) = _random_sources(1)
    per_model = [{} for _ in range(3)] if name == "sce" else weights(0.2, 0.3, 0.5)
    out = merge(name, [model, model, model], base, per_model)
    torch.testing.assert_close(out, model)


@pytest.mark.parametrize("name", [*GTA_METHODS, "sce"])
def test_no_sources_returns_base_and_source_equal_to_base_adds_nothing(name):
    base, (model,) = _random_sources(1)
    assert torch.equal(merge(name, [], base, []), base)
    if name != "sce":
        # A source equal to the base has a zero task vector.
        out = merge(name, [model, base], base, weights(1.0, 1.0))
        torch.testing.assert_close(out, merge(name, [model], base, weights(1.0)))


@pytest.mark.parametrize("normalize", [False, True])
def test_ties_at_full_density_without_conflict_is_task_arithmetic(normalize):
    base = torch.randn(8, 8, generator=torch.Generator().manual_seed(3))
    deltas = [torch.rand(8, 8, generator=torch.Generator().manual_seed(s)) + 0.1 for s in (4, 5)]
    models = [base + d for d in deltas]
    per_model = weights(0.3, 0.9)
    ties = merge("ties", models, base, per_model, normalize=normalize)
    ta = merge("task_arithmetic", models, base, per_model, normalize=normalize)
    torch.testing.assert_close(ties, ta)


def test_dare_and_della_at_full_density_are_deterministic():
    base, models = _random_sources(3)
    per_model = weights(0.2, 0.5, 0.3)
    assert torch.equal(
        merge("dare_linear", models, base, per_model),
        merge("task_arithmetic", models, base, per_model),
    )
    assert torch.equal(
        merge("dare_ties", models, base, per_model),
        merge("ties", models, base, per_model, normalize=False),
    )
    assert torch.equal(
        merge("della", models, base, per_model), merge("ties", models, base, per_model)
    )


@pytest.mark.parametrize("name", RANDOM_METHODS)
def test_random_methods_same_seed_same_output_other_seed_differs(name):
    base, models = _random_sources(2)
    per_model = weights(0.5, 0.5, density=0.5)
    first = merge(name, models, base, per_model, seed=1)
    assert torch.equal(first, merge(name, models, base, per_model, seed=1))
    assert not torch.equal(first, merge(name, models, base, per_model, seed=2))
    with pytest.raises(MergeError, match="generator"):
        merge(name, models, base, per_model, seed=None)


def test_inputs_are_not_modified():
    base, models = _random_sources(2)
    copies = [base.clone(), *(m.clone() for m in models)]
    for name in GTA_METHODS:
        merge(name, models, base, weights(0.5, 0.5, density=0.5))
    merge("sce", models, base, select_topk=0.5)
    for before, after in zip(copies, [base, *models]):
        assert torch.equal(before, after)


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(MergeError, match="shape"):
        task_vectors([torch.zeros(3, 4)], torch.zeros(4, 4), "embed_tokens.weight")
    with pytest.raises(MergeError, match="model.layers.0.weight"):
        merge("ties", [torch.zeros(5, 2)], torch.zeros(4, 2), weights(1.0))
    with pytest.raises(MergeError, match="shape"):
        merge("linear", [torch.zeros(5, 2), torch.zeros(4, 2)], per_model=weights(1.0, 1.0))


def test_ties_top_k_selection_matches_stable_sort_on_large_tied_tensor():
    # bfloat16 checkpoints give many exactly equal magnitudes at the threshold.
    delta = torch.randint(-20, 21, (300, 400), generator=torch.Generator().manual_seed(9)).float()
    k = int(0.37 * delta.numel())
    expected = torch.where(stable_top_k(delta.abs(), k), delta, torch.zeros(()))
    assert torch.equal(magnitude_prune_(delta.clone(), 0.37, False), expected)


# --- differential: mergekit (skipped unless importable) -----------------------------------------


@pytest.mark.parametrize(
    ("name", "per_model", "global_params"),
    [
        ("task_arithmetic", weights(0.5, 0.3, -0.2), {"lambda": 1.3}),
        (
            "ties",
            [
                {"weight": 0.5, "density": 0.3},
                {"weight": 0.3, "density": 0.7},
                {"weight": 1.0, "density": 0.5},
            ],
            {},
        ),
        ("ties", weights(0.4, 0.3, 1.0, density=0.4), {"rescale": True, "normalize": False}),
        ("breadcrumbs", weights(0.5, 0.3, 1.0, density=0.3, gamma=0.05), {}),
        (
            "breadcrumbs_ties",
            weights(0.5, 0.3, 1.0, density=0.6, gamma=0.1),
            {"rescale": True, "normalize": True},
        ),
        ("della", weights(0.5, 0.3, 1.0), {}),
        ("sce", [{}, {}, {}], {"select_topk": 0.3}),
    ],
)
def test_matches_mergekit(name, per_model, global_params, mergekit_registry):
    registry = mergekit_registry
    from mergekit.merge_methods.base import TensorGroup

    # Continuous random values: no magnitude ties, where mergekit's unstable sort is arbitrary.
    base, models = _random_sources(3, shape=(32, 48))
    method = registry.get(name)
    params = dict(global_params)
    for spec in method.spec.parameters:
        if spec.scope.value == "non_base":
            params[spec.name] = {
                i + 1: p.get(spec.name, spec.default) for i, p in enumerate(per_model)
            }
        else:
            params.setdefault(spec.name, spec.default)
    expected = method.merge_group(TensorGroup.from_tensors([base, *models], base_index=0), **params)
    torch.testing.assert_close(merge(name, models, base, per_model, **global_params), expected)


def test_largest_mask_bracket_path_matches_stable_sort_on_bfloat16_magnitudes():
    # bf16-rounded magnitudes: many exact ties inside the sampled bracket (the fast path).
    generator = torch.Generator().manual_seed(7)
    values = torch.randn(300_000, generator=generator).bfloat16().float().abs()
    for k in (1, 1_000, 150_000, 299_999):
        assert torch.equal(largest_mask(values, k), stable_top_k(values, k))
