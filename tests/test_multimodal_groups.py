"""Expert-group merging (mergelab.plan.expert_groups): formulas, properties, checkpoints, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_checkpoint
from safetensors.torch import load_file
from typer.testing import CliRunner

import mergelab
from mergelab import ConfigError, merge_expert_groups
from mergelab.cli import app
from mergelab.plan.expert_groups import compile_pattern, fill_pattern, match_groups
from mergelab.stats.gram import GramStats, LayerGram
from mergelab.stats.store import save_grams

BLOCKS = 3  # the top block has a VL copy


def _specific(seed: int = 0, spread: float = 0.1) -> tuple[dict, dict]:
    """A modality-specific model (V/L copies; VL in the top block) and its seed (agnostic names)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"embed.weight": torch.randn(10, 4, generator=g)}
    seed_sd = {"embed.weight": sd["embed.weight"].clone()}
    for i in range(BLOCKS):
        for part, shape in (("norm1.weight", (4,)), ("attn.qkv.weight", (12, 4)), ("attn.qkv.bias", (12,)),
                            ("norm2.weight", (4,)), ("mlp.fc1.weight", (8, 4)), ("mlp.fc2.weight", (4, 8))):
            module, leaf = part.split(".", 1)
            base = torch.randn(*shape, generator=g)
            seed_sd[f"blocks.{i}.{part}"] = base
            for m in ("v", "l") + (("vl",) if i == BLOCKS - 1 else ()):
                sd[f"blocks.{i}.{module}_{m}.{leaf}"] = base + spread * torch.randn(*shape, generator=g)
    sd["head.weight"] = torch.randn(3, 4, generator=g)
    seed_sd["head.weight"] = sd["head.weight"].clone()
    return sd, seed_sd


def _copy(sd, block, part, m):
    module, leaf = part.split(".", 1)
    return sd[f"blocks.{block}.{module}_{m}.{leaf}"]


# --- patterns ------------------------------------------------------------------------------------


def test_patterns_capture_and_fill():
    regex = compile_pattern("*.mlp_v.*")
    m = regex.fullmatch("transformer.blocks.3.mlp_v.fc1.weight")
    assert m.groups() == ("transformer.blocks.3", "fc1.weight")
    assert fill_pattern("*.mlp.*", m.groups()) == "transformer.blocks.3.mlp.fc1.weight"
    assert regex.fullmatch("blocks.3.mlp_vl.fc1.weight") is None


def test_output_order_follows_the_model():
    from mergelab.plan.expert_groups import get_preset

    sd, seed = _specific()
    groups, drop = get_preset("mergelab-mini").build(list(sd))
    match = match_groups(list(sd), groups, drop)
    assert match.problems == []
    assert match.order == list(seed)  # the seed was built in the same order, without copies


# --- formulas ------------------------------------------------------------------------------------


def test_interpolation_weights_hand_computed():
    sd = {
        "b.0.f_v.w": torch.tensor([1.0, 2.0]), "b.0.f_l.w": torch.tensor([3.0, -6.0]),
        "b.1.f_v.w": torch.tensor([3.0, 0.0]), "b.1.f_l.w": torch.tensor([0.0, 3.0]),
        "b.1.f_vl.w": torch.tensor([6.0, 6.0]),
    }
    groups = [{"members": {"v": "*.f_v.*", "l": "*.f_l.*", "vl": "*.f_vl.*"}, "into": "*.f.*",
               "optional": ["vl"]}]
    out = merge_expert_groups(sd, method="interpolation", groups=groups, parameters={"alpha": 0.25})
    # two copies: 0.25 * v + 0.75 * l
    assert torch.allclose(out["b.0.f.w"], torch.tensor([2.5, -4.0]))
    # three copies: 2a/3 v + 2(1-a)/3 l + 1/3 vl = 1/6 v + 1/2 l + 1/3 vl
    assert torch.allclose(out["b.1.f.w"], torch.tensor([0.5 + 0.0 + 2.0, 0.0 + 1.5 + 2.0]))


def test_modality_arithmetic_formula():
    sd, seed = _specific()
    out = merge_expert_groups(sd, method="modality_arithmetic", preset="mergelab-mini",
                              parameters={"lambda": 0.4}, seed=seed)
    for block, members in ((0, ("v", "l")), (BLOCKS - 1, ("v", "l", "vl"))):
        for part in ("attn.qkv.weight", "norm2.weight", "mlp.fc2.weight"):
            base = seed[f"blocks.{block}.{part}"]
            expected = base + 0.4 * sum(_copy(sd, block, part, m) - base for m in members)
            assert torch.allclose(out[f"blocks.{block}.{part}"], expected, atol=1e-6)
    assert torch.equal(out["embed.weight"], sd["embed.weight"])
    assert torch.equal(out["head.weight"], sd["head.weight"])


def test_seed_may_use_the_member_names():
    sd, _ = _specific()
    # a seed that is itself modality-specific (identical copies): the first member's name is used
    out_a = merge_expert_groups(sd, method="modality_arithmetic", preset="mergelab-mini",
                                parameters={"lambda": 0.5}, seed=sd)
    base = sd["blocks.0.mlp_v.fc1.weight"]
    expected = base + 0.5 * (sd["blocks.0.mlp_l.fc1.weight"] - base)
    assert torch.allclose(out_a["blocks.0.mlp.fc1.weight"], expected, atol=1e-6)


def test_regmean_recovers_joint_least_squares():
    """RegMean (alpha 1) of the V and L copies = least squares on both modalities' data."""
    g = torch.Generator().manual_seed(3)
    w_v, w_l = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    x_v, x_l = torch.randn(40, 5, generator=g), torch.randn(30, 5, generator=g) * 2
    sd = {"blk.0.lin_v.weight": w_v, "blk.0.lin_l.weight": w_l,
          "blk.0.lin_v.bias": torch.ones(3), "blk.0.lin_l.bias": torch.zeros(3)}
    grams = {
        "blk.0.lin_v": LayerGram("linear", (x_v.T @ x_v).double(), 40),
        "blk.0.lin_l": LayerGram("linear", (x_l.T @ x_l).double(), 30),
    }
    groups = [{"members": {"v": "*.lin_v.*", "l": "*.lin_l.*"}, "into": "*.lin.*"}]
    out = merge_expert_groups(sd, method="regmean", groups=groups, grams=grams,
                              parameters={"alpha": 1.0, "regularization": 0.0})
    x = torch.cat([x_v, x_l]).double()
    y = torch.cat([x_v @ w_v.T, x_l @ w_l.T]).double()
    expected = torch.linalg.lstsq(x, y).solution.T
    assert torch.allclose(out["blk.0.lin.weight"].double(), expected, atol=1e-4)
    assert torch.allclose(out["blk.0.lin.bias"], torch.full((3,), 0.5))  # non-weights: the mean


def test_ties_density_one_without_conflict_is_modality_arithmetic():
    sd, seed = _specific()
    # copies that all move the same way from the seed: no sign conflict
    for k in list(sd):
        if k.startswith("blocks."):
            module, leaf = k.split(".")[2].split("_")[0], ".".join(k.split(".")[3:])
            base = seed[f"{'.'.join(k.split('.')[:2])}.{module}.{leaf}"]
            sd[k] = base + (sd[k] - base).abs()
    # TIES's disjoint merge sums the agreeing entries when `normalize` is off
    ties = merge_expert_groups(sd, method="ties", preset="mergelab-mini", seed=seed,
                               parameters={"weight": 1.0, "density": 1.0, "lambda": 0.7,
                                           "normalize": False})
    arith = merge_expert_groups(sd, method="modality_arithmetic", preset="mergelab-mini", seed=seed,
                                parameters={"lambda": 0.7})
    for k in arith:
        assert torch.allclose(ties[k], arith[k], atol=1e-5), k


def test_member_parameters_reach_the_kernel():
    sd, _ = _specific()
    out = merge_expert_groups(
        sd, method="linear", preset="mergelab-mini", parameters={"normalize": False},
        member_parameters={"v": {"weight": 2.0}, "l": {"weight": -1.0}, "vl": {"weight": 0.0}},
    )
    part = "mlp.fc1.weight"
    assert torch.allclose(out[f"blocks.0.{part}"], 2 * _copy(sd, 0, part, "v") - _copy(sd, 0, part, "l"))
    top = BLOCKS - 1
    assert torch.allclose(out[f"blocks.{top}.{part}"], 2 * _copy(sd, top, part, "v") - _copy(sd, top, part, "l"))


@pytest.mark.parametrize("method,params", [
    ("interpolation", {"alpha": 0.3}),
    ("linear", {"weight": 1.0}),
    ("ties", {"weight": 1.0, "density": 1.0}),
    ("regmean", {}),
])
def test_identical_copies_merge_to_the_copy(method, params):
    _, seed = _specific()
    # every copy is the seed plus the same update
    sd = {}
    for k, v in seed.items():
        if not k.startswith("blocks."):
            sd[k] = v
            continue
        block, module, leaf = k.split(".", 2)[1], k.split(".")[2], k.split(".", 3)[3]
        for m in ("v", "l") + (("vl",) if int(block) == BLOCKS - 1 else ()):
            sd[f"blocks.{block}.{module}_{m}.{leaf}"] = v + 0.05
    g = torch.Generator().manual_seed(1)
    grams = {}
    for k, v in sd.items():
        if v.dim() == 2 and k.startswith("blocks."):
            x = torch.randn(7, v.shape[1], generator=g)
            grams[k.rsplit(".", 1)[0]] = LayerGram("linear", (x.T @ x).double(), 7)
    out = merge_expert_groups(sd, method=method, preset="mergelab-mini", parameters=params,
                              seed=seed if method == "ties" else None,
                              grams=grams if method == "regmean" else None)
    for k, v in seed.items():
        expected = v + 0.05 if k.startswith("blocks.") else v
        assert torch.allclose(out[k], expected, atol=1e-5), (method, k)


def test_weight_one_on_one_copy_returns_it():
    sd, _ = _specific()
    out = merge_expert_groups(sd, method="interpolation", preset="mergelab-mini", parameters={"alpha": 1.0})
    assert torch.allclose(out["blocks.0.attn.qkv.weight"], sd["blocks.0.attn_v.qkv.weight"])


# --- presets -------------------------------------------------------------------------------------


def test_vlmo_preset_names():
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(2):
        sd[f"transformer.blocks.{i}.attn.qkv.weight"] = torch.randn(6, 2, generator=g)
        for m in ("imag", "text") + (("vl",) if i == 1 else ()):
            sd[f"transformer.blocks.{i}.norm2_{m}.weight"] = torch.randn(2, generator=g)
            sd[f"transformer.blocks.{i}.mlp_{m}.fc1.weight"] = torch.randn(4, 2, generator=g)
    out = merge_expert_groups(sd, method="interpolation", preset="vlmo")
    assert set(out) == {f"transformer.blocks.{i}.{p}" for i in range(2)
                        for p in ("attn.qkv.weight", "norm2.weight", "mlp.fc1.weight")}
    expected = (2 * 0.5 / 3) * (sd["transformer.blocks.1.mlp_imag.fc1.weight"]
                                + sd["transformer.blocks.1.mlp_text.fc1.weight"]) \
        + sd["transformer.blocks.1.mlp_vl.fc1.weight"] / 3
    assert torch.allclose(out["transformer.blocks.1.mlp.fc1.weight"], expected, atol=1e-6)


def test_mixtral_preset_collapses_experts_and_drops_the_router():
    g = torch.Generator().manual_seed(0)
    sd = {"model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g),
          "model.layers.0.block_sparse_moe.gate.weight": torch.randn(3, 4, generator=g)}
    for e in range(3):
        for w in ("w1", "w2", "w3"):
            sd[f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"] = torch.randn(4, 4, generator=g)
    out = merge_expert_groups(sd, method="linear", preset="mixtral", parameters={"weight": 1.0})
    assert set(out) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                        "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"}
    mean_w2 = sum(sd[f"model.layers.0.block_sparse_moe.experts.{e}.w2.weight"] for e in range(3)) / 3
    assert torch.allclose(out["model.layers.0.mlp.down_proj.weight"], mean_w2, atol=1e-6)


def test_beit3_multiway_preset():
    sd = {"encoder.layers.0.ffn.A.fc1.weight": torch.ones(2, 2),
          "encoder.layers.0.ffn.B.fc1.weight": torch.zeros(2, 2)}
    out = merge_expert_groups(sd, method="interpolation", preset="beit3", parameters={"alpha": 0.75})
    assert torch.allclose(out["encoder.layers.0.ffn.fc1.weight"], torch.full((2, 2), 0.75))


# --- checkpoints on disk through the CLI -----------------------------------------------------------


def _save(folder: Path, sd: dict) -> Path:
    return save_checkpoint(folder, sd, config={"model_type": "mini-vlmo", "num_hidden_layers": BLOCKS})


def _write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_merges_a_checkpoint_folder(tmp_path):
    sd, seed = _specific()
    model = _save(tmp_path / "specific", sd)
    seed_dir = _save(tmp_path / "seed", seed)
    config = _write_config(tmp_path / "merge.yml", {
        "merge_method": "modality_arithmetic",
        "models": [{"model": str(model)}],
        "base_model": str(seed_dir),
        "parameters": {"lambda": 0.5},
        "expert_groups": {"preset": "mergelab-mini"},
    })
    result = CliRunner().invoke(app, ["merge", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert set(merged) == set(seed)
    base = seed["blocks.2.mlp.fc1.weight"]
    expected = base + 0.5 * sum(_copy(sd, 2, "mlp.fc1.weight", m) - base for m in ("v", "l", "vl"))
    assert torch.allclose(merged["blocks.2.mlp.fc1.weight"], expected, atol=1e-6)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "mini-vlmo"


def test_cli_regmean_reads_a_gram_folder(tmp_path):
    sd, _ = _specific()
    g = torch.Generator().manual_seed(5)
    layers = {}
    for name in sd:
        module, leaf = name.rsplit(".", 1)
        if leaf == "weight" and sd[name].dim() == 2 and name.startswith("blocks."):
            x = torch.randn(20, sd[name].shape[1], generator=g)
            layers[module] = LayerGram("linear", (x.T @ x).double(), 20)
    save_grams(GramStats(layers=layers, examples=20, batches=1), tmp_path / "grams")
    model = _save(tmp_path / "specific", sd)
    config = _write_config(tmp_path / "merge.yml", {
        "merge_method": "regmean", "models": [{"model": str(model)}],
        "expert_groups": {"preset": "mergelab-mini", "grams": "grams"},
    })
    result = CliRunner().invoke(app, ["merge", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    in_memory = merge_expert_groups(sd, method="regmean", preset="mergelab-mini", grams=layers)
    for k, v in in_memory.items():
        assert torch.allclose(merged[k], v, atol=1e-6), k


# --- bad input -----------------------------------------------------------------------------------


def _plan_error(raw: dict, sd: dict, seed: dict | None = None) -> str:
    held = {"m": sd, "s": seed}
    with pytest.raises(ConfigError) as info:
        mergelab.merge_state_dicts(raw, {k: v for k, v in held.items() if v is not None})
    return str(info.value)


def test_members_with_different_shapes_are_refused():
    sd, _ = _specific()
    sd["blocks.1.mlp_l.fc1.weight"] = torch.zeros(9, 4)
    msg = _plan_error({"merge_method": "interpolation", "models": [{"model": "m"}],
                       "expert_groups": {"preset": "mergelab-mini"}}, sd)
    assert "members differ in shape" in msg and "blocks.1.mlp_l.fc1.weight" in msg and "[9, 4]" in msg


def test_a_pattern_matching_nothing_is_named():
    sd, _ = _specific()
    msg = _plan_error({"merge_method": "interpolation", "models": [{"model": "m"}],
                       "expert_groups": {"groups": [{"name": "ffn", "members": {"v": "*.ffn_v.*", "l": "*.mlp_l.*"},
                                                      "into": "*.ffn.*"}],
                                         "drop": ["*.router.*"]}}, sd)
    assert "'*.ffn_v.*' matches no tensor" in msg
    assert "drop pattern '*.router.*' matches no tensor" in msg


def test_a_copy_without_its_counterpart_is_named():
    sd, _ = _specific()
    del sd["blocks.0.attn_l.qkv.bias"]
    msg = _plan_error({"merge_method": "interpolation", "models": [{"model": "m"}],
                       "expert_groups": {"preset": "mergelab-mini"}}, sd)
    assert "`blocks.0.attn_v.qkv.bias` has no counterpart" in msg and "blocks.0.attn_l.qkv.bias" in msg


def test_modality_arithmetic_without_seed_is_refused():
    sd, _ = _specific()
    msg = _plan_error({"merge_method": "modality_arithmetic", "models": [{"model": "m"}],
                       "expert_groups": {"preset": "mergelab-mini"}}, sd)
    assert "needs the seed checkpoint" in msg and "base_model" in msg


def test_seed_checkpoint_missing_on_disk(tmp_path):
    sd, _ = _specific()
    model = _save(tmp_path / "specific", sd)
    config = _write_config(tmp_path / "merge.yml", {
        "merge_method": "ties", "models": [{"model": str(model)}], "base_model": str(tmp_path / "nope"),
        "parameters": {"weight": 1.0}, "expert_groups": {"preset": "mergelab-mini"},
    })
    result = CliRunner().invoke(app, ["merge", str(config), "--out", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert "base_model" in result.output and "nope" in result.output
    assert not (tmp_path / "out").exists()


def test_unknown_method_preset_member_and_key_typos():
    sd, seed = _specific()
    msg = _plan_error({"merge_method": "interpolaton", "models": [{"model": "m"}],
                       "expert_groups": {"preset": "mergelab-mini"}}, sd)
    assert "did you mean 'interpolation'" in msg
    msg = _plan_error({"merge_method": "interpolation", "models": [{"model": "m"}],
                       "expert_groups": {"preset": "mergelab-mni"}}, sd)
    assert "did you mean 'mergelab-mini'" in msg
    msg = _plan_error({"merge_method": "ties", "models": [{"model": "m"}], "base_model": "s",
                       "expert_groups": {"preset": "mergelab-mini",
                                         "member_parameters": {"vv": {"weight": 1.0}}}}, sd, seed)
    assert "no group has a member `vv`" in msg
    msg = _plan_error({"merge_method": "interpolation", "models": [{"model": "m"}],
                       "parameters": {"alpah": 0.5}, "expert_groups": {"preset": "mergelab-mini"}}, sd)
    assert "did you mean `alpha`" in msg
    msg = _plan_error({"merge_method": "interpolation", "models": [{"model": "m"}],
                       "expert_groups": {"prest": "mergelab-mini"}}, sd)
    assert "did you mean `preset`" in msg


def test_regmean_without_grams_or_with_missing_layers():
    sd, _ = _specific()
    msg = _plan_error({"merge_method": "regmean", "models": [{"model": "m"}],
                       "expert_groups": {"preset": "mergelab-mini"}}, sd)
    assert "expert_groups.grams" in msg
    with pytest.raises(ConfigError, match=r"no Gram matrix for layer\(s\) \['blocks.0.mlp_v.fc1'"):
        merge_expert_groups(sd, method="regmean", preset="mergelab-mini",
                            grams={"blocks.0.mlp_l.fc1": LayerGram("linear", torch.eye(4, dtype=torch.float64), 4)})


def test_two_models_are_refused():
    sd, _ = _specific()
    msg = _plan_error({"merge_method": "interpolation", "models": [{"model": "m"}, {"model": "m"}],
                       "expert_groups": {"preset": "mergelab-mini"}}, sd)
    assert "exactly one entry under `models`" in msg


def test_match_groups_reports_tensors_claimed_twice():
    from mergelab.plan.expert_groups import ExpertGroup

    g1 = ExpertGroup("a", (("v", "*.x_v.*"), ("l", "*.x_l.*")), "*.x.*")
    g2 = ExpertGroup("b", (("v", "*_v.*"), ("l", "*_l.*")), "*.*")
    match = match_groups(["k.x_v.w", "k.x_l.w"], [g1, g2])
    assert any("matches both" in p for p in match.problems)


# --- one planner: the groups are a layout of build_plan, their methods registry methods ----------


def _two_copy_model(seed: int = 0) -> tuple[dict, dict, dict]:
    """(model with V and L copies in every block, each copy as a separate agnostic model, seed)."""
    g = torch.Generator().manual_seed(seed)
    sd, per_member, seed_sd = {}, {"v": {}, "l": {}}, {}
    for i in range(BLOCKS):
        for leaf, shape in (("fc1.weight", (6, 4)), ("fc1.bias", (6,)), ("fc2.weight", (4, 6))):
            base = torch.randn(*shape, generator=g)
            seed_sd[f"blocks.{i}.mlp.{leaf}"] = base
            for m in ("v", "l"):
                copy = base + 0.1 * torch.randn(*shape, generator=g)
                sd[f"blocks.{i}.mlp_{m}.{leaf}"] = copy
                per_member[m][f"blocks.{i}.mlp.{leaf}"] = copy
    return sd, per_member, seed_sd


_FFN = [{"name": "ffn", "members": {"v": "*.mlp_v.*", "l": "*.mlp_l.*"}, "into": "*.mlp.*"}]


@pytest.mark.parametrize("method,params", [
    ("interpolation", {"alpha": [0.2, 0.8]}),  # a gradient over the layers: t is the same
    ("modality_arithmetic", {"lambda": 0.7}),
    ("ties", {"weight": 1.0, "density": 0.5}),
    ("dare_ties", {"weight": 1.0, "density": 0.5}),  # same tensor names: same random masks
])
def test_a_group_merge_equals_the_merge_of_its_members_as_models(method, params):
    sd, per_member, seed_sd = _two_copy_model()
    uses_seed = method != "interpolation"
    grouped = merge_expert_groups(sd, method=method, groups=_FFN, parameters=params,
                                  seed=seed_sd if uses_seed else None, random_seed=4)
    raw = {"merge_method": method, "models": [{"model": "v"}, {"model": "l"}], "parameters": params}
    if uses_seed:
        raw["base_model"] = "seed"
    separate = mergelab.merge_state_dicts(raw, {**per_member, "seed": seed_sd}, seed=4)
    assert set(grouped) == set(separate)
    for k in separate:
        assert torch.equal(grouped[k], separate[k]), k


def test_group_parameters_and_member_parameters_reach_the_kernel():
    sd, per_member, _ = _two_copy_model()
    groups = [{"name": "fc1", "members": {"v": "*.mlp_v.fc1.*", "l": "*.mlp_l.fc1.*"},
               "into": "*.mlp.fc1.*", "parameters": {"alpha": 1.0}},
              {"name": "fc2", "members": {"v": "*.mlp_v.fc2.*", "l": "*.mlp_l.fc2.*"},
               "into": "*.mlp.fc2.*"}]
    out = merge_expert_groups(sd, method="interpolation", groups=groups, parameters={"alpha": 0.0})
    assert torch.equal(out["blocks.1.mlp.fc1.weight"], per_member["v"]["blocks.1.mlp.fc1.weight"])
    assert torch.equal(out["blocks.1.mlp.fc2.weight"], per_member["l"]["blocks.1.mlp.fc2.weight"])
    out = merge_expert_groups(sd, method="linear", groups=_FFN, parameters={"normalize": False},
                              member_parameters={"v": {"weight": [0.0, 1.0]}, "l": {"weight": 0.5}})
    expected = 1.0 * per_member["v"]["blocks.2.mlp.fc2.weight"] + 0.5 * per_member["l"]["blocks.2.mlp.fc2.weight"]
    assert torch.allclose(out["blocks.2.mlp.fc2.weight"], expected)


def test_parameter_errors_come_from_the_one_validator_with_key_paths():
    sd, per_member, seed_sd = _two_copy_model()
    base = {"models": [{"model": "m"}]}
    # the same message as for a config of separate models
    with pytest.raises(ConfigError) as info:
        mergelab.merge_state_dicts({"merge_method": "interpolation", "parameters": {"alpha": 1.5},
                                    "models": [{"model": "v"}, {"model": "l"}]}, per_member)
    plain = "parameters.alpha: `alpha` must be in [0, 1]; got 1.5 (method `interpolation`)"
    assert plain in str(info.value)
    msg = _plan_error({**base, "merge_method": "interpolation", "parameters": {"alpha": 1.5},
                       "expert_groups": {"groups": _FFN}}, sd)
    assert plain in msg
    msg = _plan_error({**base, "merge_method": "interpolation",
                       "expert_groups": {"groups": [{**_FFN[0], "parameters": {"alpha": -0.1}}],
                                         "member_parameters": {"v": {"alpha": 0.5}}}}, sd)
    assert "expert_groups.groups.0.parameters.alpha: `alpha` must be in [0, 1]; got -0.1" in msg
    assert ("expert_groups.member_parameters.v.alpha: `alpha` is a global parameter of "
            "`interpolation`; set it under the top-level or a group's `parameters`") in msg
    msg = _plan_error({**base, "merge_method": "ties", "base_model": "s", "parameters": {"weight": 1.0},
                       "expert_groups": {"groups": _FFN, "member_parameters": {"l": {"density": 1.3}}}},
                      sd, seed_sd)
    assert "expert_groups.member_parameters.l.density: `density` must be in (0, 1]; got 1.3 (method `ties`)" in msg
    msg = _plan_error({**base, "merge_method": "linear", "expert_groups": {"groups": _FFN}}, sd)
    assert "parameter `weight` of method `linear` is required for member `v`" in msg
    msg = _plan_error({**base, "merge_method": "regmean", "parameters": {"alpah": 0.5, "scaling": -1},
                       "expert_groups": {"groups": _FFN, "grams": "g"}}, sd)
    assert "parameters.alpah: unknown parameter of method `regmean` (did you mean `alpha`?)" in msg
    assert "parameters.scaling: `scaling` must be in [0, inf]; got -1 (method `regmean`)" in msg


def test_arity_and_data_needs_come_from_the_declarations():
    g = torch.Generator().manual_seed(0)
    sd = {f"layers.0.experts.{e}.w.weight": torch.randn(2, 2, generator=g) for e in range(4)}
    msg = _plan_error({"merge_method": "interpolation", "models": [{"model": "m"}],
                       "expert_groups": {"preset": "moe"}}, sd)
    assert "group `experts`: method `interpolation` takes at most 3 members; got 4" in msg
    msg = _plan_error({"merge_method": "fisher", "models": [{"model": "m"}],
                       "expert_groups": {"preset": "moe"}}, sd)
    assert "`fisher` needs data per model" in msg and "regmean" in msg and "expert_groups.grams" in msg


def _grams_of(sd: dict, seed: int = 5, counts: tuple[int, ...] = (20, 60)) -> dict:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i, (name, tensor) in enumerate(sorted(sd.items())):
        if tensor.dim() == 2:
            count = counts[i % len(counts)]
            x = torch.randn(count, tensor.shape[1], generator=g) * (1 + i % 3)
            layers[name.rsplit(".", 1)[0]] = LayerGram("linear", (x.T @ x).double(), count)
    return layers


def test_group_regmean_takes_the_registry_parameters():
    from mergelab.methods.data_aware import regmean_solve

    sd, per_member, seed_sd = _two_copy_model()
    grams = _grams_of(sd)
    key, v, lang = "blocks.1.mlp.fc2.weight", "blocks.1.mlp_v.fc2", "blocks.1.mlp_l.fc2"
    weights = [per_member["v"][key], per_member["l"][key]]
    # average_grams: each Gram divided by its row count first
    out = merge_expert_groups(sd, method="regmean", groups=_FFN, grams=grams,
                              parameters={"alpha": 0.8, "average_grams": True})
    expected = regmean_solve(weights, [grams[v].mean(), grams[lang].mean()], alpha=0.8)
    assert torch.allclose(out[key], expected, atol=1e-6)
    summed = merge_expert_groups(sd, method="regmean", groups=_FFN, grams=grams, parameters={"alpha": 0.8})
    assert not torch.allclose(summed[key], out[key], atol=1e-4)  # the counts differ: so do the merges
    # scaling: the merged task vector from the seed, scaled
    scaled = merge_expert_groups(sd, method="regmean", groups=_FFN, grams=grams, seed=seed_sd,
                                 parameters={"alpha": 0.8, "scaling": 0.5})
    for k in summed:
        assert torch.allclose(scaled[k], seed_sd[k] + 0.5 * (summed[k] - seed_sd[k]), atol=1e-6), k
    with pytest.raises(ConfigError, match=r"`scaling` 0.5 needs the base model \(set `base_model`\)"):
        merge_expert_groups(sd, method="regmean", groups=_FFN, grams=grams, parameters={"scaling": 0.5})


def test_an_expert_group_plan_references_each_members_gram_for_the_engine():
    """RegMean in a group merge is planned like any data-aware merge: each linear weight's
    task references its members' Grams in the plan's statistics; the engine reads them."""
    from mergelab.api import _state_dict_opener
    from mergelab.plan.config import parse_config
    from mergelab.plan.expert_groups import GRAMS_STORE
    from mergelab.plan.planner import build_plan

    grams = {"a.x_v": LayerGram("linear", torch.eye(2, dtype=torch.float64), 3),
             "a.x_l": LayerGram("linear", 2 * torch.eye(2, dtype=torch.float64), 5)}
    sd = {"a.x_v.weight": torch.randn(2, 2), "a.x_l.weight": torch.randn(2, 2),
          "a.x_v.bias": torch.zeros(2), "a.x_l.bias": torch.ones(2)}
    config = parse_config({"merge_method": "regmean", "models": [{"model": "m"}],
                          "expert_groups": {"groups": [{"members": {"v": "*.x_v.*", "l": "*.x_l.*"},
                                                        "into": "*.x.*"}], "grams": "folder"}})
    plan = build_plan(config, _state_dict_opener({"m": sd}), open_grams=lambda _: grams)
    tasks = {t.name: t for t in plan.tasks}
    assert tasks["a.x.weight"].statistics == ((GRAMS_STORE, "a.x_v"), (GRAMS_STORE, "a.x_l"))
    assert tasks["a.x.bias"].statistics == ()  # no Gram: the kernel averages it
    read = plan.statistics[GRAMS_STORE].read("a.x_l")
    assert int(read["rows"]) == 5 and torch.equal(read["gram"], 2 * torch.eye(2, dtype=torch.float64))


def test_validate_and_dry_run_plan_an_expert_group_config(tmp_path):
    sd, seed = _specific()
    model = _save(tmp_path / "specific", sd)
    seed_dir = _save(tmp_path / "seed", seed)
    config = _write_config(tmp_path / "merge.yml", {
        "merge_method": "modality_arithmetic", "models": [{"model": str(model)}],
        "base_model": str(seed_dir), "parameters": {"lambda": 0.5},
        "expert_groups": {"preset": "mergelab-mini"},
    })
    result = CliRunner().invoke(app, ["validate", str(config)])
    assert result.exit_code == 0, result.output
    assert "modality_arithmetic" in result.output and f"{len(seed)} output tensors" in result.output
    result = CliRunner().invoke(app, ["merge", str(config), str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "out").exists()
    plan = mergelab.plan_merge(config)
    assert sorted(t.name for t in plan.tasks) == sorted(seed)
    assert sum(t.copied for t in plan.tasks) == 2  # embed and head: outside every group
    assert plan.method.name == "modality_arithmetic" and plan.donor == str(model)
    assert any("expert groups: " in note for note in plan.notes)
