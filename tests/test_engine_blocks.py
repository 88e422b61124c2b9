"""Blockwise merging of large tensors equals whole-tensor merging, and memory stays bounded."""

from __future__ import annotations

import pytest
import torch

import mergelab.engine.blocks as blocks
from mergelab import merge_state_dicts
from mergelab.engine.blocks import row_blocks
from mergelab.methods import get_method
from mergelab.methods.registry import TensorMerge
from mergelab.methods.sparsify import MagnitudeCutSearch, magnitude_prune_


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 elements, so a 40x16 tensor is merged in 10 blocks of 4 rows."""
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 64)


def _family(dtype=torch.float32, rows=40, cols=16):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(rows, cols, generator=g)
    fts = [base + 0.1 * torch.randn(rows, cols, generator=g) for _ in range(3)]
    # bf16 rounding makes many magnitudes tie exactly: the hard case for top-k selection
    base, fts = base.to(dtype), [f.to(dtype) for f in fts]
    sds = {"base": {"w": base, "b": base[0].clone()}}
    sds.update({f"ft{i}": {"w": f, "b": f[0].clone()} for i, f in enumerate(fts)})
    return sds


def _whole(method: str, sds, params: dict, model_params: list[dict], seed_gen=None):
    m = get_method(method)
    keys = [k for k in sds if k != "base"]
    job = TensorMerge(
        tensors=[sds[k]["w"].float() for k in keys],
        base=sds["base"]["w"].float(),
        model_params=[
            {p.name: p.default for p in m.model_params if p.default is not None} | mp
            for mp in model_params
        ],
        params={p.name: p.default for p in m.global_params if p.default is not None} | params,
        generator=seed_gen,
        name="w",
    )
    return m.kernel(job)


def test_row_blocks_depend_on_shape_only(small_blocks):
    assert row_blocks((40, 16)) == [(i, i + 4) for i in range(0, 40, 4)]
    assert row_blocks((8, 16)) is None  # up to twice the block size: merged whole
    assert row_blocks((1000,)) is not None and row_blocks(()) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("density", [0.3, 0.5, 1.0])
@pytest.mark.parametrize("rescale", [False, True])
def test_ties_blockwise_equals_whole(small_blocks, dtype, density, rescale):
    sds = _family(dtype)
    model_params = [{"weight": w, "density": density} for w in (1.0, 0.5, 0.7)]
    config = {
        "merge_method": "ties",
        "base_model": "base",
        "models": [{"model": f"ft{i}", "parameters": mp} for i, mp in enumerate(model_params)],
        "parameters": {"lambda": 0.8, "rescale": rescale},
        "dtype": "float32",
    }
    merged = merge_state_dicts(config, sds)["w"]
    expected = _whole("ties", sds, {"lambda": 0.8, "rescale": rescale}, model_params)
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("kernels", ["fused", "torch"])
def test_ties_blockwise_skips_the_search_of_a_zero_task_vector_with_the_same_bits(
    small_blocks, monkeypatch, rescale, kernels
):
    """A source equal to the base (a frozen table) skips its magnitude search: the merge has
    the bits the search would have given (signed zeros included), and stays the whole-tensor
    reference's merge."""
    from mergelab.methods import task_arithmetic

    if kernels == "torch":
        monkeypatch.setenv("MERGELAB_KERNELS", "torch")
    sds = _family()
    sds["base"]["w"][0, :4] = -0.0
    sds["ft1"] = {k: v.clone() for k, v in sds["base"].items()}  # a zero task vector
    model_params = [{"weight": w, "density": d} for w, d in ((1.0, 0.3), (0.5, 0.5), (0.7, 0.4))]
    config = {
        "merge_method": "ties", "base_model": "base",
        "models": [{"model": f"ft{i}", "parameters": mp} for i, mp in enumerate(model_params)],
        "parameters": {"lambda": 0.8, "rescale": rescale}, "dtype": "float32",
    }

    def bits(t):
        return t.view(torch.int32)

    skipped = merge_state_dicts(config, sds)["w"]
    searched_calls = []
    with monkeypatch.context() as patch:
        patch.setattr(task_arithmetic, "_zero_task_vectors",
                      lambda access, candidates: searched_calls.append(candidates) or [])
        searched = merge_state_dicts(config, sds)["w"]
    assert searched_calls == [[1]]  # the sample flagged the zero source; here it was searched
    assert torch.equal(bits(skipped), bits(searched))
    expected = _whole("ties", sds, {"lambda": 0.8, "rescale": rescale}, model_params)
    torch.testing.assert_close(skipped, expected, rtol=1e-6, atol=1e-6)
    for name in ("ft0", "ft2"):  # every task vector zero: base + 0 (so -0.0 becomes +0.0)
        sds[name] = {k: v.clone() for k, v in sds["base"].items()}
    skipped = merge_state_dicts(config, sds)["w"]
    with monkeypatch.context() as patch:
        patch.setattr(task_arithmetic, "_zero_task_vectors", lambda access, candidates: [])
        searched = merge_state_dicts(config, sds)["w"]
    assert torch.equal(bits(skipped), bits(searched))
    assert torch.equal(skipped, sds["base"]["w"])


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_entrywise_methods_blockwise_equal_whole(small_blocks, method):
    sds = _family()
    if method == "linear":
        config = {"merge_method": "linear", "models": [{"model": k, "parameters": {"weight": i + 1.0}} for i, k in enumerate(sds)]}
        sd = merge_state_dicts(config, sds)
        expected = sum((i + 1.0) * sds[k]["w"] for i, k in enumerate(sds)) / 10.0
    else:
        config = {"merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 0.5},
                  "models": [{"model": f"ft{i}", "parameters": {"weight": 1.0}} for i in range(3)]}
        sd = merge_state_dicts(config, sds)
        expected = sds["base"]["w"] + 0.5 * sum(sds[f"ft{i}"]["w"] - sds["base"]["w"] for i in range(3))
    torch.testing.assert_close(sd["w"], expected, rtol=1e-5, atol=1e-6)


def test_slerp_blockwise_equals_whole(small_blocks):
    sds = _family()
    config = {"merge_method": "slerp", "base_model": "base", "models": [{"model": "ft0"}], "parameters": {"t": 0.3}}
    merged = merge_state_dicts(config, {"base": sds["base"], "ft0": sds["ft0"]})["w"]
    from mergelab.methods.spherical import slerp

    torch.testing.assert_close(merged, slerp(0.3, sds["base"]["w"], sds["ft0"]["w"]), rtol=1e-5, atol=1e-6)


def test_dare_blockwise_keeps_fraction_rescales_l1_and_is_seeded(small_blocks, monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 4096)
    g = torch.Generator().manual_seed(1)
    base = torch.randn(512, 64, generator=g)
    ft = base + torch.randn(512, 64, generator=g)
    sds = {"base": {"w": base}, "ft": {"w": ft}}
    config = {"merge_method": "dare_linear", "base_model": "base",
              "models": [{"model": "ft", "parameters": {"weight": 1.0, "density": 0.3}}]}
    out = merge_state_dicts(config, sds, seed=5)["w"]
    delta = out - base
    kept = (delta != 0).float().mean().item()
    assert abs(kept - 0.3) < 0.01
    # rescale preserves the task vector's L1 norm over the whole tensor
    torch.testing.assert_close(delta.abs().sum(), (ft - base).abs().sum(), rtol=1e-4, atol=0)
    assert torch.equal(out, merge_state_dicts(config, sds, seed=5)["w"])
    assert not torch.equal(out, merge_state_dicts(config, sds, seed=6)["w"])


def test_cut_search_recovers_when_the_sample_bracket_misses():
    g = torch.Generator().manual_seed(3)
    values = torch.rand(10_000, generator=g)
    # a deliberately unrepresentative sample: only small values, so the first bracket misses
    search = MagnitudeCutSearch(values[values < 0.1][:200], values.numel(), density=0.2, rescale=False)
    passes = 0
    cut = None
    while cut is None:
        passes += 1
        for chunk in values.split(1000):
            search.observe(chunk)
        cut = search.result()
        if cut is None:
            search.widen()
    assert passes > 1
    delta = values.clone()
    cut.apply_(delta)
    expected = magnitude_prune_(values.clone(), 0.2, False)
    assert torch.equal(delta, expected)


def test_blockwise_reads_rows_not_whole_tensors(small_blocks, tmp_path):
    """A blocked tensor is never read whole: get() is not called for it, get_rows() is."""
    from safetensors.torch import save_file

    import mergelab
    from mergelab.checkpoint.reader import CheckpointReader

    sds = _family()
    for k, sd in sds.items():
        (tmp_path / k).mkdir()
        save_file(sd, str(tmp_path / k / "model.safetensors"))
    calls = {"get": [], "rows": 0}
    real_get, real_rows = CheckpointReader.get, CheckpointReader.get_rows

    def get(self, name):
        calls["get"].append(name)
        return real_get(self, name)

    def get_rows(self, name, start, stop):
        calls["rows"] += 1
        return real_rows(self, name, start, stop)

    CheckpointReader.get, CheckpointReader.get_rows = get, get_rows
    try:
        config = {"merge_method": "ties", "base_model": str(tmp_path / "base"),
                  "models": [{"model": str(tmp_path / f"ft{i}"), "parameters": {"weight": 1.0, "density": 0.5}} for i in range(3)]}
        mergelab.merge(config, tmp_path / "out", progress=False)
    finally:
        CheckpointReader.get, CheckpointReader.get_rows = real_get, real_rows
    assert "w" not in calls["get"] and "b" in calls["get"]
    assert calls["rows"] > 0
    merged = mergelab.merge_state_dicts(
        {**config, "base_model": "base", "models": [{"model": f"ft{i}", "parameters": {"weight": 1.0, "density": 0.5}} for i in range(3)]},
        sds,
    )
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(tmp_path / "out" / "model.safetensors"))["w"], merged["w"])


@pytest.mark.parametrize(
    "method,params,model_params,with_base",
    [
        ("passthrough", {}, [{"scale": 0.5}], False),
        ("expo", {"alpha": 0.3}, [{}], True),
        ("magmax", {"lambda": 0.5}, [{}, {}], True),
        ("nearswap", {"t": 0.05}, [{}], True),
    ],
)
def test_other_entrywise_methods_blockwise_equal_whole(small_blocks, method, params, model_params, with_base):
    sds = _family()
    sources = {k: sds[k] for k in ["base", "ft0", "ft1"][: len(model_params) + 1]}
    if not with_base:
        sources = {"ft0": sds["ft0"]}
    models = [{"model": k, "parameters": mp} for k, mp in zip([k for k in sources if k != "base"], model_params)]
    config = {"merge_method": method, "models": models, "parameters": params}
    if with_base:
        config["base_model"] = "base"
    merged = merge_state_dicts(config, sources)["w"]
    m = get_method(method)
    job = TensorMerge(
        tensors=[sources[k]["w"] for k in sources if k != "base"],
        base=sources["base"]["w"] if with_base else None,
        model_params=[{p.name: p.default for p in m.model_params if p.default is not None} | mp for mp in model_params],
        params={p.name: p.default for p in m.global_params if p.default is not None} | params,
        name="w",
    )
    torch.testing.assert_close(merged, m.kernel(job), rtol=1e-6, atol=1e-7)
