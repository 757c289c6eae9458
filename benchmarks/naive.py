"""A textbook NT-Xent reference, the way many SimCLR re-implementations write it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def naive_nt_xent(view0: Tensor, view1: Tensor, temperature: float = 0.5) -> Tensor:
    """NT-Xent of two ``(N, D)`` views: ``(2N, 2N)`` cosine logits, self masked, cross-entropy.

    Every row ``i`` of the concatenated batch is an anchor whose target is its other view
    (``i + N`` mod ``2N``); the diagonal is masked with ``-inf`` through a boolean ``eye``.
    """
    if view0.shape != view1.shape or view0.dim() != 2:
        raise ValueError(
            f"view0 and view1 must be (N, D) tensors of one shape, got "
            f"{tuple(view0.shape)} and {tuple(view1.shape)}"
        )
    batch = view0.shape[0]
    z = F.normalize(torch.cat([view0, view1], dim=0), dim=1)
    logits = z @ z.T / temperature
    eye = torch.eye(2 * batch, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    targets = torch.arange(2 * batch, device=z.device).roll(batch)
    return F.cross_entropy(logits, targets)
