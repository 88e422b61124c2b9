"""The fused (numba) kernels of TIES, DARE, breadcrumbs and DELLA equal the torch reference bit
for bit: every comparison below is of the results' bit patterns (so -0 and +0 differ)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mergelab.engine.blocks as blocks
from mergelab import merge_state_dicts
from mergelab.methods import fused, get_method
from mergelab.methods import task_arithmetic as ta
from mergelab.methods.registry import TensorMerge

pytest.importorskip("numba")

METHODS = [
    "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear",
]


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.int32 if tensor.dtype == torch.float32 else torch.int64)


def assert_same_bits(fused_result: torch.Tensor, reference: torch.Tensor) -> None:
    assert fused_result.dtype == reference.dtype and fused_result.shape == reference.shape
    differ = _bits(fused_result) != _bits(reference)
    assert not bool(differ.any()), (
        f"{int(differ.sum())} of {differ.numel()} entries differ, e.g. "
        f"{fused_result[differ][:3].tolist()} vs {reference[differ][:3].tolist()}"
    )


def _family(shape, dtype, models=3, seed=0, ties=True):
    """A base with exact zeros and sources with entries equal to the base (zero task-vector
    entries) and, with `ties`, bfloat16-rounded deltas (many exactly tied magnitudes)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64)
    base.view(-1)[::5] = 0
    sources = []
    for i in range(models):
        delta = 0.01 * torch.randn(shape, generator=g, dtype=torch.float64)
        if ties:
            delta = delta.to(torch.bfloat16).double()
        delta.view(-1)[i::7] = 0
        sources.append((base + delta).to(dtype))
    return sources, base.to(dtype)


def _kernel_pair(name, sources, base, model_params, params, seed=0):
    """(fused, reference) results of `name`'s kernel on the same inputs and seed."""
    method = get_method(name)
    results = []
    for fused_kernels in (None, False):
        generator = torch.Generator().manual_seed(seed) if method.randomized else None
        job = TensorMerge(
            tensors=[s.clone() for s in sources],
            base=base.clone(),
            model_params=[
                {p.name: p.default for p in method.model_params if p.default is not None} | mp
                for mp in model_params
            ],
            params={p.name: p.default for p in method.global_params if p.default is not None}
            | params,
            generator=generator,
            name="w",
            writable=True,
        )
        spec = _SPECS[name]
        results.append(
            ta.generalized_task_arithmetic(
                job, spec[0], spec[1], method.randomized, fused_kernels=fused_kernels
            )
        )
    return results


_SPECS = {
    "task_arithmetic": (None, False),
    "ties": (ta.MAGNITUDE, True),
    "dare_ties": (ta.RANDOM, True),
    "dare_linear": (ta.RANDOM, False),
    "breadcrumbs": (ta.BREADCRUMBS, False),
    "breadcrumbs_ties": (ta.BREADCRUMBS, True),
    "della": (ta.DELLA, True),
    "della_linear": (ta.DELLA, False),
}


def test_declared_kernels_take_the_fused_path(monkeypatch):
    """The registered kernels reach the fused merge (not only the function the tests call)."""
    calls = []
    real = fused.merge
    monkeypatch.setattr(fused, "merge", lambda *a, **k: calls.append(1) or real(*a, **k))
    sources, base = _family((8, 8), torch.float32)
    method = get_method("ties")
    job = TensorMerge(
        tensors=sources, base=base,
        model_params=[{"weight": 1.0, "density": 0.5}] * 3,
        params={p.name: p.default for p in method.global_params if p.default is not None},
    )
    method.kernel(job)
    assert calls


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(), (1,), (7,), (33, 17), (257, 259)])
def test_fused_equals_reference(name, dtype, shape):
    sources, base = _family(shape, dtype)
    model_params = [
        {"weight": 1.0, "density": 0.5, "gamma": 0.01, "epsilon": 0.1},
        {"weight": -0.7, "density": 0.3, "gamma": 0.05, "epsilon": 0.2},
        {"weight": 0.3, "density": 0.85, "gamma": 0.0, "epsilon": 0.1},
    ]
    for params in ({}, {"lambda": 0.6, "normalize": True, "rescale": True},
                   {"normalize": False, "rescale": False}):
        assert_same_bits(*_kernel_pair(name, sources, base, model_params, params))


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("density", [0.0, 1.0, 1e-9, 0.999999])
def test_fused_equals_reference_at_extreme_densities(name, density):
    sources, base = _family((40, 9), torch.float32, models=2)
    model_params = [{"weight": 0.5, "density": density, "gamma": 0.0, "epsilon": 0.0}] * 2
    if name.startswith("della") and 0 < density < 1:
        model_params = [dict(p, epsilon=min(density, 1 - density) / 2) for p in model_params]
    for params in ({}, {"rescale": True, "normalize": True}):
        assert_same_bits(*_kernel_pair(name, sources, base, model_params, params))


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties"])
def test_fused_selection_when_the_sample_bracket_misses(monkeypatch, name):
    """A bracket that misses the threshold falls back to selecting over every entry."""
    sources, base = _family((257, 259), torch.float32)
    monkeypatch.setattr(fused, "bracket_bounds", lambda *a, **k: (0.0, 0.0))
    params = [{"weight": 1.0, "density": 0.4}] * 3
    params = [dict(p, gamma=0.05) for p in params]
    for global_params in ({}, {"rescale": True}):
        assert_same_bits(*_kernel_pair(name, sources, base, params, global_params))


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(METHODS),
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    models=st.integers(1, 4),
    density=st.floats(0.05, 0.95),
    weight=st.floats(-2, 2),
    scale=st.sampled_from([1.0, 0.5, 1.7]),
    normalize=st.booleans(),
    rescale=st.booleans(),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fused_equals_reference_property(
    name, rows, cols, models, density, weight, scale, normalize, rescale, double, seed
):
    dtype = torch.float64 if double else torch.float32
    sources, base = _family((rows, cols), dtype, models=models, seed=seed, ties=seed % 2 == 0)
    epsilon = min(density, 1 - density) / 2
    model_params = [
        {"weight": weight * (i + 1) / models, "density": density, "gamma": 0.02, "epsilon": epsilon}
        for i in range(models)
    ]
    params = {"lambda": scale, "normalize": normalize, "rescale": rescale}
    assert_same_bits(*_kernel_pair(name, sources, base, model_params, params, seed=seed))


def test_reference_path_for_other_dtypes_and_devices(monkeypatch):
    sources, base = _family((4, 4), torch.float32)
    assert fused.available(sources, base)
    assert not fused.available([s.to(torch.bfloat16) for s in sources], base.to(torch.bfloat16))
    assert not fused.available([s.double() for s in sources], base)  # mixed dtypes
    assert not fused.available(sources, None) and not fused.available([], base)
    assert not fused.available(sources, base.requires_grad_())
    monkeypatch.setenv("MERGELAB_KERNELS", "torch")
    assert not fused.available(sources, base.detach())


@pytest.mark.parametrize("name", ["ties", "dare_ties", "dare_linear", "task_arithmetic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rescale", [False, True])
def test_blockwise_fused_equals_blockwise_reference(monkeypatch, name, dtype, rescale):
    """Large tensors merged block by block (the engine's Blockwise forms) give the same bits
    with the fused kernels as with the torch reference."""
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 64)
    sources, base = _family((40, 16), torch.float32, models=3)
    sds = {"base": {"w": base.to(dtype)}} | {
        f"ft{i}": {"w": s.to(dtype)} for i, s in enumerate(sources)
    }
    config = {
        "merge_method": name,
        "base_model": "base",
        "dtype": "float32",
        "parameters": {"rescale": rescale},
        "models": [
            {"model": f"ft{i}", "parameters": {"weight": w, "density": d}}
            for i, (w, d) in enumerate([(0.5, 0.3), (-0.4, 0.6), (0.9, 0.5)])
        ],
    }
    results = []
    for kernels in ("numba", "torch"):
        monkeypatch.setenv("MERGELAB_KERNELS", kernels)
        results.append(merge_state_dicts(config, sds, seed=3)["w"])
    assert_same_bits(results[0], results[1])
