"""Analytic values, theory identities, gradients and numerics of cl_lib.losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cl_lib import losses as L

F64 = torch.float64


def _randn(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    """Seeded standard normal tensor."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _orthonormal(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``n`` mutually orthogonal unit vectors in R^dim (rows), n <= dim."""
    q, _ = torch.linalg.qr(_randn(dim, dim, seed=seed))
    return q[:, :n].T.contiguous()


# --------------------------------------------------------------------------- analytic values


@pytest.mark.parametrize("n", [2, 5, 16])
@pytest.mark.parametrize("tau", [0.05, 0.5, 2.0])
def test_all_equal_embeddings(n: int, tau: float) -> None:
    """Collapse: every s = 1, so NT-Xent = log(2N-1) and the derived loss = log(2N-2)."""
    views = _randn(1, 1, 7).expand(2, n, 7) * torch.rand(2, n, 1, dtype=F64).add(0.5)
    assert L.nt_xent_loss(views, temperature=tau).item() == pytest.approx(math.log(2 * n - 1))
    derived = L.decoupled_contrastive_loss(views, temperature=tau)
    assert derived.item() == pytest.approx(math.log(2 * n - 2))
    for alpha, lam in [(1.0, 1.0), (0.5, 2.0), (3.0, 0.25)]:
        got = L.balanced_contrastive_loss(views, temperature=tau, alpha=alpha, lam=lam)
        want = (lam - alpha) / tau + lam * math.log(2 * n - 2)
        assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-9)
        got = L.balanced_contrastive_loss(
            views, temperature=tau, alpha=alpha, lam=lam, include_positive=True
        )
        want = (lam - alpha) / tau + lam * math.log(2 * n - 1)
        assert got.item() == pytest.approx(want, rel=1e-12, abs=1e-9)


@pytest.mark.parametrize("num_views", [3, 4])
def test_all_equal_embeddings_multi_view(num_views: int) -> None:
    """V views of N equal points: V(N-1) negatives, derived = log V(N-1), NT-Xent log(V(N-1)+1)."""
    n = 5
    views = torch.ones(num_views, n, 3, dtype=F64)
    negatives = num_views * (n - 1)
    assert L.decoupled_contrastive_loss(views).item() == pytest.approx(math.log(negatives))
    assert L.nt_xent_loss(views).item() == pytest.approx(math.log(negatives + 1))


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("tau", [0.1, 0.5, 1.0])
def test_coinciding_positives_orthogonal_instances(n: int, tau: float) -> None:
    """z1 = z2, instances orthogonal: s_ip = 1, s_ik = 0 on the 2N-2 negatives."""
    base = _orthonormal(n, 8, seed=n) * 3.0
    views = torch.stack([base, base])
    nt = L.nt_xent_loss(views, temperature=tau, reduction="none")
    torch.testing.assert_close(
        nt, torch.full_like(nt, math.log1p((2 * n - 2) * math.exp(-1 / tau)))
    )
    derived = L.decoupled_contrastive_loss(views, temperature=tau)
    assert derived.item() == pytest.approx(math.log(2 * n - 2) - 1 / tau)
    alpha, lam = 0.7, 1.9
    got = L.balanced_contrastive_loss(views, temperature=tau, alpha=alpha, lam=lam)
    assert got.item() == pytest.approx(-alpha / tau + lam * math.log(2 * n - 2))
    got = L.balanced_contrastive_loss(
        views, temperature=tau, alpha=alpha, lam=lam, include_positive=True
    )
    assert got.item() == pytest.approx(-alpha / tau + lam * math.log(math.exp(1 / tau) + 2 * n - 2))


def test_balanced_weighted_closed_form() -> None:
    """Orthogonal instances, z1 = z2: l_i = -alpha/tau + lam log sum_{k in N(i)} w_k."""
    n, tau, alpha, lam = 4, 0.3, 1.5, 0.8
    base = _orthonormal(n, 6)
    views = torch.stack([base, base])
    weights = torch.linspace(0.5, 2.0, 2 * n, dtype=F64)  # one weight per candidate v*N + m
    per_instance = weights.reshape(2, n).sum(0)  # both views of instance m
    negative_mass = per_instance.sum() - per_instance  # all views of the other instances
    want = (-alpha / tau + lam * negative_mass.log()).repeat(2)
    got = L.balanced_contrastive_loss(
        views, temperature=tau, alpha=alpha, lam=lam, negative_weights=weights, reduction="none"
    )
    torch.testing.assert_close(got, want)
    # per anchor-candidate weights: the same numbers in matrix form give the same loss
    matrix = weights.expand(2 * n, 2 * n).clone()
    got2 = L.balanced_contrastive_loss(
        views, temperature=tau, alpha=alpha, lam=lam, negative_weights=matrix, reduction="none"
    )
    torch.testing.assert_close(got2, want)
    # weights at non-negatives are ignored
    matrix[torch.arange(2 * n), torch.arange(2 * n)] = 1e6
    got3 = L.balanced_contrastive_loss(
        views, temperature=tau, alpha=alpha, lam=lam, negative_weights=matrix, reduction="none"
    )
    torch.testing.assert_close(got3, want)


def test_uniform_weights_shift_by_log_weight() -> None:
    """A constant weight c adds lam * log c to every per-anchor loss."""
    views, c, lam = _randn(2, 6, 4), 3.0, 0.7
    plain = L.balanced_contrastive_loss(views, lam=lam, reduction="none")
    weighted = L.balanced_contrastive_loss(
        views, lam=lam, negative_weights=torch.full((12,), c, dtype=F64), reduction="none"
    )
    torch.testing.assert_close(weighted, plain + lam * math.log(c))


def test_debiased_closed_form_and_tau_plus_zero() -> None:
    """Orthogonal instances, z1 = z2, and tau_plus = 0 reduces to NT-Xent."""
    n, tau = 5, 0.4
    base = _orthonormal(n, 5)
    views = torch.stack([base, base])
    m = 2 * n - 2
    for tau_plus in [0.0, 0.05, 0.3]:
        pos = math.exp(1 / tau)
        ng = max((m - tau_plus * m * pos) / (1 - tau_plus), m * math.exp(-1 / tau))
        got = L.debiased_contrastive_loss(views, temperature=tau, tau_plus=tau_plus)
        assert got.item() == pytest.approx(-math.log(pos / (pos + ng)))
    views = _randn(2, 7, 3)
    torch.testing.assert_close(
        L.debiased_contrastive_loss(views, temperature=0.2, tau_plus=0.0, reduction="none"),
        L.nt_xent_loss(views, temperature=0.2, reduction="none"),
    )


def test_supcon_closed_form() -> None:
    """Orthogonal classes, equal within a class: -1/tau + log((n_c-1) e^{1/tau} + M - n_c)."""
    tau = 0.25
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])  # class 3 has no positive: skipped
    directions = _orthonormal(4, 4)
    embeddings = directions[labels] * 2.0
    counts = torch.bincount(labels).to(F64)[labels]
    m = labels.numel()
    want = -1 / tau + torch.log((counts - 1) * math.exp(1 / tau) + m - counts)
    got = L.supcon_loss(embeddings, labels, temperature=tau, reduction="none")
    torch.testing.assert_close(got[:-1], want[:-1])
    assert got[-1].item() == 0.0
    assert L.supcon_loss(embeddings, labels, temperature=tau).item() == pytest.approx(
        want[:-1].mean().item()
    )
    assert L.supcon_loss(embeddings, labels, temperature=tau, reduction="sum").item() == (
        pytest.approx(want[:-1].sum().item())
    )


def test_supcon_instance_labels_two_views_is_nt_xent() -> None:
    """With two views and instance labels, SupCon's L_out is NT-Xent."""
    views = _randn(2, 9, 5, seed=3)
    loss = L.SupConLoss(temperature=0.3)(views)
    assert loss.item() == pytest.approx(L.nt_xent_loss(views, temperature=0.3).item())


def test_prototype_loss_closed_form() -> None:
    """z on the direction of mu_y, orthogonal prototypes of norm r: hard -r, smooth -r + lam LSE."""
    r, lam, tau, c = 0.8, 1.7, 0.2, 4
    prototypes = _orthonormal(c, 6) * r
    labels = torch.tensor([0, 1, 2, 3, 1])
    embeddings = prototypes[labels] * 5.0
    hard = L.supervised_prototype_loss(embeddings, labels, prototypes, lam=lam)
    assert hard.item() == pytest.approx(-r)
    smooth = L.supervised_prototype_loss(embeddings, labels, prototypes, lam=lam, temperature=tau)
    assert smooth.item() == pytest.approx(-r + lam * tau * math.log(c - 1))
    full = L.supervised_prototype_loss(
        embeddings, labels, prototypes, lam=lam, temperature=tau, include_positive=True
    )
    assert full.item() == pytest.approx(-r + lam * tau * math.log(math.exp(r / tau) + c - 1))


def test_class_prototypes_are_class_means_of_unit_vectors() -> None:
    """mu_c = mean of normalised embeddings of class c (norm <= 1, not renormalised)."""
    x = _randn(12, 3)
    labels = torch.tensor([0, 1, 2] * 4)
    mu = L.class_prototypes(x, labels)
    z = F.normalize(x, dim=1)
    for c in range(3):
        torch.testing.assert_close(mu[c], z[labels == c].mean(0))
    assert bool((mu.norm(dim=1) <= 1 + 1e-12).all())
    assert mu.shape == (3, 3)
    assert L.class_prototypes(x, labels, num_classes=3).shape == (3, 3)


# --------------------------------------------------------------------------- theory identities


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_is_derived_plus_gap(seed: int, tau: float) -> None:
    """NTXent_i = derived_i + log(1 + exp(s_ip/tau) / sum_neg) per anchor, so NT-Xent >= derived."""
    views = _randn(2, 10, 6, seed=seed)
    parts = L.contrastive_components(views, temperature=tau)
    nt = L.nt_xent_loss(views, temperature=tau, reduction="none")
    derived = L.decoupled_contrastive_loss(views, temperature=tau, reduction="none")
    z = F.normalize(views, dim=-1).reshape(20, 6)
    s = z @ z.T / tau
    pos = torch.cat([s.diagonal(10), s.diagonal(-10)])
    same = torch.eye(10, dtype=torch.bool).repeat(2, 2)
    neg_sum = torch.where(same, 0.0, s.exp()).sum(1)
    torch.testing.assert_close(parts.positive, pos)
    torch.testing.assert_close(parts.negative_lse, neg_sum.log())
    torch.testing.assert_close(parts.nt_xent_gap, torch.log1p(pos.exp() / neg_sum))
    torch.testing.assert_close(nt, derived + parts.nt_xent_gap)
    torch.testing.assert_close(parts.derived, derived)
    torch.testing.assert_close(parts.nt_xent, nt)
    assert bool((nt > derived).all())
    assert L.contrastive_components(_randn(3, 4, 2)).nt_xent_gap is None


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_gradient_is_the_derived_gradient_weighted_by_exp_minus_gap(tau: float) -> None:
    """Appendix (forces of the balanced loss): per anchor, every derivative of NT-Xent is
    1 - p_ip = exp(-gap_i) times the derived loss's, so the two gradients agree once each
    anchor's derived loss is weighted by exp(-gap_i) (and differ without the weights)."""
    views = _randn(2, 12, 8, seed=5)
    views[1] = views[0] + 0.3 * _randn(12, 8, seed=6)  # close views: the weights differ
    views.requires_grad_(True)
    nt = L.nt_xent_loss(views, temperature=tau, reduction="none")
    derived = L.decoupled_contrastive_loss(views, temperature=tau, reduction="none")
    weight = torch.exp(-(nt - derived)).detach()
    (g_nt,) = torch.autograd.grad(nt.sum(), views, retain_graph=True)
    (g_weighted,) = torch.autograd.grad((weight * derived).sum(), views, retain_graph=True)
    (g_derived,) = torch.autograd.grad(derived.sum(), views)
    torch.testing.assert_close(g_nt, g_weighted, rtol=1e-10, atol=1e-12)
    assert float(weight.max() - weight.min()) > 0.01
    assert not torch.allclose(g_nt, g_derived, atol=1e-4)


def test_gap_shrinks_with_more_negatives() -> None:
    """The NT-Xent/derived gap falls as the batch (number of negatives) grows."""
    gaps = []
    for n in [4, 32, 256]:
        views = _randn(2, n, 8, seed=n)
        views[1] = views[0] + 0.3 * _randn(n, 8, seed=n + 1)
        gaps.append(L.contrastive_components(views, temperature=0.5).nt_xent_gap.mean().item())
    assert gaps[0] > gaps[1] > gaps[2]


@pytest.mark.parametrize("k", [2, 10, 100])
def test_smooth_max_bounds(k: int) -> None:
    """max <= LSE_tau <= max + tau log K, and the gap vanishes as tau -> 0."""
    a = _randn(5, k, seed=k)
    top = a.max(dim=1).values
    gaps = []
    for tau in [1.0, 0.1, 0.01, 0.001]:
        sm = L.smooth_max(a, tau)
        assert bool((sm >= top - 1e-12).all())
        assert bool((sm <= top + tau * math.log(k) + 1e-12).all())
        gaps.append((sm - top).max().item())
    assert gaps == sorted(gaps, reverse=True)
    assert gaps[-1] < 1e-3 * math.log(k) + 1e-12
    # equal scores attain the upper bound; -inf entries are ignored
    torch.testing.assert_close(
        L.smooth_max(torch.zeros(k, dtype=F64), 0.5), 0.5 * torch.tensor(math.log(k), dtype=F64)
    )
    masked = torch.tensor([1.0, float("-inf"), 2.0], dtype=F64)
    assert L.smooth_max(masked, 0.3).item() == pytest.approx(
        0.3 * math.log(math.exp(1 / 0.3) + math.exp(2 / 0.3))
    )
    torch.testing.assert_close(L.smooth_max(a.T, 0.2, dim=0), L.smooth_max(a, 0.2, dim=1))


@pytest.mark.parametrize("tau", [0.05, 0.5, 2.0])
def test_prototype_objective_is_cosine_classifier_cross_entropy(tau: float) -> None:
    """lam = 1, all classes: loss / tau == cross-entropy of z @ mu.T / tau."""
    x, mu = _randn(16, 5, seed=1), _randn(4, 5, seed=2) * 0.6
    y = torch.randint(0, 4, (16,), generator=torch.Generator().manual_seed(0))
    loss = L.supervised_prototype_loss(x, y, mu, temperature=tau, include_positive=True)
    want = F.cross_entropy(F.normalize(x, dim=1) @ mu.T / tau, y)
    torch.testing.assert_close(loss / tau, want)


@pytest.mark.parametrize("lam", [0.5, 1.0, 2.0])
def test_hard_prototype_loss_below_smooth(lam: float) -> None:
    """LSE over c != y upper-bounds the max, so hard <= smooth <= hard + lam tau log(C-1)."""
    x, mu = _randn(32, 6, seed=4), _randn(5, 6, seed=5)
    y = torch.arange(32) % 5
    hard = L.supervised_prototype_loss(x, y, mu, lam=lam, reduction="none")
    z = F.normalize(x, dim=1)
    s = z @ mu.T
    other = s.masked_fill(F.one_hot(y, 5).bool(), float("-inf")).max(1).values
    torch.testing.assert_close(hard, -s[torch.arange(32), y] + lam * other)
    for tau in [1.0, 0.1, 0.01]:
        smooth = L.supervised_prototype_loss(x, y, mu, lam=lam, temperature=tau, reduction="none")
        assert bool((hard <= smooth + 1e-12).all())
        assert bool((smooth <= hard + lam * tau * math.log(4) + 1e-12).all())


def test_reductions_and_view_formats_agree() -> None:
    """(V, N, D) tensor and list of views give the same; mean/sum/none are consistent."""
    views = _randn(3, 5, 4, seed=7)
    per = L.balanced_contrastive_loss(views, alpha=0.6, lam=1.3, reduction="none")
    assert per.shape == (15,)
    torch.testing.assert_close(
        L.balanced_contrastive_loss(list(views), alpha=0.6, lam=1.3, reduction="sum"), per.sum()
    )
    torch.testing.assert_close(
        L.balanced_contrastive_loss(tuple(views), alpha=0.6, lam=1.3), per.mean()
    )


def test_view_permutation_equivariance() -> None:
    """Permuting the instances permutes the per-anchor losses (no index bookkeeping errors)."""
    views = _randn(3, 6, 4, seed=8)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    for fn in (L.nt_xent_loss, L.decoupled_contrastive_loss):
        per = fn(views, reduction="none").reshape(3, 6)
        torch.testing.assert_close(fn(views[:, perm], reduction="none").reshape(3, 6), per[:, perm])


def test_multi_view_positive_convention() -> None:
    """V > 2: mean over positives of per-pair losses; denominator {p} U N(i) (PML convention)."""
    views, tau = _randn(3, 4, 5, seed=9), 0.4
    z = F.normalize(views, dim=-1)
    flat = z.reshape(12, 5)
    s = flat @ flat.T / tau
    inst = torch.arange(12) % 4
    neg = inst[:, None] != inst[None, :]
    want_nt, want_dec = torch.zeros(12, dtype=F64), torch.zeros(12, dtype=F64)
    for i in range(12):
        neg_sum = s[i][neg[i]].exp().sum()
        positives = [p for p in range(12) if inst[p] == inst[i] and p != i]
        want_nt[i] = sum(-s[i, p] + torch.log(s[i, p].exp() + neg_sum) for p in positives) / 2
        want_dec[i] = sum(-s[i, p] + neg_sum.log() for p in positives) / 2
    torch.testing.assert_close(L.nt_xent_loss(views, temperature=tau, reduction="none"), want_nt)
    torch.testing.assert_close(
        L.decoupled_contrastive_loss(views, temperature=tau, reduction="none"), want_dec
    )


# --------------------------------------------------------------------------- gradients


def _gradcheck_cases() -> dict[str, object]:
    """Every loss as a function of float64 inputs for gradcheck."""
    y = torch.tensor([0, 1, 0, 2, 1, 2])
    w = torch.linspace(0.5, 1.5, 6, dtype=F64)
    return {
        "nt_xent": lambda v: L.nt_xent_loss(v, temperature=0.3),
        "decoupled": lambda v: L.decoupled_contrastive_loss(v, temperature=0.3, lam=0.7),
        "balanced": lambda v: L.balanced_contrastive_loss(
            v, temperature=0.4, alpha=1.3, lam=0.6, negative_weights=w
        ),
        "balanced_pos": lambda v: L.balanced_contrastive_loss(
            v, temperature=0.4, alpha=0.8, lam=1.2, include_positive=True
        ),
        "debiased": lambda v: L.debiased_contrastive_loss(v, temperature=0.5, tau_plus=0.1),
        "supcon": lambda v: L.supcon_loss(v.reshape(6, 4), y, temperature=0.2),
        "supcon_module": lambda v: L.SupConLoss(0.3)(v, torch.tensor([0, 1, 0])),
        "prototype_hard": lambda v: L.supervised_prototype_loss(
            v.reshape(6, 4), y, _randn(3, 4, seed=11), lam=0.9
        ),
        "prototype_smooth": lambda v: L.supervised_prototype_loss(
            v.reshape(6, 4), y, _randn(3, 4, seed=11), lam=0.9, temperature=0.3
        ),
        "class_prototypes": lambda v: L.class_prototypes(v.reshape(6, 4), y),
        "smooth_max": lambda v: L.smooth_max(v, 0.2, dim=1),
    }


@pytest.mark.parametrize("name", list(_gradcheck_cases()))
def test_gradcheck(name: str) -> None:
    """Autograd gradients equal finite differences (float64) for every loss."""
    fn = _gradcheck_cases()[name]
    views = _randn(2, 3, 4, seed=12).requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (views,), eps=1e-6, atol=1e-6)


def test_gradcheck_prototypes_and_weights() -> None:
    """Gradients also flow exactly into the prototypes and the negative weights."""
    x = _randn(5, 3, seed=13).requires_grad_(True)
    mu = _randn(3, 3, seed=14).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 1, 0])
    assert torch.autograd.gradcheck(
        lambda a, b: L.supervised_prototype_loss(a, y, b, temperature=0.4, lam=1.5), (x, mu)
    )
    w = torch.rand(8, 8, dtype=F64).add(0.5).requires_grad_(True)
    v = _randn(2, 4, 3, seed=15)
    assert torch.autograd.gradcheck(
        lambda ww: L.balanced_contrastive_loss(v, negative_weights=ww, reduction="none"), (w,)
    )


@pytest.mark.parametrize("include_positive", [False, True])
def test_balanced_gradient_closed_form(include_positive: bool) -> None:
    """dl_i/dz_i = (-alpha z_p + lam sum_k p_ik z_k) / tau, through the normalisation Jacobian.

    z is fed already normalised, so the autograd gradient of l_i w.r.t. the raw anchor is
    (I - z_i z_i^T) times the closed form; the projection leaves a non-trivial vector to compare.
    """
    n, d, tau, alpha, lam = 5, 4, 0.3, 1.4, 0.6
    z = F.normalize(_randn(2, n, d, seed=16), dim=-1).requires_grad_(True)
    w = torch.linspace(0.5, 2.0, 2 * n, dtype=F64)
    per = L.balanced_contrastive_loss(
        z,
        temperature=tau,
        alpha=alpha,
        lam=lam,
        negative_weights=w,
        include_positive=include_positive,
        reduction="none",
    )
    flat = z.detach().reshape(2 * n, d)
    inst = torch.arange(2 * n) % n
    for i in range(2 * n):
        (grad,) = torch.autograd.grad(per[i], z, retain_graph=True)
        p = (i + n) % (2 * n)
        in_denominator = inst != inst[i]
        weights = w.clone()
        if include_positive:
            in_denominator[p] = True
            weights[p] = 1.0  # the positive enters the denominator unweighted
        logits = torch.where(in_denominator, flat @ flat[i] / tau + weights.log(), -torch.inf)
        probs = torch.softmax(logits, dim=0)
        closed = (-alpha * flat[p] + lam * probs @ flat) / tau
        projected = closed - (closed @ flat[i]) * flat[i]
        torch.testing.assert_close(grad.reshape(2 * n, d)[i], projected)
        assert projected.norm() > 1e-3


def test_forces_scale_linearly_with_alpha_and_lam() -> None:
    """Attraction is linear in alpha/tau, repulsion in lam; only (alpha, lam) scale jointly."""
    z = _randn(2, 6, 5, seed=17).requires_grad_(True)

    def grad(alpha: float, lam: float, tau: float = 0.5) -> torch.Tensor:
        loss = L.balanced_contrastive_loss(z, temperature=tau, alpha=alpha, lam=lam)
        return torch.autograd.grad(loss, z)[0]

    g = grad(0.8, 1.3)
    torch.testing.assert_close(grad(2.4, 3.9), 3.0 * g)  # joint scale = effective learning rate
    attract = grad(1.5, 1.0) - grad(0.5, 1.0)  # d grad / d alpha
    torch.testing.assert_close(grad(3.5, 1.0) - grad(0.5, 1.0), 3.0 * attract)
    repel = grad(1.0, 1.5) - grad(1.0, 0.5)  # d grad / d lam
    torch.testing.assert_close(grad(1.0, 2.5) - grad(1.0, 0.5), 2.0 * repel)
    torch.testing.assert_close(g, 0.8 * attract + 1.3 * repel)
    attract_2tau = grad(1.5, 1.0, tau=1.0) - grad(0.5, 1.0, tau=1.0)
    torch.testing.assert_close(attract, 2.0 * attract_2tau)  # attraction ~ alpha / tau


# --------------------------------------------------------------------------- numerics


def _labels(v: torch.Tensor) -> torch.Tensor:
    """Three classes over the N instances of a batch of views, on its device."""
    return torch.arange(v.shape[1], device=v.device) % 3


def _all_view_losses(device: str = "cpu") -> dict[str, object]:
    """Every loss as a function of a (2, N, D) batch of views on ``device`` and a temperature."""
    class_weights = torch.tensor([1.0, 2.0, 3.0], device=device)
    return {
        "nt_xent": lambda v, t: L.nt_xent_loss(v, temperature=t),
        "decoupled": lambda v, t: L.decoupled_contrastive_loss(v, temperature=t),
        "balanced": lambda v, t: L.balanced_contrastive_loss(
            v,
            temperature=t,
            alpha=1.5,
            lam=0.5,
            negative_weights=torch.full((2 * v.shape[1],), 0.5, device=v.device),
        ),
        "balanced_class_weights": lambda v, t: L.BalancedContrastiveLoss(
            temperature=t, include_positive=True, class_weights=class_weights
        )(v, _labels(v)),
        "debiased": lambda v, t: L.debiased_contrastive_loss(v, temperature=t),
        "supcon": lambda v, t: L.SupConLoss(temperature=t)(v),
        "supcon_labels": lambda v, t: L.SupConLoss(temperature=t)(v, _labels(v)),
        "prototype": lambda v, t: L.supervised_prototype_loss(
            v[0], _labels(v), L.class_prototypes(v[1].detach(), _labels(v)), temperature=t
        ),
        "prototype_hard": lambda v, t: L.supervised_prototype_loss(
            v[0], _labels(v), L.class_prototypes(v[1].detach(), _labels(v))
        ),
    }


@pytest.mark.parametrize("name", list(_all_view_losses()))
def test_autocast_bfloat16_cpu(name: str) -> None:
    """Under CPU bf16 autocast the loss is float32, finite and computed in float32."""
    fn = _all_view_losses()[name]
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 16)
    x = torch.randn(2, 12, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        loss = fn(out, 0.2)
    assert out.dtype == torch.bfloat16
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    exact_inputs = fn(out.float(), 0.2)  # same bf16 inputs, float32 computation
    torch.testing.assert_close(loss, exact_inputs, rtol=1e-5, atol=1e-5)
    full_fp32 = fn(layer(x), 0.2)
    torch.testing.assert_close(loss, full_fp32, rtol=3e-2, atol=3e-2)
    loss.backward()
    assert torch.isfinite(layer.weight.grad).all()


@pytest.mark.parametrize("name", list(_all_view_losses()))
def test_small_temperature_large_cosines(name: str) -> None:
    """tau = 0.01 with cosines near 1: finite loss and gradients, accurate against float64."""
    fn = _all_view_losses()[name]
    base = _randn(1, 1, 16, seed=18, dtype=torch.float32) * 10
    views = (base + 0.3 * _randn(2, 12, 16, seed=19, dtype=torch.float32)).requires_grad_(True)
    loss = fn(views, 0.01)
    (grad,) = torch.autograd.grad(loss, views)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    ref = fn(views.detach().double(), 0.01)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-3, abs=1e-3)


def test_scale_invariance() -> None:
    """Raw embeddings are normalised inside: rescaling each row leaves the loss unchanged."""
    views = _randn(2, 6, 4, seed=20)
    scale = torch.rand(2, 6, 1, dtype=F64) * 10 + 0.1
    for fn in (L.nt_xent_loss, L.decoupled_contrastive_loss, L.debiased_contrastive_loss):
        torch.testing.assert_close(fn(views * scale), fn(views))


# --------------------------------------------------------------------------- modules


def test_modules_match_functions() -> None:
    """The nn.Module wrappers compute the functional losses; labels ignored where documented."""
    views = _randn(2, 6, 4, seed=21)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    nt = L.nt_xent_loss(views, temperature=0.3)
    torch.testing.assert_close(L.make_loss("nt_xent", temperature=0.3)(views, labels), nt)
    torch.testing.assert_close(L.NTXentLoss(0.3)(views), nt)
    torch.testing.assert_close(
        L.make_loss("decoupled", temperature=0.3, lam=0.5)(views),
        L.decoupled_contrastive_loss(views, temperature=0.3, lam=0.5),
    )
    torch.testing.assert_close(
        L.make_loss("debiased", temperature=0.3, tau_plus=0.2)(views),
        L.debiased_contrastive_loss(views, temperature=0.3, tau_plus=0.2),
    )
    torch.testing.assert_close(
        L.make_loss("supcon", temperature=0.3)(views, labels),
        L.supcon_loss(views.reshape(12, 4), labels.repeat(2), temperature=0.3),
    )
    balanced = L.make_loss("balanced", temperature=0.3, alpha=2.0, lam=0.5, include_positive=True)
    torch.testing.assert_close(
        balanced(views),
        L.balanced_contrastive_loss(
            views, temperature=0.3, alpha=2.0, lam=0.5, include_positive=True
        ),
    )
    mu = L.class_prototypes(views[0], labels)
    torch.testing.assert_close(
        L.SupervisedPrototypeLoss(lam=0.5, temperature=0.2)(views[1], labels, mu),
        L.supervised_prototype_loss(views[1], labels, mu, lam=0.5, temperature=0.2),
    )
    assert set(L.LOSS_NAMES) == {"nt_xent", "decoupled", "balanced", "supcon", "debiased"}


def test_balanced_module_class_weights() -> None:
    """class_weights[labels] is the weight of every view of an instance."""
    views = _randn(3, 6, 4, seed=22)
    labels = torch.tensor([0, 1, 0, 1, 2, 2])
    class_weights = torch.tensor([0.5, 1.0, 4.0], dtype=F64)
    module = L.BalancedContrastiveLoss(temperature=0.4, lam=0.9, class_weights=class_weights)
    want = L.balanced_contrastive_loss(
        views, temperature=0.4, lam=0.9, negative_weights=class_weights[labels].repeat(3)
    )
    torch.testing.assert_close(module(views, labels), want)
    assert "class_weights" in dict(module.named_buffers())


def test_gather_distributed_is_noop_on_one_process() -> None:
    """gather_distributed=True without an initialised process group changes nothing."""
    views = _randn(2, 5, 3, seed=23)
    for fn in (L.nt_xent_loss, L.debiased_contrastive_loss):
        torch.testing.assert_close(fn(views, gather_distributed=True), fn(views))
    torch.testing.assert_close(L.SupConLoss(gather_distributed=True)(views), L.SupConLoss()(views))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(_all_view_losses()))
def test_cuda_matches_cpu_without_host_sync(name: str) -> None:
    """On CUDA: same loss as on CPU, float32 under fp16/bf16 autocast, and no host sync."""
    fn = _all_view_losses("cuda")[name]
    views = _randn(2, 12, 8, seed=24, dtype=torch.float32)
    cpu = _all_view_losses()[name](views, 0.2)
    cuda_views = views.cuda().requires_grad_(True)
    torch.testing.assert_close(fn(cuda_views, 0.2).cpu(), cpu, rtol=1e-5, atol=1e-5)
    if name.startswith("prototype"):
        return  # class_prototypes reads the class counts (documented host sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for dtype in (torch.float16, torch.bfloat16):
            with torch.autocast("cuda", dtype=dtype):
                loss = fn(cuda_views.to(dtype), 0.2)
            assert loss.dtype == torch.float32
            loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss).item() and torch.isfinite(cuda_views.grad).all().item()


# --------------------------------------------------------------------------- raw dot products


def _raw_reference(views: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(NT-Xent, derived) per anchor on raw dot products, by the definitions (two views)."""
    n = views.shape[1]
    z = views.reshape(2 * n, -1)
    logits = z @ z.T / tau
    idx = torch.arange(2 * n)
    pos = logits[idx, (idx + n) % (2 * n)]
    same = (idx[:, None] % n) == (idx[None, :] % n)
    neg = logits.masked_fill(same, float("-inf")).logsumexp(dim=1)
    return torch.logaddexp(pos, neg) - pos, neg - pos


@pytest.mark.parametrize("tau", [0.01, 0.2, 1.0])
def test_unnormalised_losses_match_definition(tau: float) -> None:
    """normalize=False scores raw dot products (also through the shifted small-tau path)."""
    views = 3.0 * _randn(2, 6, 4, seed=3)
    nt, derived = _raw_reference(views, tau)
    got_nt = L.nt_xent_loss(views, temperature=tau, normalize=False, reduction="none")
    got_derived = L.decoupled_contrastive_loss(
        views, temperature=tau, normalize=False, reduction="none"
    )
    torch.testing.assert_close(got_nt, nt, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_derived, derived, rtol=1e-10, atol=1e-10)
    weights = torch.ones(12, dtype=F64)  # the weighted (unfused) path agrees too
    got_weighted = L.balanced_contrastive_loss(
        views, temperature=tau, negative_weights=weights, normalize=False, reduction="none"
    )
    torch.testing.assert_close(got_weighted, derived, rtol=1e-10, atol=1e-10)


def test_unnormalised_equals_normalised_on_unit_vectors() -> None:
    views = F.normalize(_randn(2, 5, 3, seed=4), dim=-1)
    for fn in (L.nt_xent_loss, L.decoupled_contrastive_loss):
        raw = fn(views, temperature=0.3, normalize=False)
        assert raw.item() == pytest.approx(fn(views, temperature=0.3).item(), rel=1e-12)


def test_without_normalisation_the_derived_loss_is_unbounded_below() -> None:
    """Scaling every embedding by c moves the raw losses, not the cosine ones.

    With each positive the largest score of its anchor, the derived loss falls linearly in
    ``c**2`` (no lower bound) while NT-Xent stays >= 0 and tends to 0.
    """
    base = torch.eye(4, dtype=F64)
    views = torch.stack([base, base + 0.1 * _randn(4, 4, seed=5)])
    scales = [1.0, 4.0, 16.0]
    derived = [L.decoupled_contrastive_loss(c * views, normalize=False).item() for c in scales]
    nt = [L.nt_xent_loss(c * views, normalize=False).item() for c in scales]
    cosine = [L.decoupled_contrastive_loss(c * views).item() for c in scales]
    assert derived[0] > derived[1] > derived[2] and derived[2] < -100
    assert nt[0] > nt[1] > nt[2] >= 0 and nt[2] < 1e-6
    assert cosine == pytest.approx([cosine[0]] * 3, rel=1e-12)


def test_unnormalised_gradcheck_and_modules() -> None:
    x = _randn(2, 4, 3, seed=6).requires_grad_(True)
    for tau in (0.01, 0.5):  # shifted and unshifted paths of the fused log-sum-exp
        assert torch.autograd.gradcheck(
            lambda v, t=tau: L.decoupled_contrastive_loss(v, temperature=t, normalize=False), (x,)
        )
    views = _randn(2, 4, 3, seed=7)
    for name in ("nt_xent", "decoupled", "balanced"):
        module = L.make_loss(name, temperature=0.5, normalize=False)
        assert "normalize=False" in repr(module)
    want = L.nt_xent_loss(views, normalize=False)
    assert L.make_loss("nt_xent", normalize=False)(views).item() == pytest.approx(want.item())
    with pytest.raises(ValueError, match="normalize"):
        L.nt_xent_loss(views, normalize=1)
    with pytest.raises(ValueError, match="normalize"):
        L.make_loss("supcon", normalize=False)
