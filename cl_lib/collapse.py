"""Collapse and plateau detection for training runs, and the stability ratio rho.

Two flags mark a run whose numbers should not carry a claim (:func:`run_flags`):

* **plateau**: the per-epoch training loss stays at or above ``collapse value - margin`` for at
  least ``PLATEAU_SHARE`` of the epochs. The collapse value is the loss at identical
  embeddings (:func:`collapse_loss_value`): ``log(2N - 1)`` for NT-Xent and
  ``(lam - alpha) / tau + lam * log(2N - 2)`` for the balanced loss without weights. The
  margin is ``PLATEAU_MARGIN * lam`` (the loss is homogeneous of degree 1 in (alpha, lam), so
  the margin scales with it; NT-Xent has lam = 1).
* **knn**: the final kNN accuracy is less than ``KNN_MARGIN`` above the kNN accuracy of the
  randomly initialised encoder of the same seed (same protocol, recorded as
  ``knn_random_init``).

:func:`collapse_ratio` measures ``rho = E|z_i - z_p|^2 / E|z_i - z_k|^2`` (positive pairs over
negative pairs, normalised projections): near collapse the balanced loss is, to second order,
``const + (alpha E|d_ip|^2 - lam mean_k |d_ik|^2) / (2 tau)``, so collapse attracts when
``lam / alpha < rho``. :func:`pair_spreads` gives the two distances themselves and
:func:`toward_collapse` the path that shrinks an embedding towards collapse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "KNN_MARGIN",
    "PLATEAU_MARGIN",
    "PLATEAU_SHARE",
    "collapse_loss_value",
    "collapse_ratio",
    "pair_spreads",
    "plateau_epochs",
    "run_flags",
    "toward_collapse",
]

PLATEAU_MARGIN = 0.03
"""Plateau band below the collapse value, in loss units per unit of lam."""
PLATEAU_SHARE = 1 / 3
"""Share of the epochs on the plateau from which a run is flagged."""
KNN_MARGIN = 0.05
"""Final kNN must exceed the random-initialisation kNN by this much (absolute, 5 points)."""


def _balanced_class_counts(counts: Sequence[int], batch: int) -> Tensor:
    """Labels of a batch of ``batch`` whose class composition follows ``counts``."""
    c = torch.tensor([float(x) for x in counts], dtype=torch.float64)
    if c.numel() < 1 or bool((c < 0).any()) or float(c.sum()) <= 0:
        raise ValueError(f"class_counts must be non-negative with a positive sum, got {counts}")
    share = c / c.sum() * batch
    per = share.floor().long()
    rest = batch - int(per.sum())
    order = torch.argsort(share - per.double(), descending=True, stable=True)
    per[order[:rest]] += 1  # largest remainders
    return torch.repeat_interleave(torch.arange(c.numel()), per)


def collapse_loss_value(
    loss: Mapping[str, Any], batch_size: int, class_counts: Sequence[int] | None = None
) -> float:
    """Training loss at identical (unit) embeddings for a run's ``loss`` config section.

    Evaluates the very loss the run trained with (:func:`cl_lib.losses.make_loss` with the
    run's temperature, alpha, lam, include_positive, normalize) on a batch of ``batch_size``
    identical two-view embeddings. With ``class_balanced`` the negative weights come from
    ``class_counts`` (inverse frequencies, normalised as in training) and the batch's labels
    follow the class shares (largest remainders).
    """
    from cl_lib.losses import make_loss
    from cl_lib.train import LossConfig, _class_weights, _loss_kwargs

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2, got {batch_size!r}")
    fields = {k: loss[k] for k in LossConfig.__dataclass_fields__ if k in loss}
    cfg = LossConfig(**fields)
    weights, labels = None, None
    if cfg.class_balanced:
        if class_counts is None:
            raise ValueError("class_counts must be given for a class_balanced loss")
        labels = _balanced_class_counts(class_counts, batch_size)
        counts = torch.tensor([int(c) for c in class_counts])
        classes = counts.numel()
        weights = _class_weights(torch.repeat_interleave(torch.arange(classes), counts), classes)
    loss_fn = make_loss(cfg.name, **_loss_kwargs(cfg, weights, gather=False))
    views = torch.ones(2, batch_size, 8, dtype=torch.float64) / math.sqrt(8)  # exact to 1e-15
    with torch.no_grad():
        return float(loss_fn(views, labels))


def plateau_epochs(losses: Sequence[float], collapse_value: float, margin: float) -> list[int]:
    """1-based epochs whose loss is at or above ``collapse_value - margin`` (on the plateau)."""
    if not margin >= 0:
        raise ValueError(f"margin must be a float >= 0, got {margin!r}")
    return [i + 1 for i, v in enumerate(losses) if v >= collapse_value - margin]


def run_flags(
    run: Mapping[str, Any],
    *,
    plateau_margin: float = PLATEAU_MARGIN,
    plateau_share: float = PLATEAU_SHARE,
    knn_margin: float = KNN_MARGIN,
) -> dict[str, Any]:
    """Plateau and kNN flags of one stored run (its ``config``, ``history`` and ``metrics``).

    Returns ``flagged`` (either flag), ``plateau``, ``knn``, the ``collapse_value``, the
    ``plateau_epochs`` and their share, and the kNN gain over random initialisation.
    """
    if not 0.0 < plateau_share <= 1.0:
        raise ValueError(f"plateau_share must be a float in (0, 1], got {plateau_share!r}")
    cfg, metrics = run["config"], run["metrics"]
    lam = cfg["loss"].get("lam")
    lam = 1.0 if lam is None or cfg["loss"]["name"] == "nt_xent" else float(lam)
    value = collapse_loss_value(
        cfg["loss"], cfg["optim"]["batch_size"], metrics.get("train_class_counts")
    )
    losses = [h["loss"] for h in run.get("history", [])]
    epochs = plateau_epochs(losses, value, plateau_margin * lam)
    share = len(epochs) / len(losses) if losses else math.nan
    gain = None
    if metrics.get("knn_random_init") is not None and metrics.get("knn_acc") is not None:
        gain = float(metrics["knn_acc"]) - float(metrics["knn_random_init"])
    plateau = bool(losses) and share >= plateau_share
    knn = gain is not None and gain < knn_margin
    return {
        "flagged": plateau or knn,
        "plateau": plateau,
        "knn": knn,
        "collapse_value": value,
        "plateau_margin": plateau_margin * lam,
        "plateau_epochs": epochs,
        "plateau_share": share,
        "knn_gain_over_init": gain,
    }


def pair_spreads(z1: Tensor, z2: Tensor) -> tuple[float, float]:
    """``(A, R)``: mean squared distances of positive and of negative pairs (float64).

    ``z1``, ``z2`` (N, D): two views of N images (normalised here). Positives: ``(z1_i, z2_i)``;
    negatives of anchor ``i``: every view of the other images, as in the contrastive losses.
    These are the ``A`` and ``R`` of Proposition A.7 (``rho = A / R``).
    """
    if not isinstance(z1, Tensor) or not isinstance(z2, Tensor) or z1.ndim != 2:
        raise ValueError("z1 and z2 must be 2-D tensors (N, D)")
    if z1.shape != z2.shape or z1.shape[0] < 2:
        raise ValueError(f"z1 and z2 must share a shape (N >= 2, D), got {z1.shape}, {z2.shape}")
    a = F.normalize(z1.double(), dim=-1)
    b = F.normalize(z2.double(), dim=-1)
    n = a.shape[0]
    positive = float((a - b).pow(2).sum(-1).mean())
    z = torch.cat([a, b])
    sq = (2.0 - 2.0 * z @ z.T).clamp(min=0.0)
    image = torch.arange(n).repeat(2)
    other = image.unsqueeze(0) != image.unsqueeze(1)
    return positive, float(sq[other].mean())


def collapse_ratio(z1: Tensor, z2: Tensor) -> float:
    """``rho = A / R`` of :func:`pair_spreads`: positive over negative squared distances.

    NaN when every pair coincides (exact collapse).
    """
    positive, negative = pair_spreads(z1, z2)
    if negative == 0.0:
        return math.nan
    return positive / negative


def toward_collapse(views: Tensor, eps: float) -> Tensor:
    """``views`` (2, N, D) with every offset from their mean direction scaled by ``eps``.

    Normalised, float64. ``eps = 1`` keeps the (normalised) views, ``eps -> 0`` moves them all
    onto one point: the path along which Proposition A.7 compares the loss with its value at
    collapse.
    """
    if not isinstance(views, Tensor) or views.ndim != 3 or views.shape[0] != 2:
        raise ValueError(f"views must be a (2, N, D) tensor, got {getattr(views, 'shape', views)}")
    if not (isinstance(eps, float) and eps > 0.0):
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    u = F.normalize(views.double(), dim=-1)
    centre = F.normalize(u.reshape(-1, u.shape[-1]).mean(0), dim=0)
    return F.normalize(centre + eps * (u - centre), dim=-1)
