"""Tests for cl_lib.practice: the two-view estimator, the Jensen gap, effective negatives."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cl_lib import losses as L
from cl_lib import practice as P

F64 = torch.float64


def _views(k: int, n: int, d: int, noise: float, seed: int = 0) -> torch.Tensor:
    """k noisy views around n random unit centres (float64)."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n, d, generator=gen, dtype=F64), dim=-1)
    return centres + noise * torch.randn(k, n, d, generator=gen, dtype=F64)


def test_attraction_estimator_is_unbiased_with_shrinking_error() -> None:
    z = _views(17, 400, 16, noise=0.3)  # 16 views besides the anchor
    errors = P.attraction_estimates(z, [1, 2, 4, 8])
    # the groups partition the 16 views, so their estimates average to the reference exactly
    for e in errors:
        assert abs(e.mean_error) < 1e-12 and e.num_estimates == (16 // e.k) * 400
    # Var(group mean - all-view mean) = s^2 (1/k - 1/16): the rms error follows it
    s2 = errors[0].rms_error ** 2 / (1 - 1 / 16)
    for e in errors[1:]:
        assert e.rms_error**2 == pytest.approx(s2 * (1 / e.k - 1 / 16), rel=0.15)
    assert [e.rms_error for e in errors] == sorted((e.rms_error for e in errors), reverse=True)


def test_independent_reference_makes_the_mean_error_a_test_of_bias() -> None:
    z = _views(33, 400, 16, noise=0.3)  # 16 estimate views and 16 reference views
    errors = P.attraction_estimates(z, [1, 2, 4, 8], reference="independent")
    s2 = None
    for e in errors:
        # unbiased: the mean error is within a few standard errors of 0, and not 0 by algebra
        assert 0 < e.standard_error and abs(e.mean_error) < 4 * e.standard_error
        assert abs(e.mean_error) > 1e-12 and e.num_estimates == (16 // e.k) * 400
        # Var(group mean - independent reference mean) = s^2 (1/k + 1/16)
        s2 = s2 or e.rms_error**2 / (1 / e.k + 1 / 16)
        assert e.rms_error**2 == pytest.approx(s2 * (1 / e.k + 1 / 16), rel=0.15)
    # a biased estimator is caught: shift every estimate view towards the anchor
    zn = F.normalize(z, dim=-1)
    biased = zn.clone()
    biased[1:17] = F.normalize(zn[1:17] + 0.1 * zn[0], dim=-1)
    for e in P.attraction_estimates(biased, [1, 4], reference="independent"):
        assert abs(e.mean_error) > 10 * e.standard_error
    with pytest.raises(ValueError, match="reference"):
        P.attraction_estimates(z, [1], reference="other")


def test_identical_views_give_exact_estimates_and_no_jensen_gap() -> None:
    z = _views(1, 30, 8, noise=0.0).expand(5, 30, 8)
    assert all(e.rms_error < 1e-12 for e in P.attraction_estimates(z, [1, 2]))
    gaps = P.jensen_gap(z, [0.1, 1.0])
    assert max(abs(g) for g in gaps.values()) < 1e-12


def test_jensen_gap_is_non_negative_and_grows_as_tau_falls() -> None:
    z = _views(9, 50, 8, noise=0.5, seed=1)
    gaps = P.jensen_gap(z, [2.0, 0.5, 0.1])
    assert 0 < gaps[2.0] < gaps[0.5] < gaps[0.1]
    # small-variance limit: the gap is about Var(<z_i, z_j'>) / (2 tau^2)
    small = _views(65, 40, 8, noise=0.01, seed=2)
    zn = F.normalize(small, dim=-1)
    var = torch.einsum("id,vjd->vij", zn[0], zn[1:]).var(dim=0, unbiased=False)
    var = var[~torch.eye(40, dtype=torch.bool)].mean().item()
    assert P.jensen_gap(small, [1.0])[1.0] == pytest.approx(var / 2, rel=0.05)


def test_effective_negatives_limits() -> None:
    n = 6
    same = torch.ones(2, n, 4, dtype=F64)  # every cosine 1: uniform weights
    assert P.effective_negatives(same, [0.05])[0.05] == pytest.approx(2 * n - 2, rel=1e-12)
    z = _views(2, n, 16, noise=0.2, seed=3)
    eff = P.effective_negatives(z, [0.01, 0.2, 1.0, 100.0])
    values = [eff[t] for t in (0.01, 0.2, 1.0, 100.0)]
    assert values == sorted(values) and 1.0 <= values[0] < 1.5
    assert values[-1] == pytest.approx(2 * n - 2, rel=1e-3)


def test_scale_sweep_cosine_is_blind_to_the_scale() -> None:
    views = F.normalize(_views(2, 8, 5, noise=0.1, seed=4), dim=-1)
    out = P.scale_sweep(views, [1.0, 3.0], L.decoupled_contrastive_loss, temperature=0.5)
    assert out["cosine"][0] == pytest.approx(out["cosine"][1], rel=1e-12)
    assert out["raw"][0] == pytest.approx(out["cosine"][0], rel=1e-12)  # unit vectors
    assert out["raw"][1] != pytest.approx(out["raw"][0])


def test_lengthening_one_instance_drives_the_raw_derived_loss_down_without_bound() -> None:
    """One instance with aligned views: its attraction grows like c**2, its repulsion like c."""
    views = F.normalize(_views(2, 8, 5, noise=0.1, seed=5), dim=-1)
    scales = [1.0, 4.0, 16.0, 64.0]
    derived = P.scale_sweep(
        views, scales, L.decoupled_contrastive_loss, temperature=0.5, instances=[0]
    )
    nt = P.scale_sweep(views, scales, L.nt_xent_loss, temperature=0.5, instances=[0])
    assert derived["raw"] == sorted(derived["raw"], reverse=True) and derived["raw"][-1] < -100
    assert min(nt["raw"]) >= 0  # NT-Xent is a cross-entropy: bounded below by 0
    assert derived["cosine"] == pytest.approx([derived["cosine"][0]] * 4, rel=1e-12)
    with pytest.raises(ValueError, match="instances"):
        P.scale_sweep(views, scales, L.nt_xent_loss, temperature=0.5, instances=[8])


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: P.attraction_estimates(torch.zeros(2, 4, 3), [1]), "z must have at least 3"),
        (lambda: P.attraction_estimates(torch.ones(5, 4, 3), [4]), "ks"),
        (lambda: P.attraction_estimates(torch.ones(4, 3), [1]), "shape"),
        (lambda: P.jensen_gap(torch.ones(3, 4, 3), [0.0]), "temperatures"),
        (lambda: P.jensen_gap(torch.full((3, 4, 3), math.nan), [1.0]), "finite"),
        (lambda: P.effective_negatives(torch.ones(2, 4, 3, dtype=torch.int64), [1.0]), "floating"),
        (
            lambda: P.scale_sweep(torch.ones(2, 4, 3), [-1.0], L.nt_xent_loss, temperature=0.5),
            "scales",
        ),
    ],
)
def test_bad_arguments_are_named(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_heat_map_text_is_legible_on_every_cell():
    # White on yellow (the top of viridis) or black on dark blue would fail the contrast test.
    import matplotlib

    from cl_lib.plotting import text_colour

    def contrast(a, b):
        def lum(rgba):
            lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgba[:3]]
            return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

        hi, lo = sorted((lum(a), lum(b)), reverse=True)
        return (hi + 0.05) / (lo + 0.05)

    for name in ("viridis", "coolwarm", "magma"):
        cmap = matplotlib.colormaps[name]
        for k in range(101):
            cell = cmap(k / 100)
            colour = matplotlib.colors.to_rgba(text_colour(cell))
            assert contrast(cell, colour) >= 4.5, (name, k)  # WCAG AA for normal text
    assert text_colour(matplotlib.colormaps["viridis"](1.0)) == "black"  # yellow
    assert text_colour(matplotlib.colormaps["viridis"](0.0)) == "white"  # dark purple
