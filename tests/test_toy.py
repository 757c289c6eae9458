"""Toy embeddings on the circle and sphere."""

import math

import pytest
import torch

from cl_lib.toy import class_clusters, random_unit_vectors


def test_random_unit_vectors_lie_on_sphere_and_are_centred():
    x = random_unit_vectors(20000, 3, torch.Generator().manual_seed(0))
    assert x.shape == (20000, 3)
    assert torch.allclose(x.norm(dim=1), torch.ones(20000), atol=1e-6)
    # uniform on the sphere: mean ~ 0 (std of each coordinate's mean is 1/sqrt(3n))
    assert x.mean(0).abs().max() < 5 / math.sqrt(3 * 20000)


def test_class_clusters_on_circle_are_evenly_spaced_and_labelled():
    g = torch.Generator().manual_seed(1)
    points, labels, centres = class_clusters(4, 50, dim=2, spread=0.05, generator=g)
    assert points.shape == (200, 2) and labels.shape == (200,) and centres.shape == (4, 2)
    assert torch.allclose(points.norm(dim=1), torch.ones(200), atol=1e-6)
    gram = centres @ centres.T
    assert torch.allclose(gram.diagonal(), torch.ones(4), atol=1e-6)
    assert torch.allclose(gram[0, 1], torch.tensor(0.0), atol=1e-6)  # 90 degrees apart
    # with a small spread every point is nearest to its own centre
    assert torch.equal((points @ centres.T).argmax(1), labels)


def test_zero_spread_puts_points_on_centres():
    points, labels, centres = class_clusters(3, 5, dim=4, spread=0.0)
    assert torch.allclose(points, centres[labels])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_classes": 1, "per_class": 3}, "num_classes"),
        ({"num_classes": 3, "per_class": 0}, "per_class"),
        ({"num_classes": 3, "per_class": 3, "dim": 1}, "dim"),
        ({"num_classes": 3, "per_class": 3, "spread": -1.0}, "spread"),
        ({"num_classes": 3, "per_class": 3, "spread": float("nan")}, "spread"),
    ],
)
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        class_clusters(**kwargs)
