"""Optimisers and the learning-rate schedule of pre-training.

Here: :class:`LARS`, :class:`WarmupCosine` (linear warm-up, then cosine decay to 0, stepped
every batch) and the choice among SGD, LARS and AdamW from an
:class:`~cl_lib.train.config.OptimConfig`. Not here: the config itself
(:mod:`cl_lib.train.config`) or the loop that steps them (:mod:`cl_lib.train.trainer`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from cl_lib.train.config import OptimConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017).

    For parameter groups with ``lars=True`` the update ``g + wd * w`` is scaled by the trust
    ratio ``eta * ||w|| / ||g + wd * w||`` (1 when either norm is 0); groups with
    ``lars=False`` (biases, normalisation parameters) get plain momentum SGD without weight
    decay. Everything stays on the device: no host syncs.
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "lars": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One update of every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if group["lars"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (w_norm > 0) & (u_norm > 0),
                        group["eta"] * w_norm / u_norm,
                        torch.ones_like(w_norm),
                    )
                    update = update.mul(trust)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = update.clone()
                else:
                    buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


class WarmupCosine:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup = warmup
        self.total = total

    def __call__(self, step: int) -> float:
        """Factor for the 0-based ``step``."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD, LARS (biases / norm parameters excluded from adaptation and decay) or AdamW."""
    lr = cfg.effective_lr
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    groups = [
        {"params": [p for p in params if p.ndim > 1], "lars": True},
        {"params": [p for p in params if p.ndim <= 1], "lars": False, "weight_decay": 0.0},
    ]
    return LARS(
        [g for g in groups if g["params"]],
        lr=lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        eta=cfg.lars_eta,
    )
