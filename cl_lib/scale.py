"""SimCLR at scale (Chapter 6): the two runs of the chapter, their evaluation, and helpers.

* :func:`simclr_config` builds the chapter's :class:`~cl_lib.train.TrainConfig` for a profile
  (``"full"``: CIFAR-10, CIFAR ResNet-18, SGD, mixed precision; ``"quick"``: synthetic shapes
  and the small CNN) and a loss (``"nt_xent"`` or ``"balanced"`` at :data:`BALANCED`), without
  reading ``configs/`` (on Colab only the package is installed);
* :func:`load_splits`, :func:`encode` and :func:`downstream_accuracy`: frozen features of the
  clean training and test images, weighted kNN and a linear probe;
* :func:`label_efficiency`: linear-probe accuracy with ``k`` labels per class, over seeds;
* :func:`embedding_2d`: a 2-D map of features (t-SNE from scikit-learn, or UMAP if installed);
* :func:`run_time`: the recorded time of a run, to print beside its numbers (the hardware
  comes from :func:`cl_lib.provenance.machine`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cl_lib.data import ImageData, load_dataset
from cl_lib.evaluate import extract_features, few_label_subset, knn_accuracy, linear_probe
from cl_lib.train import TrainConfig, config_from_dict

__all__ = [
    "BALANCED",
    "FULL_EPOCHS",
    "LIVE_SIZING",
    "LOSSES",
    "PROFILES",
    "QUICK_EPOCHS",
    "RUN_LABELS",
    "Features",
    "accuracy_table",
    "downstream_accuracy",
    "embedding_2d",
    "encode",
    "label_efficiency",
    "live_overrides",
    "load_splits",
    "run_time",
    "simclr_config",
]

PROFILES: tuple[str, ...] = ("quick", "full")
"""Profiles accepted by :func:`simclr_config`."""

LOSSES: tuple[str, ...] = ("nt_xent", "balanced")
"""The chapter's two losses, SimCLR's NT-Xent and the balanced loss at :data:`BALANCED`."""

BALANCED: dict[str, Any] = {"alpha": 1.0, "lam": 1.0, "include_positive": False}
"""The chapter's balanced loss, (alpha, lambda) = (1, 1) with the positive left out of the
denominator, which is the loss derived in Chapter 2. Chosen from Chapter 4's grid
``balance_grid`` at the working recipe: no balanced cell there beats it
(``tests/test_scale.py`` checks this against ``results/balance_grid.json``), and
lambda / alpha = 2, the first version's choice, is lower on the linear probe."""

RUN_LABELS: dict[str, str] = {"nt_xent": "NT-Xent", "balanced": "derived (1, 1)"}
"""Display names of the runs."""

FULL_EPOCHS = 20
"""Epochs per full run, sized by an estimate (not a measurement). At about 3000 views/s
(ResNet-18, 32x32, fp16 on a T4) an epoch of 2 x 50 000 views takes 30-40 s, so two runs of 20
epochs plus evaluation take about 30 minutes."""

LIVE_SIZING: dict[str, int] = {
    "data.size": 2000,
    "data.test_size": 1000,
    "optim.batch_size": 64,
    "optim.epochs": 10,
}
"""The book's live CPU sizing of the shapes recipe, 310 steps (2000 images, batch 64, 10
epochs), about half a minute per run on one core. It is the shortest sizing tried at which
NT-Xent ends clearly above a random encoder and raw pixels (seed 0: kNN 39% against 23% and
25%); 200 steps on 1280 images did not. Chapter 6's quick profile and Chapter 4's live runs
use it."""


def live_overrides() -> tuple[str, ...]:
    """:data:`LIVE_SIZING` as ``key=value`` config overrides."""
    return tuple(f"{key}={value}" for key, value in LIVE_SIZING.items())


QUICK_EPOCHS = LIVE_SIZING["optim.epochs"]
"""Epochs per quick run, of 31 steps each (:data:`LIVE_SIZING`)."""

_COMMON: dict[str, Any] = {"seed": 0, "device": "auto", "checkpoint_every": 1}

_FULL: dict[str, Any] = {
    "amp": True,
    "channels_last": True,
    "eval_every": 10,
    "knn_k": 200,
    "knn_temperature": 0.1,
    "geometry_size": 512,
    "data": {"name": "cifar10", "root": "data", "download": True, "n_views": 2},
    "augment": {"name": "simclr_cifar", "strength": 1.0},
    "model": {"backbone": "resnet18", "head_hidden": 512, "head_out": 128, "head_layers": 2},
    "loss": {"temperature": 0.5},
    "optim": {
        "name": "sgd",
        "lr": 0.06,
        "base_batch_size": 256,
        "momentum": 0.9,
        "weight_decay": 5.0e-4,
        "warmup_fraction": 0.05,
        "batch_size": 512,
        "epochs": FULL_EPOCHS,
    },
}

_QUICK: dict[str, Any] = {
    "eval_every": 0,
    "knn_k": 20,
    "knn_temperature": 0.07,
    "geometry_size": 256,
    "data": {
        "name": "shapes",
        "size": LIVE_SIZING["data.size"],
        "test_size": LIVE_SIZING["data.test_size"],
        "n_views": 2,
    },
    "augment": {"name": "shapes", "strength": 1.0},
    "model": {"backbone": "small_cnn", "head_hidden": 256, "head_out": 128, "head_layers": 2},
    "loss": {"temperature": 0.2},
    "optim": {
        "name": "adamw",
        "lr": 3.0e-3,
        "weight_decay": 1.0e-4,
        "warmup_fraction": 0.1,
        "batch_size": LIVE_SIZING["optim.batch_size"],
        "epochs": QUICK_EPOCHS,
    },
}


# =========================================================================== configuration


def _merge(base: dict[str, Any], overrides: Mapping[str, Any], prefix: str = "") -> None:
    """Merge ``overrides`` into ``base`` in place: mappings merge into sections, values replace."""
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            section = base.setdefault(key, {})
            if not isinstance(section, dict):
                raise ValueError(f"override {prefix}{key!r} must be a value, not a section")
            _merge(section, value, f"{prefix}{key}.")
        else:
            base[key] = value


def simclr_config(profile: str, loss: str, out_dir: str | Path, /, **overrides: Any) -> TrainConfig:
    """The chapter's pre-training config for ``profile`` and ``loss``, writing to ``out_dir``.

    ``full``: CIFAR-10 (downloaded to ``data/``), CIFAR ResNet-18 with a 512-512-128 head, the
    SimCLR CIFAR augmentations on the GPU, mixed precision and channels-last, SGD (lr 0.06 x
    batch / 256, momentum 0.9, weight decay 5e-4, 5% warm-up then cosine), batch 512,
    :data:`FULL_EPOCHS` epochs, temperature 0.5, kNN with k = 200 and T = 0.1 (as
    ``configs/cifar10_resnet18.yaml``, shorter). ``quick``: 2000 synthetic shapes, the small CNN,
    AdamW 3e-3, batch 64, :data:`QUICK_EPOCHS` epochs, temperature 0.2, kNN k = 20
    (``configs/shapes_quick.yaml``, shorter). ``loss`` is ``"nt_xent"`` or ``"balanced"``
    (:data:`BALANCED`). Keyword ``overrides`` replace top-level keys; a mapping merges into its
    section, e.g. ``optim={"epochs": 2}`` or ``loss={"lam": 1.0}`` (the first three arguments are
    positional-only, so ``loss=`` names the section). Unknown keys or wrong types raise
    ``ValueError``.
    """
    if profile not in PROFILES:
        raise ValueError(f"profile must be one of {PROFILES}, got {profile!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    if not isinstance(out_dir, (str, Path)) or not str(out_dir):
        raise ValueError(f"out_dir must be a non-empty str or Path, got {out_dir!r}")
    raw = copy.deepcopy({**_COMMON, **(_FULL if profile == "full" else _QUICK)})
    raw["out_dir"] = str(out_dir)
    raw["loss"]["name"] = loss
    if loss == "balanced":
        raw["loss"].update(BALANCED)
    _merge(raw, overrides)
    return config_from_dict(raw)


# =========================================================================== features


@dataclass(frozen=True, eq=False)
class Features:
    """Frozen float32 features (CPU) of the clean training and test images, with labels."""

    train: Tensor
    train_labels: Tensor
    test: Tensor
    test_labels: Tensor


def load_splits(config: TrainConfig) -> tuple[ImageData, ImageData]:
    """The training and test images a run of ``config`` trains and evaluates on."""
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    d = config.data
    kw = {"root": d.root, "download": d.download, "seed": config.seed}
    train = load_dataset(d.name, "train", size=d.size, imbalance_ratio=d.imbalance_ratio, **kw)
    test = load_dataset(d.name, "test", size=d.test_size, **kw)
    return train, test


def encode(
    model: nn.Module,
    train: ImageData,
    test: ImageData,
    *,
    device: torch.device | str | None = None,
    batch_size: int = 512,
) -> Features:
    """Backbone features (``h``, before the head) of both splits, on CPU."""
    for name, data in (("train", train), ("test", test)):
        if not isinstance(data, ImageData):
            raise ValueError(f"{name} must be an ImageData, got {type(data).__name__}")
    kw = {"device": device, "batch_size": batch_size}
    return Features(
        extract_features(model, train.images, **kw),
        train.labels.cpu(),
        extract_features(model, test.images, **kw),
        test.labels.cpu(),
    )


def downstream_accuracy(
    features: Features,
    *,
    knn_k: int,
    knn_temperature: float,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Weighted kNN (``k`` capped at the training-set size) and linear-probe test accuracy."""
    if not isinstance(features, Features):
        raise ValueError(f"features must be a Features, got {type(features).__name__}")
    k = min(knn_k, features.train.shape[0]) if _is_int(knn_k, 1) else knn_k  # else: its error
    dev = torch.device(device) if device is not None else torch.device("cpu")
    f = features
    knn = knn_accuracy(
        f.train.to(dev),
        f.train_labels,
        f.test.to(dev),
        f.test_labels,
        k=k,
        temperature=knn_temperature,
    )
    linear = linear_probe(f.train, f.train_labels, f.test, f.test_labels, seed=seed, device=dev)
    return {"knn": knn, "linear": linear}


# =========================================================================== label efficiency


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_ints(name: str, values: object, minimum: int) -> tuple[int, ...]:
    """``values`` as a tuple of distinct ints >= ``minimum`` (else ValueError naming ``name``)."""
    ok = isinstance(values, Sequence) and not isinstance(values, str) and len(values) > 0
    ok = ok and all(_is_int(v, minimum) for v in values) and len(set(values)) == len(values)
    if not ok:
        raise ValueError(
            f"{name} must be a non-empty sequence of distinct ints >= {minimum}, got {values!r}"
        )
    return tuple(values)


def label_efficiency(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    shots: Sequence[int] = (1, 5, 10, 50),
    seeds: Sequence[int] = (0, 1, 2),
    *,
    epochs: int = 100,
    device: torch.device | str | None = None,
) -> dict[str, list]:
    """Linear-probe test accuracy with ``k`` labelled training images per class, over seeds.

    For every ``k`` in ``shots`` and every seed, :func:`~cl_lib.evaluate.few_label_subset`
    draws ``k`` images per class and :func:`~cl_lib.evaluate.linear_probe` (seeded alike) is
    trained on their features and tested on all test features. Returns ``shots``, ``seeds``,
    ``accuracy`` (one list over seeds per ``k``), ``mean`` and ``std`` (ddof 1; 0 for one seed).
    """
    shots = _check_ints("shots", shots, 1)
    seeds = _check_ints("seeds", seeds, 0)
    for name, x in (("train_features", train_features), ("test_features", test_features)):
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 2:
            raise ValueError(f"{name} must be a 2-D floating-point tensor, got {x!r:.60}")
    if not isinstance(train_labels, Tensor) or train_labels.shape != train_features.shape[:1]:
        raise ValueError(
            f"train_labels must be a tensor of shape ({train_features.shape[0]},) "
            f"to match train_features"
        )
    counts = torch.bincount(train_labels.cpu().long()[train_labels.cpu() >= 0])
    smallest = int(counts[counts > 0].min()) if counts.numel() else 0
    if max(shots) > smallest:
        raise ValueError(
            f"shots must not exceed the smallest class of train_labels ({smallest} images), "
            f"got {max(shots)}"
        )
    accuracy = []
    for k in shots:
        row = []
        for seed in seeds:
            idx = few_label_subset(train_labels, k, seed=seed).to(train_features.device)
            row.append(
                linear_probe(
                    train_features[idx],
                    train_labels[idx],
                    test_features,
                    test_labels,
                    epochs=epochs,
                    seed=seed,
                    device=device,
                )
            )
        accuracy.append(row)
    acc = np.asarray(accuracy, dtype=np.float64)
    std = acc.std(axis=1, ddof=1) if len(seeds) > 1 else np.zeros(len(shots))
    return {
        "shots": list(shots),
        "seeds": list(seeds),
        "accuracy": accuracy,
        "mean": acc.mean(axis=1).tolist(),
        "std": std.tolist(),
    }


# =========================================================================== 2-D maps

EMBEDDING_METHODS: tuple[str, ...] = ("tsne", "umap")


def embedding_2d(
    features: Tensor | np.ndarray,
    method: str = "tsne",
    seed: int = 0,
    *,
    perplexity: float = 30.0,
    normalize: bool = True,
    threads: int | None = 1,
) -> np.ndarray:
    """A 2-D map (float32 ``(N, 2)``) of ``features`` ``(N, D)`` for plotting.

    ``method="tsne"``: scikit-learn's t-SNE (PCA initialisation, ``perplexity`` capped at
    ``(N - 1) / 3``); ``"umap"``: UMAP (needs the ``umap-learn`` package). Rows are
    L2-normalised first when ``normalize`` (the cosine geometry the losses use). ``threads``
    caps the OpenMP and BLAS threads during the fit (1 by default: on a busy or small machine
    more threads mostly spin; ``None`` keeps the libraries' defaults). The result is
    deterministic for a given ``seed`` on a given machine.
    """
    if method not in EMBEDDING_METHODS:
        raise ValueError(f"method must be one of {EMBEDDING_METHODS}, got {method!r}")
    if not _is_int(seed, 0):
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if not isinstance(perplexity, (int, float)) or not perplexity > 0:
        raise ValueError(f"perplexity must be a number > 0, got {perplexity!r}")
    x = features.detach().cpu().numpy() if isinstance(features, Tensor) else features
    if not isinstance(x, np.ndarray) or x.ndim != 2 or not np.issubdtype(x.dtype, np.floating):
        raise ValueError("features must be a 2-D floating-point tensor or array")
    if x.shape[0] < 4:
        raise ValueError(f"features must have at least 4 rows, got {x.shape[0]}")
    if threads is not None and not _is_int(threads, 1):
        raise ValueError(f"threads must be an int >= 1 or None, got {threads!r}")
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    with threadpool_limits(limits=threads):
        return _fit_2d(x, method, seed, float(perplexity), normalize)


def _fit_2d(
    x: np.ndarray, method: str, seed: int, perplexity: float, normalize: bool
) -> np.ndarray:
    """The fit behind :func:`embedding_2d` (arguments already checked)."""
    x = x.astype(np.float64)
    if normalize:
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if method == "umap":
        try:
            import umap
        except ImportError:
            raise ImportError("method='umap' needs the umap-learn package") from None
        reducer = umap.UMAP(n_components=2, random_state=seed)
        return reducer.fit_transform(x).astype(np.float32)
    from sklearn.manifold import TSNE

    tsne = TSNE(
        n_components=2,
        perplexity=min(perplexity, (x.shape[0] - 1) / 3),
        init="pca",
        random_state=seed,
    )
    return tsne.fit_transform(x).astype(np.float32)


# =========================================================================== reporting


def accuracy_table(rows: Mapping[str, Mapping[str, float | str | None]]) -> str:
    """A text table: one row per run, one column per metric, accuracies in % to 3 digits.

    A value given as a string (e.g. from :meth:`cl_lib.recorded.Recorded.near`) is printed as is.
    """
    if not rows:
        raise ValueError("rows must map at least one run name to its metrics")
    columns = list(dict.fromkeys(c for metrics in rows.values() for c in metrics))
    width = max(len(name) for name in rows) + 2
    lines = [f"{'run':<{width}}" + "".join(f"{c:>16}" for c in columns)]
    for name, metrics in rows.items():
        cells = []
        for c in columns:
            value = metrics.get(c)
            text = "n/a" if value is None else value if isinstance(value, str) else _pct3(value)
            cells.append(f"{text:>16}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def _pct3(x: float) -> str:
    """``x`` (a fraction) as a percentage with 3 significant digits."""
    if not math.isfinite(x):
        return f"{x}"
    return f"{float(f'{100 * x:.3g}'):g}%"


def run_time(history: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Seconds of training and of per-epoch evaluation recorded in a run's ``history``.

    The history is restored with a checkpoint, so a resumed run reports the time of all its
    epochs, not only of those trained since the last restart.
    """
    if isinstance(history, (str, bytes)) or not isinstance(history, Sequence):
        raise ValueError(f"history must be a sequence of per-epoch records, got {history!r:.60}")
    train = sum(float(r["train_time_s"]) for r in history)
    evaluation = sum(float(r.get("eval_time_s") or 0.0) for r in history)
    return {"epochs": len(history), "train_s": train, "eval_s": evaluation}
