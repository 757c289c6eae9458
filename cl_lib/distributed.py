"""Differentiable all-gather helpers for multi-process contrastive losses.

Contrastive losses compare each local anchor with *every* candidate of the global batch.
With ``gather_distributed=True`` the losses in :mod:`cl_lib.losses` all-gather the normalised
embeddings of all ranks with :func:`all_gather_with_grad`; anchors stay the local rows.

Gradient convention (exact, the same as one process on the concatenated batch). Every rank
calls ``loss.backward()`` on its own loss ``L_r`` (a mean over its local anchors). The backward
of the gather all-reduces (sums) the gradient of the gathered tensor over the ranks and keeps
this rank's slice, so rank ``r`` receives ``sum_r' dL_r'/dx_r``. DDP then averages parameter
gradients over the ``W`` ranks, which yields the gradient of ``mean_r L_r``: the mean loss of
the whole batch, exactly as a single process would compute it.

Requirements: every rank passes tensors of the same shape (use ``drop_last=True`` in the data
loader), and every rank runs the backward pass (the all-reduce is a collective). On a single
process, or when :mod:`torch.distributed` is not initialised, every helper is a no-op.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "all_gather_no_grad",
    "all_gather_with_grad",
    "gather_along_dim",
    "is_distributed",
    "rank",
    "world_size",
]


def is_distributed() -> bool:
    """True when torch.distributed is available, initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """Rank of this process (0 when torch.distributed is not initialised)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; the backward sums gradients over ranks and returns this slice."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        """Concatenate the tensors of all ranks along dim 0 (rank order)."""
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor)
        ctx.local_rows = tensor.shape[0]  # type: ignore[attr-defined]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_output: Tensor) -> Tensor:  # type: ignore[override]
        """Sum the gradient of the gathered tensor over ranks; keep this rank's rows."""
        grad = grad_output.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        rows = ctx.local_rows  # type: ignore[attr-defined]
        start = dist.get_rank() * rows
        return grad[start : start + rows]


def _check_gatherable(tensor: Tensor) -> None:
    """Raise ValueError unless ``tensor`` is a tensor with a dim 0 to gather along."""
    if not isinstance(tensor, Tensor):
        raise ValueError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() == 0:
        raise ValueError("tensor must have at least one dimension to gather along dim 0")


def all_gather_with_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` of every rank along dim 0, differentiably (no-op on one process).

    All ranks must pass the same shape. See the module docstring for the gradient convention.
    """
    _check_gatherable(tensor)
    if not is_distributed():
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_gather_no_grad(tensor: Tensor) -> Tensor:
    """Concatenate ``tensor`` of every rank along dim 0 without gradient (labels, weights)."""
    _check_gatherable(tensor)
    if not is_distributed():
        return tensor
    tensor = tensor.detach().contiguous()
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return torch.cat(parts, dim=0)


def gather_along_dim(tensor: Tensor, dim: int, *, differentiable: bool = True) -> Tensor:
    """All-gather ``tensor`` along ``dim`` (rank-major within that dim); no-op on one process.

    Used for view-major batches ``(V, N, D)``: gathering along ``dim=1`` keeps the views apart
    and concatenates the instances of the ranks, so row ``v * (W * N) + r * N + n`` of the
    flattened result is view ``v`` of instance ``n`` of rank ``r``.
    """
    if not isinstance(tensor, Tensor):
        raise ValueError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(f"dim must be in [-{tensor.dim()}, {tensor.dim()}), got {dim}")
    if not is_distributed():
        return tensor
    moved = tensor.movedim(dim, 0)
    gathered = all_gather_with_grad(moved) if differentiable else all_gather_no_grad(moved)
    return gathered.movedim(0, dim)
