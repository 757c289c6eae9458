"""Evaluation of a finished run from its checkpoint file.

Here: :func:`load_checkpoint_model` (the encoder, its config and the raw state) and
:func:`evaluate_checkpoint` (kNN and linear-probe accuracy on a split), as ``python -m cl_lib
eval`` runs them. Not here: the measurements taken during training
(:mod:`cl_lib.train.measure`) or the metrics themselves (:mod:`cl_lib.evaluate`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cl_lib import runtime
from cl_lib.train.checkpoint import _MODEL_KEYS, _read_checkpoint
from cl_lib.train.components import _labelled
from cl_lib.train.config import TrainConfig, config_from_dict
from cl_lib.train.errors import CheckpointError, _brief


def load_checkpoint_model(
    path: str | os.PathLike, device: torch.device | str | None = None
) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """The model stored in a checkpoint of :func:`pretrain`, its config and the raw state."""
    from cl_lib.models import build_model

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint must be an existing file, got {str(path)!r}")
    dev = _eval_device(device)
    advice = "give a checkpoint.pt written by train (python -m cl_lib train)"
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        advice = f"{path.name} looks like a config or metrics file; {advice}"
    state = _read_checkpoint(path, _MODEL_KEYS, advice)
    config = config_from_dict(state["config"])
    try:
        kwargs = dict(state["model_kwargs"])
        model = build_model(kwargs.pop("backbone"), **kwargs)
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is damaged ({_brief(error)}); {advice}") from None
    return model.to(dev).eval(), config, state


def _eval_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a torch.device (None: the default); CUDA must be available."""
    if device is None:
        return runtime.default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be like 'cpu', 'cuda' or 'cuda:0', got {device!r}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device {str(device)!r} is not available: this machine has no CUDA GPU; "
                f"use device 'cpu' (eval --device cpu)"
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r} does not exist: there are {count} GPUs")
    return dev


def evaluate_checkpoint(
    path: str | os.PathLike,
    *,
    split: str = "test",
    linear: bool = True,
    device: torch.device | str | None = None,
    data_root: str | None = None,
) -> dict[str, Any]:
    """kNN (and linear-probe) accuracy of a checkpoint's encoder on ``split``.

    The memory bank / probe training set is the clean training split of the checkpoint's
    dataset; queries are ``split``. Returns a JSON-friendly dict.
    """
    from cl_lib.data import load_dataset
    from cl_lib.evaluate import extract_features, knn_accuracy, linear_probe

    model, cfg, state = load_checkpoint_model(path, device)
    dev = next(model.parameters()).device
    d = cfg.data
    kw = {"root": data_root or d.root, "download": d.download, "seed": cfg.seed}
    train = load_dataset(d.name, "train", size=d.size, imbalance_ratio=d.imbalance_ratio, **kw)
    size = d.test_size if split == "test" else d.size
    query = load_dataset(d.name, split, size=size, **kw)
    bank_x, bank_y = _labelled(train.images, train.labels)
    query_x, query_y = _labelled(query.images, query.labels)
    bank_f = extract_features(model, bank_x, device=dev)
    query_f = extract_features(model, query_x, device=dev)
    k = min(cfg.knn_k, len(bank_y))
    result: dict[str, Any] = {
        "checkpoint": str(path),
        "split": split,
        "epoch": state["epoch"],
        "knn_k": k,
        "knn_accuracy": knn_accuracy(
            bank_f, bank_y, query_f, query_y, k=k, temperature=cfg.knn_temperature
        ),
    }
    if linear:
        result["linear_probe_accuracy"] = linear_probe(
            bank_f, bank_y, query_f, query_y, seed=cfg.seed, device=dev
        )
    return result
