"""The seconds-long MLP zoo: deterministic, the fine-tunes carry real skills, the cache is safe."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from mergelab.errors import MergeLabError
from mergelab.eval.harness import evaluate_model
from mergelab.training import DONE_MARKER
from mergelab_bench.zoo.cache import (
    MANIFEST,
    ZooCacheError,
    read_entry,
    state_dict_delta,
    with_base,
)
from mergelab_bench.zoo.mlp import MLPZoo, MLPZooSettings
from mergelab_bench.zoo.registry import get_zoo


@pytest.fixture(scope="module")
def zoos():
    zoo = MLPZoo()
    return {recipe: zoo.build(recipe=recipe, seed=0) for recipe in zoo.recipes}


def test_registry_finds_the_mlp_zoo_and_rejects_unknown_names():
    assert isinstance(get_zoo("mlp"), MLPZoo)
    with pytest.raises(MergeLabError, match="unknown zoo 'nope'; known zoos: .*mlp"):
        get_zoo("nope")


def test_build_is_deterministic_and_same_keys(zoos):
    again = MLPZoo().build(recipe="joint", seed=0)
    built = zoos["joint"]
    for task in built.tasks:
        assert set(built.finetuned[task]) == set(built.pretrained)
        for key, value in built.finetuned[task].items():
            assert torch.equal(value, again.finetuned[task][key])
        assert torch.equal(built.heads[task].weight, again.heads[task].weight)
    other_seed = MLPZoo().build(recipe="joint", seed=1)
    assert not torch.equal(other_seed.finetuned["parity"]["fc1.weight"], built.finetuned["parity"]["fc1.weight"])


def test_recipes_differ_in_the_head(zoos):
    lpft, joint = zoos["lpft"], zoos["joint"]
    for task in lpft.tasks:
        # LP-FT fine-tunes under the frozen probe: the task head *is* the probe.
        assert torch.equal(lpft.heads[task].weight, lpft.probe_heads[task].weight)
        assert not torch.equal(joint.heads[task].weight, joint.probe_heads[task].weight)
        assert not torch.equal(lpft.finetuned[task]["fc2.weight"], lpft.pretrained["fc2.weight"])
    # Same pretrained trunk and probes whatever the recipe.
    assert torch.equal(lpft.pretrained["fc1.weight"], joint.pretrained["fc1.weight"])


def test_each_finetune_beats_the_linear_probe_on_its_task(zoos):
    for built in zoos.values():
        ev = built.evaluator
        probe = evaluate_model(ev, built.pretrained, built.probe_heads)
        for task in built.tasks:
            own = ev.accuracy(built.finetuned[task], built.heads[task], task, "test")
            assert own > probe[task] + 0.02, (built.recipe, task, own, probe[task])
            assert 0.5 < probe[task] < 0.97  # the probe is a real but beatable baseline


def test_evaluator_rejects_unknown_task_split_and_mismatched_head(zoos):
    built = zoos["lpft"]
    ev = built.evaluator
    with pytest.raises(MergeLabError, match="unknown task 'nope'"):
        ev.accuracy(built.pretrained, built.heads["parity"], "nope", "test")
    with pytest.raises(MergeLabError, match="unknown split 'dev'"):
        ev.accuracy(built.pretrained, built.heads["parity"], "parity", "dev")
    with pytest.raises(MergeLabError, match="outputs 3 classes; the task has 2"):
        ev.accuracy(built.pretrained, built.heads["mod3"], "parity", "test")
    with pytest.raises(MergeLabError, match="outputs 3 classes"):
        evaluate_model(ev, built.pretrained, {"parity": nn.Linear(32, 3)})


def test_bad_recipe_and_task_names():
    with pytest.raises(MergeLabError, match="unknown recipe 'x'"):
        MLPZoo().build(recipe="x", seed=0)
    with pytest.raises(MergeLabError, match="unknown task"):
        MLPZoo(MLPZooSettings(tasks=("parity", "colour")))


def test_delta_round_trip_shares_frozen_tensors():
    base = {"a": torch.ones(2), "b": torch.zeros(3)}
    tuned = {"a": torch.ones(2), "b": torch.tensor([0.0, 1.0, 0.0])}
    delta = state_dict_delta(tuned, base)
    assert list(delta) == ["b"]
    restored = with_base(delta, base)
    assert restored["a"] is base["a"] and torch.equal(restored["b"], tuned["b"])
    with pytest.raises(ZooCacheError, match="lacks"):
        with_base({"c": torch.ones(1)}, base)


# --- the disk cache ------------------------------------------------------------------------------


def _entry(root: Path) -> Path:
    (folder,) = [p for p in root.iterdir() if not p.name.startswith(".")]
    return folder


def test_disk_cache_reloads_identical_zoo(tmp_path):
    first = MLPZoo(cache_root=tmp_path).build(recipe="lpft", seed=0)
    folder = _entry(tmp_path)
    assert (folder / DONE_MARKER).is_file()
    stamp = (folder / MANIFEST).stat().st_mtime_ns
    second = MLPZoo(cache_root=tmp_path).build(recipe="lpft", seed=0)
    assert (folder / MANIFEST).stat().st_mtime_ns == stamp  # loaded, not rebuilt
    for task in first.tasks:
        for key, value in first.finetuned[task].items():
            assert torch.equal(value, second.finetuned[task][key])


def test_corrupt_cache_file_is_a_clear_error(tmp_path):
    MLPZoo(cache_root=tmp_path).build(recipe="lpft", seed=0)
    folder = _entry(tmp_path)
    victim = folder / "parity.encoder.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ZooCacheError, match=r"parity\.encoder\.safetensors does not match its checksum"):
        MLPZoo(cache_root=tmp_path).build(recipe="lpft", seed=0)
    # --rebuild replaces it
    rebuilt = MLPZoo(cache_root=tmp_path).build(recipe="lpft", seed=0, rebuild=True)
    assert "parity" in rebuilt.finetuned
    read_entry(_entry(tmp_path))


def test_truncated_manifest_and_missing_file_are_clear_errors(tmp_path):
    MLPZoo(cache_root=tmp_path).build(recipe="joint", seed=0)
    folder = _entry(tmp_path)
    manifest = (folder / MANIFEST).read_text()
    (folder / MANIFEST).write_text(manifest[: len(manifest) // 2])
    with pytest.raises(ZooCacheError, match="bad manifest.json"):
        MLPZoo(cache_root=tmp_path).build(recipe="joint", seed=0)
    (folder / MANIFEST).write_text(manifest)
    (folder / "loops.head.safetensors").unlink()
    with pytest.raises(ZooCacheError, match="loops.head.safetensors is missing"):
        MLPZoo(cache_root=tmp_path).build(recipe="joint", seed=0)


def test_half_built_entry_is_never_used(tmp_path):
    MLPZoo(cache_root=tmp_path).build(recipe="lpft", seed=0)
    folder = _entry(tmp_path)
    reference = json.loads((folder / MANIFEST).read_text())["files"]
    # Simulate a crash before the completion marker: garbage in place of a finished folder.
    (folder / DONE_MARKER).unlink()
    (folder / "parity.encoder.safetensors").write_bytes(b"half")
    # ...and a leftover temporary folder from another crashed build.
    shutil.copytree(folder, tmp_path / f".{folder.name}.abc.tmp")
    built = MLPZoo(cache_root=tmp_path).build(recipe="lpft", seed=0)
    assert (folder / DONE_MARKER).is_file()
    assert json.loads((folder / MANIFEST).read_text())["files"] == reference  # rebuilt identically
    assert built.finetuned["parity"]["fc1.weight"].shape == (32, 64)
