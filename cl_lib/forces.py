"""Attracting and repelling forces of the balanced contrastive loss on the sphere.

For an anchor ``z_i`` (a normalised embedding) with positive ``z_p`` and negatives
``N(i)`` the per-anchor balanced loss of :mod:`cl_lib.losses` is

    l_i = -alpha * <z_i, z_p> / tau + lam * log sum_{k in N(i)} w_ik exp(<z_i, z_k> / tau),

and its gradient with respect to the anchor (every other embedding held fixed) is

    dl_i/dz_i = (-alpha * z_p + lam * sum_{k in N(i)} p_ik z_k) / tau,

with ``p_ik`` the softmax weights of the denominator. The first term is the *attraction*
(its minus points to the positive), the second the *repulsion* (its minus points away
from the softmax-weighted mean of the negatives). Because ``z_i`` lives on the unit
sphere only the tangent part ``g - <g, z_i> z_i`` moves it; the gradient with respect to
the raw (unnormalised) embedding ``u_i`` is that tangent part divided by ``||u_i||``.

Conventions follow :func:`cl_lib.losses.balanced_contrastive_loss`: ``views`` is a
``(V, N, D)`` tensor or a sequence of ``V`` tensors ``(N, D)``; row ``v * N + n`` is view
``v`` of instance ``n``; with ``V > 2`` views the loss (hence the gradient) is the mean over
the ``V - 1`` positives; ``include_positive=True`` puts the positive in the denominator
(NT-Xent for ``alpha = lam = 1``), whose softmax weight then appears in the repulsion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cl_lib.losses import _as_views, _check_bool, _check_positive
from cl_lib.runtime import autocast_off

__all__ = [
    "ContrastiveForces",
    "anchor_gradients",
    "contrastive_forces",
    "tangent_projection",
]


@dataclass(frozen=True)
class ContrastiveForces:
    """Per-anchor gradient of the balanced loss, split into its two parts.

    All tensors have one row per anchor, in view-major order (row ``v * N + n``):

    * ``embeddings`` (V*N, D): the normalised embeddings ``z_i``;
    * ``positives`` (V*N, D): the mean of the anchor's positives (``z_p`` when ``V = 2``);
    * ``attraction`` (V*N, D): ``-alpha * z_p / tau`` (its tangent part by default);
    * ``repulsion`` (V*N, D): ``lam * sum_k p_ik z_k / tau`` (its tangent part by default);
    * ``weights`` (V*N, V*N): the softmax weights ``p_ik``, zero outside the denominator,
      averaged over the positives when ``V > 2``; every row sums to 1.

    The forces that move the embeddings are the *minus* gradients.
    """

    embeddings: Tensor
    positives: Tensor
    attraction: Tensor
    repulsion: Tensor
    weights: Tensor

    @property
    def gradient(self) -> Tensor:
        """The full per-anchor gradient ``attraction + repulsion``, shape (V*N, D)."""
        return self.attraction + self.repulsion


def _log_weights(negative_weights: Tensor, rows: int, z: Tensor) -> Tensor:
    """Validate ``negative_weights`` ((V*N,) or (V*N, V*N), > 0); return their log."""
    if not isinstance(negative_weights, Tensor) or not negative_weights.is_floating_point():
        raise ValueError("negative_weights must be a floating-point torch.Tensor")
    if negative_weights.shape not in ((rows,), (rows, rows)):
        raise ValueError(
            f"negative_weights must have shape ({rows},) or ({rows}, {rows}), "
            f"got {tuple(negative_weights.shape)}"
        )
    if negative_weights.device != z.device:
        raise ValueError(f"negative_weights must be on {z.device}, got {negative_weights.device}")
    if negative_weights.device.type == "cpu":  # a value check would force a sync on CUDA
        if not bool((torch.isfinite(negative_weights) & (negative_weights > 0)).all()):
            raise ValueError("negative_weights must be finite and > 0")
    return negative_weights.to(z.dtype).log()


def tangent_projection(points: Tensor, vectors: Tensor) -> Tensor:
    """Project ``vectors`` onto the tangent spaces of the unit sphere at ``points``.

    Both have shape (..., D); returns ``v - <v, z> z`` row by row. ``points`` must have
    unit norm (not checked, which would force a host synchronisation on CUDA).
    """
    if not isinstance(points, Tensor) or not isinstance(vectors, Tensor):
        raise ValueError("points and vectors must be torch.Tensors")
    if points.shape != vectors.shape or points.dim() < 1:
        raise ValueError(
            f"points and vectors must have the same shape (..., D), got "
            f"{tuple(points.shape)} and {tuple(vectors.shape)}"
        )
    return vectors - (vectors * points).sum(dim=-1, keepdim=True) * points


def _softmax_weights(
    scores: Tensor,
    log_weights: Tensor | None,
    same_instance: Tensor,
    positive: Tensor,
    include_positive: bool,
) -> Tensor:
    """Softmax weights of the denominator, averaged over the positives; rows sum to 1.

    ``scores`` are ``s_ik / tau``; the log-weights apply to the negatives only (a positive in
    the denominator enters with weight 1, as in the loss).
    """
    logits = scores if log_weights is None else scores + log_weights
    negative = logits.masked_fill(same_instance, float("-inf"))
    weights = negative.softmax(dim=-1)
    if not include_positive:
        return weights
    # Pair (i, p): denominator {p} U N(i). The positive's share is q_ip = sigmoid(s_ip - lse_i);
    # the negatives keep the softmax over N(i) scaled by 1 - q_ip. Average over the positives.
    num_positives = positive.sum(dim=-1, keepdim=True).to(logits.dtype)
    lse = torch.logsumexp(negative, dim=-1, keepdim=True)
    share = torch.sigmoid(scores - lse) * positive
    mean_share = share.sum(dim=-1, keepdim=True) / num_positives
    return weights * (1.0 - mean_share) + share / num_positives


def contrastive_forces(
    views: Tensor | Sequence[Tensor],
    *,
    temperature: float = 0.5,
    alpha: float = 1.0,
    lam: float = 1.0,
    negative_weights: Tensor | None = None,
    include_positive: bool = False,
    tangent: bool = True,
) -> ContrastiveForces:
    """Closed-form per-anchor gradient of the balanced loss, split into attraction and repulsion.

    Arguments mirror :func:`cl_lib.losses.balanced_contrastive_loss` (raw embeddings, which are
    L2-normalised; ``negative_weights`` ``(V*N,)`` or ``(V*N, V*N)``, > 0). With ``tangent``
    (default) both parts are projected onto the tangent space of the sphere at the anchor,
    the part that moves it; otherwise the ambient gradient ``dl_i/dz_i`` is returned.
    Computed in float32 (float64 stays float64) with autocast disabled.
    """
    tau = _check_positive(temperature, "temperature")
    alpha = _check_positive(alpha, "alpha")
    lam = _check_positive(lam, "lam")
    include_positive = _check_bool(include_positive, "include_positive")
    tangent = _check_bool(tangent, "tangent")
    stacked = _as_views(views, check_finite=None)
    num_views, batch, dim = stacked.shape
    rows = num_views * batch
    dtype = torch.float64 if stacked.dtype == torch.float64 else torch.float32
    with autocast_off(stacked.device):
        z = F.normalize(stacked.reshape(rows, dim).to(dtype), dim=-1)
        instance = torch.arange(rows, device=z.device) % batch
        same_instance = instance.unsqueeze(1) == instance.unsqueeze(0)
        positive = same_instance & ~torch.eye(rows, dtype=torch.bool, device=z.device)
        log_w = None if negative_weights is None else _log_weights(negative_weights, rows, z)
        weights = _softmax_weights(z @ z.T / tau, log_w, same_instance, positive, include_positive)
        positives = positive.to(dtype) @ z / (num_views - 1)
        attraction = -alpha / tau * positives
        repulsion = lam / tau * (weights @ z)
        if tangent:
            attraction = tangent_projection(z, attraction)
            repulsion = tangent_projection(z, repulsion)
    return ContrastiveForces(z, positives, attraction, repulsion, weights)


def anchor_gradients(loss_fn: Callable[[Tensor], Tensor], views: Tensor) -> Tensor:
    """Autograd gradient of every per-anchor loss with respect to its own anchor row.

    ``loss_fn`` maps a (V, N, D) tensor to the V*N per-anchor losses in view-major order
    (e.g. a loss of :mod:`cl_lib.losses` with ``reduction="none"``). Returns (V*N, D) whose
    row ``i`` is ``d l_i / d u_i`` for the raw input row ``u_i``, all other rows held fixed
    (one vmapped backward pass, or one pass per anchor where vmap fails). For unit-norm
    inputs this equals the tangent part of ``d l_i / d z_i``, i.e.
    ``contrastive_forces(...).gradient``.
    """
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    stacked = _as_views(views, check_finite=None)
    num_views, batch, dim = stacked.shape
    rows = num_views * batch
    inputs = stacked.detach().clone().requires_grad_(True)
    losses = loss_fn(inputs)
    if not isinstance(losses, Tensor) or losses.shape != (rows,):
        got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
        raise ValueError(f"loss_fn must return the V*N = {rows} per-anchor losses, got {got}")
    idx = torch.arange(rows, device=losses.device)
    basis = torch.eye(rows, dtype=losses.dtype, device=losses.device)
    try:  # one vmapped backward pass
        (jacobian,) = torch.autograd.grad(
            losses, inputs, grad_outputs=basis, retain_graph=True, is_grads_batched=True
        )
    except RuntimeError:  # a backward that vmap cannot batch (e.g. in-place ops): row by row
        rows_grads = [
            torch.autograd.grad(losses, inputs, grad_outputs=basis[i], retain_graph=True)[0]
            for i in range(rows)
        ]
        jacobian = torch.stack(rows_grads)
    return jacobian.reshape(rows, rows, dim)[idx, idx]
