"""Measurements behind chapter 5 (correspondence to practice), on embeddings of many views.

Every function takes ``z``: a ``(K, N, D)`` tensor of ``K`` augmented views of ``N`` instances
(for example from :func:`cl_lib.evaluate.embed_views`); rows are L2-normalised inside.

* :func:`attraction_estimates` - the two-view estimator of ``<z, m_i>`` with ``k`` views;
* :func:`jensen_gap` - how much the repulsion bound loses by sampling one view of a negative;
* :func:`effective_negatives` - how many negatives the softmax of the repulsion attends to;
* :func:`scale_sweep` - the losses on cosines and on raw dot products of rescaled views.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cl_lib.losses import _check_positive

__all__ = [
    "EstimatorError",
    "attraction_estimates",
    "effective_negatives",
    "jensen_gap",
    "scale_sweep",
]


def _check_views(z: Tensor, min_views: int) -> Tensor:
    """Validate a (K, N, D) float tensor of views and return it L2-normalised in float64."""
    if not isinstance(z, Tensor) or not z.is_floating_point() or z.dim() != 3:
        raise ValueError("z must be a floating-point tensor of shape (K views, N, D)")
    if z.shape[0] < min_views or z.shape[1] < 2 or z.shape[2] < 1:
        raise ValueError(
            f"z must have at least {min_views} views, 2 instances and 1 dimension, "
            f"got shape {tuple(z.shape)}"
        )
    if not bool(torch.isfinite(z).all()):
        raise ValueError("z must be finite, got NaN or inf values")
    return F.normalize(z.double(), dim=-1)


@dataclass(frozen=True)
class EstimatorError:
    """Error of the ``k``-view estimate of ``<z_i, m_i>`` against a many-view reference."""

    k: int
    mean_error: float  # signed: close to 0 for an unbiased estimator
    rms_error: float  # falls like 1 / sqrt(k)
    num_estimates: int
    # standard error of mean_error over instances (NaN with reference="shared", where
    # mean_error is 0 by construction)
    standard_error: float = float("nan")


def attraction_estimates(
    z: Tensor, ks: Sequence[int], reference: str = "shared"
) -> list[EstimatorError]:
    """Two-view estimator of the attraction ``<z_i, m_i>`` with ``k`` extra views.

    View 0 is the anchor of every instance; each estimate averages ``<z_i, z'>`` over a
    disjoint group of ``k`` other views. ``k = 1`` is what a two-view batch uses.

    ``reference="shared"``: the reference surrogate is the mean of views ``1..K-1`` and the
    groups partition those same views, so ``mean_error`` is 0 by algebra for any encoder
    (it is no test of bias); ``Var(estimate - reference) = s^2 (1/k - 1/(K-1))``.

    ``reference="independent"``: the views ``1..K-1`` are split in two halves; the estimates
    use the first half and the reference is the mean of the second, so ``mean_error`` is a
    genuine test of bias, with ``standard_error`` over instances, and
    ``Var(estimate - reference) = s^2 (1/k + 1/R)`` with ``R`` reference views.
    """
    if reference not in ("shared", "independent"):
        raise ValueError(f"reference must be 'shared' or 'independent', got {reference!r}")
    zn = _check_views(z, 3)
    scores = torch.einsum("nd,knd->kn", zn[0], zn[1:])  # <z_i, z_i^(v)> for every other view
    if reference == "shared":
        pool, ref_scores = scores, scores
    else:
        half = scores.shape[0] // 2
        pool, ref_scores = scores[:half], scores[half:]
    ref = ref_scores.mean(dim=0)  # = <z_i, mean of the reference views>, by linearity
    out = []
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < max(pool.shape[0], 2):
            raise ValueError(f"ks must hold ints in [1, {pool.shape[0] - 1}], got {k!r}")
        groups = pool.shape[0] // k
        estimates = pool[: groups * k].reshape(groups, k, -1).mean(dim=1)  # (groups, N)
        err = estimates - ref
        per_instance = err.mean(dim=0)
        se = (
            float(per_instance.std() / math.sqrt(per_instance.numel()))
            if reference == "independent"
            else float("nan")
        )
        out.append(
            EstimatorError(
                k=k,
                mean_error=float(err.mean()),
                rms_error=float(err.pow(2).mean().sqrt()),
                num_estimates=int(err.numel()),
                standard_error=se,
            )
        )
    return out


def jensen_gap(z: Tensor, temperatures: Sequence[float]) -> dict[float, float]:
    """Mean of ``log E_t' exp(<z_i, z_j'>/tau) - <z_i, m_j>/tau`` over anchor/negative pairs.

    Anchor ``z_i``: view 0; the expectation runs over views ``1..K-1`` of the negative ``j``
    and ``m_j`` is their mean. Jensen's inequality makes every term ``>= 0``: sampling one view
    of each negative over-estimates the repulsion of the surrogate bound, more so at small
    ``tau``.
    """
    zn = _check_views(z, 2)
    anchors, others = zn[0], zn[1:]
    scores = torch.einsum("id,vjd->vij", anchors, others)  # (K-1, N, N)
    off = ~torch.eye(zn.shape[1], dtype=torch.bool)
    out = {}
    for tau in temperatures:
        t = _check_positive(tau, "temperatures[i]")
        log_mean_exp = torch.logsumexp(scores / t, dim=0) - math.log(others.shape[0])
        gap = log_mean_exp - scores.mean(dim=0) / t
        out[float(tau)] = float(gap[off].mean())
    return out


def effective_negatives(z: Tensor, temperatures: Sequence[float]) -> dict[float, float]:
    """``exp(entropy)`` of the repulsion's softmax weights ``p_ik`` over a batch's negatives.

    Views 0 and 1 form a two-view batch of ``N`` instances: each of the ``2N`` anchors has
    ``2N - 2`` negatives. The mean over anchors of ``exp(H(p_i))`` ranges from 1 (one hard
    negative takes all the weight, small ``tau``) to ``2N - 2`` (uniform weights, large ``tau``).
    """
    zn = _check_views(z, 2)[:2]
    n = zn.shape[1]
    flat = zn.reshape(2 * n, -1)
    cos = flat @ flat.T
    instance = torch.arange(2 * n) % n
    same = instance.unsqueeze(0) == instance.unsqueeze(1)
    out = {}
    for tau in temperatures:
        t = _check_positive(tau, "temperatures[i]")
        logp = torch.log_softmax((cos / t).masked_fill(same, float("-inf")), dim=1)
        entropy = -(logp.exp() * logp.masked_fill(same, 0.0)).sum(dim=1)
        out[float(tau)] = float(entropy.exp().mean())
    return out


def scale_sweep(
    views: Tensor,
    scales: Sequence[float],
    loss: Callable[..., Tensor],
    *,
    temperature: float,
    instances: Sequence[int] | None = None,
) -> dict[str, list[float]]:
    """``loss`` after scaling the views of ``instances`` (default: all) by each ``c`` in ``scales``.

    Returns the losses on cosines (``"cosine"``, blind to ``c``) and on raw dot products
    (``"raw"``). ``loss`` is one of the view losses of :mod:`cl_lib.losses` (it must take
    ``normalize``). Scaling one instance multiplies its own positive score by ``c**2`` and its
    scores with other instances by ``c``.
    """
    if not isinstance(views, Tensor) or not views.is_floating_point() or views.dim() != 3:
        raise ValueError("views must be a floating-point tensor of shape (V, N, D)")
    tau = _check_positive(temperature, "temperature")
    cs = [_check_positive(c, "scales[i]") for c in scales]
    n = views.shape[1]
    chosen = list(range(n)) if instances is None else list(instances)
    if not chosen or any(isinstance(i, bool) or not isinstance(i, int) for i in chosen):
        raise ValueError(f"instances must be a non-empty sequence of ints, got {instances!r}")
    if min(chosen) < 0 or max(chosen) >= n:
        raise ValueError(f"instances must lie in [0, {n - 1}], got {instances!r}")
    mask = torch.zeros(1, n, 1, dtype=views.dtype, device=views.device)
    mask[:, chosen] = 1.0
    out: dict[str, list[float]] = {"cosine": [], "raw": []}
    for c in cs:
        scaled = views * (1.0 + (c - 1.0) * mask)
        out["cosine"].append(float(loss(scaled, temperature=tau)))
        out["raw"].append(float(loss(scaled, temperature=tau, normalize=False)))
    return out
