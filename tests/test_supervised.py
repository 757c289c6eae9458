"""Tests for cl_lib.supervised: the digits split, balanced batches, the short supervised run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cl_lib.losses import supcon_loss
from cl_lib.supervised import (
    balanced_batches,
    embed,
    load_digits_split,
    make_embedding_mlp,
    prototype_stats,
    supcon_prototype_bound,
    train_supervised_embedding,
)
from cl_lib.toy import class_clusters


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one thread is fastest, and several threads crawl on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    return load_digits_split(test_fraction=0.3, seed=0)


def test_digits_split_shapes_standardised_and_stratified(digits):
    assert digits.x_train.shape == (1257, 64) and digits.x_test.shape == (540, 64)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.long
    assert digits.x_train.mean(0).abs().max() < 1e-4
    stds = digits.x_train.std(0)
    varying = stds > 0.5
    assert torch.allclose(stds[varying], torch.ones_like(stds[varying]), atol=1e-4)
    train_share = torch.bincount(digits.y_train, minlength=10) / len(digits.y_train)
    test_share = torch.bincount(digits.y_test, minlength=10) / len(digits.y_test)
    assert (train_share - test_share).abs().max() < 0.01


@pytest.mark.parametrize("bad", [0.0, 1.0, 1, "0.3"])
def test_digits_split_rejects_bad_fraction(bad):
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(test_fraction=bad)


def test_digits_split_in_float64_equals_the_float32_split(digits):
    wide = load_digits_split(test_fraction=0.3, seed=0, dtype=torch.float64)
    assert wide.x_train.dtype == wide.x_test.dtype == torch.float64
    assert torch.equal(wide.y_train, digits.y_train)
    assert torch.allclose(wide.x_train.float(), digits.x_train, atol=1e-5)
    with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64"):
        load_digits_split(dtype=torch.float16)


def test_float64_training_is_insensitive_to_float32_sized_perturbations():
    """The chapters train in float64: a 1e-12 change of the inputs (far above the round-off
    differences between CPUs) moves the result by far less than the printed 1e-3."""
    wide = load_digits_split(test_fraction=0.3, seed=0, dtype=torch.float64)
    kwargs = dict(epochs=6, snapshot_x=wide.x_test, snapshot_epochs=[6], seed=0)
    run = train_supervised_embedding(wide.x_train, wide.y_train, **kwargs)
    nudged = train_supervised_embedding(wide.x_train + 1e-12, wide.y_train, **kwargs)
    assert next(run.model.parameters()).dtype == torch.float64
    assert run.snapshots[6].dtype == torch.float64
    assert (run.losses - nudged.losses).abs().max() < 1e-6
    assert (run.snapshots[6] - nudged.snapshots[6]).abs().max() < 1e-6


def test_mlp_seeded_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a, b, c = (make_embedding_mlp(8, 3, 16, seed=s) for s in (1, 1, 2))
    assert torch.equal(torch.get_rng_state(), state)
    x = torch.randn(5, 8)
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    assert a(x).shape == (5, 3)
    with pytest.raises(ValueError, match="out_dim"):
        make_embedding_mlp(8, out_dim=1)


def test_balanced_batches_cover_each_class_equally_without_repeats():
    labels = torch.tensor([0] * 7 + [1] * 9 + [2] * 5)
    g = torch.Generator().manual_seed(3)
    batches = balanced_batches(labels, per_class=2, generator=g)
    assert batches.shape == (2, 6)  # min count 5 -> 2 batches of 2 per class
    for row in batches:
        assert torch.equal(torch.bincount(labels[row], minlength=3), torch.tensor([2, 2, 2]))
    assert batches.flatten().unique().numel() == batches.numel()
    again = balanced_batches(labels, 2, torch.Generator().manual_seed(3))
    assert torch.equal(batches, again)


def test_balanced_batches_rejects_small_or_missing_classes():
    with pytest.raises(ValueError, match="per_class"):
        balanced_batches(torch.tensor([0, 0, 1]), per_class=2)
    with pytest.raises(ValueError, match="per_class"):
        balanced_batches(torch.tensor([0, 0, 2, 2]), per_class=1)  # class 1 is empty
    with pytest.raises(ValueError, match="labels"):
        balanced_batches(torch.tensor([0.0, 1.0]), per_class=1)


def test_training_is_deterministic_and_learns(digits):
    kwargs = dict(epochs=12, snapshot_x=digits.x_test, snapshot_epochs=[0, 12], seed=4)
    run = train_supervised_embedding(digits.x_train, digits.y_train, **kwargs)
    again = train_supervised_embedding(digits.x_train, digits.y_train, **kwargs)
    assert torch.equal(run.losses, again.losses)
    assert torch.equal(run.snapshots[12], again.snapshots[12])
    assert run.losses.shape == (12,) and run.snapshots[0].shape == (540, 3)
    assert torch.allclose(run.snapshots[12].norm(dim=1), torch.ones(540), atol=1e-5)
    assert run.losses[-1] < run.losses[0] - 0.2
    before = prototype_stats(
        embed(make_embedding_mlp(64, 3, 64, seed=4), digits.x_train),
        digits.y_train,
        run.snapshots[0],
        digits.y_test,
        10,
    )
    after = prototype_stats(
        embed(run.model, digits.x_train), digits.y_train, run.snapshots[12], digits.y_test, 10
    )
    assert after.accuracy > 0.8  # chance is 0.1
    assert after.accuracy > before.accuracy + 0.3
    assert after.own_cosine > after.other_cosine + 0.2


def test_supcon_objective_also_learns(digits):
    run = train_supervised_embedding(
        digits.x_train, digits.y_train, objective="supcon", epochs=10, seed=1
    )
    stats = prototype_stats(
        embed(run.model, digits.x_train),
        digits.y_train,
        embed(run.model, digits.x_test),
        digits.y_test,
        10,
    )
    assert run.losses[-1] < run.losses[0] and stats.accuracy > 0.7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(objective="ce"), "objective"),
        (dict(epochs=0), "epochs"),
        (dict(temperature=0.0), "temperature"),
        (dict(lam=-1.0), "lam"),
        (dict(snapshot_epochs=[5]), "snapshot_epochs"),
        (dict(snapshot_x=torch.zeros(3, 5)), "snapshot_x"),
    ],
)
def test_training_rejects_bad_arguments(kwargs, match):
    x, y = torch.randn(40, 6), torch.arange(4).repeat(10)
    with pytest.raises(ValueError, match=match):
        train_supervised_embedding(x, y, epochs=kwargs.pop("epochs", 2), **kwargs)


def test_training_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="labels"):
        train_supervised_embedding(torch.randn(10, 4), torch.zeros(9, dtype=torch.long))


def test_prototype_stats_on_collapsed_and_reference_values():
    centres = F.normalize(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), dim=1)
    y = torch.arange(3).repeat(4)
    stats = prototype_stats(centres[y], y, centres[y], y, 3)
    assert math.isclose(stats.own_cosine, 1.0, abs_tol=1e-6)
    assert math.isclose(stats.other_cosine, 0.0, abs_tol=1e-6)
    assert math.isclose(stats.prototype_norm, 1.0, abs_tol=1e-6)
    assert stats.accuracy == 1.0
    # against a direct computation on noisy clusters
    g = torch.Generator().manual_seed(0)
    z, y, _ = class_clusters(4, 30, 3, 0.8, g)
    zt, yt, _ = class_clusters(4, 10, 3, 0.8, torch.Generator().manual_seed(1))
    stats = prototype_stats(z, y, zt, yt, 4)
    mu = torch.stack([z[y == c].mean(0) for c in range(4)])
    scores = zt @ mu.T
    expected_acc = sum(int(scores[i].argmax() == yt[i]) for i in range(len(yt))) / len(yt)
    assert math.isclose(stats.accuracy, expected_acc, abs_tol=1e-6)
    assert math.isclose(stats.prototype_norm, mu.norm(dim=1).mean().item(), rel_tol=1e-5)
    with pytest.raises(ValueError, match="train_y"):
        prototype_stats(z[y < 3], y[y < 3], zt, yt, 4)


def _supcon_bound_reference(z: torch.Tensor, y: torch.Tensor, tau: float) -> torch.Tensor:
    """Per-anchor bound by explicit leave-one-out means (a slow reference)."""
    z = F.normalize(z, dim=1)
    out = []
    for i in range(len(z)):
        others = torch.arange(len(z)) != i
        terms, own = [], None
        for c in y.unique():
            members = z[others & (y == c)]
            m = members.mean(0)
            terms.append(math.log(len(members)) + float(z[i] @ m) / tau)
            if c == y[i]:
                own = float(z[i] @ m)
        out.append(-own / tau + torch.logsumexp(torch.tensor(terms), 0).item())
    return torch.tensor(out)


def test_supcon_bound_matches_reference_and_lower_bounds_supcon():
    z, y, _ = class_clusters(3, 6, 3, 0.5, torch.Generator().manual_seed(2))
    for tau in (0.1, 0.5):
        bound = supcon_prototype_bound(z, y, tau)
        assert torch.allclose(bound, _supcon_bound_reference(z, y, tau), atol=1e-4)
        gap = supcon_loss(z, y, temperature=tau, reduction="none") - bound
        assert gap.min() >= -1e-5 and gap.max() > 1e-3


def test_supcon_bound_is_tight_for_collapsed_classes():
    z, y, _ = class_clusters(4, 5, 3, 0.0, torch.Generator().manual_seed(0))
    bound = supcon_prototype_bound(z, y, 0.2)
    assert torch.allclose(supcon_loss(z, y, temperature=0.2, reduction="none"), bound, atol=1e-5)


def test_supcon_bound_rejects_singleton_classes():
    with pytest.raises(ValueError, match="two members"):
        supcon_prototype_bound(torch.randn(3, 2), torch.tensor([0, 0, 1]), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        supcon_prototype_bound(torch.randn(4, 2), torch.tensor([0, 0, 1, 1]), 0)
