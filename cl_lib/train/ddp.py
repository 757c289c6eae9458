"""Multi-process training under ``torchrun``: the process group, the device, BatchNorm.

Here: joining the process group (gloo on CPU, nccl on CUDA) and choosing the device of a rank,
and :class:`AllReduceBatchNorm`. Per-rank BatchNorm statistics would differ from those of the
combined batch, so BatchNorm layers are synchronised: :class:`torch.nn.SyncBatchNorm` on CUDA,
and on CPU (where torch's SyncBatchNorm refuses CPU tensors) :class:`AllReduceBatchNorm`, which
all-reduces the batch sums differentiably. Either way one DDP step equals one single-process step
on the concatenated global batch. Not here: the loss's all-gather (:mod:`cl_lib.distributed`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # initialised by us: destroy at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config key 'device' is {spec!r} but CUDA is not available")
    return device


def _setup_distributed(device_spec: str) -> tuple[_Dist, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(device_spec, local_rank if world > 1 else 0)
    if world <= 1:
        return _Dist(), device
    owns = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the backward all-reduces the gradient as well."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:  # type: ignore[override]
        """Sum ``tensor`` over all ranks."""
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        """The gradient of every rank's input is the sum of the output gradients."""
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span all ranks (a CPU-capable SyncBatchNorm).

    The per-channel sums and squared deviations are all-reduced with the differentiable
    all-reduce of :class:`_AllReduceSum` (two passes, like a single-process
    BatchNorm on the concatenated batch). Without an initialised multi-rank process group, or
    in eval mode, it is a plain BatchNorm. Accepts ``(N, C)`` and ``(N, C, *)`` inputs.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"input must have shape (N, C, *), got {tuple(input.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` with global batch statistics when training under DDP."""
        self._check_input_dim(x)
        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (self.training and multi):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        local = torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype, device=x.device)
        sums = all_reduce(torch.cat([x.sum(dims), local]))
        count = sums[-1]
        mean = sums[:-1] / count
        centred = x - mean.view(shape)
        var = all_reduce(centred.pow(2).sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum
                weight: float | Tensor = (
                    1.0 / self.num_batches_tracked if momentum is None else momentum
                )
                self.running_mean.lerp_(mean.detach(), weight)
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_var.lerp_(unbiased, weight)
        return y

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm1d/2d/3d of ``module`` by this class (same parameters)."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            new = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
            )
            new.load_state_dict(module.state_dict())
            new.to(next(iter(module.state_dict().values())).device)
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module
