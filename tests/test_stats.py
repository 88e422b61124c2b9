"""Statistics through hooks (mergelab.stats): Grams and Fisher against hand computations."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mergelab.stats import (
    DataError,
    GramStore,
    TaskData,
    collect_fisher,
    collect_grams,
    estimate_gram_bytes,
    load_fisher,
    load_grams,
    with_head,
)
from mergelab.stats.gram import gram_layers


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class TokenMLP(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear over tokens: inputs [batch, tokens] of ids."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.up = nn.Linear(4, 5)
        self.down = nn.Linear(5, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(ids))))


def test_linear_gram_equals_xtx_with_tokens_flattened_and_counts():
    torch.manual_seed(0)
    model = TokenMLP().double()
    ids = torch.randint(0, 7, (6, 3), generator=_gen())
    stats = collect_grams(model, [ids[:4], ids[4:]])
    x = model.embed(ids).detach().reshape(-1, 4)
    h = torch.relu(model.up(x)).detach()
    assert torch.allclose(stats.layers["up"].gram, x.T @ x)
    assert torch.allclose(stats.layers["down"].gram, h.T @ h)
    assert stats.layers["up"].count == 18 and stats.examples == 6 and stats.batches == 2
    assert torch.allclose(stats.layers["up"].mean(), x.T @ x / 18)
    counts = torch.bincount(ids.reshape(-1), minlength=7).double()
    assert stats.layers["embed"].kind == "embedding"
    assert torch.equal(stats.layers["embed"].gram, counts)
    assert stats.layers["up"].gram.dtype == torch.float64


def test_float32_inputs_accumulate_in_float64():
    model = nn.Linear(3, 2)
    x = torch.randn(5, 3, generator=_gen(1))
    stats = collect_grams(model, [x])
    layer = stats.layers[""]  # the root module itself is a layer
    assert layer.gram.dtype == torch.float64
    assert torch.allclose(layer.gram, (x.double().T @ x.double()), atol=1e-5)


def _patches_by_hand(x: torch.Tensor, k: int, stride: int, padding: int) -> torch.Tensor:
    """Rows = output positions, columns = (channel, ky, kx): the conv weight's column order."""
    x = F.pad(x, (padding,) * 4)
    b, c, h, w = x.shape
    rows = []
    for n in range(b):
        for i in range(0, h - k + 1, stride):
            for j in range(0, w - k + 1, stride):
                rows.append(x[n, :, i : i + k, j : j + k].reshape(-1))
    return torch.stack(rows)


def test_conv_gram_equals_gram_of_patches_per_group():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2).double()
    x = torch.randn(2, 4, 5, 5, generator=_gen(2), dtype=torch.float64)
    stats = collect_grams(conv, [x])
    g = stats.layers[""]
    assert g.kind == "conv" and g.gram.shape == (2, 18, 18)
    for group in range(2):
        p = _patches_by_hand(x[:, 2 * group : 2 * group + 2], 3, 2, 1)
        assert torch.allclose(g.gram[group], p.T @ p)
    assert g.count == 2 * 3 * 3
    # The Gram's column order matches the weight's: the conv output equals patches @ W^T.
    p0 = _patches_by_hand(x[:, :2], 3, 2, 1)
    w0 = conv.weight[:3].reshape(3, -1)
    out = conv(x)[:, :3].permute(0, 2, 3, 1).reshape(-1, 3) - conv.bias[:3]
    assert torch.allclose(p0 @ w0.T, out, atol=1e-10)


def test_conv1d_gram():
    conv = nn.Conv1d(2, 3, 3, padding=1).double()
    x = torch.randn(2, 2, 6, generator=_gen(3), dtype=torch.float64)
    g = collect_grams(conv, [x]).layers[""]
    padded = F.pad(x, (1, 1))
    rows = [padded[n, :, i : i + 3].reshape(-1) for n in range(2) for i in range(6)]
    p = torch.stack(rows)
    assert torch.allclose(g.gram[0], p.T @ p)


def test_memory_estimate_counts_float64_accumulators():
    model = TokenMLP()
    assert estimate_gram_bytes(gram_layers(model)) == 8 * (7 + 4 * 4 + 5 * 5)
    stats = collect_grams(model, [torch.randint(0, 7, (2, 3), generator=_gen())])
    assert stats.estimated_bytes == 8 * (7 + 16 + 25)


def test_statistics_on_disk_round_trip_and_atomic(tmp_path):
    model = TokenMLP()
    ids = torch.randint(0, 7, (4, 3), generator=_gen())
    stats = collect_grams(model, [ids], out_dir=tmp_path / "stats")
    loaded = load_grams(tmp_path / "stats")
    for name, layer in stats.layers.items():
        assert torch.equal(loaded.layers[name].gram, layer.gram)
        assert loaded.layers[name].count == layer.count
    store = GramStore(tmp_path / "stats")
    assert store.get("down").kind == "linear" and "up" in store
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats"]  # no partial folder left
    # Rewriting replaces it; an unrelated existing folder is refused.
    collect_grams(model, [ids[:2]], out_dir=tmp_path / "stats")
    assert load_grams(tmp_path / "stats").examples == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(Exception, match="not a statistics folder"):
        collect_grams(model, [ids], out_dir=tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").exists()


def test_layer_selection_and_unsupported_layers_are_named():
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3), nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"))
    assert set(gram_layers(model)) == {"0"}  # the reflect-padded conv is left to averaging
    with pytest.raises(DataError, match=r"layer `1` is a LayerNorm"):
        gram_layers(model, ["1"])
    with pytest.raises(DataError, match=r"layer `2` \(Conv2d\) uses padding_mode 'reflect'"):
        gram_layers(model, ["2"])
    with pytest.raises(DataError, match="no layer named `nope`"):
        gram_layers(model, ["nope"])
    assert set(gram_layers(model, ["0", "1*"])) == {"0"}  # globs pass over norms, containers
    with pytest.raises(DataError, match="reflect"):
        gram_layers(model, ["*"])  # but not over a convolution they cannot handle


def test_bad_data_gives_clear_errors():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(DataError, match="yielded no batch"):
        collect_grams(model, [])
    with pytest.raises(DataError, match="batch 1 does not fit"):
        collect_grams(model, [torch.randn(2, 3), torch.randn(2, 4)])
    bad = torch.randn(2, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(DataError, match="non-finite values reached layer `0`"):
        collect_grams(model, [bad])
    with pytest.raises(DataError, match="a batch must be"):
        collect_grams(model, [(torch.randn(2, 3),) * 3])


def test_max_examples_cuts_the_last_batch():
    model = nn.Linear(2, 2)
    x = torch.randn(10, 2, generator=_gen())
    stats = collect_grams(model, [x[:4], x[4:8], x[8:]], max_examples=6)
    layer = stats.layers[""]
    assert stats.examples == 6 and layer.count == 6
    assert torch.allclose(layer.gram, x[:6].double().T @ x[:6].double(), atol=1e-5)


# --- Fisher -----------------------------------------------------------------------------------------


def _fisher_by_hand(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    sums = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(x.shape[0]):
        model.zero_grad()
        logp = torch.log_softmax(model(x[i : i + 1]), -1)
        (-logp[0, y[i]]).backward()
        for n, p in model.named_parameters():
            sums[n] += p.grad.square()
    return {n: s / x.shape[0] for n, s in sums.items()}


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_fisher_equals_per_example_squared_gradients(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(7, 3, generator=_gen(4), dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=_gen(5))
    stats = collect_fisher(model, [(x[:4], y[:4]), (x[4:], y[4:])], mode=mode)
    expected = _fisher_by_hand(model, x, y)
    assert stats.examples == 7 and stats.mode == mode
    for n, f in expected.items():
        assert torch.allclose(stats.fisher[n].double(), f, rtol=1e-5, atol=1e-9), n
    # The square of the batch gradient is not the Fisher (cross terms): a real difference.
    model.zero_grad()
    F.cross_entropy(model(x), y, reduction="sum").backward()
    batch_sq = model[0].weight.grad.square() / 7
    assert not torch.allclose(batch_sq, expected["0.weight"], rtol=1e-3)


def test_fisher_on_disk_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2))
    x = torch.randn(4, 3, generator=_gen(3))
    stats = collect_fisher(model, [x], target="argmax", out_dir=tmp_path / "fisher")
    loaded, examples = load_fisher(tmp_path / "fisher")
    assert examples == 4 and set(loaded) == {"0.weight", "0.bias"}
    assert torch.equal(loaded["0.weight"], stats.fisher["0.weight"])
    with pytest.raises(Exception, match="not a Fisher statistics folder"):
        load_fisher(tmp_path)


def test_fisher_argmax_and_sample_targets():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3)).double()
    x = torch.randn(6, 3, generator=_gen(6), dtype=torch.float64)
    argmax = collect_fisher(model, [x], target="argmax")
    expected = _fisher_by_hand(model, x, model(x).argmax(-1))
    assert torch.allclose(argmax.fisher["0.weight"].double(), expected["0.weight"], rtol=1e-5)
    a = collect_fisher(model, [x], target="sample", generator=_gen(9))
    b = collect_fisher(model, [x], target="sample", generator=_gen(9))
    assert torch.equal(a.fisher["0.weight"], b.fisher["0.weight"])  # reproducible from a seed
    with pytest.raises(DataError, match="carries no labels"):
        collect_fisher(model, [x], target="labels")


def test_fisher_through_a_head_only_on_the_module_parameters():
    encoder = nn.Linear(3, 4)
    head = nn.Linear(4, 2)
    x = torch.randn(5, 3, generator=_gen(7))
    y = torch.randint(0, 2, (5,), generator=_gen(8))
    stats = collect_fisher(encoder, [(x, y)], forward=with_head(head))
    assert set(stats.fisher) == {"weight", "bias"}
    composed = nn.Sequential(encoder, head)
    expected = _fisher_by_hand(composed, x, y)
    assert torch.allclose(stats.fisher["weight"], expected["0.weight"], rtol=1e-4, atol=1e-8)


def test_fisher_bad_inputs():
    model = nn.Sequential(nn.Linear(3, 2))
    with pytest.raises(DataError, match="yielded no batch"):
        collect_fisher(model, [])
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(DataError, match="non-finite logits .*batch 0"):
        collect_fisher(model, [torch.randn(2, 3)])
    with pytest.raises(DataError, match="target must be"):
        collect_fisher(model, [torch.randn(2, 3)], target="bogus")  # type: ignore[arg-type]


def test_fisher_on_dict_batches_of_token_logits_ignores_negative_labels():
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.out = nn.Linear(3, 2)

        def forward(self, input_ids):
            return self.out(self.embed(input_ids))

    model = Tagger()
    ids = torch.randint(0, 5, (3, 4), generator=_gen(1))
    labels = torch.randint(0, 2, (3, 4), generator=_gen(2))
    labels[:, -1] = -100
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # vmap handles a dict of inputs: no fallback warning
        stats = collect_fisher(model, [{"input_ids": ids, "labels": labels}])
    assert stats.mode == "vmap"
    # by hand: per sequence, sum of token log-likelihoods, ignoring label -100
    sums = torch.zeros_like(model.out.weight)
    for i in range(3):
        model.zero_grad()
        logp = torch.log_softmax(model(ids[i : i + 1]), -1)[0]
        keep = labels[i] >= 0
        (-logp[keep].gather(-1, labels[i][keep].unsqueeze(-1)).sum()).backward()
        sums += model.out.weight.grad.square()
    assert torch.allclose(stats.fisher["out.weight"], sums / 3, rtol=1e-4, atol=1e-8)


def test_task_data_reiterates_and_materialises_one_shot_iterators():
    data = TaskData(iter([torch.ones(2, 3), torch.ones(1, 3)]))
    assert len(list(data.iterate())) == 2 and len(list(data.iterate())) == 2
    calls = []
    fresh = TaskData(lambda: (calls.append(1), iter([torch.ones(1, 3)]))[1])
    list(fresh.iterate())
    list(fresh.iterate())
    assert len(calls) == 2
