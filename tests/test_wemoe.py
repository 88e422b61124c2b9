"""WEMoE: the MLPs' task vectors routed per token by routers trained on unlabelled inputs
(entropy minimisation), written in the upscaled folder format and loaded as a torch module;
hand-computed layers, a router that learns which task vector its inputs need, a tiny BERT end
to end, seeds, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from _data_aware_models import bert_config, tiny_bert_folders
from safetensors.torch import load_file
from torch import nn

import mergelab
from mergelab.errors import CheckpointError, ConfigError
from mergelab.methods import get_method
from mergelab.methods.registry import TensorMerge, resolve_defaults
from mergelab.methods.wemoe import (
    WEMoELinear,
    initial_router,
    is_mlp_linear,
    wemoe_cost,
    wemoe_forward,
    wemoe_tensor,
)
from mergelab.stats.batches import DataError, TaskData
from mergelab.training import FinetuneSettings, train
from mergelab.upscale import upscale_module
from mergelab.upscale.train import EntropyExamples, TrainedParameters


def _params(**given):
    return resolve_defaults(get_method("wemoe").global_params, given)


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def _wemoe_layer(base_w, base_b, tuned, **params) -> WEMoELinear:
    """A WEMoE layer made as the engine makes it: the kernel's merged weight and extras."""
    resolved = _params(**params)
    gen = torch.Generator().manual_seed(0)

    def job(name, base, tensors):
        return wemoe_tensor(TensorMerge(tensors=tensors, base=base, model_params=[{}] * len(tensors),
                                        params=resolved, name=name, generator=gen))  # fmt: skip

    weight = job("mlp.fc.weight", base_w, [w for w, _ in tuned])
    bias = job("mlp.fc.bias", base_b, [b for _, b in tuned])
    layer = _linear(weight.merged, bias.merged)
    return WEMoELinear(layer, {**weight.extras, **bias.extras}, float(resolved["lambda"]))


def test_which_layers_are_mlp_layers() -> None:
    shape = (4, 4)
    for name in ("encoder.layer.0.intermediate.dense.weight", "encoder.layer.0.output.dense.weight",
                 "vision_model.encoder.layers.3.mlp.fc1.weight", "model.layers.0.mlp.down_proj.weight",
                 "transformer.layer.1.ffn.lin2.weight"):  # fmt: skip
        assert is_mlp_linear(name, shape), name
    for name in ("encoder.layer.0.attention.output.dense.weight",
                 "encoder.layer.0.attention.self.query.weight", "pooler.dense.weight",
                 "embeddings.word_embeddings.weight", "encoder.layer.0.intermediate.dense.bias"):  # fmt: skip
        assert not is_mlp_linear(name, shape), name


def test_layer_adds_the_routed_task_vectors_to_the_merged_layer() -> None:
    # merged W = [[1, 0], [0, 1]], b = 0; tau_0 = [[2, 0], [0, 0]], tau_1 = [[0, 0], [0, 3]],
    # bias vectors [1, 0] and [0, 1]; routing (0.5, 0.2) with lambda 0.3 -> offsets (0.2, -0.1).
    x = torch.tensor([[1.0, 2.0]])
    taus = torch.tensor([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]]])
    out = wemoe_forward(x, torch.eye(2), torch.zeros(2), taus, torch.eye(2),
                        torch.tensor([[0.5, 0.2]]), 0.3)  # fmt: skip
    # y = [1, 2] + 0.2 * ([2, 0] + [1, 0]) - 0.1 * ([0, 6] + [0, 1]) = [1.6, 1.3]
    assert torch.allclose(out, torch.tensor([[1.6, 1.3]]), atol=1e-6)


def test_an_untrained_router_is_the_task_arithmetic_layer_bit_for_bit() -> None:
    gen = torch.Generator().manual_seed(1)
    base_w, base_b = torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen)
    tuned = [(base_w + torch.randn(5, 4, generator=gen), base_b + torch.randn(5, generator=gen))
             for _ in range(3)]  # fmt: skip
    layer = _wemoe_layer(base_w, base_b, tuned, **{"lambda": 0.4, "router_hidden": 3})
    ta_w = base_w + 0.4 * sum(w - base_w for w, _ in tuned)
    ta_b = base_b + 0.4 * sum(b - base_b for _, b in tuned)
    assert torch.allclose(layer.weight, ta_w, atol=1e-6) and torch.allclose(layer.bias, ta_b, atol=1e-6)
    x = torch.randn(2, 7, 4, generator=gen)
    with torch.no_grad():
        assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
        assert torch.equal(layer.last_routing, torch.full((2, 7, 3), 0.4))
    # the router's first layer is drawn from the generator, its last weight zero
    router = initial_router(4, 3, 3, 0.4, torch.Generator().manual_seed(0))
    assert router["router_in"].abs().max() > 0 and not router["router_out"].any()


def test_a_pointwise_convolution_routes_every_pixel_as_a_token() -> None:
    """`all_linear` upscales a 1x1 convolution: its output at each pixel is the linear WEMoE
    layer's on that pixel's channels, the routing per pixel; untrained, the task-arithmetic
    convolution."""
    gen = torch.Generator().manual_seed(2)
    base_w, base_b = torch.randn(5, 4, 1, 1, generator=gen), torch.randn(5, generator=gen)
    tuned = [(base_w + torch.randn(5, 4, 1, 1, generator=gen), base_b + torch.randn(5, generator=gen))
             for _ in range(2)]  # fmt: skip
    resolved = _params(**{"lambda": 0.5, "router_hidden": 3, "all_linear": True})

    def extras(name, base, tensors):
        return wemoe_tensor(TensorMerge(tensors=tensors, base=base, model_params=[{}] * len(tensors),
                                        params=resolved, name=name,
                                        generator=torch.Generator().manual_seed(0)))  # fmt: skip

    weight = extras("features.3.conv.weight", base_w, [w for w, _ in tuned])
    bias = extras("features.3.conv.bias", base_b, [b for _, b in tuned])
    assert weight.extras["task_vectors"].shape == (2, 5, 4)
    conv = nn.Conv2d(4, 5, 1)
    with torch.no_grad():
        conv.weight.copy_(weight.merged)
        conv.bias.copy_(bias.merged)
    layer = WEMoELinear(conv, {**weight.extras, **bias.extras}, 0.5)
    x = torch.randn(2, 4, 3, 3, generator=gen)
    with torch.no_grad():
        assert torch.allclose(layer(x), conv(x), atol=1e-6)  # untrained: task arithmetic
        layer.router.router_out.normal_(generator=gen)  # a router that routes
        linear = WEMoELinear(_linear(weight.merged.flatten(1), bias.merged),
                             {**weight.extras, **bias.extras}, 0.5)
        linear.router.load_state_dict(layer.router.state_dict())
        pixels = x.movedim(1, -1)
        assert torch.allclose(layer(x), linear(pixels).movedim(-1, 1), atol=1e-5)
        assert layer.last_routing.shape == (2, 3, 3, 2)
        assert not torch.allclose(layer(x), conv(x), atol=1e-3)
    with pytest.raises(CheckpointError, match="only pointwise"):
        WEMoELinear(nn.Conv2d(4, 5, 1, groups=1, padding=1), {**weight.extras, **bias.extras}, 0.5)


def test_layer_is_the_papers_input_conditioned_weights_token_by_token() -> None:
    # The paper (and FusionBench's WeightEnsemblingMoE) builds the weights W_0 + sum_i r_i tau_i
    # for an input, then applies them; our layer applies the task-arithmetic weights and adds
    # the routed task vectors' products. On one token (where FusionBench's mean over a
    # sequence's tokens is that token) both are the same function.
    gen = torch.Generator().manual_seed(3)
    base_w, base_b = torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen)
    tuned = [(base_w + torch.randn(5, 4, generator=gen), base_b + torch.randn(5, generator=gen))
             for _ in range(3)]  # fmt: skip
    layer = _wemoe_layer(base_w, base_b, tuned, **{"lambda": 0.3, "router_hidden": 6})
    with torch.no_grad():
        for p in layer.router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        x = torch.randn(9, 4, generator=gen)
        ours = layer(x)
        r = layer.router(x)
        for t in range(9):
            w = base_w + sum(r[t, i] * (tuned[i][0] - base_w) for i in range(3))
            b = base_b + sum(r[t, i] * (tuned[i][1] - base_b) for i in range(3))
            assert torch.allclose(ours[t], w @ x[t] + b, atol=1e-5)


def test_cost_counts_merged_layer_task_vectors_and_router() -> None:
    shapes = {"task_vectors": (3, 6, 10), "router_in": (4, 10), "router_in_bias": (4,),
              "router_out": (3, 4), "router_out_bias": (3,), "bias": (3, 6)}  # fmt: skip
    # merged 60; three task vectors 180; their weighted sum 3*6; bias vectors 3*6;
    # router 4*10 + 3*4
    assert wemoe_cost((6, 10), shapes, {}) == (60 + 180 + 18 + 18 + 52, 60)
    one_layer = {**shapes, "router_in": (0, 10), "router_out": (3, 10)}
    assert wemoe_cost((6, 10), one_layer, {}) == (60 + 180 + 18 + 18 + 30, 60)


def test_a_router_trained_on_one_tasks_inputs_routes_to_that_tasks_vector() -> None:
    # Task A's inputs lie along e0, which only tau_A moves (to confident logits); tau_B moves
    # e1 only. Minimising the entropy of A's predictions must raise A's routing weight; B's
    # does not change the predictions on A's inputs, so it gets no gradient and stays lambda.
    base_w, base_b = torch.zeros(2, 2), torch.zeros(2)
    tau_a = torch.tensor([[4.0, 0.0], [-4.0, 0.0]])
    tau_b = torch.tensor([[0.0, 4.0], [0.0, -4.0]])
    layer = _wemoe_layer(base_w, base_b, [(base_w + tau_a, base_b), (base_w + tau_b, base_b)],
                         **{"lambda": 0.3, "router_hidden": 4})  # fmt: skip
    model = nn.Sequential(layer).eval()
    gen = torch.Generator().manual_seed(2)
    batches = [torch.stack([0.5 + torch.rand(8, generator=gen), torch.zeros(8)], 1) for _ in range(4)]
    examples = EntropyExamples(model, {"a": TaskData(batches, head=nn.Identity())})
    model.requires_grad_(False)
    router = TrainedParameters(list(layer.router.parameters()))
    settings = FinetuneSettings(steps=60, batch_size=1, learning_rate=0.05, warmup_steps=0,
                                schedule="constant", optimizer="adam", seed=0)  # fmt: skip
    losses = train(router, examples, settings)
    assert losses[-1] < 0.5 * losses[0]
    with torch.no_grad():
        model(torch.cat(batches))
    routing = layer.last_routing.mean(0)
    assert routing[0] > 0.3 + 1.0 and torch.allclose(routing[1], torch.tensor(0.3))


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    root = tmp_path_factory.mktemp("wemoe")
    return root, tiny_bert_folders(root)


def _config(bert, **params):
    root, folders = bert
    return bert_config(root, folders, "wemoe", parameters={"router_hidden": 4, **params})


def _ids() -> torch.Tensor:
    return torch.randint(5, 14, (3, 6), generator=torch.Generator().manual_seed(0))


def _load(folder):
    model = transformers.BertModel.from_pretrained(folder).eval()
    return upscale_module(model, folder).eval()


def test_untrained_wemoe_is_the_task_arithmetic_merge(tmp_path, bert):
    root, folders = bert
    out = tmp_path / "wemoe"
    report = mergelab.merge(_config(bert, steps=0, **{"lambda": 0.3}), out, progress=False)
    assert any("routers untrained" in n for n in report.notes)
    ta = tmp_path / "ta"
    mergelab.merge({"merge_method": "task_arithmetic", "base_model": str(folders["base"]),
                    "models": [{"model": str(folders[m]), "parameters": {"weight": 1.0}}
                               for m in ("m0", "m1")],
                    "parameters": {"lambda": 0.3}}, ta, progress=False)  # fmt: skip
    shared, merged = load_file(out / "model.safetensors"), load_file(ta / "model.safetensors")
    assert shared.keys() == merged.keys() and all(torch.equal(shared[k], merged[k]) for k in shared)
    model = _load(out)
    layers = [m for m in model.modules() if isinstance(m, WEMoELinear)]
    assert len(layers) == 4  # intermediate.dense and output.dense of two layers
    dense = transformers.BertModel.from_pretrained(ta).eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=_ids()).last_hidden_state,
                           dense(input_ids=_ids()).last_hidden_state)  # fmt: skip


def test_trained_routers_lower_the_entropy_and_the_folder_loads_to_the_trained_model(tmp_path, bert):
    from mergelab.api import _provider
    from mergelab.stats.stage import CollectOptions
    from mergelab.upscale.train import train_routers

    config = _config(bert, steps=30, lr=0.05)
    plan = mergelab.plan_merge(config)
    try:
        trained = train_routers(plan, _provider(plan, None, None), CollectOptions(seed=0))
    finally:
        mergelab.api.close_plan(plan)
    history = trained.entropy_history
    assert len(history) == 30 and sum(history[-5:]) < sum(history[:5])
    out = tmp_path / "wemoe"
    report = mergelab.merge(config, out, progress=False)
    assert any("routers trained 30 step(s)" in n for n in report.notes)
    assert any("extra parameters" in n and "multiply-adds" in n for n in report.notes)
    manifest = json.loads((out / "upscaled" / "upscaled.json").read_text())
    assert manifest["method"] == "wemoe" and manifest["cost"]["upscaled_macs"] > manifest["cost"]["base_macs"]
    weights = sorted(n for n, r in manifest["tensors"].items() if n.endswith(".weight") and r["active"])
    assert weights == sorted(f"encoder.layer.{i}.{p}.dense.weight" for i in (0, 1)
                             for p in ("intermediate", "output"))  # fmt: skip
    extras = load_file(out / "upscaled" / "extras" / "extras.safetensors")
    for tensor, keys in trained.extras.items():
        for key, value in keys.items():
            assert torch.equal(extras[f"{tensor}:{key}"], value)
    loaded = _load(out)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=_ids()).last_hidden_state,
                              trained.module(input_ids=_ids()).last_hidden_state, atol=1e-6)  # fmt: skip
    from mergelab.eval.models import load_model

    evaluated = load_model(out, name="wemoe")
    assert sum(isinstance(m, WEMoELinear) for m in evaluated.encoder.modules()) == 4
    from typer.testing import CliRunner

    from mergelab.cli import app

    root, folders = bert
    scored = CliRunner().invoke(app, ["eval", str(out), "--task", str(root / "task.csv"), "--head",
                                      str(folders["m0"] / "head.safetensors"), "--json",
                                      "--no-baselines"])  # fmt: skip
    assert scored.exit_code == 0, scored.output
    (result,) = json.loads(scored.output)["results"]
    assert 0.0 <= result["low"] <= result["value"] <= result["high"] <= 1.0


def test_seeded_runs_reproduce(tmp_path, bert):
    config = _config(bert, steps=5, lr=0.05)
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        mergelab.merge(config, tmp_path / name, progress=False, seed=seed)
        runs[name] = load_file(tmp_path / name / "upscaled" / "extras" / "extras.safetensors")
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert any(not torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"] if ":router" in k)


def test_bad_input_fails_before_work(tmp_path, bert):
    root, folders = bert
    for params, message in (({"router_hidden": -1}, "`router_hidden` must be in"),
                            ({"lr": 0.0}, "`lr` must be in"),
                            ({"lambda": 11.0}, "`lambda` must be in"),
                            ({"steps": 1.5}, "`steps` must be an integer"),
                            ({"lr": [0.1, 0.2]}, "is trained once for the whole merge")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            mergelab.merge(_config(bert, **params), tmp_path / "x", progress=False)
        assert not (tmp_path / "x").exists()
    no_data = _config(bert)
    no_data["data"] = {"tasks": [str(root / "task.csv")]}  # one task for two models
    with pytest.raises(ConfigError, match=r"data.tasks: 1 task\(s\) for 2 model\(s\)"):
        mergelab.merge(no_data, tmp_path / "x", progress=False)
    (tmp_path / "empty.csv").write_text("text,label\n")
    no_data["data"] = {"tasks": [str(root / "task.csv"), str(tmp_path / "empty.csv")]}
    with pytest.raises(ConfigError, match="empty.csv"):
        mergelab.merge(no_data, tmp_path / "x", progress=False)
    no_head = tmp_path / "headless"
    transformers.BertModel.from_pretrained(folders["m1"]).save_pretrained(no_head)
    config = _config(bert)
    config["models"][1]["model"] = str(no_head)
    with pytest.raises(ConfigError, match="needs the task head"):
        mergelab.merge(config, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    base = transformers.BertModel.from_pretrained(folders["base"])
    with pytest.raises(ConfigError, match="'m0': its state dict has no tensors"):
        mergelab.data_merge("wemoe", base, {"m0": {}}, {"m0": []})
    with pytest.raises(DataError, match="model 'm0': its task's data yielded no batch"):
        mergelab.data_merge("wemoe", base, {"m0": base.state_dict()}, {"m0": TaskData([], head=nn.Linear(8, 2))})
    out = tmp_path / "wemoe"
    mergelab.merge(_config(bert, steps=1), out, progress=False)
    other = transformers.BertModel(transformers.BertConfig(
        vocab_size=14, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32))  # fmt: skip
    with pytest.raises(CheckpointError, match="extras were made for"):
        upscale_module(other, out)


def test_one_layer_routers_on_every_linear_layer_write_and_load(tmp_path, bert):
    out = tmp_path / "wemoe"
    mergelab.merge(_config(bert, steps=2, router_hidden=0, all_linear=True), out, progress=False)
    extras = load_file(out / "upscaled" / "extras" / "extras.safetensors")
    name = "encoder.layer.0.attention.self.query.weight"
    assert extras[f"{name}:router_in"].shape == (0, 8) and extras[f"{name}:router_out"].shape == (2, 8)
    model = _load(out)
    layers = [m for m in model.modules() if isinstance(m, WEMoELinear)]
    assert len(layers) == 13 and all(m.router.hidden == 0 for m in layers)  # 6 per layer + pooler
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=_ids()).last_hidden_state).all()


def test_data_merge_trains_the_same_routers_in_memory_as_the_folder_merge(tmp_path, bert):
    """`mergelab.data_merge("wemoe", ...)` on the config's architecture and data: its upscaled
    result (shared weights, trained routers, cost) is the folder `mergelab.merge` writes."""
    from mergelab.api import _provider

    config = _config(bert, steps=8, lr=0.05)
    out = tmp_path / "wemoe"
    mergelab.merge(config, out, progress=False, seed=3)
    plan = mergelab.plan_merge(config)
    try:
        provider = _provider(plan, None, None)
        names = list(plan.merged_sources)
        module = provider.module()
        data = {n: provider.task_data(n) for n in names}
        folders = [m["model"] for m in config["models"]]
        state_dicts = {n: load_file(f"{f}/model.safetensors") for n, f in zip(names, folders, strict=True)}
        base = load_file(f"{config['base_model']}/model.safetensors")
        result = mergelab.data_merge("wemoe", module, state_dicts, data, base_state_dict=base,
                                     merge_seed=3, router_hidden=4, steps=8, lr=0.05)  # fmt: skip
    finally:
        mergelab.api.close_plan(plan)
    upscaled = result.upscaled
    manifest = json.loads((out / "upscaled" / "upscaled.json").read_text())
    assert upscaled.cost == manifest["cost"] and upscaled.upscaled_layers == 4
    assert len(result.entropy_history) == 8
    extras = load_file(out / "upscaled" / "extras" / "extras.safetensors")
    for tensor, keys in upscaled.extras.items():
        for key, value in keys.items():
            assert torch.allclose(extras[f"{tensor}:{key}"], value, atol=1e-6), (tensor, key)
    model = transformers.BertModel.from_pretrained(out).eval()
    model.load_state_dict(upscaled.state_dict, strict=False)
    in_memory = upscaled.upscale(model).eval()
    with torch.no_grad():
        assert torch.allclose(in_memory(input_ids=_ids()).last_hidden_state,
                              _load(out)(input_ids=_ids()).last_hidden_state, atol=1e-6)  # fmt: skip
