"""The parts a run is built from: its data, its loss, and small helpers of the training step.

Here: loading the train and test splits (rank 0 first under DDP), the labelled part of a split,
the loss and its keyword arguments (class-balanced weights), the embedding spread (the collapse
flag) and the message of a non-finite loss. Not here: the model (:mod:`cl_lib.models`), the
optimiser (:mod:`cl_lib.train.optim`) or the loop (:mod:`cl_lib.train.trainer`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lib.train.config import LossConfig, TrainConfig
from cl_lib.train.ddp import _Dist


def _load_data(cfg: TrainConfig, rank_zero_first: _Dist) -> tuple[Any, Any]:
    from cl_lib.data import load_dataset

    d = cfg.data

    def load() -> tuple[Any, Any]:
        kw = {"root": d.root, "download": d.download, "seed": cfg.seed}
        train = load_dataset(d.name, "train", size=d.size, imbalance_ratio=d.imbalance_ratio, **kw)
        test = load_dataset(d.name, "test", size=d.test_size, **kw)
        return train, test

    if rank_zero_first.world == 1:
        return load()
    if rank_zero_first.is_main:  # one rank downloads, the others wait for it
        out = load()
        dist.barrier()
        return out
    dist.barrier()
    return load()


def _labelled(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The labelled part of a dataset (drops UNLABELLED = -1 images)."""
    keep = labels >= 0
    if bool(keep.all()):
        return images, labels
    return images[keep], labels[keep]


def _loss_kwargs(cfg: LossConfig, class_weights: Tensor | None, gather: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"temperature": cfg.temperature}
    for key in ("alpha", "lam", "include_positive", "tau_plus"):
        value = getattr(cfg, key)
        if value is not None:
            kwargs[key] = value
    if not cfg.normalize:
        kwargs["normalize"] = False
    if class_weights is not None:
        kwargs["class_weights"] = class_weights
    if gather:
        kwargs["gather_distributed"] = True
    return kwargs


def _build_loss(cfg: LossConfig, class_weights: Tensor | None, gather: bool) -> nn.Module:
    from cl_lib.losses import make_loss

    kwargs = _loss_kwargs(cfg, class_weights, gather)
    try:
        return make_loss(cfg.name, **kwargs)
    except TypeError as error:
        raise ValueError(
            f"config section 'loss' sets a parameter that loss {cfg.name!r} does not take "
            f"({', '.join(sorted(kwargs))}): {error}"
        ) from None


def _class_weights(labels: Tensor, num_classes: int) -> Tensor:
    """Inverse class frequencies, normalised to mean 1 over the classes present."""
    counts = torch.bincount(labels[labels >= 0], minlength=num_classes).float()
    weights = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    weights = weights * (counts > 0).sum() / weights.sum()
    return weights.clamp(min=1e-6)


def _nonfinite_message(epoch: int, step: int, last: Path | None) -> str:
    kept = f"the last good checkpoint is kept at {last}" if last else "no checkpoint was written"
    return (
        f"non-finite loss at epoch {epoch + 1}, step {step} (global, 0-based); stopping "
        f"({kept}). Try a lower optim.lr, a higher loss.temperature or a longer "
        f"optim.warmup_fraction: rerun with the new value in a new out_dir, or in this one "
        f"with --no-resume (resume=False), which starts afresh and replaces the checkpoint."
    )


def _embedding_spread(z: Tensor) -> Tensor:
    """Std of the normalised embeddings across the batch, times sqrt(D): ~0 when collapsed."""
    zn = F.normalize(z.detach().float(), dim=-1)
    return zn.std(dim=0).mean() * math.sqrt(zn.shape[-1])
