"""The loss family of the book (single source of truth for every notebook).

Every function takes RAW, unnormalised embeddings and L2-normalises them itself
(``z = f / ||f||``, a point on the unit sphere), so similarities ``s = <z, z'>`` are cosines.
Chapter numbers refer to ``theory.md`` (the book's derivations); the framework comes from
B. Lee, "Understanding Self-supervised Contrastive Learning through Supervised Objectives",
TMLR 2025.

Supervised objectives (chapter 1)
    * :func:`smooth_max`: ``LSE_tau(a) = tau * log sum_k exp(a_k / tau)``, with
      ``max_k a_k <= LSE_tau(a) <= max_k a_k + tau * log K``.
    * :func:`class_prototypes`: ``mu_c`` = mean of the normalised embeddings of class ``c``.
    * :func:`supervised_prototype_loss`: ``-<z, mu_y> + lam * max_{c != y} <z, mu_c>`` (hard form)
      or with the max replaced by ``LSE_tau`` (smooth form). With ``lam = 1`` and the sum over
      all classes, ``loss / tau`` is the cross-entropy of a cosine classifier whose weights are the
      prototypes.
    * :func:`supcon_loss`: supervised contrastive loss "L_out" (Khosla et al., NeurIPS 2020), the
      sampled version with same-class positives.

Self-supervised losses (chapters 2 and 4)
    * :func:`balanced_contrastive_loss` (chapter 4):
      ``l_i = -alpha * s_ip / tau + lam * log sum_{k in N(i)} w_ik exp(s_ik / tau)``.
    * :func:`decoupled_contrastive_loss`: the loss derived in chapter 2 (``alpha = 1``, positive
      left out of the denominator); with ``lam = 1`` the decoupled contrastive loss of
      Yeh et al. (ECCV 2022).
    * :func:`nt_xent_loss`: NT-Xent / InfoNCE of SimCLR (Chen et al., ICML 2020; van den Oord
      et al. 2018), the positive kept in the denominator. Per anchor,
      ``NTXent_i = derived_i + log(1 + exp(s_ip / tau) / sum_{k in N(i)} exp(s_ik / tau))``
      (chapter 2); :func:`contrastive_components` returns the pieces.
    * :func:`debiased_contrastive_loss`: Chuang et al. (NeurIPS 2020), corrects class collisions
      among the negatives with a class prior ``tau_plus`` (chapter 3).

Batches of views. ``views`` is a ``(V, N, D)`` tensor or a sequence of ``V`` tensors of shape
``(N, D)`` (``V >= 2`` views of ``N >= 2`` instances). Candidates are indexed view-major: row
``v * N + n`` is view ``v`` of instance ``n``; every view of every instance is an anchor. The
negatives ``N(i)`` of an anchor are all views of the other instances; its positives are the
``V - 1`` other views of its instance, and the per-anchor loss is the mean over them of the
per-pair loss. With ``include_positive=True`` the denominator of pair ``(i, p)`` is
``{p} U N(i)`` (the convention of pytorch-metric-learning; other positives are not in it).

Numerics. Logits and log-sum-exps are computed in float32 (float64 stays float64) with
autocast disabled inside, so the losses work under ``torch.autocast`` on CPU and CUDA; masked
entries are ``-inf`` inside ``logsumexp`` so small temperatures (``tau = 0.01``) are stable.
Memory is O(N^2): at most a ``(V N) x (V N)`` logit matrix, never an ``N x N x D`` tensor.
Without ``negative_weights``, the balanced family (NT-Xent, decoupled, balanced) computes the
negatives' log-sum-exp with a fused autograd function that holds one such matrix (the
exponentiated logits, reused by the backward pass). Higher derivatives are exact: with
``create_graph=True`` (gradient penalties, Hessian-vector products) its backward is recomputed
from differentiable operations. Inside :mod:`torch.func` transforms (``grad``, ``vmap``,
``jacrev``, ...) the losses use plain differentiable operations instead of the fused function
and skip the data-dependent value checks (transforms forbid data-dependent control flow).

Validation. Bad arguments raise ``ValueError`` naming the argument. Value checks that need the
data (finiteness, positivity of weights, label ranges) force a host sync on CUDA, so they run
only when the tensor is on the CPU, or when asked with ``check_finite=True`` (per call) or
:func:`set_check_finite` (globally); ``check_finite=False`` skips them everywhere.

Distributed training. With ``gather_distributed=True`` and an initialised process group of more
than one rank, candidates are the normalised embeddings of all ranks (a differentiable
all-gather, see :mod:`cl_lib.distributed`) and anchors the local rows. Off by default, a no-op
on a single process; gradients are exact when each rank back-propagates its own mean loss and
gradients are averaged over ranks (DDP). Every rank must have the same batch size.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lib import distributed as cl_dist
from cl_lib.runtime import autocast_off

__all__ = [
    "BalancedContrastiveLoss",
    "ContrastiveComponents",
    "DebiasedContrastiveLoss",
    "DecoupledContrastiveLoss",
    "LOSS_NAMES",
    "NTXentLoss",
    "SupConLoss",
    "SupervisedPrototypeLoss",
    "balanced_contrastive_loss",
    "class_prototypes",
    "contrastive_components",
    "debiased_contrastive_loss",
    "decoupled_contrastive_loss",
    "make_loss",
    "nt_xent_loss",
    "set_check_finite",
    "smooth_max",
    "supcon_loss",
    "supervised_prototype_loss",
]

Views = Tensor | Sequence[Tensor]
REDUCTIONS = ("mean", "sum", "none")
_CHECK_VALUES_GLOBALLY = False


# --------------------------------------------------------------------------- validation


def set_check_finite(enabled: bool) -> None:
    """Globally enable (or disable) value checks on non-CPU tensors (they force a host sync)."""
    global _CHECK_VALUES_GLOBALLY
    if not isinstance(enabled, bool):
        raise ValueError(f"enabled must be a bool, got {type(enabled).__name__}")
    _CHECK_VALUES_GLOBALLY = enabled


def _should_check(tensor: Tensor, check_finite: bool | None) -> bool:
    """Whether data-dependent checks run: CPU tensors, or when asked per call / globally;
    never inside torch.func transforms (no data-dependent control flow there)."""
    if _transforms_active():
        return False
    if check_finite is not None:
        return check_finite
    return tensor.device.type == "cpu" or _CHECK_VALUES_GLOBALLY


def _transforms_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, ...) is running."""
    return torch._C._are_functorch_transforms_active()


def _check_finite(tensor: Tensor, name: str, check_finite: bool | None) -> None:
    """Raise if ``tensor`` holds NaN or inf (only when checks are on, see module docstring)."""
    if _should_check(tensor, check_finite) and not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} must be finite, got NaN or inf values")


def _check_positive(value: float, name: str) -> float:
    """Return ``value`` if it is a finite real number > 0, else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive float, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite float > 0, got {value}")
    return float(value)


def _check_tau_plus(tau_plus: float) -> float:
    """Return ``tau_plus`` if it lies in [0, 1), else raise ValueError."""
    if isinstance(tau_plus, bool) or not isinstance(tau_plus, numbers.Real):
        raise ValueError(f"tau_plus must be a float in [0, 1), got {type(tau_plus).__name__}")
    if not 0.0 <= tau_plus < 1.0:
        raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
    return float(tau_plus)


def _check_reduction(reduction: str) -> str:
    """Return ``reduction`` if it is one of "mean", "sum", "none"."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def _check_bool(value: bool, name: str) -> bool:
    """Return ``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_float_tensor(tensor: Tensor, name: str, ndim: int) -> Tensor:
    """Check that ``tensor`` is a floating tensor with ``ndim`` dimensions."""
    if not isinstance(tensor, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    return tensor


def _check_labels(
    labels: Tensor,
    length: int,
    device: torch.device,
    check_finite: bool | None,
    num_classes: int | None = None,
    name: str = "labels",
) -> Tensor:
    """Check integer labels of shape ``(length,)`` on ``device`` (range only if checks are on)."""
    if not isinstance(labels, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"{name} must be an integer tensor (torch.int64), got {labels.dtype}")
    if labels.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"{name} must be on {device}, got {labels.device}")
    if num_classes is not None and _should_check(labels, check_finite) and length > 0:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}), got range [{low}, {high}]")
    return labels


def _as_views(views: Views, check_finite: bool | None) -> Tensor:
    """Validate ``views`` and return them as one ``(V, N, D)`` tensor."""
    if isinstance(views, Tensor):
        _check_float_tensor(views, "views", 3)
        stacked = views
    elif isinstance(views, Sequence) and not isinstance(views, (str, bytes)):
        if len(views) < 2:
            raise ValueError(f"views must hold at least 2 views, got {len(views)}")
        for k, view in enumerate(views):
            _check_float_tensor(view, f"views[{k}]", 2)
        first = views[0]
        for k, view in enumerate(views):
            if view.shape != first.shape:
                raise ValueError(
                    f"views must all have the same shape, views[0] is {tuple(first.shape)} "
                    f"but views[{k}] is {tuple(view.shape)}"
                )
            if view.device != first.device or view.dtype != first.dtype:
                raise ValueError(
                    f"views must share one device and dtype, views[0] is {first.dtype} on "
                    f"{first.device} but views[{k}] is {view.dtype} on {view.device}"
                )
        stacked = torch.stack(list(views))
    else:
        raise ValueError(
            f"views must be a (V, N, D) tensor or a sequence of (N, D) tensors, "
            f"got {type(views).__name__}"
        )
    num_views, batch, dim = stacked.shape
    if num_views < 2:
        raise ValueError(f"views must hold at least 2 views, got V={num_views}")
    if batch < 2:
        raise ValueError(f"views must hold at least 2 instances (N >= 2), got N={batch}")
    if dim < 1:
        raise ValueError("views must have an embedding dimension D >= 1, got D=0")
    _check_finite(stacked, "views", check_finite)
    return stacked


# --------------------------------------------------------------------------- numerics


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (half precision is upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _normalise(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Upcast to ``dtype`` and L2-normalise along the last dimension."""
    return F.normalize(x.to(dtype), dim=-1)


def _embed(x: Tensor, dtype: torch.dtype, normalize: bool) -> Tensor:
    """Upcast to ``dtype``; L2-normalise unless ``normalize`` is False (raw dot products)."""
    return _normalise(x, dtype) if normalize else x.to(dtype)


def _reduce(per_item: Tensor, reduction: str) -> Tensor:
    """Apply "mean", "sum" or "none" to a 1-D tensor of per-item losses."""
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    return per_item


def smooth_max(scores: Tensor, temperature: float, dim: int = -1) -> Tensor:
    """``tau * logsumexp(scores / tau, dim)``, a smooth upper bound of the max (chapter 1).

    ``max <= smooth_max <= max + tau * log K`` with ``K`` the size of ``dim``; ``-inf`` entries
    are ignored (masking). Half-precision scores are computed in float32.
    """
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        raise ValueError("scores must be a floating-point torch.Tensor")
    if scores.dim() == 0:
        raise ValueError("scores must have at least one dimension")
    if not -scores.dim() <= dim < scores.dim():
        raise ValueError(f"dim must be in [-{scores.dim()}, {scores.dim()}), got {dim}")
    tau = _check_positive(temperature, "temperature")
    with autocast_off(scores.device):
        x = scores.to(_compute_dtype(scores))
        return tau * torch.logsumexp(x / tau, dim=dim)


# --------------------------------------------------------------------------- prototypes


def class_prototypes(
    embeddings: Tensor,
    labels: Tensor,
    num_classes: int | None = None,
    *,
    check_finite: bool | None = None,
) -> Tensor:
    """``(C, D)`` class prototypes: the mean of the L2-normalised embeddings of each class.

    Not renormalised (norm <= 1, chapter 1). A class without samples raises ValueError
    (this check reads the counts, a host sync on CUDA; the function is not a hot path).
    ``num_classes=None`` means ``labels.max() + 1``.
    """
    _check_float_tensor(embeddings, "embeddings", 2)
    if embeddings.shape[0] < 1:
        raise ValueError("embeddings must hold at least one row")
    _check_finite(embeddings, "embeddings", check_finite)
    _check_labels(labels, embeddings.shape[0], embeddings.device, check_finite=False)
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    _check_labels(labels, embeddings.shape[0], embeddings.device, True, num_classes)
    counts = torch.bincount(labels.long(), minlength=num_classes)
    empty = (counts == 0).nonzero().flatten()
    if empty.numel() > 0:
        raise ValueError(f"labels: classes {empty.tolist()} have no sample, cannot average")
    with autocast_off(embeddings.device):
        z = _normalise(embeddings, _compute_dtype(embeddings))
        sums = torch.zeros(num_classes, z.shape[1], dtype=z.dtype, device=z.device)
        sums = sums.index_add(0, labels.long(), z)
        return sums / counts.to(z.dtype).unsqueeze(1)


def supervised_prototype_loss(
    embeddings: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    *,
    lam: float = 1.0,
    temperature: float | None = None,
    include_positive: bool = False,
    reduction: str = "mean",
    check_finite: bool | None = None,
) -> Tensor:
    """Prototype objective of chapter 1: ``-<z, mu_y> + lam * max_{c != y} <z, mu_c>``.

    ``temperature=None`` gives this hard form; a temperature replaces the max with
    :func:`smooth_max` over ``c != y`` (an upper bound of the hard form), or over all classes
    when ``include_positive=True``. ``z`` is normalised, ``prototypes`` ``(C, D)`` are used as
    given. With ``lam = 1``, ``include_positive=True``: ``loss / tau`` equals
    ``F.cross_entropy(z @ mu.T / tau, y)``, a cosine classifier with prototype weights.
    """
    _check_float_tensor(embeddings, "embeddings", 2)
    _check_float_tensor(prototypes, "prototypes", 2)
    batch, dim = embeddings.shape
    num_classes = prototypes.shape[0]
    if batch < 1:
        raise ValueError("embeddings must hold at least one row")
    if prototypes.shape[1] != dim:
        raise ValueError(
            f"prototypes must have D={dim} columns like embeddings, got {tuple(prototypes.shape)}"
        )
    if prototypes.device != embeddings.device:
        raise ValueError(f"prototypes must be on {embeddings.device}, got {prototypes.device}")
    include_positive = _check_bool(include_positive, "include_positive")
    if num_classes < (1 if include_positive else 2):
        raise ValueError(f"prototypes must hold at least 2 classes, got C={num_classes}")
    lam = _check_positive(lam, "lam")
    tau = None if temperature is None else _check_positive(temperature, "temperature")
    reduction = _check_reduction(reduction)
    _check_finite(embeddings, "embeddings", check_finite)
    _check_finite(prototypes, "prototypes", check_finite)
    _check_labels(labels, batch, embeddings.device, check_finite, num_classes)
    with autocast_off(embeddings.device):
        dtype = _compute_dtype(embeddings, prototypes)
        scores = _normalise(embeddings, dtype) @ prototypes.to(dtype).T  # (B, C)
        target = labels.long().unsqueeze(1)
        attraction = scores.gather(1, target).squeeze(1)
        if include_positive:
            others = scores
        else:
            is_target = F.one_hot(labels.long(), num_classes).bool()
            others = scores.masked_fill(is_target, float("-inf"))
        repulsion = others.amax(dim=1) if tau is None else smooth_max(others, tau, dim=1)
        return _reduce(-attraction + lam * repulsion, reduction)


# --------------------------------------------------------------------------- view contrast


@dataclass(frozen=True)
class _ViewLogits:
    """Logits of a batch of views, the pieces every view-contrastive loss needs."""

    positive: Tensor  # (V, V, N): s(view v, view w of the same instance) / tau; diagonal unused
    negative: Tensor  # (V*N, V*M): s_ik / tau + log w_ik at negatives, -inf elsewhere
    num_negatives: int  # |N(i)|, the same for every anchor

    @property
    def negative_lse(self) -> Tensor:
        """``log sum_{k in N(i)} w_ik exp(s_ik / tau)`` per anchor, shape (V, N)."""
        num_views, _, batch = self.positive.shape
        return torch.logsumexp(self.negative, dim=1).reshape(num_views, batch)


def _off_diagonal(num_views: int, device: torch.device) -> Tensor:
    """(V, V, 1) bool mask of pairs of distinct views."""
    return ~torch.eye(num_views, dtype=torch.bool, device=device).unsqueeze(2)


def _mean_over_positives(pair_terms: Tensor) -> Tensor:
    """Mean over the V-1 positives ``w != v`` of (V, V, N) pair terms, flattened to (V*N,)."""
    num_views, _, batch = pair_terms.shape
    mask = _off_diagonal(num_views, pair_terms.device)
    summed = torch.where(mask, pair_terms, torch.zeros_like(pair_terms)).sum(dim=1)
    return (summed / (num_views - 1)).reshape(num_views * batch)


def _gather_weights(weights: Tensor, num_views: int, batch: int, gather: bool) -> Tensor:
    """Per-candidate weights (V*N,) of this rank -> (V*M,) of the global view-major batch."""
    if not gather:
        return weights
    local = weights.reshape(num_views, batch)
    return cl_dist.gather_along_dim(local, 1).reshape(-1)


def _log_weights(
    negative_weights: Tensor,
    num_anchors: int,
    num_candidates: int,
    z: Tensor,
    gather: bool,
    check_finite: bool | None,
) -> Tensor:
    """Validate ``negative_weights`` and return their log, broadcastable to (anchors, cands)."""
    if not isinstance(negative_weights, Tensor) or not negative_weights.is_floating_point():
        raise ValueError("negative_weights must be a floating-point torch.Tensor")
    if negative_weights.device != z.device:
        raise ValueError(f"negative_weights must be on {z.device}, got {negative_weights.device}")
    local_candidates = num_anchors  # this rank's candidates are its anchors
    shapes = [(local_candidates,), (num_anchors, num_candidates)]
    if negative_weights.shape not in shapes:
        raise ValueError(
            f"negative_weights must have shape {shapes[0]} (one weight per candidate) or "
            f"{shapes[1]} (per anchor and candidate), got {tuple(negative_weights.shape)}"
        )
    if _should_check(negative_weights, check_finite):
        if not bool(torch.isfinite(negative_weights).all()):
            raise ValueError("negative_weights must be finite, got NaN or inf values")
        if not bool((negative_weights > 0).all()):
            raise ValueError("negative_weights must be > 0, got non-positive values")
    log_w = negative_weights.to(z.dtype).log()
    if log_w.dim() == 1:
        num_views, batch = z.shape[0], z.shape[1]
        return _gather_weights(log_w, num_views, batch, gather).unsqueeze(0)
    return log_w


def _view_logits(
    views: Views,
    temperature: float,
    negative_weights: Tensor | None,
    gather_distributed: bool,
    check_finite: bool | None,
    normalize: bool = True,
) -> _ViewLogits:
    """Normalise the views, (optionally) gather them over ranks and build the masked logits.

    Must be called with autocast disabled; returns float32 (or float64) logits.
    """
    x = _as_views(views, check_finite)
    num_views, batch, _ = x.shape
    z = _embed(x, _compute_dtype(x), normalize)  # (V, N, D)
    gather = bool(gather_distributed) and cl_dist.is_distributed()
    offset = cl_dist.rank() * batch if gather else 0
    candidates = cl_dist.gather_along_dim(z, 1) if gather else z  # (V, M, D)
    total = candidates.shape[1]

    positive = torch.einsum("vnd,wnd->vwn", z, z) / temperature
    logits = z.reshape(num_views * batch, -1) @ candidates.reshape(num_views * total, -1).T
    logits = logits / temperature
    if negative_weights is not None:
        logits = logits + _log_weights(
            negative_weights, num_views * batch, num_views * total, z, gather, check_finite
        )
    device = z.device
    anchor_instance = torch.arange(num_views * batch, device=device) % batch + offset
    candidate_instance = torch.arange(num_views * total, device=device) % total
    same_instance = anchor_instance.unsqueeze(1) == candidate_instance.unsqueeze(0)
    negative = logits.masked_fill(same_instance, float("-inf"))
    return _ViewLogits(positive, negative, num_negatives=num_views * (total - 1))


# Largest ``1 / tau`` for which ``exp(s / tau)`` needs no shift: cosine logits lie in
# ``[-1 / tau, 1 / tau]`` and ``exp(+-40)`` is well inside the normal float32 range (about
# ``exp(+-87)``), so the row sums cannot overflow or underflow. Smaller temperatures shift every
# row by its own maximum instead.
_MAX_UNSHIFTED_INV_TAU = 40.0


class _NegativeLogSumExp(torch.autograd.Function):
    """``log sum_k exp(<a_i, c_k> / tau)`` over the candidates ``k`` not masked for anchor ``i``.

    Fused forward and backward that hold a single ``(A, C)`` buffer: the logits are computed
    by one ``mm``, exponentiated in place (unshifted, since cosine logits are bounded by
    ``1 / tau``; shifted by the row maximum for small temperatures) and the masked entries are
    zeroed in place; the backward reuses these unnormalised softmax weights ``E`` for
    ``grad_a = g / (tau S) * E c`` and ``grad_c = E^T (g / (tau S) * a)`` with ``S`` the row
    sums. With ``create_graph=True`` the backward is itself differentiated: it then recomputes
    the softmax from the inputs with differentiable operations (exact higher derivatives).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        anchors: Tensor,
        candidates: Tensor,
        inv_tau: float,
        masked_rows: Tensor,
        masked_cols: Tensor,
        bounded: bool,
    ) -> Tensor:
        """Row-wise masked log-sum-exp, shape (A,); ``bounded``: unit-norm inputs."""
        weights = torch.mm(anchors * inv_tau, candidates.T)
        if bounded and inv_tau <= _MAX_UNSHIFTED_INV_TAU:
            shift = None
        else:
            weights.index_put_((masked_rows, masked_cols), weights.new_tensor(float("-inf")))
            shift = weights.amax(dim=1, keepdim=True)
            weights.sub_(shift)
        weights.exp_()
        weights.index_put_((masked_rows, masked_cols), weights.new_zeros(()))
        total = weights.sum(dim=1, keepdim=True)
        ctx.save_for_backward(anchors, candidates, weights, total, masked_rows, masked_cols)
        ctx.inv_tau = inv_tau
        lse = total.log()
        return (lse if shift is None else lse + shift).squeeze(1)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor | None, ...]:
        """Gradients w.r.t. anchors and candidates (two matmuls with the saved weights)."""
        anchors, candidates, weights, total, rows, cols = ctx.saved_tensors
        inv_tau = ctx.inv_tau
        if torch.is_grad_enabled():  # create_graph=True: the backward must be differentiable
            logits = _masked_logits(anchors, candidates, inv_tau, rows, cols)
            weights, total = torch.softmax(logits, dim=1), 1.0
        coef = grad.unsqueeze(1) * inv_tau / total  # (A, 1)
        grad_anchors = grad_candidates = None
        if ctx.needs_input_grad[0]:
            grad_anchors = torch.mm(weights, candidates).mul_(coef)
        if ctx.needs_input_grad[1]:
            grad_candidates = torch.mm(weights.T, anchors * coef)
        return grad_anchors, grad_candidates, None, None, None, None


def _masked_logits(
    anchors: Tensor, candidates: Tensor, inv_tau: float, rows: Tensor, cols: Tensor
) -> Tensor:
    """``<a_i, c_k> / tau`` with ``-inf`` at the masked ``(rows, cols)``; differentiable."""
    logits = torch.mm(anchors * inv_tau, candidates.T)
    return logits.index_put((rows, cols), logits.new_tensor(float("-inf")))


def _negative_lse(
    anchors: Tensor,
    candidates: Tensor,
    inv_tau: float,
    rows: Tensor,
    cols: Tensor,
    bounded: bool,
) -> Tensor:
    """:class:`_NegativeLogSumExp`, or plain differentiable operations inside torch.func."""
    if _transforms_active():
        return torch.logsumexp(_masked_logits(anchors, candidates, inv_tau, rows, cols), dim=1)
    return _NegativeLogSumExp.apply(anchors, candidates, inv_tau, rows, cols, bounded)


@dataclass(frozen=True)
class _ViewParts:
    """Positive logits and negative log-sum-exps of a batch of views (no ``(A, C)`` output)."""

    positive: Tensor  # (V, V, N): s(view v, view w of the same instance) / tau; diagonal unused
    negative_lse: Tensor  # (V, N): log sum_{k in N(i)} exp(s_ik / tau)
    num_negatives: int  # |N(i)|, the same for every anchor


def _view_parts(
    views: Views,
    temperature: float,
    gather_distributed: bool,
    check_finite: bool | None,
    normalize: bool = True,
) -> _ViewParts:
    """Unweighted :class:`_ViewParts` through :class:`_NegativeLogSumExp`.

    Must be called with autocast disabled; works in float32 (or float64).
    """
    x = _as_views(views, check_finite)
    num_views, batch, dim = x.shape
    z = _embed(x, _compute_dtype(x), normalize)  # (V, N, D)
    gather = bool(gather_distributed) and cl_dist.is_distributed()
    offset = cl_dist.rank() * batch if gather else 0
    candidates = cl_dist.gather_along_dim(z, 1) if gather else z  # (V, M, D)
    total = candidates.shape[1]
    # (V, V, N) by broadcasting: an einsum here runs as N tiny batched matmuls on the CPU
    positive = (z.unsqueeze(1) * z.unsqueeze(0)).sum(dim=-1) / temperature
    # same-instance entries of the (V*N, V*M) logits: row v*N + n, columns w*M + n + offset
    rows = torch.arange(num_views * batch, device=z.device)
    view_starts = torch.arange(num_views, device=z.device) * total
    cols = view_starts.unsqueeze(0) + (rows % batch + offset).unsqueeze(1)  # (V*N, V)
    lse = _negative_lse(
        z.reshape(num_views * batch, dim),
        candidates.reshape(num_views * total, dim),
        1.0 / temperature,
        rows.repeat_interleave(num_views),
        cols.reshape(-1),
        normalize,
    )
    return _ViewParts(positive, lse.reshape(num_views, batch), num_views * (total - 1))


def balanced_contrastive_loss(
    views: Views,
    *,
    temperature: float = 0.5,
    alpha: float = 1.0,
    lam: float = 1.0,
    negative_weights: Tensor | None = None,
    include_positive: bool = False,
    gather_distributed: bool = False,
    reduction: str = "mean",
    check_finite: bool | None = None,
    normalize: bool = True,
) -> Tensor:
    """Balanced contrastive loss (chapter 4), per anchor ``i`` and positive ``p``:

    ``l_ip = -alpha * s_ip / tau + lam * log sum_{k in D(i, p)} w_ik exp(s_ik / tau)``

    with ``D(i, p) = N(i)`` (all views of the other instances), or ``{p} U N(i)`` when
    ``include_positive=True`` (the positive enters with weight 1). The anchor's loss is the mean
    of ``l_ip`` over its ``V - 1`` positives. ``negative_weights`` is ``None``, ``(V*N,)`` (one
    weight per candidate, e.g. class-balance weights) or ``(V*N, V*N)`` (anchor x candidate;
    ``(V*N, V*M)`` with ``M`` the global batch when gathering, while a 1-D tensor holds this
    rank's candidates and is gathered); weights must be finite and > 0 and enter as
    log-weights added to the logits. Gradient w.r.t. the normalised anchor:
    ``(-alpha * z_p + lam * sum_k p_ik z_k) / tau`` (``p_ik`` the softmax weights of ``D``).
    ``reduction="none"`` returns the ``(V*N,)`` per-anchor losses (view-major).
    ``normalize=False`` scores raw dot products instead of cosines (chapter 5 shows what breaks;
    the loss is then unbounded below unless the positive stays in the denominator).
    """
    tau = _check_positive(temperature, "temperature")
    normalize = _check_bool(normalize, "normalize")
    alpha = _check_positive(alpha, "alpha")
    lam = _check_positive(lam, "lam")
    include_positive = _check_bool(include_positive, "include_positive")
    gather_distributed = _check_bool(gather_distributed, "gather_distributed")
    reduction = _check_reduction(reduction)
    device = views.device if isinstance(views, Tensor) else _first_device(views)
    with autocast_off(device):
        if negative_weights is None:
            parts: _ViewParts | _ViewLogits = _view_parts(
                views, tau, gather_distributed, check_finite, normalize
            )
        else:
            parts = _view_logits(
                views, tau, negative_weights, gather_distributed, check_finite, normalize
            )
        lse = parts.negative_lse  # (V, N)
        attraction = _mean_over_positives(parts.positive)
        if include_positive:
            repulsion = _mean_over_positives(torch.logaddexp(parts.positive, lse.unsqueeze(1)))
        else:
            repulsion = lse.reshape(-1)
        return _reduce(-alpha * attraction + lam * repulsion, reduction)


def _first_device(views: Views) -> torch.device:
    """Device of the first view (validation of the rest happens in :func:`_as_views`)."""
    if isinstance(views, Sequence) and len(views) > 0 and isinstance(views[0], Tensor):
        return views[0].device
    return torch.device("cpu")


def nt_xent_loss(
    views: Views,
    *,
    temperature: float = 0.5,
    gather_distributed: bool = False,
    reduction: str = "mean",
    check_finite: bool | None = None,
    normalize: bool = True,
) -> Tensor:
    """NT-Xent / InfoNCE (SimCLR): the balanced loss with ``alpha = lam = 1``, positive kept.

    Per anchor ``-log(exp(s_ip/tau) / (exp(s_ip/tau) + sum_{k in N(i)} exp(s_ik/tau)))``.
    """
    return balanced_contrastive_loss(
        views,
        temperature=temperature,
        include_positive=True,
        gather_distributed=gather_distributed,
        reduction=reduction,
        check_finite=check_finite,
        normalize=normalize,
    )


def decoupled_contrastive_loss(
    views: Views,
    *,
    temperature: float = 0.5,
    lam: float = 1.0,
    gather_distributed: bool = False,
    reduction: str = "mean",
    check_finite: bool | None = None,
    normalize: bool = True,
) -> Tensor:
    """The loss derived in chapter 2: ``-s_ip/tau + lam * log sum_{k in N(i)} exp(s_ik/tau)``.

    The positive is left out of the denominator; ``lam = 1`` is the decoupled contrastive loss
    of Yeh et al. (2022).
    """
    return balanced_contrastive_loss(
        views,
        temperature=temperature,
        lam=lam,
        include_positive=False,
        gather_distributed=gather_distributed,
        reduction=reduction,
        check_finite=check_finite,
        normalize=normalize,
    )


@dataclass(frozen=True)
class ContrastiveComponents:
    """Per-anchor pieces of the contrastive losses, each of shape ``(V*N,)`` (view-major).

    ``positive``: mean over positives of ``s_ip / tau``; ``negative_lse``:
    ``log sum_{k in N(i)} exp(s_ik / tau)``; ``nt_xent_gap`` (``V == 2`` only, else ``None``):
    ``log(1 + exp(s_ip / tau) / sum_{k in N(i)} exp(s_ik / tau))``, so that
    ``NT-Xent = derived + nt_xent_gap`` per anchor (chapter 2).
    """

    positive: Tensor
    negative_lse: Tensor
    nt_xent_gap: Tensor | None

    @property
    def derived(self) -> Tensor:
        """The derived (decoupled, ``lam = 1``) per-anchor loss ``negative_lse - positive``."""
        return self.negative_lse - self.positive

    @property
    def nt_xent(self) -> Tensor:
        """The per-anchor NT-Xent loss ``derived + nt_xent_gap`` (two views only)."""
        if self.nt_xent_gap is None:
            raise ValueError("nt_xent needs V == 2 views (nt_xent_gap is None)")
        return self.derived + self.nt_xent_gap


def contrastive_components(
    views: Views,
    *,
    temperature: float = 0.5,
    gather_distributed: bool = False,
    check_finite: bool | None = None,
) -> ContrastiveComponents:
    """Split the per-anchor losses into attraction, repulsion and the NT-Xent gap (chapter 2)."""
    tau = _check_positive(temperature, "temperature")
    gather_distributed = _check_bool(gather_distributed, "gather_distributed")
    device = views.device if isinstance(views, Tensor) else _first_device(views)
    with autocast_off(device):
        parts = _view_parts(views, tau, gather_distributed, check_finite)
        positive = _mean_over_positives(parts.positive)
        negative_lse = parts.negative_lse.reshape(-1)
        gap = F.softplus(positive - negative_lse) if parts.positive.shape[0] == 2 else None
        return ContrastiveComponents(positive, negative_lse, gap)


def debiased_contrastive_loss(
    views: Views,
    *,
    temperature: float = 0.5,
    tau_plus: float = 0.1,
    gather_distributed: bool = False,
    reduction: str = "mean",
    check_finite: bool | None = None,
) -> Tensor:
    """Debiased contrastive loss (Chuang et al. 2020) with class prior ``tau_plus`` in [0, 1).

    With ``pos = exp(s_ip/tau)``, ``M = |N(i)|`` negatives:
    ``Ng = max((sum_neg - tau_plus * M * pos) / (1 - tau_plus), M * exp(-1/tau))`` and
    ``loss = -log(pos / (pos + Ng))``, computed in log space. Two views only.
    ``tau_plus = 0`` gives NT-Xent.
    """
    tau = _check_positive(temperature, "temperature")
    tau_plus = _check_tau_plus(tau_plus)
    gather_distributed = _check_bool(gather_distributed, "gather_distributed")
    reduction = _check_reduction(reduction)
    device = views.device if isinstance(views, Tensor) else _first_device(views)
    with autocast_off(device):
        parts = _view_logits(views, tau, None, gather_distributed, check_finite)
        if parts.positive.shape[0] != 2:
            raise ValueError(
                f"views: the debiased loss needs exactly V=2 views, got V={parts.positive.shape[0]}"
            )
        pos = _mean_over_positives(parts.positive)  # V == 2: the single positive
        count = parts.num_negatives
        shift = torch.maximum(pos, parts.negative.amax(dim=1)).detach()
        pos_scaled = torch.exp(pos - shift)
        neg_scaled = torch.exp(parts.negative - shift.unsqueeze(1)).sum(dim=1)
        estimate = (neg_scaled - tau_plus * count * pos_scaled) / (1.0 - tau_plus)
        positive_part = estimate > 0
        safe = torch.where(positive_part, estimate, torch.ones_like(estimate))
        log_estimate = torch.where(
            positive_part, safe.log() + shift, torch.full_like(safe, float("-inf"))
        )
        log_ng = torch.clamp(log_estimate, min=math.log(count) - 1.0 / tau)
        return _reduce(torch.logaddexp(pos, log_ng) - pos, reduction)


# --------------------------------------------------------------------------- SupCon


def supcon_loss(
    embeddings: Tensor,
    labels: Tensor,
    *,
    temperature: float = 0.1,
    gather_distributed: bool = False,
    reduction: str = "mean",
    check_finite: bool | None = None,
) -> Tensor:
    """Supervised contrastive loss "L_out" (Khosla et al. 2020), chapter 1.

    For anchor ``i`` with positives ``P(i)`` (same label, not ``i``):
    ``-1/|P(i)| sum_{p in P(i)} log(exp(s_ip/tau) / sum_{a != i} exp(s_ia/tau))``.
    No ``temperature / base_temperature`` rescaling. Anchors without a positive are skipped:
    ``"mean"`` averages over the anchors that have one (0 if none has), ``"sum"`` sums them,
    ``"none"`` returns ``(M,)`` with 0 for skipped anchors. ``embeddings`` ``(M, D)``,
    ``labels`` ``(M,)`` integers. When gathering, the global batch is the concatenation of the
    ranks' batches; ``"mean"`` is per rank, so it matches the global mean (under DDP's gradient
    averaging) when every rank has the same number of anchors with a positive.
    """
    _check_float_tensor(embeddings, "embeddings", 2)
    if embeddings.shape[0] < 2:
        raise ValueError(f"embeddings must hold at least 2 rows, got {embeddings.shape[0]}")
    tau = _check_positive(temperature, "temperature")
    gather_distributed = _check_bool(gather_distributed, "gather_distributed")
    reduction = _check_reduction(reduction)
    _check_finite(embeddings, "embeddings", check_finite)
    _check_labels(labels, embeddings.shape[0], embeddings.device, check_finite)
    with autocast_off(embeddings.device):
        z = _normalise(embeddings, _compute_dtype(embeddings))
        gather = gather_distributed and cl_dist.is_distributed()
        candidates = cl_dist.all_gather_with_grad(z) if gather else z
        cand_labels = cl_dist.all_gather_no_grad(labels) if gather else labels
        offset = cl_dist.rank() * z.shape[0] if gather else 0

        logits = z @ candidates.T / tau  # (M, M_global)
        rows = torch.arange(z.shape[0], device=z.device) + offset  # anchors' global indices
        columns = torch.arange(candidates.shape[0], device=z.device)
        is_self = rows.unsqueeze(1) == columns.unsqueeze(0)
        positive = (labels.unsqueeze(1) == cand_labels.unsqueeze(0)) & ~is_self
        lse = torch.logsumexp(logits.masked_fill(is_self, float("-inf")), dim=1)
        num_pos = positive.sum(dim=1)
        pos_sum = torch.where(positive, logits, torch.zeros_like(logits)).sum(dim=1)
        has_pos = num_pos > 0
        per_anchor = torch.where(has_pos, lse - pos_sum / num_pos.clamp(min=1), 0.0)
        if reduction == "mean":
            return per_anchor.sum() / has_pos.sum().clamp(min=1)
        return _reduce(per_anchor, reduction)


# --------------------------------------------------------------------------- modules


def _views_batch(views: Views) -> tuple[int, int]:
    """(V, N) of a batch of views (after validation by the functional API)."""
    if isinstance(views, Tensor):
        return views.shape[0], views.shape[1]
    return len(views), views[0].shape[0]


class BalancedContrastiveLoss(nn.Module):
    """Module form of :func:`balanced_contrastive_loss`: ``forward(views, labels=None)``.

    With ``class_weights`` ``(C,)`` the weight of candidate ``v*N + n`` is
    ``class_weights[labels[n]]`` (e.g. inverse class frequencies for a long-tailed dataset);
    ``labels`` ``(N,)`` are then required. Without class weights labels are ignored.
    """

    def __init__(
        self,
        temperature: float = 0.5,
        alpha: float = 1.0,
        lam: float = 1.0,
        include_positive: bool = False,
        class_weights: Tensor | None = None,
        gather_distributed: bool = False,
        reduction: str = "mean",
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.temperature = _check_positive(temperature, "temperature")
        self.normalize = _check_bool(normalize, "normalize")
        self.alpha = _check_positive(alpha, "alpha")
        self.lam = _check_positive(lam, "lam")
        self.include_positive = _check_bool(include_positive, "include_positive")
        self.gather_distributed = _check_bool(gather_distributed, "gather_distributed")
        self.reduction = _check_reduction(reduction)
        if class_weights is not None:
            _check_float_tensor(class_weights, "class_weights", 1)
            if class_weights.numel() < 1:
                raise ValueError("class_weights must hold at least one class")
            if _should_check(class_weights, None) and not bool(
                (torch.isfinite(class_weights) & (class_weights > 0)).all()
            ):
                raise ValueError("class_weights must be finite and > 0")
        self.register_buffer("class_weights", class_weights)

    def forward(self, views: Views, labels: Tensor | None = None) -> Tensor:
        """Loss of a batch of views; ``labels`` (N,) are needed only with class weights."""
        weights = None
        if self.class_weights is not None:
            if labels is None:
                raise ValueError("labels are required when class_weights is set")
            num_views, batch = _views_batch(_as_views(views, check_finite=False))
            _check_labels(
                labels, batch, self.class_weights.device, None, self.class_weights.shape[0]
            )
            weights = self.class_weights[labels.long()].repeat(num_views)
        return balanced_contrastive_loss(
            views,
            temperature=self.temperature,
            alpha=self.alpha,
            lam=self.lam,
            negative_weights=weights,
            include_positive=self.include_positive,
            gather_distributed=self.gather_distributed,
            reduction=self.reduction,
            normalize=self.normalize,
        )

    def extra_repr(self) -> str:
        """Hyper-parameters shown by ``print(module)``."""
        return (
            f"temperature={self.temperature}, alpha={self.alpha}, lam={self.lam}, "
            f"include_positive={self.include_positive}, "
            f"class_weights={self.class_weights is not None}, normalize={self.normalize}"
        )


class NTXentLoss(BalancedContrastiveLoss):
    """Module form of :func:`nt_xent_loss`: ``forward(views, labels=None)``, labels ignored."""

    def __init__(
        self,
        temperature: float = 0.5,
        gather_distributed: bool = False,
        reduction: str = "mean",
        normalize: bool = True,
    ) -> None:
        super().__init__(
            temperature,
            include_positive=True,
            gather_distributed=gather_distributed,
            reduction=reduction,
            normalize=normalize,
        )


class DecoupledContrastiveLoss(BalancedContrastiveLoss):
    """Module form of :func:`decoupled_contrastive_loss`: ``forward(views, labels=None)``."""

    def __init__(
        self,
        temperature: float = 0.5,
        lam: float = 1.0,
        gather_distributed: bool = False,
        reduction: str = "mean",
        normalize: bool = True,
    ) -> None:
        super().__init__(
            temperature,
            lam=lam,
            gather_distributed=gather_distributed,
            reduction=reduction,
            normalize=normalize,
        )


class DebiasedContrastiveLoss(nn.Module):
    """Module form of :func:`debiased_contrastive_loss`: ``forward(views, labels=None)``."""

    def __init__(
        self,
        temperature: float = 0.5,
        tau_plus: float = 0.1,
        gather_distributed: bool = False,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.temperature = _check_positive(temperature, "temperature")
        self.tau_plus = _check_tau_plus(tau_plus)
        self.gather_distributed = _check_bool(gather_distributed, "gather_distributed")
        self.reduction = _check_reduction(reduction)

    def forward(self, views: Views, labels: Tensor | None = None) -> Tensor:
        """Debiased loss of a batch of two views; labels ignored."""
        return debiased_contrastive_loss(
            views,
            temperature=self.temperature,
            tau_plus=self.tau_plus,
            gather_distributed=self.gather_distributed,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        """Hyper-parameters shown by ``print(module)``."""
        return f"temperature={self.temperature}, tau_plus={self.tau_plus}"


class SupConLoss(nn.Module):
    """Module form of :func:`supcon_loss` on views: ``forward(views, labels=None)``.

    The ``V`` views are flattened view-major to ``(V*N, D)`` and ``labels`` ``(N,)`` repeated
    ``V`` times. ``labels=None`` uses instance identity (multi-positive instance discrimination;
    with ``V = 2`` this equals NT-Xent).
    """

    def __init__(
        self, temperature: float = 0.1, gather_distributed: bool = False, reduction: str = "mean"
    ) -> None:
        super().__init__()
        self.temperature = _check_positive(temperature, "temperature")
        self.gather_distributed = _check_bool(gather_distributed, "gather_distributed")
        self.reduction = _check_reduction(reduction)

    def forward(self, views: Views, labels: Tensor | None = None) -> Tensor:
        """SupCon of a batch of views (instance labels when ``labels`` is None)."""
        x = _as_views(views, check_finite=None)
        num_views, batch, dim = x.shape
        if labels is None:
            offset = cl_dist.rank() * batch if self.gather_distributed else 0
            labels = torch.arange(batch, device=x.device) + offset
        else:
            _check_labels(labels, batch, x.device, check_finite=False)
        return supcon_loss(
            x.reshape(num_views * batch, dim),
            labels.repeat(num_views),
            temperature=self.temperature,
            gather_distributed=self.gather_distributed,
            reduction=self.reduction,
            check_finite=False,  # the views were checked above
        )

    def extra_repr(self) -> str:
        """Hyper-parameters shown by ``print(module)``."""
        return f"temperature={self.temperature}"


class SupervisedPrototypeLoss(nn.Module):
    """Module form of :func:`supervised_prototype_loss`.

    ``forward(embeddings, labels, prototypes)``; see the function for the parameters.
    """

    def __init__(
        self,
        lam: float = 1.0,
        temperature: float | None = None,
        include_positive: bool = False,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        self.lam = _check_positive(lam, "lam")
        self.temperature = (
            None if temperature is None else _check_positive(temperature, "temperature")
        )
        self.include_positive = _check_bool(include_positive, "include_positive")
        self.reduction = _check_reduction(reduction)

    def forward(self, embeddings: Tensor, labels: Tensor, prototypes: Tensor) -> Tensor:
        """Prototype objective of a labelled batch."""
        return supervised_prototype_loss(
            embeddings,
            labels,
            prototypes,
            lam=self.lam,
            temperature=self.temperature,
            include_positive=self.include_positive,
            reduction=self.reduction,
        )

    def extra_repr(self) -> str:
        """Hyper-parameters shown by ``print(module)``."""
        return (
            f"lam={self.lam}, temperature={self.temperature}, "
            f"include_positive={self.include_positive}"
        )


_REGISTRY: dict[str, type[nn.Module]] = {
    "nt_xent": NTXentLoss,
    "decoupled": DecoupledContrastiveLoss,
    "balanced": BalancedContrastiveLoss,
    "supcon": SupConLoss,
    "debiased": DebiasedContrastiveLoss,
}
LOSS_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def make_loss(name: str, **kwargs: object) -> nn.Module:
    """Build a view loss module by name (``forward(views, labels=None)``); see ``LOSS_NAMES``."""
    if name not in _REGISTRY:
        raise ValueError(f"name must be one of {', '.join(LOSS_NAMES)}; got {name!r}")
    cls = _REGISTRY[name]
    accepted = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"kwargs {unknown} are not accepted by {name!r}; expected some of {accepted}"
        )
    return cls(**kwargs)
