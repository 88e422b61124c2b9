"""SMILE: routed low-rank experts from task vectors, written beside the base weights and loaded
as a torch module (mergelab.upscale); hand-computed layers, a tiny BERT end to end, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

import mergelab
from mergelab.errors import CheckpointError, ConfigError
from mergelab.methods import get_method
from mergelab.methods.registry import TensorMerge, resolve_defaults
from mergelab.methods.smile import (
    SmileLinear,
    smile_cost,
    smile_experts,
    smile_forward,
    smile_route,
    smile_tensor,
)
from mergelab.upscale import has_upscaling, upscale_module


def _layer(weight: torch.Tensor, bias: torch.Tensor) -> torch.nn.Linear:
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


# Two tasks that moved orthogonal input directions: task 0 along e0, task 1 along e1.
W0 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
B0 = torch.tensor([0.5, -0.5])
TAU = torch.stack([
    3.0 * torch.outer(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0, 0.0])),
    2.0 * torch.outer(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0, 0.0])),
])  # fmt: skip
BIAS_DELTAS = torch.tensor([[1.0, 0.0], [0.0, 1.0]])


def test_experts_of_rank_one_task_vectors_are_exact_and_route_by_projection() -> None:
    experts = smile_experts(TAU, k=1, gate_k=1)
    assert experts["gate"].shape == (2, 3) and experts["u"].shape == (2, 2, 1)
    for i in range(2):
        assert torch.allclose(experts["u"][i] @ experts["svh"][i], TAU[i], atol=1e-6)
    experts["bias"] = BIAS_DELTAS
    x = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    weights, chosen = smile_route(x, experts["gate"], 2, 1)
    assert chosen.squeeze(1).tolist() == [0, 1] and torch.equal(weights, torch.ones(2, 1))
    out = smile_forward(x, W0, B0, experts, top_k=1)
    # token 0 -> expert 0: W0 x + b0 + tau_0 x + db_0 = [2, 0] + [.5, -.5] + [6, 0] + [1, 0]
    # token 1 -> expert 1: [0, 1] + [.5, -.5] + [0, 2] + [0, 1]
    assert torch.allclose(out, torch.tensor([[9.5, -0.5], [0.5, 3.5]]), atol=1e-5)


def test_top_two_experts_are_weighted_by_the_renormalised_softmax() -> None:
    experts = smile_experts(TAU, k=1, gate_k=1)
    x = torch.tensor([[1.0, 2.0, 0.0]])
    # logits: |e0 . x| = 1, |e1 . x| = 2 -> softmax [1, e] / (1 + e)
    w0, w1 = 1 / (1 + math.e), math.e / (1 + math.e)
    out = smile_forward(x, W0, None, experts, top_k=2)
    expected = x @ W0.T + w0 * (x @ TAU[0].T) + w1 * (x @ TAU[1].T)
    assert torch.allclose(out, expected, atol=1e-5)


def test_one_expert_with_full_rank_is_the_fine_tuned_layer() -> None:
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(5, 4, generator=gen), torch.randn(5, generator=gen)
    tuned_w, tuned_b = weight + torch.randn(5, 4, generator=gen), bias + 1.0
    method = get_method("smile")
    params = resolve_defaults(method.global_params, {"k": 4})

    def extras(name, base, tuned):
        job = TensorMerge(tensors=[tuned], base=base, model_params=[{}], params=params, name=name)
        return smile_tensor(job).extras

    layer = SmileLinear(_layer(weight, bias),
                        {**extras("fc.weight", weight, tuned_w), **extras("fc.bias", bias, tuned_b)},
                        top_k=1)  # fmt: skip
    x = torch.randn(3, 7, 4, generator=gen)
    assert torch.allclose(layer(x), x @ tuned_w.T + tuned_b, atol=1e-5)


def test_unchanged_layers_and_non_linear_tensors_get_no_experts() -> None:
    method = get_method("smile")
    params = resolve_defaults(method.global_params, {})
    same = TensorMerge(tensors=[W0.clone()], base=W0, model_params=[{}], params=params,
                       name="fc.weight")  # fmt: skip
    result = smile_tensor(same)
    assert not result.active and all(not t.any() for t in result.extras.values())
    table = TensorMerge(tensors=[torch.ones(9, 2)], base=torch.zeros(9, 2), model_params=[{}],
                        params=params, name="model.embed_tokens.weight")  # fmt: skip
    assert smile_tensor(table).extras == {}


def _conv(weight: torch.Tensor, bias: torch.Tensor, **options) -> torch.nn.Conv2d:
    layer = torch.nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), **options)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


@pytest.mark.parametrize("stride", [1, 2])
def test_a_pointwise_convolution_is_upscaled_as_a_linear_layer_per_pixel(stride) -> None:
    """A 1x1 convolution is a linear layer at every pixel: one full-rank expert gives the
    fine-tuned convolution; two experts route each pixel as the linear layer routes a token."""
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(5, 4, 1, 1, generator=gen), torch.randn(5, generator=gen)
    tuned = [(weight + torch.randn(5, 4, 1, 1, generator=gen), bias + torch.randn(5, generator=gen))
             for _ in range(2)]  # fmt: skip
    params = resolve_defaults(get_method("smile").global_params, {"k": 4, "top_k": 1})

    def extras(sources):
        jobs = (("c.weight", weight, [w for w, _ in sources]), ("c.bias", bias, [b for _, b in sources]))
        out = {}
        for name, base, tensors in jobs:
            out.update(smile_tensor(TensorMerge(tensors=tensors, base=base, model_params=[{}] * len(tensors),
                                                params=params, name=name)).extras)  # fmt: skip
        return out

    x = torch.randn(2, 4, 6, 6, generator=gen)
    one = SmileLinear(_conv(weight, bias, stride=stride), extras(tuned[:1]), top_k=1)
    expected = torch.nn.functional.conv2d(x, tuned[0][0], tuned[0][1], stride=stride)
    assert one(x).shape == expected.shape
    assert torch.allclose(one(x), expected, atol=1e-5)
    two = extras(tuned)
    as_conv = SmileLinear(_conv(weight, bias, stride=stride), two, top_k=1)
    as_linear = SmileLinear(_layer(weight.flatten(1), bias), two, top_k=1)
    pixels = x[..., ::stride, ::stride].movedim(1, -1)  # [B, H, W, C]: a token per pixel
    assert torch.allclose(as_conv(x), as_linear(pixels).movedim(-1, 1), atol=1e-6)
    assert smile_cost((5, 4, 1, 1), {k: tuple(v.shape) for k, v in two.items() if k != "bias"},
                      {"top_k": 1}) == smile_cost((5, 4), {k: tuple(v.shape) for k, v in two.items()
                                                           if k != "bias"}, {"top_k": 1})  # fmt: skip


def test_only_linear_maps_of_pixels_are_upscaled() -> None:
    """A 3x3 convolution's weight gets no experts; a grouped or padded 1x1 convolution holding
    experts is refused when wrapped, naming the problem."""
    params = resolve_defaults(get_method("smile").global_params, {})
    spatial = TensorMerge(tensors=[torch.ones(4, 4, 3, 3)], base=torch.zeros(4, 4, 3, 3),
                          model_params=[{}], params=params, name="conv.weight")  # fmt: skip
    assert smile_tensor(spatial).extras == {}
    experts = smile_experts(torch.randn(2, 4, 2), k=1, gate_k=1)
    with pytest.raises(CheckpointError, match="groups 2 .* only pointwise"):
        SmileLinear(torch.nn.Conv2d(4, 4, 1, groups=2), experts, top_k=1)
    with pytest.raises(CheckpointError, match="padding"):
        SmileLinear(torch.nn.Conv2d(2, 4, 1, padding=1), smile_experts(torch.randn(2, 4, 2), 1, 1), 1)


def test_in_memory_smile_merge_of_a_cnn_wraps_its_pointwise_convolutions() -> None:
    """A tiny CNN (3x3 conv, BatchNorm, 1x1 convs) whose fine-tune moved only its pointwise
    convolutions: SMILE of that one fine-tune at full rank is the fine-tuned network."""

    def cnn() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                                   torch.nn.ReLU(), torch.nn.Conv2d(8, 6, 1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(6, 4, 1, stride=2)).eval()  # fmt: skip

    base, tuned = cnn(), cnn()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for index in (3, 5):
            tuned[index].weight.add_(0.3 * torch.randn(tuned[index].weight.shape, generator=gen))
            tuned[index].bias.add_(0.3 * torch.randn(tuned[index].bias.shape, generator=gen))
    config = {"merge_method": "smile", "base_model": "base", "models": [{"model": "ft"}],
              "parameters": {"k": 8}}  # fmt: skip
    merged = mergelab.merge_upscaled(config, {"base": base.state_dict(), "ft": tuned.state_dict()})
    assert merged.upscaled_layers == 2
    routed = merged.upscale(cnn()).eval()
    assert [type(m).__name__ for m in routed] == ["Conv2d", "BatchNorm2d", "ReLU", "SmileLinear",
                                                  "ReLU", "SmileLinear"]  # fmt: skip
    x = torch.randn(2, 3, 8, 8, generator=gen)
    with torch.no_grad():
        assert torch.allclose(routed(x), tuned(x), atol=1e-5)


def test_cost_counts_base_router_and_chosen_experts() -> None:
    shapes = {"gate": (3 * 2, 10), "u": (3, 6, 4), "svh": (3, 4, 10)}
    # base 6*10; router 6 gate rows * 10; one expert: 4 * (6 + 10)
    assert smile_cost((6, 10), shapes, {"top_k": 1}) == (60 + 60 + 64, 60)
    assert smile_cost((6, 10), shapes, {"top_k": 2}) == (60 + 60 + 128, 60)


# --------------------------------------------------------------------------- end to end


def _bert(seed: int = 0) -> transformers.BertModel:
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=32)  # fmt: skip
    return transformers.BertModel(config).eval()


@pytest.fixture(scope="module")
def berts(tmp_path_factory) -> dict[str, Path]:
    """A base BERT and two 'fine-tunes' whose linear layers (only) moved."""
    root = tmp_path_factory.mktemp("smile")
    base = _bert()
    base.save_pretrained(root / "base")
    folders = {"base": root / "base"}
    for name, seed in (("a", 1), ("b", 2)):
        model = _bert()
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.add_(0.1 * torch.randn(module.weight.shape, generator=gen))
                    module.bias.add_(0.1 * torch.randn(module.bias.shape, generator=gen))
        model.save_pretrained(root / name)
        folders[name] = root / name
    return folders


def _config(berts, models=("a", "b"), **params) -> dict:
    return {"merge_method": "smile", "base_model": str(berts["base"]),
            "models": [{"model": str(berts[m])} for m in models], "parameters": params}  # fmt: skip


def test_smile_merge_writes_base_weights_and_experts_and_loads_as_a_module(tmp_path, berts):
    out = tmp_path / "smile"
    report = mergelab.merge(_config(berts, k=4), out, progress=False)
    assert any("extra parameters" in n and "multiply-adds" in n for n in report.notes)
    assert has_upscaling(out)
    manifest = json.loads((out / "upscaled" / "upscaled.json").read_text())
    assert manifest["method"] == "smile" and len(manifest["tasks"]) == 2
    weights = [n for n in manifest["tensors"] if n.endswith(".weight")]
    assert len(weights) == 7  # q, k, v, attention output, intermediate, output, pooler
    assert not any("LayerNorm" in n or "embeddings" in n for n in manifest["tensors"])
    cost = manifest["cost"]
    assert cost["upscaled_macs"] > cost["base_macs"] > 0 and cost["extra_parameters"] > 0

    from mergelab.eval.models import load_model

    loaded = load_model(out, name="smile")
    layers = [m for m in loaded.encoder.modules() if isinstance(m, SmileLinear)]
    assert len(layers) == 7 and all(m.num_experts == 2 for m in layers)
    # the shared weights are the base's; the routed forward adds the chosen expert
    base = transformers.BertModel.from_pretrained(berts["base"]).eval()
    dense = loaded.encoder.encoder.layer[0].intermediate.dense
    assert torch.equal(dense.weight, base.encoder.layer[0].intermediate.dense.weight)
    x = torch.randn(4, 16)
    assert torch.allclose(dense(x), smile_forward(x, dense.weight, dense.bias, dense.experts(), 1))


def test_smile_of_one_fine_tune_at_full_rank_is_that_model(tmp_path, berts):
    out = tmp_path / "one"
    mergelab.merge(_config(berts, models=("a",), k=32), out, progress=False)
    model = upscale_module(transformers.BertModel.from_pretrained(out), out).eval()
    tuned = transformers.BertModel.from_pretrained(berts["a"]).eval()
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).last_hidden_state,
                              tuned(input_ids=ids).last_hidden_state, atol=1e-4)  # fmt: skip


def test_smile_bad_input_fails_before_work(tmp_path, berts):
    with pytest.raises(ConfigError, match=r"`top_k` must be at most the number of models \(2\)"):
        mergelab.merge(_config(berts, top_k=3), tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
    assert get_method("smile").param("k").check(0) is not None
    out = tmp_path / "smile"
    mergelab.merge(_config(berts, k=2), out, progress=False)
    other = transformers.BertModel(transformers.BertConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32))  # fmt: skip
    with pytest.raises(CheckpointError, match="extras were made for"):
        upscale_module(other, out)


def test_in_memory_smile_merge_is_the_folder_merge(tmp_path, berts):
    """`merge_upscaled` on the same weights as state dicts: the same shared weights, extras,
    cost and routed module as `merge` writes and `upscale_module` loads."""
    out = tmp_path / "smile"
    mergelab.merge(_config(berts, k=4, top_k=2), out, progress=False)
    state_dicts = {name: transformers.BertModel.from_pretrained(folder).state_dict()
                   for name, folder in berts.items()}  # fmt: skip
    config = {"merge_method": "smile", "base_model": "base", "models": [{"model": "a"}, {"model": "b"}],
              "parameters": {"k": 4, "top_k": 2}}  # fmt: skip
    merged = mergelab.merge_upscaled(config, state_dicts)
    manifest = json.loads((out / "upscaled" / "upscaled.json").read_text())
    assert merged.cost == manifest["cost"] and merged.tasks == ["a", "b"]
    assert merged.records == manifest["tensors"]
    assert merged.upscaled_layers == 7
    assert merged.macs_ratio == manifest["cost"]["upscaled_macs"] / manifest["cost"]["base_macs"]
    assert merged.extra_bytes == 4 * manifest["cost"]["extra_parameters"]  # float32 extras
    base = transformers.BertModel.from_pretrained(berts["base"]).state_dict()
    assert all(torch.equal(merged.state_dict[k], base[k]) for k in base if k in merged.state_dict)

    from_folder = upscale_module(transformers.BertModel.from_pretrained(out), out).eval()
    model = transformers.BertModel(from_folder.config)
    model.load_state_dict(merged.state_dict, strict=False)
    in_memory = merged.upscale(model).eval()
    assert sum(isinstance(m, SmileLinear) for m in in_memory.modules()) == 7
    ids = torch.randint(0, 20, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(in_memory(input_ids=ids).last_hidden_state,
                           from_folder(input_ids=ids).last_hidden_state)  # fmt: skip


def test_in_memory_upscaled_merge_refuses_other_methods_and_trained_extras(berts):
    state_dicts = {name: transformers.BertModel.from_pretrained(folder).state_dict()
                   for name, folder in berts.items()}  # fmt: skip
    config = {"base_model": "base", "models": [{"model": "a"}, {"model": "b"}]}
    weighted = [{"model": m, "parameters": {"weight": 1.0}} for m in ("a", "b")]
    with pytest.raises(ConfigError, match="does not upscale; use merge_state_dicts"):
        mergelab.merge_upscaled({**config, "models": weighted, "merge_method": "task_arithmetic"},
                                state_dicts)  # fmt: skip
    with pytest.raises(ConfigError, match="`wemoe` needs data"):
        mergelab.merge_upscaled({**config, "merge_method": "wemoe"}, state_dicts)
    small = {k: v[:8] if v.ndim else v for k, v in state_dicts["a"].items()}
    with pytest.raises(ConfigError):
        mergelab.merge_upscaled({**config, "merge_method": "smile"}, {**state_dicts, "a": small})
