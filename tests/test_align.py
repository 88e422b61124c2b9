"""Alignment of models from different inits: spec derivation, Git Re-Basin matching, ZipIt!,
BatchNorm repair. Tiny models, seconds on CPU."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from _align_models import CNN, MLP, ResNet, Transformer  # noqa: E402

from mergelab.align import (  # noqa: E402
    AlignError,
    PermutationSpec,
    Probe,
    activation_matching,
    align_to_reference,
    derive_spec,
    invert,
    permute_state_dict,
    random_permutations,
    weight_matching,
    weight_matching_many,
)
from mergelab.align.features import collect_moments  # noqa: E402
from mergelab.align.repair import _channel_stats, repair_rescale, reset_batchnorm  # noqa: E402
from mergelab.align.zipit import (  # noqa: E402
    SpaceMerge,
    permute_match,
    zip_match,
    zip_models,
    zip_state_dicts,
)


def _inputs(kind: str, g: torch.Generator, batch: int = 16) -> torch.Tensor:
    if kind == "mlp":
        return torch.randn(batch, 12, generator=g)
    if kind == "transformer":
        return torch.randint(0, 20, (batch, 6), generator=g)
    return torch.randn(batch, 1, 8, 8, generator=g)


def _model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = {"mlp": MLP, "cnn": CNN, "resnet": ResNet, "transformer": Transformer}[kind]()
    if kind == "transformer":
        with torch.no_grad():
            model.pos.normal_()
    # Non-trivial BatchNorm statistics, so permuting them is tested too.
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(0.2, 0.6)  # keeps every unit alive on the data
    return model.eval()


def _permuted_copy(model, spec, perms):
    other = copy.deepcopy(model)
    other.load_state_dict(permute_state_dict(spec, model.state_dict(), perms))
    return other


KINDS = ["mlp", "cnn", "resnet", "transformer"]
CUTS = {"mlp": "fc1", "cnn": "bn1", "resnet": "layer1", "transformer": "layers.0"}


# ---------------------------------------------------------------------- derived specs


def test_mlp_spec_is_the_hand_written_one():
    model = _model("mlp")
    spec = derive_spec(model, torch.zeros(2, 12))
    hand = PermutationSpec.build(
        {"fc1": 16, "fc2": 16},
        {
            "fc1.weight": ["fc1", None], "fc1.bias": ["fc1"],
            "fc2.weight": ["fc2", "fc1"], "fc2.bias": ["fc2"],
            "fc3.weight": [None, "fc2"], "fc3.bias": [None],
        },
    )  # fmt: skip
    assert {k: v.size for k, v in spec.spaces.items()} == {"fc1": 16, "fc2": 16}
    assert dict(spec.axes) == dict(hand.axes)
    assert [p.module for p in spec.spaces["fc1"].probes] == ["fc2"]


def test_resnet_residual_stream_ties_blocks():
    spec = derive_spec(_model("resnet"), torch.zeros(2, 1, 8, 8))
    stem = spec.axes["conv1.weight"][0][0].space
    # every block of stage 1 writes into the stem's stream; stage 2's projection starts a new one
    for name in ("layer1.0.conv2.weight", "layer1.1.conv2.weight", "layer1.1.bn2.running_var"):
        assert spec.axes[name][0][0].space == stem
    stage2 = spec.axes["layer2.0.shortcut.0.weight"][0][0].space
    assert stage2 != stem
    assert spec.axes["layer2.1.conv2.weight"][0][0].space == stage2
    assert spec.axes["layer2.0.shortcut.0.weight"][1][0].space == stem
    assert spec.axes["fc.weight"][1][0].space == stage2
    assert spec.axes["fc.weight"][0] == ()  # class outputs are never permuted
    assert len(spec.spaces) == 6  # stem stream, stage-2 stream, one inner space per block


def test_transformer_spec_per_head_spaces():
    spec = derive_spec(_model("transformer"), torch.zeros(2, 6, dtype=torch.long))
    qk = spec.spaces["layers.0.attn.qk"]
    assert (qk.size, qk.head_size) == (16, 8)
    packed = spec.axes["layers.0.attn.in_proj_weight"][0]
    assert [s.space for s in packed] == ["layers.0.attn.qk", "layers.0.attn.qk", "layers.0.attn.v"]
    stream = spec.axes["embed.weight"][1][0].space
    assert spec.axes["pos"][2][0].space == stream  # positional embedding added to the stream
    assert spec.axes["layers.1.ln2.weight"][0][0].space == stream


# ---------------------------------------------------------------------- matching recovers perms


@pytest.mark.parametrize("kind", KINDS)
def test_random_permutation_is_recovered_exactly(kind):
    g = torch.Generator().manual_seed(3)
    model = _model(kind)
    x = _inputs(kind, g, 32)
    spec = derive_spec(model, x)
    perms = random_permutations(spec, g)
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    other = _permuted_copy(model, spec, perms)
    with torch.no_grad():
        torch.testing.assert_close(other(x), model(x), atol=1e-5, rtol=1e-5)

    found = weight_matching(spec, model.state_dict(), other.state_dict(), generator=g)
    for name, perm in perms.items():
        assert torch.equal(found[name], invert(perm)), name
    found = activation_matching(spec, model, other, [_inputs(kind, g, 32) for _ in range(3)])
    for name, perm in perms.items():
        assert torch.equal(found[name], invert(perm)), name

    aligned, _ = align_to_reference(spec, [model, other], method="weight", generator=g)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(aligned[1][key], value)


def test_weight_matching_of_unrelated_models_improves_the_objective():
    g = torch.Generator().manual_seed(0)
    a, b = _model("mlp", 1), _model("mlp", 2)
    spec = derive_spec(a, torch.zeros(2, 12))
    perms = weight_matching(spec, a.state_dict(), b.state_dict(), generator=g)
    moved = permute_state_dict(spec, b.state_dict(), perms)

    def inner(sd):
        return sum(float((a.state_dict()[k] * sd[k]).sum()) for k in spec.axes)

    assert inner(moved) > inner(b.state_dict())


# ---------------------------------------------------------------------- ZipIt!


def test_zip_match_hand_example():
    # units A0, A1 (model 0) and B0, B1 (model 1)
    corr = torch.eye(4)
    for (i, j), v in {(0, 3): 0.9, (0, 1): 0.95, (2, 3): 0.5, (1, 2): 0.3, (0, 2): 0.1,
                      (1, 3): 0.2}.items():  # fmt: skip
        corr[i, j] = corr[j, i] = v
    # beta = 0: no within-model merges: A0+B1 first (0.9), then A1+B0 is all that is left
    sm = zip_match(corr, 2, alpha=0.3, beta=0.0)
    assert torch.equal(sm.unmerges[0], torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    assert torch.equal(sm.unmerges[1], torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64))
    assert torch.equal(sm.merges[0], 0.5 * sm.unmerges[0].T)
    # beta = 1 (budget 1 per model): A0+A1 (0.95) first, then B0+B1 (0.5) beats min(0.9, 0.2)
    sm = zip_match(corr, 2, alpha=0.3, beta=1.0)
    assert torch.equal(sm.merges[0], torch.tensor([[0.5, 0.5], [0.0, 0.0]], dtype=torch.float64))
    assert torch.equal(sm.merges[1], torch.tensor([[0.0, 0.0], [0.5, 0.5]], dtype=torch.float64))
    # permute_match: B1 goes with A0, B0 with A1 (assignment 0.9 + 0.3 > 0.1 + 0.2)
    pm = permute_match(corr, 2)
    assert torch.equal(pm.unmerges[1], torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64))


def test_zip_state_dicts_formula():
    g = torch.Generator().manual_seed(0)
    spec = PermutationSpec.build(
        {"h": 3},
        {"l1.weight": ["h", None], "l1.bias": ["h"], "l2.weight": [None, "h"]},
    )
    sds = [{"l1.weight": torch.randn(3, 2, generator=g), "l1.bias": torch.randn(3, generator=g),
            "l2.weight": torch.randn(4, 3, generator=g)} for _ in range(2)]  # fmt: skip
    merges = [torch.rand(3, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    unmerges = [torch.rand(3, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    out = zip_state_dicts(spec, sds, {"h": SpaceMerge(merges, unmerges)})
    w1 = sum(m.float() @ sd["l1.weight"] for m, sd in zip(merges, sds, strict=True))
    torch.testing.assert_close(out["l1.weight"], w1)
    b1 = sum(m.float() @ sd["l1.bias"] for m, sd in zip(merges, sds, strict=True))
    torch.testing.assert_close(out["l1.bias"], b1)
    # the classifier only consumes the space: its models' contributions are averaged
    w2 = sum(sd["l2.weight"] @ u.float() for u, sd in zip(unmerges, sds, strict=True)) / 2
    torch.testing.assert_close(out["l2.weight"], w2)


@pytest.mark.parametrize("kind", KINDS)
def test_zipping_a_model_with_itself_is_function_equivalent(kind):
    g = torch.Generator().manual_seed(5)
    model = _model(kind)
    batches = [_inputs(kind, g, 32) for _ in range(3)]
    x = _inputs(kind, g, 8)
    spec = derive_spec(model, x)
    with torch.no_grad():
        want = model(x)
        for copies in (2, 3):
            zipped = zip_models([model] * copies, batches, spec=spec, repair=None)
            torch.testing.assert_close(zipped(x), want, atol=1e-5, rtol=1e-5)
        # a permuted copy zips back onto the original too
        other = _permuted_copy(model, spec, random_permutations(spec, g))
        zipped = zip_models([model, other], batches, spec=spec, repair=None)
        torch.testing.assert_close(zipped(x), want, atol=1e-5, rtol=1e-5)
        # partial zipping: one head per model, each computing the original function
        multi = zip_models([model, other], batches, spec=spec, stop_at=CUTS[kind], repair=None)
        outs = multi(x)
        assert len(outs) == 2
        for out in outs:
            torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_zipping_different_models_differs_from_either_and_repair_runs():
    g = torch.Generator().manual_seed(1)
    a, b = _model("resnet", 1), _model("resnet", 2)
    batches = [_inputs("resnet", g, 16) for _ in range(2)]
    zipped = zip_models([a, b], batches)
    x = batches[0]
    with torch.no_grad():
        assert not torch.allclose(zipped(x), a(x), atol=1e-3)
    assert not zipped.training
    # partial zip: the trunk's BatchNorm statistics are re-estimated, the heads keep their own
    multi = zip_models([a, b], batches, stop_at="layer1")
    assert not torch.equal(multi.trunk.bn1.running_mean, a.bn1.running_mean)
    for head, source in zip(multi.heads, (a, b), strict=True):
        bn = head.get_submodule("layer2.0.bn1")
        torch.testing.assert_close(bn.running_var, source.layer2[0].bn1.running_var)
        # heads are copies: the source models stay untouched
        assert bn.running_var.data_ptr() != source.layer2[0].bn1.running_var.data_ptr()


# ---------------------------------------------------------------------- repair


def test_reset_batchnorm_is_the_average_of_batch_statistics():
    bn = nn.BatchNorm1d(2)
    bn.running_mean.fill_(7.0)
    model = nn.Sequential(bn).eval()
    batches = [torch.tensor([[0.0, 1.0], [2.0, 3.0]]), torch.tensor([[4.0, 5.0], [6.0, 9.0]])]
    assert reset_batchnorm(model, batches + batches[:1], num_batches=2) == 2
    torch.testing.assert_close(bn.running_mean, torch.tensor([3.0, 4.5]))
    # unbiased variance of each batch: [2, 2] and [2, 8]
    torch.testing.assert_close(bn.running_var, torch.tensor([2.0, 5.0]))
    assert not bn.training
    assert reset_batchnorm(nn.Sequential(nn.Linear(2, 2)), batches) == 0
    with pytest.raises(AlignError, match="at least one batch"):
        reset_batchnorm(model, [])


def test_repair_rescale_matches_target_statistics():
    g = torch.Generator().manual_seed(0)
    a, b = _model("mlp", 1), _model("mlp", 2)
    spec = derive_spec(a, torch.zeros(2, 12))
    batches = [torch.randn(64, 12, generator=g) for _ in range(2)]
    merged = copy.deepcopy(a)
    merged.load_state_dict({k: (a.state_dict()[k] + b.state_dict()[k]) / 2 for k in a.state_dict()})
    names = repair_rescale(merged, [a, b], spec, batches)
    assert names == ["fc1", "fc2"]
    sa, sb = _channel_stats(a, names, batches, None), _channel_stats(b, names, batches, None)
    sm = _channel_stats(merged, names, batches, None)
    for name in names:
        torch.testing.assert_close(
            sm[name][0], (sa[name][0] + sb[name][0]) / 2, atol=1e-4, rtol=1e-4
        )
        torch.testing.assert_close(
            sm[name][1], (sa[name][1] + sb[name][1]) / 2, atol=1e-4, rtol=1e-4
        )


# ---------------------------------------------------------------------- errors and hand specs


class _WithGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.rnn = nn.GRU(4, 4)

    def forward(self, x):
        return self.rnn(self.fc(x))[0]


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, groups=4)

    def forward(self, x):
        return self.dw(x)


def test_underivable_architectures_name_the_module():
    with pytest.raises(AlignError, match=r"module `rnn` \(GRU\)"):
        derive_spec(_WithGRU(), torch.zeros(3, 2, 4))
    with pytest.raises(AlignError, match=r"module `dw` \(Conv2d\) has groups=4"):
        derive_spec(_Grouped(), torch.zeros(1, 4, 5, 5))

    class Spatial(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 3, 3, padding=1)
            self.fc = nn.Linear(3 * 4 * 4, 2)

        def forward(self, x):
            return self.fc(torch.flatten(self.conv(x), 1))

    with pytest.raises(AlignError, match="flatten"):
        derive_spec(Spatial(), torch.zeros(1, 1, 4, 4))


def test_models_of_different_shapes_are_refused():
    a = MLP(width=16)
    b = MLP(width=20)
    spec = derive_spec(a, torch.zeros(2, 12))
    with pytest.raises(
        AlignError, match=r"`fc1.weight`: model 0 has shape \(16, 12\), model 1 has"
    ):
        weight_matching(spec, a.state_dict(), b.state_dict())
    with pytest.raises(AlignError, match="different shapes"):
        zip_models([a, b], [torch.zeros(4, 12)])


def test_too_few_batches_for_correlations():
    model = _model("mlp")
    spec = derive_spec(model, torch.zeros(2, 12))
    with pytest.raises(AlignError, match=r"yielded 1 batch\(es\) but `num_batches`=3"):
        collect_moments([model, model], spec, [torch.zeros(4, 12)], num_batches=3)
    with pytest.raises(AlignError, match="yielded no batch"):
        activation_matching(spec, model, model, [])
    with pytest.raises(AlignError, match="needs `batches`"):
        zip_models([model, model], [])
    with pytest.raises(AlignError, match=r"saw 1 sample\(s\)"):
        zip_models([model, model], [torch.zeros(1, 12)])


def test_bad_partial_cut_and_parameters():
    g = torch.Generator().manual_seed(0)
    model = _model("resnet")
    batches = [_inputs("resnet", g)]
    with pytest.raises(AlignError, match="names no module"):
        zip_models([model, model], batches, stop_at="layer9")
    # inside a block the shortcut crosses the cut
    with pytest.raises(AlignError, match="cut at a block boundary"):
        zip_models([model, model], batches, stop_at="layer1.0.bn1")
    with pytest.raises(AlignError, match="`alpha` and `beta`"):
        zip_models([model, model], batches, alpha=2.0)


def test_hand_declared_spec_for_an_untraceable_model():
    class Dynamic(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(5, 8)
            self.fc2 = nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            if h.sum() > -1:
                h = h * 1.0
            return self.fc2(h)

    torch.manual_seed(0)
    model = Dynamic().eval()
    with pytest.raises(AlignError, match="cannot trace Dynamic"):
        derive_spec(model, torch.zeros(2, 5))
    spec = PermutationSpec.build(
        {"h": 8},
        {"fc1.weight": ["h", None], "fc1.bias": ["h"], "fc2.weight": [None, "h"]},
        probes={"h": [Probe("fc2")]},
    )
    g = torch.Generator().manual_seed(1)
    perms = random_permutations(spec, g)
    other = _permuted_copy(model, spec, perms)
    found = weight_matching(spec, model.state_dict(), other.state_dict())
    assert torch.equal(found["h"], invert(perms["h"]))
    x = torch.randn(16, 5, generator=g)
    zipped = zip_models([model, other], [x], spec=spec, repair=None)
    with torch.no_grad():
        torch.testing.assert_close(zipped(x), model(x), atol=1e-5, rtol=1e-5)
    with pytest.raises(AlignError, match="needs a spec derived"):
        zip_models([model, other], [x], spec=spec, stop_at="fc1")


def test_weight_matching_many_recovers_permuted_copies():
    g = torch.Generator().manual_seed(4)
    model = _model("resnet")
    spec = derive_spec(model, torch.zeros(2, 1, 8, 8))
    copies = [model.state_dict()] + [
        permute_state_dict(spec, model.state_dict(), random_permutations(spec, g)) for _ in range(2)
    ]
    aligned, perms = weight_matching_many(spec, copies, generator=g)
    for sd in aligned:
        for key, value in model.state_dict().items():
            torch.testing.assert_close(sd[key], value)
    assert all(torch.equal(p, torch.arange(len(p))) for p in perms[0].values())
