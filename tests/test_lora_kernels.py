"""Seeded property tests of the pure LoRA kernels (mergelab.lora.kernels)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergelab.lora import kernels

shapes = st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 5), st.integers(0, 2**31 - 1))


def _factors(out: int, fan_in: int, rank: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, fan_in, generator=g), torch.randn(out, rank, generator=g)


@settings(max_examples=40, deadline=None)
@given(shapes, st.floats(-3, 3, allow_nan=False), st.floats(0.1, 4))
def test_cat_of_one_adapter_is_the_adapter(shape, weight, scale):
    out, fan_in, rank, seed = shape
    lora_A, lora_B = _factors(out, fan_in, rank, seed)
    cat_A, cat_B = kernels.concatenate([lora_A], [lora_B], [weight * scale])
    torch.testing.assert_close(cat_B, lora_B)
    torch.testing.assert_close(cat_A, lora_A * weight * scale)
    torch.testing.assert_close(
        kernels.delta_matrix(cat_A, cat_B, 1.0), weight * kernels.delta_matrix(lora_A, lora_B, scale),
        atol=1e-4, rtol=1e-5,
    )


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 4))
def test_cat_is_the_weighted_sum_of_deltas(shape, count):
    out, fan_in, rank, seed = shape
    pairs = [_factors(out, fan_in, rank + i, seed + i) for i in range(count)]
    coefficients = [0.5 + i for i in range(count)]
    cat_A, cat_B = kernels.concatenate([a for a, _ in pairs], [b for _, b in pairs], coefficients)
    assert cat_A.shape[0] == sum(a.shape[0] for a, _ in pairs)
    expected = sum(c * b @ a for (a, b), c in zip(pairs, coefficients))
    torch.testing.assert_close(cat_B @ cat_A, expected, atol=1e-4, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(shapes, st.sampled_from(["linear", "transposed"]), st.data())
def test_fold_rows_equals_rows_of_fold(shape, layout, data):
    out, fan_in, rank, seed = shape
    lora_A, lora_B = _factors(out, fan_in, rank, seed)
    weight_shape = (out, fan_in) if layout == "linear" else (fan_in, out)
    weight = torch.randn(weight_shape, generator=torch.Generator().manual_seed(seed + 1))
    whole = kernels.fold(weight, lora_A, lora_B, 0.7, layout)
    start = data.draw(st.integers(0, weight_shape[0] - 1))
    stop = data.draw(st.integers(start, weight_shape[0]))
    rows = kernels.fold_rows(weight[start:stop], start, lora_A, lora_B, 0.7, layout)
    torch.testing.assert_close(rows, whole[start:stop])


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_factorize_at_full_rank_reconstructs_and_splits_singular_values_evenly(shape):
    out, fan_in, rank, seed = shape
    matrix = torch.randn(out, fan_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    found = kernels.factorize(matrix, min(out, fan_in))
    torch.testing.assert_close(found.lora_B @ found.lora_A, matrix)
    # Balanced: both factors carry sqrt(S), so their row/column norms match.
    torch.testing.assert_close(found.lora_A.norm(dim=1), found.lora_B.norm(dim=0))


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 9))
def test_truncation_error_is_the_spectral_tail(shape, rank):
    out, fan_in, _, seed = shape
    matrix = torch.randn(out, fan_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    found = kernels.factorize(matrix, rank)
    error = kernels.relative_error(matrix, found.lora_B @ found.lora_A)
    assert math.isclose(error, kernels.spectral_tail_error(found.singular_values, found.rank), abs_tol=1e-9)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0, 10, allow_nan=False), min_size=1, max_size=12), st.floats(0.01, 1.0))
def test_energy_rank_is_the_smallest_rank_reaching_the_energy(values, energy):
    spectrum = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    rank = kernels.energy_rank(spectrum, energy)
    total = float(spectrum.square().sum())
    if total == 0:
        assert rank == 0
        return
    kept = float(spectrum[:rank].square().sum()) / total
    assert kept >= energy - 1e-9
    assert rank == 1 or float(spectrum[: rank - 1].square().sum()) / total < energy


def test_randomized_svd_is_reproducible_and_exact_on_low_rank_matrices():
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)
    first = kernels.factorize(matrix, 3, randomized=True, generator=torch.Generator().manual_seed(1))
    again = kernels.factorize(matrix, 3, randomized=True, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first.lora_A, again.lora_A)
    torch.testing.assert_close(first.lora_B @ first.lora_A, matrix, atol=1e-4, rtol=1e-4)


def test_shared_basis_reconstructs_every_delta():
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(12, 2, generator=g) @ torch.randn(2, 9, generator=g) for _ in range(3)]
    shared = kernels.shared_basis(deltas)
    assert shared.basis.shape[1] == 6  # the concatenation's rank: 3 adapters x rank 2
    for delta, coefficient in zip(deltas, shared.coefficients):
        torch.testing.assert_close(shared.basis @ coefficient, delta, atol=1e-4, rtol=1e-4)


def test_conv_delta_matches_a_convolution_of_the_factors():
    # PEFT's Conv2d delta: conv2d(A^T, B)^T; the kernels flatten A instead.
    g = torch.Generator().manual_seed(0)
    lora_A = torch.randn(3, 5, 3, 3, generator=g)
    lora_B = torch.randn(7, 3, 1, 1, generator=g)
    expected = torch.nn.functional.conv2d(lora_A.transpose(0, 1), lora_B).transpose(0, 1) * 0.5
    torch.testing.assert_close(kernels.lora_delta(lora_A, lora_B, 0.5, (7, 5, 3, 3)), expected)
