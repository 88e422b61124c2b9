"""mergekit configs that run unchanged: parameters mergekit ignores, every problem at once."""

from __future__ import annotations

import pytest
import torch
from conftest import layered

from mergelab import ConfigError, merge_state_dicts
from mergelab.api import _state_dict_opener, plan_merge
from mergelab.plan.config import parse_config
from mergelab.plan.planner import build_plan

_layered = layered


def _sds() -> dict[str, dict[str, torch.Tensor]]:
    return {"base": _layered([0, 0, 0]), "a": _layered([1, 2, 3], 1.0), "b": _layered([3, 2, 1], 2.0)}


def _plan(raw: dict, sds: dict, *, strict: bool = False):
    return build_plan(parse_config(raw), _state_dict_opener(sds), strict=strict)


IGNORED = [
    # (config, the setting named in the warning)
    ({"merge_method": "model_stock", "base_model": "base",
      "models": [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b"}]},
     "models.0.parameters.weight"),
    ({"merge_method": "sce", "base_model": "base", "parameters": {"normalize": True},
      "models": [{"model": "a"}, {"model": "b"}]}, "parameters.normalize"),
    ({"merge_method": "della", "base_model": "base", "parameters": {"epsilon": 0.05},
      "models": [{"model": "a", "parameters": {"weight": 0.5, "density": 0.5, "lambda": 0.9}},
                 {"model": "b", "parameters": {"weight": 0.5, "density": 0.5}}]},
     "models.0.parameters.lambda"),
]


@pytest.mark.parametrize(("raw", "key"), IGNORED, ids=["model_stock-weight", "sce-normalize", "della-lambda"])
def test_parameters_mergekit_ignores_are_warned_about_and_ignored(raw, key):
    sds = _sds()
    plan = _plan(raw, sds)
    warnings = [n for n in plan.notes if n.startswith(key)]
    assert len(warnings) == 1 and "ignored" in warnings[0] and "--strict" in warnings[0], plan.notes
    # Ignored means ignored: the merge equals the one without the setting.
    merged = merge_state_dicts(raw, sds, seed=3)
    without = _drop(raw, key)
    assert not any(n.startswith(key) for n in _plan(without, sds).notes)
    reference = merge_state_dicts(without, sds, seed=3)
    for name, tensor in reference.items():
        torch.testing.assert_close(merged[name], tensor, rtol=0, atol=0)
    # --strict keeps today's error, naming the key.
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _plan(raw, sds, strict=True)


def _drop(raw: dict, key: str) -> dict:
    import copy

    out = copy.deepcopy(raw)
    parts = key.split(".")
    node = out
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    del node[parts[-1]]
    return out


def test_a_typo_stays_an_error_and_mergelabs_own_methods_stay_strict():
    sds = _sds()
    with pytest.raises(ConfigError, match="desnity: unknown parameter of method `ties`.*`density`"):
        _plan({"merge_method": "ties", "base_model": "base",
               "models": [{"model": "a", "parameters": {"weight": 1, "desnity": 0.5}}]}, sds)
    # interpolation is not a mergekit method: its configs follow mergelab's rules only.
    with pytest.raises(ConfigError, match="`alpha` is a global parameter of `interpolation`"):
        _plan({"merge_method": "interpolation",
               "models": [{"model": "a", "parameters": {"alpha": 0.5}}, {"model": "b"}]}, sds)


def test_every_problem_of_a_config_is_reported_at_once():
    sds = _sds()
    wrong = _layered([1, 2, 3])
    wrong["model.layers.1.mlp.weight"] = torch.zeros(3, 2)
    sds["wrong"] = wrong
    raw = {"merge_method": "ties", "base_model": "base",
           "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 1.5}},
                      {"model": "wrong", "parameters": {"weight": 1.0, "density": 0.5}}]}
    with pytest.raises(ConfigError) as info:
        _plan(raw, sds)
    text = str(info.value)
    # a parameter out of range and a tensor of another shape: both, not only the first
    assert "models.0.parameters.density" in text and "(0, 1]" in text
    assert "model.layers.1.mlp.weight" in text and "differs" in text
    # an unknown method and a source that does not exist: both
    with pytest.raises(ConfigError) as info:
        _plan({"merge_method": "tiess", "models": [{"model": "a"}, {"model": "missing"}]},
              {"a": sds["a"]})
    text = str(info.value)
    assert "unknown merge method 'tiess'" in text and "'missing'" in text


def test_cli_strict_flag(tmp_path):
    from conftest import save_checkpoint
    from typer.testing import CliRunner

    from mergelab.cli import app

    sds = _sds()
    folders = {k: save_checkpoint(tmp_path / k, v) for k, v in sds.items()}
    config = tmp_path / "merge.yml"
    config.write_text(
        f"merge_method: model_stock\nbase_model: {folders['base']}\nmodels:\n"
        f"  - model: {folders['a']}\n    parameters: {{weight: 1.0}}\n  - model: {folders['b']}\n"
    )
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(config)])
    assert ok.exit_code == 0 and "ignored" in ok.output, ok.output
    refused = runner.invoke(app, ["validate", str(config), "--strict"])
    assert refused.exit_code == 1 and "models.0.parameters.weight" in refused.output
    assert plan_merge(config).notes[0].startswith("models.0.parameters.weight")


# ---------------------------------------------------------------- multi-document configs


def _folders(tmp_path):
    from conftest import save_checkpoint

    return {k: save_checkpoint(tmp_path / k, v) for k, v in _sds().items()}


def _load(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


MULTI = """\
merge_method: task_arithmetic
base_model: base
models:
  - model: halfway
    parameters: {weight: 2.0}
  - model: b
    parameters: {weight: 0.5}
---
name: halfway
merge_method: linear
models:
  - {model: a, parameters: {weight: 0.5}}
  - {model: base, parameters: {weight: 0.5}}
"""


def test_stages_run_in_order_into_temporary_folders(tmp_path):
    import mergelab

    _folders(tmp_path)
    config = tmp_path / "multi.yml"
    config.write_text(MULTI)  # the final merge comes first in the file: order follows references
    report = mergelab.merge(config, tmp_path / "out", progress=False)
    sds = _sds()
    out = _load(tmp_path / "out")
    for name, base in sds["base"].items():
        halfway = 0.5 * sds["a"][name] + 0.5 * base
        expected = base + 2.0 * (halfway - base) + 0.5 * (sds["b"][name] - base)
        torch.testing.assert_close(out[name], expected)
    assert any("stage `halfway`: merged 5 tensors with `linear`" in n for n in report.notes)
    # The output records the whole file; nothing of the intermediate stage is left beside it.
    assert (tmp_path / "out" / "mergelab_config.yml").read_text() == MULTI
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "base", "multi.yml", "out"]
    plan = mergelab.plan_merge(config)
    try:
        assert plan.method.name == "task_arithmetic"
        assert any("stage `halfway` runs first (`linear`, 5 tensors)" in n for n in plan.notes)
    finally:
        mergelab.api.close_plan(plan)


def _count_reads(monkeypatch) -> list[str]:
    from mergelab.checkpoint.reader import CheckpointReader

    reads: list[str] = []
    original = CheckpointReader.get

    def get(self, name):
        reads.append(name)
        return original(self, name)

    monkeypatch.setattr(CheckpointReader, "get", get)
    return reads


BAD_STAGES = {
    "unknown": ("name: one\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n---\n"
                "merge_method: linear\nmodels: [{model: onee, parameters: {weight: 1}}]\n",
                r"model 'onee' is neither a stage of this file \(`one`\) nor a file or folder "
                r"\(did you mean stage `one`\?\)"),
    "cycle": ("name: one\nmerge_method: linear\nmodels: [{model: two, parameters: {weight: 1}}]\n---\n"
              "name: two\nmerge_method: linear\nmodels: [{model: one, parameters: {weight: 1}}]\n---\n"
              "merge_method: linear\nmodels: [{model: two, parameters: {weight: 1}}]\n",
              "stages read each other in a cycle: `one` -> `two` -> `one`"),
    "duplicate": ("name: one\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n---\n"
                  "name: one\nmerge_method: linear\nmodels: [{model: b, parameters: {weight: 1}}]\n",
                  "stage name `one` is used by 2 documents"),
    "later stage invalid": (
        "name: one\nmerge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n---\n"
        "merge_method: ties\nbase_model: base\nmodels: [{model: one, parameters: {weight: 1, density: 2}}]\n",
        r"the final \(unnamed\) stage: models.0.parameters.density: `density` must be in \(0, 1\]"),
}


@pytest.mark.parametrize("case", sorted(BAD_STAGES))
def test_bad_stages_are_refused_before_any_tensor_is_read(tmp_path, monkeypatch, case):
    import mergelab

    _folders(tmp_path)
    text, message = BAD_STAGES[case]
    config = tmp_path / "multi.yml"
    config.write_text(text)
    reads = _count_reads(monkeypatch)
    with pytest.raises(ConfigError, match=message):
        mergelab.merge(config, tmp_path / "out", progress=False)
    assert reads == [] and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------- modules: {default: ...}


def test_default_module_is_the_plain_config_with_its_parameters_between_slice_and_global():
    sds = _sds()
    slices = [{"sources": [{"model": "a", "layer_range": [0, 3]}, {"model": "b", "layer_range": [0, 3]}]}]
    module_form = {
        "merge_method": "slerp", "base_model": "a",
        "modules": {"default": {"slices": slices,
                                "parameters": {"t": [{"filter": "mlp", "value": [0.0, 1.0]}]}}},
        "parameters": {"t": 0.3},
    }
    merged = merge_state_dicts(module_form, sds)
    # mergekit's order: the module's filter matches the layers; other tensors fall back to the
    # global `t`.
    by_hand_layers = merge_state_dicts({"merge_method": "slerp", "base_model": "a", "slices": slices,
                                        "parameters": {"t": [0.0, 1.0]}}, sds)
    by_hand_rest = merge_state_dicts({"merge_method": "slerp", "base_model": "a", "slices": slices,
                                      "parameters": {"t": 0.3}}, sds)
    for name, tensor in merged.items():
        expected = by_hand_layers[name] if "mlp" in name else by_hand_rest[name]
        torch.testing.assert_close(tensor, expected)
    assert not torch.equal(by_hand_layers["model.norm.weight"], by_hand_rest["model.norm.weight"])


def test_modules_other_than_default_and_mixed_forms_are_refused():
    with pytest.raises(ConfigError) as info:
        parse_config({"merge_method": "linear", "models": [{"model": "a"}],
                      "modules": {"default": {"models": [{"model": "a"}]},
                                  "vision_tower": {"models": [{"model": "a"}]}}})
    text = str(info.value)
    assert "only the `default` module is supported" in text and "`vision_tower`" in text
    assert "exactly one of `models`, `slices` and `modules`" in text
