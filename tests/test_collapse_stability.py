"""Near collapse the contrastive losses are quadratic in the spread (book appendix, "When
collapse attracts"): for unit embeddings s = 1 - |d|^2 / 2, so to second order

    balanced:  L = (lam - alpha) / tau + lam log K + (alpha A - lam R) / (2 tau)
    NT-Xent:   L = log(K + 1) + K / (K + 1) * (A - R) / (2 tau)

with A the mean squared distance of positive pairs, R that of negative pairs and K = 2N - 2
negatives per anchor. Collapse therefore attracts the balanced loss exactly when
lam / alpha < rho = A / R (cl_lib.collapse.collapse_ratio).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cl_lib.collapse import collapse_loss_value, collapse_ratio, pair_spreads, toward_collapse
from cl_lib.losses import balanced_contrastive_loss, nt_xent_loss

N, D, TAU = 16, 8, 0.2
K = 2 * N - 2


def _near_collapse(eps: float, seed: int = 0, positive_scale: float = 0.6):
    """Two views of N instances at distance ~eps from one point c of the sphere (float64).

    Each instance has its own offset; its two views add a smaller view offset, so positives
    are closer than negatives by a factor that ``positive_scale`` sets.
    """
    gen = torch.Generator().manual_seed(seed)
    c = F.normalize(torch.randn(D, generator=gen, dtype=torch.float64), dim=0)
    instance = torch.randn(N, D, generator=gen, dtype=torch.float64)
    views = positive_scale * torch.randn(2, N, D, generator=gen, dtype=torch.float64)
    return F.normalize(c + eps * (instance + views), dim=-1)


def _spreads(z: torch.Tensor) -> tuple[float, float]:
    """A (positive pairs) and R (negative pairs) as mean squared distances."""
    a, r = pair_spreads(z[0], z[1])
    assert a / r == pytest.approx(collapse_ratio(z[0], z[1]), rel=1e-12)
    return a, r


@pytest.mark.parametrize(("alpha", "lam"), [(1.0, 1.0), (1.0, 0.5), (2.0, 1.0), (1.0, 2.0)])
def test_balanced_loss_is_its_second_order_expansion_near_collapse(alpha: float, lam: float):
    """The remainder of the quadratic expansion shrinks like eps^4 (a wrong constant or sign
    in the expansion would leave an eps^2 remainder)."""
    const = (lam - alpha) / TAU + lam * math.log(K)
    remainders = []
    for eps in (0.02, 0.01):
        z = _near_collapse(eps)
        a, r = _spreads(z)
        loss = float(balanced_contrastive_loss(z, temperature=TAU, alpha=alpha, lam=lam))
        quadratic = (alpha * a - lam * r) / (2 * TAU)
        assert abs(quadratic) > 1e-4  # the second-order term is really there
        remainders.append(abs(loss - const - quadratic))
    assert 10 < remainders[0] / remainders[1] < 22  # about 2^4 = 16


def test_the_constant_is_the_collapse_value_of_the_runs():
    """The expansion's constant is what cl_lib.collapse flags plateaus against."""
    config = {"name": "balanced", "alpha": 1.0, "lam": 2.0, "temperature": TAU}
    assert collapse_loss_value(config, N) == pytest.approx((2.0 - 1.0) / TAU + 2.0 * math.log(K))
    nt = {"name": "nt_xent", "temperature": TAU}
    assert collapse_loss_value(nt, N) == pytest.approx(math.log(K + 1))


def test_nt_xent_near_collapse_behaves_like_ratio_one():
    remainders = []
    for eps in (0.02, 0.01):
        z = _near_collapse(eps)
        a, r = _spreads(z)
        loss = float(nt_xent_loss(z, temperature=TAU))
        quadratic = K / (K + 1) * (a - r) / (2 * TAU)
        remainders.append(abs(loss - math.log(K + 1) - quadratic))
    assert 10 < remainders[0] / remainders[1] < 22


@pytest.mark.parametrize("positive_scale", [0.3, 0.6, 1.2])
def test_collapse_attracts_exactly_below_the_ratio_rho(positive_scale: float):
    """Leaving collapse along the path raises the loss when lam / alpha < rho and lowers it
    when lam / alpha > rho (a stability rule with the inequality reversed would fail here)."""
    z = _near_collapse(0.01, positive_scale=positive_scale)
    rho = collapse_ratio(z[0], z[1])
    for ratio, rises in ((0.8 * rho, True), (1.25 * rho, False)):
        collapsed = (ratio - 1.0) / TAU + ratio * math.log(K)
        loss = float(balanced_contrastive_loss(z, temperature=TAU, alpha=1.0, lam=ratio))
        assert (loss > collapsed) is rises, (positive_scale, rho, ratio)


def test_pair_spreads_are_the_mean_squared_distances_of_the_pairs():
    """A and R against a loop over every anchor and every negative view (the definition)."""
    gen = torch.Generator().manual_seed(3)
    z = F.normalize(torch.randn(2, 6, 4, generator=gen, dtype=torch.float64), dim=-1)
    a, r = pair_spreads(z[0], z[1])
    flat = z.reshape(12, 4)
    negatives = [
        float((flat[i] - flat[k]).pow(2).sum())
        for i in range(12)
        for k in range(12)
        if i % 6 != k % 6
    ]
    assert a == pytest.approx(float((z[0] - z[1]).pow(2).sum(-1).mean()), rel=1e-12)
    assert r == pytest.approx(sum(negatives) / len(negatives), rel=1e-12)


def test_toward_collapse_scales_both_spreads_by_eps_squared_and_keeps_rho():
    """Distances scale like eps (1 + O(eps)): halving a small eps quarters A and R."""
    z = _near_collapse(1.0)
    assert torch.allclose(toward_collapse(z, 1.0), F.normalize(z, dim=-1), atol=1e-12)
    a1, r1 = pair_spreads(*toward_collapse(z, 0.002))
    a2, r2 = pair_spreads(*toward_collapse(z, 0.001))
    assert a1 / a2 == pytest.approx(4.0, rel=5e-3) and r1 / r2 == pytest.approx(4.0, rel=5e-3)
    assert a1 / r1 == pytest.approx(a2 / r2, rel=5e-3)
    with pytest.raises(ValueError, match="eps"):
        toward_collapse(z, 0.0)
    with pytest.raises(ValueError, match="views"):
        toward_collapse(z[0], 0.1)
