"""Merged weights plus per-task modulators: TALL masks and EMR merging, their folder format
(bit-packed masks, rescalers, checksums), applying and exporting one task, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import mergelab
from mergelab.errors import CheckpointError
from mergelab.methods import get_method
from mergelab.methods.emr import elect_unified, emr_rescalers, emr_tensor
from mergelab.methods.registry import TensorMerge, resolve_defaults
from mergelab.methods.tall_masks import tall_mask_tensor
from mergelab.modulators import ModulatedFolder, export_task, pack_mask, unpack_mask
from mergelab.modulators.format import task_names


def job(method: str, base: torch.Tensor, tensors: list[torch.Tensor], **params) -> TensorMerge:
    declared = get_method(method)
    return TensorMerge(
        tensors=tensors, base=base, model_params=[{} for _ in tensors],
        params=resolve_defaults(declared.global_params, params), name="layers.0.weight",
    )  # fmt: skip


# --------------------------------------------------------------------------- bit packing


def test_masks_pack_least_significant_bit_first() -> None:
    mask = torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.tolist() == [0b00001101, 1]
    assert torch.equal(unpack_mask(packed, (9,)), mask)
    with pytest.raises(CheckpointError, match=r"needs 2 uint8 bytes"):
        unpack_mask(packed[:1], (3, 3))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 7), min_size=1, max_size=3), st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(shape: list[int], seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) > 0.5
    packed = pack_mask(mask)
    assert packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, tuple(shape)), mask)


def test_task_names_are_file_safe_and_unique() -> None:
    assert task_names(["./zoo/ft-a", "/x/ft-a/", "my model", "a+b"]) == [
        "ft-a", "ft-a-2", "my_model", "a_b"
    ]


# --------------------------------------------------------------------------- EMR and TALL kernels


def test_emr_hand_computed() -> None:
    tau = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]])
    # sum [4, -1, -0.5] -> sign [+, -, -]; task 0 agrees on entries 0, 1; task 1 on 0, 2
    unified, masks = elect_unified(tau)
    assert torch.equal(unified, torch.tensor([3.0, -2.0, -1.0]))
    assert masks.tolist() == [[True, True, False], [True, False, True]]
    result = emr_tensor(job("emr", torch.zeros(3), list(tau)))
    # rescalers: mean |tau_0| = 3.5/3 over mean |m_0 tau_uni| = 5/3; task 1: (5/3) / (4/3)
    assert emr_rescalers(result.sums) == pytest.approx([0.7, 1.25])
    assert torch.equal(result.merged, unified)


def test_emr_zero_sum_elects_the_negative_sign_and_empty_tasks_rescale_to_zero() -> None:
    unified, masks = elect_unified(torch.tensor([[1.0], [-1.0]]))
    assert unified.tolist() == [-1.0] and masks.tolist() == [[False], [True]]
    assert emr_rescalers([{"task_magnitude": 1.0, "masked_magnitude": 0.0}]) == [0.0]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_emr_identical_models_restore_the_model(count: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(4, 3, generator=gen)
    model = base + torch.randn(4, 3, generator=gen)
    result = emr_tensor(job("emr", base, [model] * count))
    (rescaler, *_) = emr_rescalers(result.sums)
    restored = base + rescaler * torch.where(result.masks[0], result.merged - base, 0.0)
    assert rescaler == pytest.approx(1.0)
    assert torch.allclose(restored, model, atol=1e-6)


def test_tall_masks_hand_computed_and_a_single_model_is_restored() -> None:
    base = torch.zeros(3)
    a, b = torch.tensor([1.0, 0.2, 0.0]), torch.tensor([1.0, -1.0, 0.0])
    result = tall_mask_tensor(job("tall_masks", base, [a, b], mask_lambda=0.5))
    # merged task vector [2, -0.8, 0]: a keeps entry 0 (1 > 0.5), not 1 (0.2 > 0.5 * 1.0 no);
    # b keeps 0 and 1 (1 > 0.5 * 0.2); nobody keeps the zero entry
    assert torch.equal(result.merged, torch.tensor([2.0, -0.8, 0.0]))
    assert [m.tolist() for m in result.masks] == [[True, False, False], [True, True, False]]
    alone = tall_mask_tensor(job("tall_masks", base, [a]))
    assert torch.equal(torch.where(alone.masks[0], alone.merged, 0.0), a)


# --------------------------------------------------------------------------- folders on disk


def _model(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.mlp.weight": scale * torch.randn(6, 5, generator=gen),
        "model.layers.1.mlp.weight": scale * torch.randn(6, 5, generator=gen),
        "model.norm.weight": scale * torch.randn(5, generator=gen),
        "model.position_ids": torch.arange(7),
    }


@pytest.fixture()
def zoo(tmp_path: Path) -> dict[str, Path]:
    base = _model(0)
    folders = {}
    for name, seed in (("base", 0), ("ft-a", 1), ("ft-b", 2)):
        sd = base if name == "base" else {
            k: v + 0.1 * _model(seed)[k] if v.is_floating_point() else v for k, v in base.items()
        }
        folder = tmp_path / name
        folder.mkdir()
        save_file(sd, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
        folders[name] = folder
    return folders


def _config(method: str, zoo: dict[str, Path], **params) -> dict:
    return {
        "merge_method": method,
        "base_model": str(zoo["base"]),
        "models": [{"model": str(zoo["ft-a"])}, {"model": str(zoo["ft-b"])}],
        "parameters": params,
    }


def _load(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_emr_merge_writes_shared_weights_masks_and_rescalers(tmp_path, zoo) -> None:
    out = tmp_path / "merged"
    from mergelab.api import close_plan

    plan = mergelab.plan_merge(_config("emr", zoo))
    close_plan(plan)
    assert any("modulators (bit-packed masks) in modulators/" in n for n in plan.notes)
    report = mergelab.merge(_config("emr", zoo), out, progress=False)
    assert any("per-task modulators of 2 task(s)" in n for n in report.notes)
    manifest = json.loads((out / "modulators" / "modulators.json").read_text())
    assert manifest["format"] == "mergelab-modulators" and manifest["method"] == "emr"
    assert [t["name"] for t in manifest["tasks"]] == ["ft-a", "ft-b"]
    assert manifest["base"]["path"] == str(zoo["base"].resolve())
    assert "model.position_ids" not in manifest["tensors"]  # integer buffers take no mask

    sds = {k: _load(v) for k, v in zoo.items()}
    names = [n for n in sds["base"] if sds["base"][n].is_floating_point()]
    base = {n: sds["base"][n] for n in names}
    taus = {t: {n: sds[t][n] - base[n] for n in names} for t in ("ft-a", "ft-b")}
    unified, masks, terms = {}, {}, {"ft-a": [0.0, 0.0], "ft-b": [0.0, 0.0]}
    for n in names:
        unified[n], stacked = elect_unified(torch.stack([taus["ft-a"][n], taus["ft-b"][n]]))
        for i, t in enumerate(("ft-a", "ft-b")):
            masks[t, n] = stacked[i]
            terms[t][0] += float(taus[t][n].abs().mean())
            terms[t][1] += float(torch.where(stacked[i], unified[n], 0.0).abs().mean())
    merged = _load(out)
    for n in names:
        torch.testing.assert_close(merged[n], base[n] + unified[n])
    assert torch.equal(merged["model.position_ids"], sds["base"]["model.position_ids"])
    # the masks on disk are the elected ones, one bit each
    stored = load_file(str(out / "modulators" / "ft-b" / "masks.safetensors"))
    for n in names:
        assert torch.equal(unpack_mask(stored[n], tuple(base[n].shape)), masks["ft-b", n])
        assert stored[n].numel() == (base[n].numel() + 7) // 8

    with ModulatedFolder(out) as folder:
        for task in ("ft-a", "ft-b"):
            rescaler = terms[task][0] / terms[task][1]
            assert folder.task(task).rescaler == pytest.approx(rescaler)
            dense = folder.state_dict(task)
            for n in names:
                expected = base[n] + rescaler * torch.where(masks[task, n], unified[n], 0.0)
                torch.testing.assert_close(dense[n], expected)
    # in memory, a modulated method gives its shared weights
    in_memory = mergelab.merge_state_dicts(
        {**_config("emr", zoo), "base_model": "base",
         "models": [{"model": "ft-a"}, {"model": "ft-b"}]}, sds,
    )  # fmt: skip
    for n in names:
        torch.testing.assert_close(in_memory[n], merged[n])


def test_export_writes_one_tasks_plain_dense_checkpoint(tmp_path, zoo) -> None:
    out = tmp_path / "merged"
    mergelab.merge(_config("tall_masks", zoo, mask_lambda=0.3), out, progress=False)
    exported = export_task(out, "ft-a", tmp_path / "ft-a-dense")
    assert sorted(p.name for p in exported.iterdir()) == ["config.json", "model.safetensors"]
    with ModulatedFolder(out) as folder:
        expected = folder.state_dict("ft-a")
    dense = _load(exported)
    assert dense.keys() == expected.keys()
    for n, tensor in dense.items():
        assert torch.equal(tensor, expected[n])
    # a lone fine-tune's TALL mask gives it back exactly: |tau| > 0.3 |tau - tau| wherever tau != 0
    single = tmp_path / "single"
    mergelab.merge({**_config("tall_masks", zoo), "models": [{"model": str(zoo["ft-a"])}]},
                   single, progress=False)  # fmt: skip
    restored = export_task(single, "ft-a", tmp_path / "restored")
    original = _load(zoo["ft-a"])
    for n, tensor in _load(restored).items():
        torch.testing.assert_close(tensor, original[n])


def test_modulators_for_another_model_or_base_and_unknown_tasks_are_refused(tmp_path, zoo):
    out = tmp_path / "merged"
    mergelab.merge(_config("emr", zoo), out, progress=False)
    with pytest.raises(CheckpointError, match="none is named 'ft-c'"):
        export_task(out, "ft-c", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # another base with the same tensors: found when its tensors are read
    other_base = tmp_path / "other-base"
    other_base.mkdir()
    save_file(_model(9), str(other_base / "model.safetensors"))
    with pytest.raises(CheckpointError, match="differs from the one the modulators"):
        export_task(out, "ft-a", tmp_path / "y", base=other_base)
    assert not (tmp_path / "y").exists()
    # a base of another shape: found on opening, before any tensor is read
    small = tmp_path / "small-base"
    small.mkdir()
    save_file({k: v[:2] for k, v in _model(0).items()}, str(small / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"has shape \[2, 5\] in the base"):
        ModulatedFolder(out, base=small)
    # the shared weights replaced by another merge's
    other = tmp_path / "other"
    mergelab.merge(_config("magmax", zoo), other, progress=False)
    (out / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="merged checkpoint .* differs"):
        ModulatedFolder(out).state_dict("ft-a")
    with pytest.raises(CheckpointError, match="holds no modulators"):
        ModulatedFolder(other)


def test_modulators_cli_show_and_export(tmp_path, zoo) -> None:
    from typer.testing import CliRunner

    from mergelab.cli import app

    out = tmp_path / "merged"
    mergelab.merge(_config("emr", zoo), out, progress=False)
    runner = CliRunner()
    shown = runner.invoke(app, ["modulators", "show", str(out)])
    assert shown.exit_code == 0, shown.output
    assert "ft-a" in shown.output and "rescaler" in shown.output
    bad = runner.invoke(app, ["modulators", "export", str(out), "--task", "nope",
                              "--out", str(tmp_path / "e")])  # fmt: skip
    assert bad.exit_code == 1 and "none is named 'nope'" in bad.output
    good = runner.invoke(app, ["modulators", "export", str(out), "--task", "ft-b",
                               "--out", str(tmp_path / "e")])  # fmt: skip
    assert good.exit_code == 0, good.output
    assert (tmp_path / "e" / "model.safetensors").is_file()


def test_in_memory_modulated_merge_matches_the_folder(tmp_path, zoo) -> None:
    sds = {k: _load(v) for k, v in zoo.items()}
    config = {**_config("emr", zoo), "base_model": "base",
              "models": [{"model": "ft-a"}, {"model": "ft-b"}]}  # fmt: skip
    result = mergelab.merge_modulated(config, sds)
    assert result.tasks == ["ft-a", "ft-b"]
    out = tmp_path / "merged"
    mergelab.merge(_config("emr", zoo), out, progress=False)
    with ModulatedFolder(out) as folder:
        for task in result.tasks:
            assert result.rescalers[task] == pytest.approx(folder.task(task).rescaler)
            on_disk = folder.state_dict(task)
            for name, tensor in result.task_state_dict(task).items():
                torch.testing.assert_close(tensor, on_disk[name])
    assert result.extra_bytes_per_task() == 2 * ((30 + 7) // 8) + (5 + 7) // 8 + 4
    with pytest.raises(mergelab.ConfigError, match="has no per-task modulators"):
        mergelab.merge_modulated({**config, "merge_method": "magmax"}, sds)


def reference_emr(task_vectors: list[dict[str, torch.Tensor]]):
    """EMR as FusionBench's `emr_merge` (fusion_bench/method/emr_merging/utils.py) computes it,
    written out here loop by loop: (unified vector, masks per tensor, rescalers)."""
    names = list(task_vectors[0])
    unified, masks = {}, {}
    scales = [0.0] * len(task_vectors)
    for n in names:
        flag = (sum(tv[n] for tv in task_vectors) > 0).to(torch.float64) * 2 - 1
        largest = torch.zeros_like(task_vectors[0][n])
        masks[n] = []
        for i, tv in enumerate(task_vectors):
            mask = tv[n] * flag > 0
            masks[n].append(mask)
            largest = torch.where((mask * tv[n]).abs() > largest, (mask * tv[n]).abs(), largest)
            scales[i] += float(tv[n].abs().mean())
        unified[n] = largest * flag
    masked = [sum(float((unified[n] * masks[n][i]).abs().mean()) for n in names)
              for i in range(len(task_vectors))]  # fmt: skip
    return unified, masks, [s / m for s, m in zip(scales, masked, strict=True)]


def test_emr_matches_the_reference_algorithm() -> None:
    gen = torch.Generator().manual_seed(5)
    shapes = {"a": (4, 6), "b": (7,), "c": (3, 2, 2)}
    tvs = [{n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
           for _ in range(3)]  # fmt: skip
    for tv, value in zip(tvs, (1.0, -2.0, 1.0), strict=True):  # a zero sum: the negative sign
        tv["b"][0] = value
    unified, masks, rescalers = reference_emr(tvs)
    totals = [dict() for _ in tvs]
    for n, shape in shapes.items():
        result = emr_tensor(job("emr", torch.zeros(shape, dtype=torch.float64), [tv[n] for tv in tvs]))
        assert torch.equal(result.merged, unified[n])
        for i in range(3):
            assert torch.equal(result.masks[i], masks[n][i])
            for key, value in result.sums[i].items():
                totals[i][key] = totals[i].get(key, 0.0) + value
    assert emr_rescalers(totals) == pytest.approx(rescalers, rel=1e-12)
