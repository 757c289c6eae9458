"""Toy embeddings on the unit circle and sphere, for the theory chapters.

These are points, not images: they stand in for the normalised outputs of an
encoder so that prototypes, forces and losses can be seen in 2-D and 3-D.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_positive_int(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def random_unit_vectors(n: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` points drawn uniformly on the unit sphere in ``dim`` dimensions, shape (n, dim)."""
    _check_positive_int("n", n)
    _check_positive_int("dim", dim, 2)
    x = torch.randn(n, dim, generator=generator)
    return x / x.norm(dim=1, keepdim=True)


def class_clusters(
    num_classes: int,
    per_class: int,
    dim: int = 2,
    spread: float = 0.3,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Labelled clusters on the unit sphere.

    Class centres are evenly spaced on the circle when ``dim == 2`` and random
    on the sphere otherwise; each point is its centre plus Gaussian noise of
    standard deviation ``spread``, projected back onto the sphere.

    Returns ``(points (C*per_class, dim), labels (C*per_class,), centres (C, dim))``.
    """
    _check_positive_int("num_classes", num_classes, 2)
    _check_positive_int("per_class", per_class)
    _check_positive_int("dim", dim, 2)
    if not (isinstance(spread, (int, float)) and math.isfinite(spread) and spread >= 0):
        raise ValueError(f"spread must be a finite number >= 0, got {spread!r}")
    if dim == 2:
        angles = torch.arange(num_classes, dtype=torch.float32) * (2 * math.pi / num_classes)
        centres = torch.stack([angles.cos(), angles.sin()], dim=1)
    else:
        centres = random_unit_vectors(num_classes, dim, generator)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    points = points / points.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return points, labels, centres
