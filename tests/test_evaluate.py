"""Tests for cl_lib.evaluate: features, kNN, linear probe, geometry and prototype bias."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import i0
from sklearn.linear_model import LogisticRegression
from torch import nn

from cl_lib.evaluate import (
    BiasReport,
    alignment,
    embed_views,
    extract_features,
    few_label_subset,
    knn_accuracy,
    knn_classify,
    linear_probe,
    positive_rank,
    prototype_bias,
    uniformity,
)
from cl_lib.models import build_model


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _clusters(n: int, dim: int, num_classes: int, spread: float, seed: int = 0):
    """Gaussian clusters around random unit centres: (x (n, dim), y (n,))."""
    g = _gen(seed)
    centres = torch.randn(num_classes, dim, generator=g)
    centres = centres / centres.norm(dim=1, keepdim=True)
    y = torch.randint(num_classes, (n,), generator=g)
    return centres[y] + spread * torch.randn(n, dim, generator=g), y


# --------------------------------------------------------------------------- features


class _TwoOutputs(nn.Module):
    """A tiny model with BatchNorm that returns (h, z), for mode and selection tests."""

    out_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 6), nn.BatchNorm1d(6))
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return h, self.head(h)


def _uint8_images(n: int, size: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=_gen(seed), dtype=torch.uint8)


def test_extract_features_matches_eval_forward_and_restores_mode() -> None:
    torch.manual_seed(0)
    model = _TwoOutputs()
    model.body[2].running_mean.normal_()  # make eval-mode BN differ from train-mode BN
    model.train()
    images = _uint8_images(10)
    feats = extract_features(model, images, batch_size=3)
    assert model.training and all(m.training for m in model.modules())
    assert feats.dtype == torch.float32 and feats.device.type == "cpu" and feats.shape == (10, 6)
    with torch.no_grad():
        h, z = model.eval()(images.float() / 255)
    torch.testing.assert_close(feats, h)
    # uint8 and float in [0, 1] give the same features; batch size does not matter
    torch.testing.assert_close(extract_features(model, images.float() / 255, batch_size=7), h)
    torch.testing.assert_close(extract_features(model, images, use_projection=True), z)
    assert not model.training  # it was in eval mode before the call: stays so


def test_extract_features_plain_model_and_contrastive_model() -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    images = torch.rand(4, 3, 4, 4)
    torch.testing.assert_close(extract_features(plain, images), plain(images).detach())
    with pytest.raises(ValueError, match="use_projection"):
        extract_features(plain, images, use_projection=True)
    model = build_model("small_cnn", head_out=16)
    x = _uint8_images(3, size=32)
    assert extract_features(model, x).shape == (3, 128)
    assert extract_features(model, x, use_projection=True).shape == (3, 16)


def test_embed_views_identity_and_reproducibility() -> None:
    torch.manual_seed(0)
    model = _TwoOutputs()
    images = _uint8_images(9)
    views = embed_views(model, images, lambda x, g: x, num_views=3, batch_size=4)
    assert views.shape == (3, 9, 6)
    for k in range(3):
        torch.testing.assert_close(views[k], extract_features(model, images))

    def noisy(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
        return x + 0.1 * torch.randn(x.shape, generator=g)

    a = embed_views(model, images, noisy, 4, generator=_gen(1), batch_size=4)
    b = embed_views(model, images, noisy, 4, generator=_gen(1), batch_size=4)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0], a[1])  # views differ


# --------------------------------------------------------------------------- kNN


def _knn_reference(train, ytrain, test, k, temperature, num_classes):
    """Dense float64 weighted kNN, one query at a time."""
    tr = train.double().numpy()
    te = test.double().numpy()
    tr = tr / np.linalg.norm(tr, axis=1, keepdims=True)
    te = te / np.linalg.norm(te, axis=1, keepdims=True)
    out = []
    for q in te:
        cos = tr @ q
        nn_idx = np.argsort(-cos)[:k]
        votes = np.zeros(num_classes)
        for j in nn_idx:
            votes[ytrain[j]] += np.exp(cos[j] / temperature)
        out.append(int(np.argmax(votes)))
    return torch.tensor(out)


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.07), (7, 0.07), (20, 0.5), (50, 0.1)])
def test_knn_matches_dense_reference(k: int, temperature: float) -> None:
    x, y = _clusters(260, 16, 5, spread=0.8, seed=1)
    train, ytrain, test = x[:200], y[:200], x[200:]
    pred = knn_classify(train, ytrain, test, k=k, temperature=temperature, num_classes=5)
    ref = _knn_reference(train, ytrain, test, k, temperature, 5)
    assert torch.equal(pred, ref)


def test_knn_chunk_size_and_scale_invariance() -> None:
    x, y = _clusters(300, 8, 4, spread=1.0, seed=2)
    train, ytrain, test = x[:200], y[:200], x[200:]
    base = knn_classify(train, ytrain, test, k=9)
    for chunk in (1, 7, 1000):
        assert torch.equal(knn_classify(train, ytrain, test, k=9, chunk_size=chunk), base)
    # cosine similarity: positive rescaling of any row changes nothing
    scale_tr = torch.rand(200, 1, generator=_gen(3)) + 0.1
    scale_te = torch.rand(100, 1, generator=_gen(4)) * 10 + 0.1
    assert torch.equal(knn_classify(train * scale_tr, ytrain, test * scale_te, k=9), base)


def test_knn_k1_is_nearest_neighbour_and_large_t_is_majority_vote() -> None:
    x, y = _clusters(150, 6, 2, spread=1.5, seed=5)
    train, ytrain, test = x[:100], y[:100], x[100:]
    tn = train / train.norm(dim=1, keepdim=True)
    qn = test / test.norm(dim=1, keepdim=True)
    cos = qn @ tn.T
    assert torch.equal(knn_classify(train, ytrain, test, k=1), ytrain[cos.argmax(dim=1)])
    top = cos.topk(5, dim=1).indices
    majority = (ytrain[top].sum(dim=1) >= 3).long()  # two classes, k odd: no ties
    assert torch.equal(knn_classify(train, ytrain, test, k=5, temperature=1e6), majority)


def test_knn_perfect_on_separated_clusters() -> None:
    x, y = _clusters(600, 32, 10, spread=0.05, seed=6)
    acc = knn_accuracy(x[:400], y[:400], x[400:], y[400:], k=20)
    assert acc == 1.0


# --------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_data() -> None:
    x, y = _clusters(1000, 20, 5, spread=0.1, seed=7)
    acc = linear_probe(x[:600], y[:600], x[600:], y[600:], epochs=30)
    assert acc >= 0.99


def test_linear_probe_random_labels_is_chance_on_held_out() -> None:
    g = _gen(8)
    x = torch.randn(1200, 32, generator=g)
    y = torch.randint(4, (1200,), generator=g)
    acc = linear_probe(x[:600], y[:600], x[600:], y[600:], epochs=30)
    # binomial sd at p = 1/4 with 600 test points is 0.018
    assert abs(acc - 0.25) < 0.07


def test_linear_probe_close_to_sklearn_logistic_regression() -> None:
    x, y = _clusters(1600, 10, 4, spread=0.5, seed=9)
    tr, te = slice(0, 800), slice(800, None)
    acc = linear_probe(x[tr], y[tr], x[te], y[te], epochs=50, weight_decay=1e-3)
    ref = LogisticRegression(max_iter=2000).fit(x[tr].numpy(), y[tr].numpy())
    ref_acc = float((ref.predict(x[te].numpy()) == y[te].numpy()).mean())
    assert 0.5 < ref_acc < 0.98  # a task where the probe matters
    assert abs(acc - ref_acc) < 0.03


def test_linear_probe_deterministic_given_seed() -> None:
    x, y = _clusters(400, 16, 3, spread=0.9, seed=10)
    kw = {"epochs": 5, "batch_size": 32}
    a = linear_probe(x[:300], y[:300], x[300:], y[300:], seed=3, **kw)
    b = linear_probe(x[:300], y[:300], x[300:], y[300:], seed=3, **kw)
    assert a == b


def test_few_label_subset() -> None:
    g = _gen(11)
    labels = torch.randint(5, (500,), generator=g)
    idx = few_label_subset(labels, per_class=10, seed=4)
    assert idx.dtype == torch.int64 and idx.numel() == 50
    assert idx.unique().numel() == 50  # no repeats
    assert torch.equal(torch.bincount(labels[idx], minlength=5), torch.full((5,), 10))
    assert torch.equal(idx, few_label_subset(labels, per_class=10, seed=4))
    assert not torch.equal(idx, few_label_subset(labels, per_class=10, seed=5))
    smallest = int(torch.bincount(labels).min())
    assert few_label_subset(labels, smallest).numel() == 5 * smallest
    with pytest.raises(ValueError, match="per_class"):
        few_label_subset(labels, smallest + 1)


# --------------------------------------------------------------------------- geometry


def test_alignment_analytic_values() -> None:
    z = torch.randn(50, 8, generator=_gen(12))
    assert alignment(z, 3.0 * z).item() == pytest.approx(0.0, abs=1e-6)
    # antipodal pairs: distance 2
    assert alignment(z, -z).item() == pytest.approx(4.0, rel=1e-5)
    assert alignment(z, -z, alpha=1.0).item() == pytest.approx(2.0, rel=1e-5)
    # orthogonal unit vectors: distance sqrt(2)
    e = torch.eye(4)
    assert alignment(e, e.roll(1, dims=1)).item() == pytest.approx(2.0, rel=1e-6)


def test_uniformity_two_points_and_circle_limit() -> None:
    # two unit vectors at angle theta: ||x - y||^2 = 2 - 2 cos(theta); one pair
    theta = 1.1
    z = torch.tensor([[1.0, 0.0], [math.cos(theta), math.sin(theta)]])
    d2 = 2 - 2 * math.cos(theta)
    for t in (0.5, 2.0):
        assert uniformity(z, t=t).item() == pytest.approx(-t * d2, rel=1e-5)
    # uniform on S^1, t = 2: E exp(-2 (2 - 2 cos)) = e^{-4} I_0(4)
    angles = torch.rand(2000, generator=_gen(13)) * 2 * math.pi
    circle = torch.stack([angles.cos(), angles.sin()], dim=1)
    limit = math.log(math.exp(-4) * i0(4))
    assert uniformity(circle).item() == pytest.approx(limit, abs=0.01)
    # a collapsed representation is the least uniform: log 1 = 0
    assert uniformity(torch.ones(10, 3)).item() == pytest.approx(0.0, abs=1e-6)


def test_positive_rank() -> None:
    a = torch.randn(40, 16, generator=_gen(14))
    assert torch.equal(positive_rank(a, a), torch.ones(40, dtype=torch.long))
    noisy = a + 0.01 * torch.randn(40, 16, generator=_gen(15))
    assert torch.equal(positive_rank(a, noisy), torch.ones(40, dtype=torch.long))
    # shuffled positives: rank = 1 + number of candidates more similar than the own one
    perm = torch.randperm(40, generator=_gen(16))
    p = a[perm]
    ranks = positive_rank(a, p)
    an = a / a.norm(dim=1, keepdim=True)
    pn = p / p.norm(dim=1, keepdim=True)
    for i in range(40):
        sims = pn @ an[i]
        assert ranks[i] == 1 + int((sims > sims[i]).sum())
    # relabelling the instances permutes the ranks alike
    q = torch.randperm(40, generator=_gen(17))
    assert torch.equal(positive_rank(a[q], p[q]), ranks[q])
    assert ranks.min() >= 1 and ranks.max() <= 40


# --------------------------------------------------------------------------- prototype bias


def _views_around(m_dir: torch.Tensor, c: float, k: int, g: torch.Generator) -> torch.Tensor:
    """K unit views c*u + sqrt(1-c^2)*v, v uniform on the unit sphere orthogonal to u.

    By symmetry E v = 0, so the surrogate mean is exactly c*u and tr Cov = 1 - c^2.
    """
    v = torch.randn(k, *m_dir.shape, generator=g)
    v = v - (v * m_dir).sum(-1, keepdim=True) * m_dir
    v = v / v.norm(dim=-1, keepdim=True)
    return c * m_dir + math.sqrt(1 - c * c) * v


def _setup(seed: int, n: int = 400, dim: int = 128, classes: int = 4):
    g = _gen(seed)
    centres = torch.randn(classes, dim, generator=g)
    centres = centres / centres.norm(dim=1, keepdim=True)
    y = torch.arange(n) % classes
    return g, centres, y


def test_prototype_bias_separates_bias_from_variance() -> None:
    c, (g, centres, y) = 0.6, _setup(18)
    dim = centres.shape[1]
    u = centres[y] + 0.6 / math.sqrt(dim) * torch.randn(len(y), dim, generator=g)
    u = u / u.norm(dim=1, keepdim=True)
    mu = torch.stack([c * u[y == j].mean(0) for j in range(4)])
    true_dist = (mu[y] - c * u).norm(dim=1)
    true_bias = true_dist.mean().item()
    true_sq = true_dist.square().mean().item()
    reports = {k: prototype_bias(3.0 * _views_around(u, c, k, g), y, mu) for k in (2, 4, 16, 64)}
    true_per_class = torch.stack([true_dist[y == j].mean() for j in range(4)])
    for k, r in reports.items():
        assert isinstance(r, BiasReport) and r.num_views == k
        # sqrt of a noisy unbiased estimate: a small Jensen bias at K = 2, gone by K = 4
        tol = 0.04 if k == 2 else 0.015
        assert r.bias == pytest.approx(true_bias, abs=tol)
        torch.testing.assert_close(r.per_class, true_per_class, atol=1.5 * tol, rtol=0)
        assert r.squared_bias == pytest.approx(true_sq, abs=0.008)  # unbiased at every K
        assert r.variance_term == pytest.approx((1 - c * c) / k, rel=0.03)
        counts = torch.bincount(y, minlength=4).float()
        assert (r.per_class * counts).sum().item() / len(y) == pytest.approx(r.bias, rel=1e-5)
    biases = [r.bias for r in reports.values()]
    raws = [r.raw_distance for r in reports.values()]
    assert max(biases) - min(biases) < 0.15 * (max(raws) - min(raws))  # hardly depends on K
    assert all(a > b for a, b in zip(raws, raws[1:], strict=False))  # variance shrinks with K
    assert raws[0] > true_bias + 0.2 and raws[-1] < true_bias + 0.05


def test_prototype_bias_zero_when_views_come_from_the_class() -> None:
    c, (g, centres, y) = 0.6, _setup(19)
    mu = c * centres  # class distribution c*u_c + s*v has mean exactly c*u_c
    biases = []
    for k in (2, 4, 16, 64):
        r = prototype_bias(_views_around(centres[y], c, k, g), y, mu)
        assert abs(r.squared_bias) < 0.01  # unbiased estimate of E||mu - m||^2 = 0
        assert r.raw_distance == pytest.approx(math.sqrt((1 - c * c) / k), rel=0.05)
        assert r.bias < 0.3 * r.raw_distance
        biases.append(r.bias)
    assert all(a > b for a, b in zip(biases, biases[1:], strict=False))
    assert biases[-1] < 0.03


def test_results_unchanged_under_autocast_and_no_grad() -> None:
    x, y = _clusters(300, 16, 4, spread=0.9, seed=23)
    tr, te = slice(0, 200), slice(200, None)
    knn = knn_classify(x[tr], y[tr], x[te], k=9)
    ranks = positive_rank(x[:50], x[50:100])
    probe = linear_probe(x[tr], y[tr], x[te], y[te], epochs=3)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert torch.equal(knn_classify(x[tr], y[tr], x[te], k=9), knn)
        assert torch.equal(positive_rank(x[:50], x[50:100]), ranks)
        assert linear_probe(x[tr], y[tr], x[te], y[te], epochs=3) == probe


# --------------------------------------------------------------------------- bad input


def test_bad_inputs() -> None:
    x = torch.randn(20, 4)
    y = torch.randint(3, (20,))
    with pytest.raises(ValueError, match="k must"):
        knn_classify(x, y, x, k=0)
    with pytest.raises(ValueError, match="k must"):
        knn_classify(x, y, x, k=21)
    with pytest.raises(ValueError, match="train_labels"):
        knn_classify(x, y[:10], x, k=3)
    with pytest.raises(ValueError, match="test_features"):
        knn_classify(x, y, torch.randn(5, 3), k=3)
    with pytest.raises(ValueError, match="train_features.*floating"):
        knn_classify(x.long(), y, x, k=3)
    with pytest.raises(ValueError, match="train_labels.*integer"):
        knn_classify(x, y.float(), x, k=3)
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(x, y, x, k=3, temperature=0.0)
    with pytest.raises(ValueError, match="num_classes"):
        knn_classify(x, y, x, k=3, num_classes=int(y.max()))
    with pytest.raises(ValueError, match="test_labels"):
        knn_accuracy(x, y, x, y[:3])
    with pytest.raises(ValueError, match="test_labels"):
        linear_probe(x, y, x, y[:5])
    with pytest.raises(ValueError, match="epochs"):
        linear_probe(x, y, x, y, epochs=0)
    with pytest.raises(ValueError, match="z2"):
        alignment(x, x[:5])
    with pytest.raises(ValueError, match="z must have 2 dimensions"):
        uniformity(torch.randn(3))
    with pytest.raises(ValueError, match="positives"):
        positive_rank(x, x[:, :2])
    with pytest.raises(ValueError, match="per_class"):
        few_label_subset(y, 0)
    with pytest.raises(ValueError, match="labels.*integer"):
        few_label_subset(y.float(), 1)
    views = torch.randn(2, 20, 4)
    protos = torch.randn(3, 4)
    with pytest.raises(ValueError, match="K >= 2"):
        prototype_bias(views[:1], y, protos)
    with pytest.raises(ValueError, match="view_embeddings must have 3 dimensions"):
        prototype_bias(x, y, protos)
    with pytest.raises(ValueError, match="labels"):
        prototype_bias(views, y[:4], protos)
    with pytest.raises(ValueError, match="class_prototypes"):
        prototype_bias(views, y, torch.randn(3, 5))
    with pytest.raises(ValueError, match="labels must lie"):
        prototype_bias(views, y, protos[:2])
    with pytest.raises(ValueError, match="images"):
        extract_features(nn.Identity(), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="images"):
        extract_features(nn.Identity(), torch.zeros(2, 3, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="num_views"):
        embed_views(nn.Identity(), torch.zeros(2, 3, 4, 4), lambda a, g: a, 0)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu() -> None:
    x, y = _clusters(300, 16, 4, spread=0.8, seed=20)
    xc, yc = x.cuda(), y.cuda()
    pred = knn_classify(xc[:200], yc[:200], xc[200:], k=9)
    assert pred.device.type == "cuda"
    assert torch.equal(pred.cpu(), knn_classify(x[:200], y[:200], x[200:], k=9))
    assert alignment(xc, xc).device.type == "cuda"
    torch.testing.assert_close(uniformity(xc).cpu(), uniformity(x), rtol=1e-4, atol=1e-5)
    views = torch.randn(4, 300, 16, generator=_gen(21))
    protos = torch.randn(4, 16, generator=_gen(22))
    r_cpu = prototype_bias(views, y, protos)
    r_gpu = prototype_bias(views.cuda(), yc, protos.cuda())
    assert r_gpu.bias == pytest.approx(r_cpu.bias, rel=1e-4)
    model = build_model("small_cnn").cuda()
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    feats = extract_features(model, images)
    assert feats.device.type == "cpu" and feats.shape == (5, 128)
    acc = linear_probe(xc[:200], yc[:200], xc[200:], yc[200:], epochs=5)
    assert 0.0 <= acc <= 1.0
