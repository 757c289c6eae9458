"""Bad inputs to cl_lib.losses raise ValueError naming the offending argument."""

from __future__ import annotations

import pytest
import torch

from cl_lib import losses as L

GOOD = torch.randn(2, 4, 3)
LABELS = torch.tensor([0, 1, 0, 1])


def _view_losses() -> dict[str, object]:
    """Every loss that takes views, by name."""
    return {
        "nt_xent": L.nt_xent_loss,
        "decoupled": L.decoupled_contrastive_loss,
        "balanced": L.balanced_contrastive_loss,
        "debiased": L.debiased_contrastive_loss,
        "components": L.contrastive_components,
        "supcon_module": L.SupConLoss(),
        "balanced_module": L.BalancedContrastiveLoss(),
    }


BAD_VIEWS = {
    "mismatched shapes": [torch.randn(4, 3), torch.randn(5, 3)],
    "mismatched dims": [torch.randn(4, 3), torch.randn(4, 2)],
    "one view (list)": [torch.randn(4, 3)],
    "one view (tensor)": torch.randn(1, 4, 3),
    "one instance": torch.randn(2, 1, 3),
    "integer tensor": torch.ones(2, 4, 3, dtype=torch.int64),
    "integer list": [torch.ones(4, 3, dtype=torch.int32)] * 2,
    "mixed dtypes": [torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64)],
    "nan": torch.full((2, 4, 3), float("nan")),
    "inf in a view": [torch.randn(4, 3), torch.tensor([[float("inf"), 0, 0]] * 4)],
    "2-D tensor": torch.randn(4, 3),
    "not a tensor": "views",
    "list of lists": [[1.0, 2.0], [3.0, 4.0]],
}


@pytest.mark.parametrize("loss", list(_view_losses()))
@pytest.mark.parametrize("case", list(BAD_VIEWS))
def test_bad_views(loss: str, case: str) -> None:
    """Every view loss rejects malformed views with a message naming ``views``."""
    with pytest.raises(ValueError, match="views"):
        _view_losses()[loss](BAD_VIEWS[case])


@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf"), True, "0.5", None])
@pytest.mark.parametrize("name", ["temperature", "alpha", "lam"])
def test_bad_balance_parameters(name: str, value: object) -> None:
    """temperature, alpha and lam must be finite floats > 0 (functional and module)."""
    with pytest.raises(ValueError, match=name):
        L.balanced_contrastive_loss(GOOD, **{name: value})
    with pytest.raises(ValueError, match=name):
        L.BalancedContrastiveLoss(**{name: value})


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_bad_temperature_everywhere(value: float) -> None:
    """Every loss and module checks its temperature."""
    emb = torch.randn(4, 3)
    calls = [
        lambda: L.nt_xent_loss(GOOD, temperature=value),
        lambda: L.decoupled_contrastive_loss(GOOD, temperature=value),
        lambda: L.debiased_contrastive_loss(GOOD, temperature=value),
        lambda: L.contrastive_components(GOOD, temperature=value),
        lambda: L.supcon_loss(emb, LABELS, temperature=value),
        lambda: L.supervised_prototype_loss(emb, LABELS, torch.randn(2, 3), temperature=value),
        lambda: L.smooth_max(emb, value),
        lambda: L.NTXentLoss(temperature=value),
        lambda: L.SupConLoss(temperature=value),
        lambda: L.DebiasedContrastiveLoss(temperature=value),
        lambda: L.DecoupledContrastiveLoss(temperature=value),
        lambda: L.SupervisedPrototypeLoss(temperature=value),
        lambda: L.make_loss("nt_xent", temperature=value),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="temperature"):
            call()


@pytest.mark.parametrize(
    "weights",
    [
        torch.zeros(8),
        -torch.ones(8),
        torch.tensor([1.0] * 7 + [float("nan")]),
        torch.tensor([1.0] * 7 + [float("inf")]),
        torch.ones(7),
        torch.ones(8, 7),
        torch.ones(2, 4),
        torch.ones(8, dtype=torch.int64),
        [1.0] * 8,
    ],
)
def test_bad_negative_weights(weights: object) -> None:
    """negative_weights: (V*N,) or (V*N, V*N), floating, finite and > 0."""
    with pytest.raises(ValueError, match="negative_weights"):
        L.balanced_contrastive_loss(GOOD, negative_weights=weights)


def test_bad_class_weights() -> None:
    """class_weights must be a finite positive float vector; labels required and in range."""
    for bad in [torch.tensor([1.0, 0.0]), torch.tensor([1, 2]), torch.ones(2, 2)]:
        with pytest.raises(ValueError, match="class_weights"):
            L.BalancedContrastiveLoss(class_weights=bad)
    module = L.BalancedContrastiveLoss(class_weights=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="labels"):
        module(GOOD)
    with pytest.raises(ValueError, match="labels"):
        module(GOOD, torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="labels"):
        module(GOOD, torch.tensor([0, 1, 1]))


@pytest.mark.parametrize("reduction", ["avg", "MEAN", None, ""])
def test_bad_reduction(reduction: object) -> None:
    """reduction must be 'mean', 'sum' or 'none'."""
    emb = torch.randn(4, 3)
    calls = [
        lambda: L.balanced_contrastive_loss(GOOD, reduction=reduction),
        lambda: L.nt_xent_loss(GOOD, reduction=reduction),
        lambda: L.debiased_contrastive_loss(GOOD, reduction=reduction),
        lambda: L.supcon_loss(emb, LABELS, reduction=reduction),
        lambda: L.supervised_prototype_loss(emb, LABELS, torch.randn(2, 3), reduction=reduction),
        lambda: L.NTXentLoss(reduction=reduction),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="reduction"):
            call()


@pytest.mark.parametrize("tau_plus", [-0.1, 1.0, 1.5, float("nan"), "0.1"])
def test_bad_tau_plus(tau_plus: object) -> None:
    """tau_plus must lie in [0, 1)."""
    with pytest.raises(ValueError, match="tau_plus"):
        L.debiased_contrastive_loss(GOOD, tau_plus=tau_plus)
    with pytest.raises(ValueError, match="tau_plus"):
        L.DebiasedContrastiveLoss(tau_plus=tau_plus)


def test_debiased_needs_two_views() -> None:
    """The debiased loss is defined for V = 2 and says so."""
    with pytest.raises(ValueError, match="views.*V=2"):
        L.debiased_contrastive_loss(torch.randn(3, 4, 2))


@pytest.mark.parametrize(
    "labels",
    [
        torch.tensor([0, 1, 0]),
        torch.tensor([[0, 1, 0, 1]]),
        torch.tensor([0.0, 1.0, 0.0, 1.0]),
        torch.tensor([True, False, True, False]),
        [0, 1, 0, 1],
    ],
)
def test_bad_labels(labels: object) -> None:
    """labels: an integer tensor of shape (M,)."""
    emb = torch.randn(4, 3)
    with pytest.raises(ValueError, match="labels"):
        L.supcon_loss(emb, labels)
    with pytest.raises(ValueError, match="labels"):
        L.supervised_prototype_loss(emb, labels, torch.randn(2, 3))
    with pytest.raises(ValueError, match="labels"):
        L.class_prototypes(emb, labels)
    with pytest.raises(ValueError, match="labels"):
        L.SupConLoss()(GOOD, labels)


def test_bad_embeddings_and_prototypes() -> None:
    """Embeddings and prototypes: floating 2-D, same D, finite; labels in range; no empty class."""
    emb, mu = torch.randn(4, 3), torch.randn(2, 3)
    with pytest.raises(ValueError, match="embeddings"):
        L.supcon_loss(torch.randn(4, 3, 1), LABELS)
    with pytest.raises(ValueError, match="embeddings"):
        L.supcon_loss(torch.ones(4, 3, dtype=torch.int64), LABELS)
    with pytest.raises(ValueError, match="embeddings"):
        L.supcon_loss(torch.randn(1, 3), LABELS[:1])
    with pytest.raises(ValueError, match="embeddings"):
        L.supcon_loss(torch.full((4, 3), float("nan")), LABELS)
    with pytest.raises(ValueError, match="prototypes"):
        L.supervised_prototype_loss(emb, LABELS, torch.randn(2, 4))
    with pytest.raises(ValueError, match="prototypes"):
        L.supervised_prototype_loss(emb, torch.zeros(4, dtype=torch.int64), torch.randn(1, 3))
    with pytest.raises(ValueError, match="prototypes"):
        L.supervised_prototype_loss(emb, LABELS, torch.tensor([[float("inf"), 0, 0]] * 2))
    with pytest.raises(ValueError, match="labels"):
        L.supervised_prototype_loss(emb, torch.tensor([0, 1, 2, 0]), mu)
    with pytest.raises(ValueError, match="labels"):
        L.supervised_prototype_loss(emb, torch.tensor([0, -1, 1, 0]), mu)
    with pytest.raises(ValueError, match="lam"):
        L.supervised_prototype_loss(emb, LABELS, mu, lam=0.0)
    with pytest.raises(ValueError, match="labels.*no sample"):
        L.class_prototypes(emb, LABELS, num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        L.class_prototypes(emb, LABELS, num_classes=0)
    with pytest.raises(ValueError, match="embeddings"):
        L.class_prototypes(torch.randn(4), LABELS)


def test_bad_smooth_max_arguments() -> None:
    """smooth_max checks scores and dim too."""
    with pytest.raises(ValueError, match="scores"):
        L.smooth_max(torch.tensor([1, 2]), 0.5)
    with pytest.raises(ValueError, match="dim"):
        L.smooth_max(torch.randn(3, 2), 0.5, dim=2)


def test_unknown_loss_name_lists_valid_names() -> None:
    """make_loss rejects an unknown name and lists the valid ones."""
    with pytest.raises(ValueError, match="name.*nt_xent.*decoupled.*balanced.*supcon.*debiased"):
        L.make_loss("simclr")
    with pytest.raises(ValueError, match="kwargs.*alpha"):
        L.make_loss("nt_xent", alpha=2.0)


def test_finite_check_can_be_switched() -> None:
    """Value checks run on CPU by default; check_finite=False skips them, True forces them."""
    bad = torch.full((2, 4, 3), float("nan"))
    assert torch.isnan(L.nt_xent_loss(bad, check_finite=False))
    with pytest.raises(ValueError, match="views"):
        L.nt_xent_loss(bad, check_finite=True)
    with pytest.raises(ValueError, match="enabled"):
        L.set_check_finite("yes")
    L.set_check_finite(True)
    try:
        with pytest.raises(ValueError, match="views"):
            L.nt_xent_loss(bad)
    finally:
        L.set_check_finite(False)
