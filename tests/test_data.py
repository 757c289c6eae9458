"""Tests of cl_lib.data: ImageData, synthetic shapes, dataset loaders, long tail, positives."""

from __future__ import annotations

import math
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fakes import write_fake_cifar10

from cl_lib.data import (
    SHAPE_CLASSES,
    UNLABELLED,
    ImageData,
    MultiViewDataset,
    ShapesRenderer,
    load_dataset,
    load_digits_images,
    load_torchvision,
    long_tailed,
    synthetic_shapes,
    view_sources,
)


def make_data(labels: list[int], n_classes: int = 3, size: int = 4) -> ImageData:
    """Tiny ImageData whose image i is filled with the value i (to trace indices)."""
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, size, size)
    classes = tuple(f"c{k}" for k in range(n_classes))
    return ImageData(images.contiguous(), torch.tensor(labels, dtype=torch.int64), classes)


# --------------------------------------------------------------------------------------------
# ImageData
# --------------------------------------------------------------------------------------------


def test_image_data_validation_names_the_field():
    """Wrong dtype, shape or label range raise ValueError naming the field."""
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match="images"):
        ImageData(images.float(), labels, ("a", "b", "c"))
    with pytest.raises(ValueError, match="images"):
        ImageData(images[0], labels, ("a", "b", "c"))
    with pytest.raises(ValueError, match="labels"):
        ImageData(images, labels.int(), ("a", "b", "c"))
    with pytest.raises(ValueError, match="labels"):
        ImageData(images, labels[:3], ("a", "b", "c"))
    with pytest.raises(ValueError, match="labels"):
        ImageData(images, labels, ("a", "b"))  # label 2 out of range
    with pytest.raises(ValueError, match="labels"):
        ImageData(images, torch.tensor([0, -2, 1, 1]), ("a", "b", "c"))
    with pytest.raises(ValueError, match="classes"):
        ImageData(images, labels, ["a", "b", "c"])
    unlabelled = ImageData(images, torch.tensor([0, UNLABELLED, 1, 2]), ("a", "b", "c"))
    assert unlabelled.class_counts().tolist() == [1, 1, 1]


def test_image_data_subset_and_to_float():
    """subset keeps images and labels aligned; to_float maps 0..255 to [0, 1]."""
    data = make_data([0, 1, 2, 0, 1], size=2)
    sub = data.subset(torch.tensor([4, 0]))
    assert len(sub) == 2 and sub.labels.tolist() == [1, 0]
    assert sub.images[:, 0, 0, 0].tolist() == [4, 0]
    masked = data.subset(data.labels == 0)
    assert masked.images[:, 0, 0, 0].tolist() == [0, 3]
    full = ImageData(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8), torch.tensor([0]), ("a",))
    x = full.to_float()
    assert x.dtype == torch.float32 and torch.all(x == 1.0)
    assert data.to_float("cpu").max() == pytest.approx(4 / 255)
    with pytest.raises(ValueError, match="index"):
        data.subset(torch.tensor([0.0]))


# --------------------------------------------------------------------------------------------
# Synthetic shapes
# --------------------------------------------------------------------------------------------


def test_synthetic_shapes_are_deterministic_and_balanced():
    """Same seed, same images; other seed, other images; balanced class counts."""
    a = synthetic_shapes(200, seed=3)
    b = synthetic_shapes(200, seed=3)
    c = synthetic_shapes(200, seed=4)
    assert a.images.shape == (200, 3, 32, 32) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.class_counts().tolist() == [20] * 10
    assert a.classes == SHAPE_CLASSES and len(set(SHAPE_CLASSES)) == 10
    unbalanced = synthetic_shapes(50, seed=0, balanced=False, image_size=16)
    assert unbalanced.images.shape == (50, 3, 16, 16)


def _fg_bg(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Background = top-left pixel; foreground = the pixel farthest from it (L1)."""
    x = images.float() / 255
    bg = x[:, :, 0, 0]
    dist = (x - bg[:, :, None, None]).abs().sum(1).flatten(1)
    far = dist.argmax(1)
    fg = x.flatten(2)[torch.arange(len(x)), :, far]
    return fg, bg


def test_renderer_colours_are_far_apart():
    """Without noise the two colours of every image differ by at least 0.6 in L1."""
    data = synthetic_shapes(300, seed=1, noise=0.0)
    fg, bg = _fg_bg(data.images)
    assert (fg - bg).abs().sum(1).min() >= 0.6 - 3 / 255


@pytest.mark.parametrize(
    ("class_id", "area"),
    [(0, math.pi * 0.6**2), (1, (2 * 0.75 * 0.6) ** 2), (5, math.pi * (0.98**2 - 0.46**2) * 0.36)],
)
def test_antialiased_shapes_have_their_analytic_area(class_id, area):
    """Summed coverage of a disc, square and ring equals its area in pixels (within 2%)."""
    renderer = ShapesRenderer(noise=0.0, scale=(0.6, 0.6))
    images = renderer.sample_class(class_id, 20, torch.Generator().manual_seed(class_id))
    x = images.float() / 255
    fg, bg = _fg_bg(images)
    diff = (fg - bg)[:, :, None, None]
    coverage = ((x - bg[:, :, None, None]) * diff).sum(1) / (diff * diff).sum(1)
    expected = area * 16**2  # unit-frame area times (half-width in pixels)^2
    measured = coverage.flatten(1).sum(1)
    assert torch.allclose(measured, torch.full_like(measured, expected), rtol=0.02)
    # anti-aliasing: some edge pixels are strictly between the two colours
    partial = ((coverage > 0.1) & (coverage < 0.9)).flatten(1).sum(1)
    assert (partial > 0).all()


def test_sample_class_and_render_labels():
    """sample_class draws fresh nuisances; render validates labels."""
    renderer = ShapesRenderer()
    gen = torch.Generator().manual_seed(0)
    first, second = renderer.sample_class(7, 4, gen), renderer.sample_class(7, 4, gen)
    assert first.shape == (4, 3, 32, 32) and not torch.equal(first, second)
    with pytest.raises(ValueError, match="class_id"):
        renderer.sample_class(10, 4, gen)
    with pytest.raises(ValueError, match="labels"):
        renderer.render(torch.tensor([0, 11]), gen)
    with pytest.raises(ValueError, match="noise"):
        ShapesRenderer(noise=-0.1)


def test_background_texture_adds_background_variation():
    """The texture option makes the (shape-free) border rows vary; off by default."""
    labels = torch.arange(40) % 10
    plain = ShapesRenderer(noise=0.0).render(labels, torch.Generator().manual_seed(0))
    textured = ShapesRenderer(noise=0.0, background_texture=True).render(
        labels, torch.Generator().manual_seed(0)
    )
    border = (slice(None), slice(None), slice(0, 1), slice(None))  # the top row
    plain_std = (plain[border].float() / 255).std(-1).mean()
    textured_std = (textured[border].float() / 255).std(-1).mean()
    assert plain_std < 1e-3 and textured_std > 0.02


def test_raw_pixel_knn_is_poor_but_above_chance():
    """Cosine kNN (k=20) on raw pixels: above chance (10%), well below 50% (reference ~31%).

    Also times the rendering of the 4000 + 2000 images (generous bound for shared CPUs).
    """
    start = time.process_time()  # CPU time: robust to other processes on a shared machine
    train = load_dataset("shapes", "train")
    test = load_dataset("shapes", "test")
    assert time.process_time() - start < 10.0
    assert (len(train), len(test)) == (4000, 2000)
    a = F.normalize(train.to_float().flatten(1), dim=1)
    b = F.normalize(test.to_float().flatten(1), dim=1)
    _, nearest = (b @ a.T).topk(20, dim=1)
    votes = torch.zeros(len(test), 10).scatter_add_(1, train.labels[nearest], torch.ones(2000, 20))
    accuracy = (votes.argmax(1) == test.labels).float().mean().item()
    assert 0.15 < accuracy < 0.5


# --------------------------------------------------------------------------------------------
# Digits and torchvision datasets
# --------------------------------------------------------------------------------------------


def test_digits_split_is_stratified_and_complete():
    """Train and test together hold all 1797 digits, classes in both, values in range."""
    train = load_digits_images(split="train", seed=0)
    test = load_digits_images(split="test", seed=0, channels=1, image_size=16)
    assert len(train) + len(test) == 1797
    assert train.images.shape[1:] == (3, 32, 32) and test.images.shape[1:] == (1, 16, 16)
    ratio = test.class_counts().float() / (train.class_counts() + test.class_counts()).float()
    assert torch.allclose(ratio, torch.full((10,), 0.3), atol=0.02)
    assert train.images.max() > 200  # ink saturates to near white
    with pytest.raises(ValueError, match="split"):
        load_digits_images(split="val")


def _write_pickle(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_load_fake_cifar10(tmp_path):
    """Images come back as (N, 3, 32, 32) in the file's channel-major layout, labels aligned."""
    written = write_fake_cifar10(tmp_path, per_batch=6)
    train = load_torchvision("cifar10", tmp_path, split="train", check_integrity=False)
    test = load_torchvision("cifar10", tmp_path, split="test", check_integrity=False)
    assert len(train) == 30 and len(test) == 6
    data, labels = written["test_batch"]
    assert torch.equal(test.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))
    assert test.labels.tolist() == labels
    assert train.classes == tuple(f"class{k}" for k in range(10))
    first, _ = written["data_batch_1"]
    assert torch.equal(train.images[:6], torch.from_numpy(first.reshape(-1, 3, 32, 32)))


def test_fake_files_fail_the_md5_check(tmp_path):
    """With the integrity check on, hand-made files are rejected with a helpful error."""
    write_fake_cifar10(tmp_path, per_batch=6)
    with pytest.raises(FileNotFoundError, match="download=True"):
        load_torchvision("cifar10", tmp_path, split="train")


def test_load_fake_cifar100(tmp_path):
    """CIFAR-100 uses the fine labels and names."""
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    data = rng.integers(0, 256, (8, 3072), dtype=np.uint8)
    fine = rng.integers(0, 100, 8).tolist()
    for name in ("train", "test"):
        _write_pickle(folder / name, {"data": data, "fine_labels": fine, "coarse_labels": [0] * 8})
    _write_pickle(folder / "meta", {"fine_label_names": [f"f{k}" for k in range(100)]})
    test = load_torchvision("cifar100", tmp_path, split="test", check_integrity=False)
    assert test.labels.tolist() == fine and len(test.classes) == 100
    assert torch.equal(test.images, torch.from_numpy(data.reshape(-1, 3, 32, 32)))


def test_load_fake_stl10_with_unlabelled_split(tmp_path):
    """STL-10 binaries (column-major 96x96); labels 1..10 become 0..9, unlabelled -1."""
    rng = np.random.default_rng(2)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    images = {s: rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8) for s, n in
              (("train", 4), ("test", 3), ("unlabeled", 2))}  # fmt: skip
    for split, array in images.items():
        array.transpose(0, 1, 3, 2).tofile(folder / f"{split}_X.bin")
    labels = {"train": np.array([1, 10, 3, 3], np.uint8), "test": np.array([2, 2, 9], np.uint8)}
    for split, array in labels.items():
        array.tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"n{k}" for k in range(10)))
    train = load_torchvision("stl10", tmp_path, split="train", check_integrity=False)
    assert torch.equal(train.images, torch.from_numpy(images["train"]))
    assert train.labels.tolist() == [0, 9, 2, 2] and train.classes[9] == "n9"
    unlabeled = load_torchvision("stl10", tmp_path, split="unlabeled", check_integrity=False)
    assert unlabeled.labels.tolist() == [UNLABELLED, UNLABELLED]
    with pytest.raises(ValueError, match="split"):
        load_torchvision("stl10", tmp_path, split="val")


def test_missing_dataset_says_how_to_get_it(tmp_path):
    """download=False on an empty root: FileNotFoundError naming download=True and the folder."""
    with pytest.raises(FileNotFoundError, match="download=True") as info:
        load_dataset("cifar10", root=tmp_path)
    assert "cifar-10-batches-py" in str(info.value) and "data.download=true" in str(info.value)
    with pytest.raises(ValueError, match="name"):
        load_torchvision("mnist", tmp_path)


# --------------------------------------------------------------------------------------------
# Long tail and the registry
# --------------------------------------------------------------------------------------------


def test_long_tailed_follows_the_exponential_profile():
    """n_c = floor(n_max ratio^(-c/(C-1))); max/min equals the ratio; the seed picks images."""
    n = 1000
    ids = torch.arange(n)
    images = torch.stack((ids % 256, ids // 256, ids * 0), 1).to(torch.uint8).view(n, 3, 1, 1)
    data = ImageData(images, ids % 10, tuple("abcdefghij"))
    for ratio in (1.0, 10.0, 100.0):
        lt = long_tailed(data, ratio, seed=0)
        counts = lt.class_counts().double()
        expected = torch.floor(100 * ratio ** (-torch.arange(10.0) / 9) + 1e-9)
        assert torch.equal(counts, expected.double())
        assert counts.max() / counts.min() == pytest.approx(ratio, rel=0.01)
        kept = lt.images[:, 0, 0, 0].long() + 256 * lt.images[:, 1, 0, 0].long()
        assert torch.equal(kept % 10, lt.labels)  # the input's own images and labels
    picked = [long_tailed(data, 10.0, seed=s).images for s in (1, 1, 2)]
    assert torch.equal(picked[0], picked[1]) and not torch.equal(picked[0], picked[2])
    with pytest.raises(ValueError, match="imbalance_ratio"):
        long_tailed(data, 0.5)
    with pytest.raises(ValueError, match="labelled"):
        long_tailed(make_data([0, 1, UNLABELLED]), 2.0)


def test_long_tailed_keeps_original_images_and_uneven_input():
    """Kept images are the input's own, in order; uneven classes cap n_max."""
    data = make_data([0] * 10 + [1] * 4 + [2] * 10)
    lt = long_tailed(data, 4.0, seed=0)
    # class 1 (factor 1/2) can give 4 -> n_max = 8: counts 8, 4, 2
    assert lt.class_counts().tolist() == [8, 4, 2]
    values = lt.images[:, 0, 0, 0].long()
    assert torch.equal(data.labels[values], lt.labels)
    assert torch.all(values[1:] > values[:-1])


def test_load_dataset_registry():
    """Shapes splits are independent; size and imbalance_ratio apply; unknown names fail."""
    train = load_dataset("shapes", "train", size=100, seed=5)
    test = load_dataset("shapes", "test", size=100, seed=5)
    assert len(train) == 100 and not torch.equal(train.images, test.images)
    lt = load_dataset("shapes", "train", size=500, imbalance_ratio=10.0)
    assert lt.class_counts()[0] == 50 and lt.class_counts()[-1] == 5
    digits = load_dataset("digits", "test", size=50, seed=1)
    assert len(digits) == 50 and digits.images.shape[1:] == (3, 32, 32)
    with pytest.raises(ValueError, match="name"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="size"):
        load_dataset("digits", size=0)


# --------------------------------------------------------------------------------------------
# Positive views
# --------------------------------------------------------------------------------------------


def test_view_sources_identity_and_same_class():
    """View 0 is the instance; p=0 all identity; p=1 other same-class members."""
    labels = torch.randint(0, 5, (300,), generator=torch.Generator().manual_seed(0))
    index = torch.randperm(300, generator=torch.Generator().manual_seed(1))[:64]
    gen = torch.Generator().manual_seed(2)
    identity = view_sources(labels, index, 3, 0.0, gen)
    assert identity.shape == (3, 64) and torch.equal(identity, index.expand(3, -1))
    sources = view_sources(labels, index, 4, 1.0, gen)
    assert torch.equal(sources[0], index)
    assert torch.equal(labels[sources], labels[index].expand(4, -1))
    assert (sources[1:] != index).all()


def test_view_sources_rate_and_uniformity():
    """Swaps happen at rate p; a swapped view is uniform over the other class members."""
    labels = torch.arange(2000) % 4
    index = torch.arange(2000)
    p = 0.3
    sources = view_sources(labels, index, 3, p, torch.Generator().manual_seed(3))
    assert torch.equal(labels[sources], labels[index].expand(3, -1))
    rate = (sources[1:] != index).float().mean().item()
    assert abs(rate - p) < 3 * math.sqrt(p * (1 - p) / 4000)
    # uniform over the 499 other members of the class of instance 0
    many = view_sources(labels, torch.zeros(20000, dtype=torch.long), 2, 1.0,
                        torch.Generator().manual_seed(4))[1]  # fmt: skip
    counts = torch.bincount(many // 4, minlength=500)
    assert counts[0] == 0 and (counts[1:] > 0).sum() > 490
    assert counts[1:].float().std() / counts[1:].float().mean() < 0.35  # Poisson(40): 0.16


def test_view_sources_singletons_and_unlabelled_stay_themselves():
    """A class of one member and unlabelled instances have no other positive."""
    labels = torch.tensor([0, 0, 1, UNLABELLED, UNLABELLED, 2, 2])
    index = torch.arange(7)
    sources = view_sources(labels, index, 5, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(sources[:, [2, 3, 4]], index[[2, 3, 4]].expand(5, -1))
    assert (sources[1:, [0, 1, 5, 6]] == torch.tensor([1, 0, 6, 5])).all()
    with pytest.raises(ValueError, match="same_class_prob"):
        view_sources(labels, index, 2, 1.5)
    with pytest.raises(ValueError, match="n_views"):
        view_sources(labels, index, 0, 0.5)


def test_multi_view_dataset_with_torchvision_transform():
    """Items are (V, C, H, W) float views and the label; positives share the class."""
    from torchvision.transforms import v2

    data = make_data([0, 1, 2, 0, 1, 2, 0], size=8)
    dataset = MultiViewDataset(data, v2.RandomHorizontalFlip(), n_views=3, same_class_prob=1.0)
    views, label = dataset[0]
    assert views.shape == (3, 3, 8, 8) and views.dtype == torch.float32 and label == 0
    sources = (views[:, 0, 0, 0] * 255).round().long()  # image i holds the value i
    assert sources[0] == 0 and all(data.labels[s] == 0 for s in sources)
    assert (sources[1:] != 0).all()
    loader = torch.utils.data.DataLoader(MultiViewDataset(data), batch_size=4)
    batch, labels = next(iter(loader))
    assert batch.shape == (4, 2, 3, 8, 8) and labels.tolist() == [0, 1, 2, 0]
    assert torch.equal(batch[:, 0], batch[:, 1])  # no transform, no swaps: identical views


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_view_sources_and_renderer_on_cuda():
    """Same indices on the GPU as on the CPU for the same CPU generator; rendering on device."""
    labels = torch.arange(100) % 7
    index = torch.arange(0, 100, 3)
    cpu = view_sources(labels, index, 3, 0.5, torch.Generator().manual_seed(0))
    gpu = view_sources(labels.cuda(), index.cuda(), 3, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(cpu, gpu.cpu())
    images = ShapesRenderer().render(labels.cuda(), torch.Generator().manual_seed(0))
    reference = ShapesRenderer().render(labels, torch.Generator().manual_seed(0))
    assert images.is_cuda
    assert (images.cpu().int() - reference.int()).abs().max() <= 1  # rounding at .5 only
