"""Tests for cl_lib.forces: the attraction/repulsion split of the balanced loss's gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cl_lib.forces import (
    ContrastiveForces,
    anchor_gradients,
    contrastive_forces,
    tangent_projection,
)
from cl_lib.losses import balanced_contrastive_loss


def unit_views(num_views: int, batch: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Random unit-norm views (V, N, D) in float64."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num_views, batch, dim, generator=g, dtype=torch.float64), dim=-1)


def library_gradient(views: torch.Tensor, **kwargs) -> torch.Tensor:
    """Per-anchor autograd gradient of cl_lib's balanced loss w.r.t. each anchor row."""

    def per_anchor(x: torch.Tensor) -> torch.Tensor:
        return balanced_contrastive_loss(x, reduction="none", **kwargs)

    return anchor_gradients(per_anchor, views)


@pytest.mark.parametrize("num_views", [2, 3])
@pytest.mark.parametrize("include_positive", [False, True])
@pytest.mark.parametrize(
    ("temperature", "alpha", "lam"), [(0.5, 1.0, 1.0), (0.2, 2.5, 0.4), (1.3, 0.3, 3.0)]
)
def test_split_sums_to_autograd_gradient(num_views, include_positive, temperature, alpha, lam):
    views = unit_views(num_views, 6, 4, seed=num_views)
    kwargs = dict(temperature=temperature, alpha=alpha, lam=lam, include_positive=include_positive)
    forces = contrastive_forces(views, **kwargs)
    expected = library_gradient(views, **kwargs)
    torch.testing.assert_close(forces.attraction + forces.repulsion, expected)
    torch.testing.assert_close(forces.gradient, expected)


@pytest.mark.parametrize("shape", ["candidate", "pair"])
@pytest.mark.parametrize("include_positive", [False, True])
def test_negative_weights_match_the_library(shape, include_positive):
    views = unit_views(2, 5, 3, seed=7)
    g = torch.Generator().manual_seed(1)
    size = (10,) if shape == "candidate" else (10, 10)
    weights = 0.2 + 2 * torch.rand(size, generator=g, dtype=torch.float64)
    kwargs = dict(temperature=0.4, negative_weights=weights, include_positive=include_positive)
    forces = contrastive_forces(views, **kwargs)
    torch.testing.assert_close(forces.gradient, library_gradient(views, **kwargs))


def test_raw_inputs_gradient_is_tangent_part_over_norm():
    views = unit_views(2, 5, 3, seed=3)
    g = torch.Generator().manual_seed(2)
    scale = 0.5 + 2 * torch.rand(2, 5, 1, generator=g, dtype=torch.float64)
    raw = views * scale
    forces = contrastive_forces(raw, temperature=0.3, alpha=1.5, lam=0.7)
    expected = library_gradient(raw, temperature=0.3, alpha=1.5, lam=0.7)
    torch.testing.assert_close(forces.gradient / scale.reshape(10, 1), expected)
    torch.testing.assert_close(forces.embeddings, views.reshape(10, 3))


def test_tangent_part_of_ambient_gradient():
    views = unit_views(2, 6, 5, seed=4)
    ambient = contrastive_forces(views, temperature=0.5, tangent=False)
    tangent = contrastive_forces(views, temperature=0.5)
    z = ambient.embeddings
    torch.testing.assert_close(tangent_projection(z, ambient.attraction), tangent.attraction)
    torch.testing.assert_close(tangent_projection(z, ambient.repulsion), tangent.repulsion)
    # The ambient attraction is exactly -alpha z_p / tau, z_p the other view of the instance.
    torch.testing.assert_close(ambient.attraction, -views.flip(0).reshape(12, 5) / 0.5)
    # Tangent vectors are orthogonal to the anchor.
    dots = (tangent.gradient * z).sum(dim=1)
    torch.testing.assert_close(dots, torch.zeros_like(dots))


def test_attraction_scales_with_alpha_over_tau_and_repulsion_with_lam():
    views = unit_views(2, 8, 3, seed=5)
    base = contrastive_forces(views, temperature=0.5)
    more_alpha = contrastive_forces(views, temperature=0.5, alpha=3.0)
    more_lam = contrastive_forces(views, temperature=0.5, lam=0.25)
    torch.testing.assert_close(more_alpha.attraction, 3.0 * base.attraction)
    torch.testing.assert_close(more_alpha.repulsion, base.repulsion)
    torch.testing.assert_close(more_lam.repulsion, 0.25 * base.repulsion)
    torch.testing.assert_close(more_lam.attraction, base.attraction)
    # Attraction is alpha/tau times a tau-free vector: its norm is (alpha/tau) sin(angle to z_p).
    for tau in (0.1, 0.7, 2.0):
        forces = contrastive_forces(views, temperature=tau, alpha=1.5)
        cos = (forces.embeddings * forces.positives).sum(dim=1)
        expected = 1.5 / tau * (1 - cos**2).clamp_min(0).sqrt()
        torch.testing.assert_close(forces.attraction.norm(dim=1), expected)
        # Repulsion is lam/tau times a tangent part of a convex combination: norm <= lam/tau.
        assert bool((forces.repulsion.norm(dim=1) <= 1.0 / tau + 1e-12).all())


def test_attraction_points_toward_the_positive():
    views = unit_views(2, 10, 4, seed=6)
    forces = contrastive_forces(views, temperature=0.5, alpha=2.0)
    z, zp = forces.embeddings, forces.positives
    toward = zp - (zp * z).sum(dim=1, keepdim=True) * z
    assert bool(((-forces.attraction * toward).sum(dim=1) > 0).all())
    # A small step along the minus attraction, renormalised, brings the anchor closer to z_p.
    moved = F.normalize(z - 1e-3 * forces.attraction, dim=1)
    assert bool(((moved * zp).sum(dim=1) > (z * zp).sum(dim=1)).all())


def test_repulsion_moves_away_from_weighted_negatives():
    views = unit_views(2, 10, 4, seed=8)
    forces = contrastive_forces(views, temperature=0.5)
    z = forces.embeddings
    centre = forces.weights @ z  # softmax-weighted mean of the negatives
    moved = F.normalize(z - 1e-3 * forces.repulsion, dim=1)
    assert bool(((moved * centre).sum(dim=1) < (z * centre).sum(dim=1)).all())


def test_minus_gradient_is_a_descent_direction():
    views = unit_views(2, 6, 3, seed=9)
    kwargs = dict(temperature=0.5, alpha=1.3, lam=0.8)
    forces = contrastive_forces(views, **kwargs)
    before = balanced_contrastive_loss(views, reduction="none", **kwargs)
    step = 1e-4
    for i in range(12):  # move one anchor at a time; the loss of that anchor must fall
        moved = views.reshape(12, 3).clone()
        moved[i] = F.normalize(moved[i] - step * forces.gradient[i], dim=0)
        after = balanced_contrastive_loss(moved.reshape(2, 6, 3), reduction="none", **kwargs)
        assert after[i] < before[i]


@pytest.mark.parametrize("include_positive", [False, True])
def test_shapes_and_weights(include_positive):
    views = unit_views(3, 4, 5, seed=10).float()
    forces = contrastive_forces(list(views), include_positive=include_positive)
    assert isinstance(forces, ContrastiveForces)
    for name in ("embeddings", "positives", "attraction", "repulsion", "gradient"):
        assert getattr(forces, name).shape == (12, 5)
        assert getattr(forces, name).dtype == torch.float32
    assert forces.weights.shape == (12, 12)
    torch.testing.assert_close(forces.weights.sum(dim=1), torch.ones(12))
    instance = torch.arange(12) % 4
    same = instance[:, None] == instance[None, :]
    assert bool((forces.weights[torch.eye(12, dtype=torch.bool)] == 0).all())
    off_diag_same = same & ~torch.eye(12, dtype=torch.bool)
    positive_weights = forces.weights[off_diag_same]
    if include_positive:
        assert bool((positive_weights > 0).all())
    else:
        assert bool((positive_weights == 0).all())
    # The sequence and the stacked form agree.
    stacked = contrastive_forces(views, include_positive=include_positive)
    torch.testing.assert_close(stacked.gradient, forces.gradient)


def test_works_under_autocast():
    views = unit_views(2, 6, 8, seed=11).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        forces = contrastive_forces(views)
    assert forces.gradient.dtype == torch.float32
    torch.testing.assert_close(forces.gradient, contrastive_forces(views).gradient)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    views = unit_views(2, 16, 8, seed=12).float()
    cpu = contrastive_forces(views, temperature=0.2, alpha=1.5)
    gpu = contrastive_forces(views.cuda(), temperature=0.2, alpha=1.5)
    torch.testing.assert_close(gpu.gradient.cpu(), cpu.gradient, rtol=1e-4, atol=1e-5)


def test_tangent_projection_is_orthogonal_and_idempotent():
    g = torch.Generator().manual_seed(13)
    z = F.normalize(torch.randn(7, 4, generator=g, dtype=torch.float64), dim=1)
    v = torch.randn(7, 4, generator=g, dtype=torch.float64)
    t = tangent_projection(z, v)
    torch.testing.assert_close((t * z).sum(dim=1), torch.zeros(7, dtype=torch.float64))
    torch.testing.assert_close(tangent_projection(z, t), t)
    torch.testing.assert_close(tangent_projection(z, 2.5 * z), torch.zeros_like(z))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=math.inf), "temperature"),
        (dict(alpha=-1.0), "alpha"),
        (dict(alpha=True), "alpha"),
        (dict(lam=math.nan), "lam"),
        (dict(include_positive=1), "include_positive"),
        (dict(tangent="yes"), "tangent"),
        (dict(negative_weights=torch.ones(3)), "negative_weights"),
        (dict(negative_weights=-torch.ones(8)), "negative_weights"),
        (dict(negative_weights=torch.ones(8, dtype=torch.int64)), "negative_weights"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        contrastive_forces(torch.randn(2, 4, 3), **kwargs)


@pytest.mark.parametrize(
    "views",
    [
        torch.randn(1, 4, 3),  # one view
        torch.randn(2, 1, 3),  # one instance
        torch.randn(8, 3),  # not (V, N, D)
        torch.ones(2, 4, 3, dtype=torch.int64),  # not floating
        [torch.randn(4, 3), torch.randn(5, 3)],  # mismatched views
        "not a tensor",
    ],
)
def test_bad_views_raise(views):
    with pytest.raises(ValueError, match="views"):
        contrastive_forces(views)


def test_tangent_projection_and_anchor_gradients_validate():
    with pytest.raises(ValueError, match="same shape"):
        tangent_projection(torch.randn(3, 2), torch.randn(2, 3))
    with pytest.raises(ValueError, match="loss_fn"):
        anchor_gradients("not callable", torch.randn(2, 3, 2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per-anchor"):
        anchor_gradients(lambda x: x.sum(), torch.randn(2, 3, 2))


class _SquaredNormInplace(torch.autograd.Function):
    """Row-wise squared norm whose backward uses an in-place op that vmap cannot batch."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return (x * x).sum(dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return (2 * x).mul_(grad.unsqueeze(-1))


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_anchor_gradients_of_a_row_wise_loss(inplace_backward):
    g = torch.Generator().manual_seed(14)
    views = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)

    def per_anchor(x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(6, 4)
        return _SquaredNormInplace.apply(rows) if inplace_backward else (rows * rows).sum(dim=1)

    torch.testing.assert_close(anchor_gradients(per_anchor, views), 2 * views.reshape(6, 4))
