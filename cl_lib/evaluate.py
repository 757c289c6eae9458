"""Evaluation of learned representations.

* features: :func:`extract_features`, :func:`embed_views` (K augmented views per image);
* downstream accuracy: weighted kNN (:func:`knn_classify`, :func:`knn_accuracy`) and a
  linear probe (:func:`linear_probe`), with :func:`few_label_subset` for few-label probes;
* geometry: :func:`alignment` and :func:`uniformity` (Wang & Isola 2020),
  :func:`positive_rank`;
* the prototype representation bias of chapter 3: :func:`prototype_bias`.

Everything is device-agnostic: computations run where the inputs (or ``device``) are.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cl_lib.runtime import autocast_off

Augment = Callable[[Tensor, "torch.Generator | None"], Tensor]  # (x, generator) -> views


# --------------------------------------------------------------------------- checks


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_positive(name: str, value: object) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_nonneg(name: str, value: object) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_features(name: str, x: object, ndim: int = 2) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if x.shape[-2] < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name} must be non-empty, got shape {tuple(x.shape)}")
    return x


def _check_finite(name: str, x: Tensor) -> None:
    """Raise if ``x`` holds NaN or inf (one host sync; evaluation is not a hot path)."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{name} must be finite, got NaN or inf values (did the encoder diverge? "
            f"check the run's loss)"
        )


def _check_labels(name: str, y: object, n: int, n_name: str) -> Tensor:
    if not isinstance(y, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(f"{name} must be an integer tensor, got dtype {y.dtype}")
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match {n_name}, got {tuple(y.shape)}")
    return y


def _check_images(images: object) -> Tensor:
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point in [0, 1], got {images.dtype}")
    return images


def _check_same_dim(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"{b_name} must have feature dimension {a.shape[-1]} like {a_name}, got {b.shape[-1]}"
        )


# --------------------------------------------------------------------------- features


def _to_float01(x: Tensor) -> Tensor:
    """uint8 in [0, 255] -> float32 in [0, 1]; float inputs are returned unchanged."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else fallback


def _pick(output: Tensor | tuple[Tensor, ...], use_projection: bool) -> Tensor:
    """The representation h (or projection z) from a model's output."""
    if isinstance(output, (tuple, list)):
        return output[1] if use_projection else output[0]
    if use_projection:
        raise ValueError("use_projection=True needs a model that returns (h, z)")
    return output


class _EvalMode:
    """Context manager: put a module in eval mode, then restore every submodule's mode."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.modes = [(m, m.training) for m in self.model.modules()]
        return self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for m, mode in self.modes:
            m.training = mode


@torch.no_grad()
def extract_features(
    model: nn.Module,
    images: Tensor,
    *,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    use_projection: bool = False,
) -> Tensor:
    """Features of ``images`` (uint8 (N, C, H, W) or float in [0, 1]), float32 (N, D) on CPU.

    ``use_projection`` picks ``z`` instead of ``h`` from a model that returns
    ``(h, z)``. The model runs in eval mode; its previous mode is restored.
    Features are not normalised (kNN and the geometry functions normalise).
    ``device`` defaults to the model's device.
    """
    images = _check_images(images)
    _check_int("batch_size", batch_size, 1)
    dev = torch.device(device) if device is not None else _model_device(model, images.device)
    chunks: list[Tensor] = []
    with _EvalMode(model):
        for start in range(0, images.shape[0], batch_size):
            x = _to_float01(images[start : start + batch_size].to(dev, non_blocking=True))
            chunks.append(_pick(model(x), use_projection).float())
    if not chunks:
        raise ValueError("images must contain at least one image, got N = 0")
    return torch.cat(chunks).cpu()


@torch.no_grad()
def embed_views(
    model: nn.Module,
    images: Tensor,
    augment: Augment,
    num_views: int,
    *,
    generator: torch.Generator | None = None,
    batch_size: int = 512,
    device: torch.device | str | None = None,
    use_projection: bool = False,
) -> Tensor:
    """Features of ``num_views`` augmented views of every image: float32 (K, N, D) on CPU.

    ``augment(x, generator)`` maps a float batch in [0, 1] on ``device`` to augmented
    views (``cl_lib.augment.BatchAugment`` fits); ``generator`` is passed through so the
    result is reproducible. Model mode is handled as in :func:`extract_features`.
    """
    images = _check_images(images)
    _check_int("num_views", num_views, 1)
    _check_int("batch_size", batch_size, 1)
    if not callable(augment):
        raise ValueError(f"augment must be callable (x, generator) -> x, got {augment!r}")
    if images.shape[0] == 0:
        raise ValueError("images must contain at least one image, got N = 0")
    dev = torch.device(device) if device is not None else _model_device(model, images.device)
    batches: list[Tensor] = []
    with _EvalMode(model):
        for start in range(0, images.shape[0], batch_size):
            x = _to_float01(images[start : start + batch_size].to(dev, non_blocking=True))
            views = [
                _pick(model(augment(x, generator)), use_projection).float()
                for _ in range(num_views)
            ]
            batches.append(torch.stack(views).cpu())
    return torch.cat(batches, dim=1)


# --------------------------------------------------------------------------- kNN


def _check_knn_inputs(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, k: int
) -> None:
    _check_features("train_features", train_features)
    _check_features("test_features", test_features)
    _check_same_dim("train_features", train_features, "test_features", test_features)
    _check_finite("train_features", train_features)
    _check_finite("test_features", test_features)
    n_train = train_features.shape[0]
    _check_labels("train_labels", train_labels, n_train, "train_features")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n_train:
        raise ValueError(f"k must be an int in [1, {n_train}] (the train set size), got {k!r}")


def _knn_chunk(
    bank: Tensor, labels: Tensor, queries: Tensor, k: int, temperature: float, num_classes: int
) -> Tensor:
    """Weighted-kNN labels of one chunk of queries against the normalised feature bank."""
    q = F.normalize(queries.to(bank.device).float(), dim=1)
    sim, idx = (q @ bank.T).topk(k, dim=1)
    weights = torch.exp((sim - 1.0) / temperature)  # exp(cos/T) up to a per-query factor
    votes = torch.zeros(q.shape[0], num_classes, device=bank.device, dtype=weights.dtype)
    votes.scatter_add_(1, labels[idx], weights)
    return votes.argmax(dim=1)


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Weighted kNN labels (Wu et al. 2018): cosine similarity, neighbour weight exp(cos / T).

    Each query's ``k`` most similar training features vote for their labels with
    weight ``exp(cos / temperature)``; the class with the largest total wins (ties:
    the smallest label). Runs on the train features' device, ``chunk_size`` queries
    at a time (memory O(chunk_size x N_train)). Returns int64 labels (N_test,).
    """
    _check_knn_inputs(train_features, train_labels, test_features, k)
    _check_positive("temperature", temperature)
    _check_int("chunk_size", chunk_size, 1)
    lo, hi = int(train_labels.min()), int(train_labels.max())  # one host sync per call
    if num_classes is None:
        num_classes = hi + 1
    _check_int("num_classes", num_classes, 1)
    if lo < 0 or hi >= num_classes:
        raise ValueError(
            f"train_labels must lie in [0, num_classes={num_classes}), got [{lo}, {hi}]"
        )
    dev = train_features.device
    bank = F.normalize(train_features.float(), dim=1)
    labels = train_labels.to(dev, torch.int64)
    with autocast_off(dev):
        out = [
            _knn_chunk(bank, labels, test_features[i : i + chunk_size], k, temperature, num_classes)
            for i in range(0, test_features.shape[0], chunk_size)
        ]
    return torch.cat(out)


def knn_accuracy(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    **kw,
) -> float:
    """Accuracy in [0, 1] of :func:`knn_classify` (keyword arguments passed on)."""
    _check_features("test_features", test_features)
    _check_labels("test_labels", test_labels, test_features.shape[0], "test_features")
    pred = knn_classify(train_features, train_labels, test_features, **kw)
    return (pred == test_labels.to(pred.device, torch.int64)).float().mean().item()


# --------------------------------------------------------------------------- linear probe


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 1e-4,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> float:
    """Test accuracy of a logistic-regression probe on frozen features.

    Features are standardised with the training mean and standard deviation; the
    linear classifier starts at zero and is trained with mini-batch SGD (Nesterov
    momentum 0.9, cosine learning-rate decay to 0, L2 penalty ``weight_decay``)
    on cross-entropy for ``epochs`` passes. Shuffling uses a CPU generator seeded with
    ``seed``, so the result is deterministic given ``seed`` on a deterministic backend.
    """
    _check_features("train_features", train_features)
    _check_features("test_features", test_features)
    _check_same_dim("train_features", train_features, "test_features", test_features)
    _check_finite("train_features", train_features)
    _check_finite("test_features", test_features)
    n = train_features.shape[0]
    _check_labels("train_labels", train_labels, n, "train_features")
    _check_labels("test_labels", test_labels, test_features.shape[0], "test_features")
    _check_int("epochs", epochs, 1)
    _check_positive("lr", lr)
    _check_nonneg("weight_decay", weight_decay)
    _check_int("batch_size", batch_size, 1)
    _check_int("seed", seed, 0)
    if int(train_labels.min()) < 0 or int(test_labels.min()) < 0:
        raise ValueError("train_labels and test_labels must be >= 0")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1

    dev = torch.device(device) if device is not None else train_features.device
    x_train = train_features.to(dev, torch.float32)
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-6)
    with autocast_off(dev), torch.enable_grad():
        clf = _fit_linear(
            (x_train - mean) / std,
            train_labels.to(dev, torch.int64),
            num_classes,
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            batch_size=batch_size,
            seed=seed,
        )
    with autocast_off(dev), torch.no_grad():
        pred = clf((test_features.to(dev, torch.float32) - mean) / std).argmax(dim=1)
        return (pred == test_labels.to(dev, torch.int64)).float().mean().item()


def _fit_linear(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
) -> nn.Linear:
    """Zero-initialised softmax regression trained with SGD + Nesterov and cosine decay."""
    n = x.shape[0]
    clf = nn.Linear(x.shape[1], num_classes).to(x.device)
    nn.init.zeros_(clf.weight)
    nn.init.zeros_(clf.bias)
    opt = torch.optim.SGD(
        clf.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=epochs * math.ceil(n / batch_size)
    )
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen).to(x.device, non_blocking=True)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            loss = F.cross_entropy(clf(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return clf


def few_label_subset(labels: Tensor, per_class: int, seed: int = 0) -> Tensor:
    """Indices (sorted, int64, on ``labels``' device) of ``per_class`` random samples per class.

    Every class present in ``labels`` contributes exactly ``per_class`` indices,
    drawn without replacement with a CPU generator seeded with ``seed``.
    """
    if not isinstance(labels, Tensor) or labels.ndim != 1:
        raise ValueError("labels must be a 1-D integer tensor")
    _check_labels("labels", labels, labels.shape[0], "labels")
    _check_int("per_class", per_class, 1)
    _check_int("seed", seed, 0)
    y = labels.cpu().to(torch.int64)
    perm = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(seed))
    sorted_y, order = torch.sort(y[perm], stable=True)
    classes, counts = torch.unique_consecutive(sorted_y, return_counts=True)
    if counts.numel() == 0 or int(counts.min()) < per_class:
        smallest = int(counts.min()) if counts.numel() else 0
        raise ValueError(
            f"per_class must be <= the size of the smallest class ({smallest}), got {per_class}"
        )
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(y.shape[0]) - torch.repeat_interleave(starts, counts)
    chosen = perm[order][rank < per_class]
    return chosen.sort().values.to(labels.device)


# --------------------------------------------------------------------------- geometry


def alignment(z1: Tensor, z2: Tensor, alpha: float = 2.0) -> Tensor:
    """Alignment (Wang & Isola 2020): mean of ||z1_i - z2_i||^alpha on L2-normalised rows."""
    _check_features("z1", z1)
    _check_features("z2", z2)
    if z1.shape != z2.shape:
        raise ValueError(f"z2 must have the shape of z1 {tuple(z1.shape)}, got {tuple(z2.shape)}")
    _check_positive("alpha", alpha)
    d = F.normalize(z1.float(), dim=1) - F.normalize(z2.float(), dim=1)
    return d.norm(dim=1).pow(alpha).mean()


def uniformity(z: Tensor, t: float = 2.0) -> Tensor:
    """Uniformity (Wang & Isola 2020): log mean_{i<j} exp(-t ||z_i - z_j||^2), normalised rows."""
    _check_features("z", z)
    if z.shape[0] < 2:
        raise ValueError(f"z must have at least 2 rows, got {z.shape[0]}")
    _check_positive("t", t)
    sq = torch.pdist(F.normalize(z.float(), dim=1), p=2).pow(2)
    return torch.logsumexp(-t * sq, dim=0) - math.log(sq.numel())


def positive_rank(anchors: Tensor, positives: Tensor) -> Tensor:
    """Rank (1 = best) of each anchor's own positive among all N positives, by cosine.

    ``rank_i = 1 + #{j : cos(a_i, p_j) > cos(a_i, p_i)}`` (ties count in the
    positive's favour). Returns int64 (N,). Memory O(N^2).
    """
    _check_features("anchors", anchors)
    _check_features("positives", positives)
    if anchors.shape != positives.shape:
        raise ValueError(
            f"positives must have the shape of anchors {tuple(anchors.shape)}, "
            f"got {tuple(positives.shape)}"
        )
    with autocast_off(anchors.device):
        a = F.normalize(anchors.float(), dim=1)
        p = F.normalize(positives.float(), dim=1)
        sim = a @ p.T
    own = sim.diagonal().unsqueeze(1)  # from the same matmul: no rounding mismatch
    return (sim > own).sum(dim=1) + 1


# --------------------------------------------------------------------------- prototype bias


@dataclass(frozen=True)
class BiasReport:
    """Prototype representation bias, split into bias and view-sampling variance.

    ``bias``: mean over instances of the corrected distance ||mu_y - m_x|| (see
    :func:`prototype_bias`); ``raw_distance``: mean ||mu_y - m_hat_x|| with the K-view
    mean; ``variance_term``: mean tr Cov(z) / K, the part of E||mu - m_hat||^2 due to
    finitely many views; ``per_class``: (C,) mean corrected distance per class (NaN for
    a class without instances); ``squared_bias``: mean of the unclipped corrected squared
    distances, an unbiased estimate of E_x ||mu_y - m_x||^2 (may be slightly negative).
    """

    bias: float
    raw_distance: float
    variance_term: float
    per_class: Tensor
    num_views: int
    squared_bias: float = math.nan


def prototype_bias(view_embeddings: Tensor, labels: Tensor, class_prototypes: Tensor) -> BiasReport:
    """Prototype representation bias ``E_x ||mu_{y(x)} - m_x||`` from K views per instance.

    ``view_embeddings`` (K, N, D) are raw embeddings of K augmented views of N
    instances (normalised here); ``class_prototypes`` (C, D) are the class means of
    normalised embeddings over many augmented samples (e.g.
    ``cl_lib.losses.class_prototypes``), used as they are.

    With ``m_hat`` the mean of the K normalised views,
    ``E ||mu - m_hat||^2 = ||mu - m||^2 + tr Cov(z) / K``. The variance term is
    estimated per instance with the unbiased sample variance across the K views
    (hence K >= 2) and subtracted, which gives an unbiased estimate of
    ``||mu - m||^2`` (its mean is ``squared_bias``). That estimate is clipped at 0
    per instance before the square root; the square root of a noisy estimate is
    biased (down by Jensen's inequality, up by the clipping) by an amount that
    shrinks as K grows, but unlike ``raw_distance`` it does not carry the
    ``tr Cov / K`` offset. Error in ``class_prototypes`` is not corrected.
    """
    _check_features("view_embeddings", view_embeddings, ndim=3)
    k, n, _ = view_embeddings.shape
    if k < 2:
        raise ValueError(f"view_embeddings must hold K >= 2 views (dim 0), got K = {k}")
    _check_labels("labels", labels, n, "view_embeddings.shape[1]")
    _check_features("class_prototypes", class_prototypes)
    _check_same_dim("view_embeddings", view_embeddings, "class_prototypes", class_prototypes)
    num_classes = class_prototypes.shape[0]
    dev = view_embeddings.device
    y = labels.to(dev, torch.int64)
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}) (rows of class_prototypes)")

    z = F.normalize(view_embeddings.float(), dim=-1)
    m_hat = z.mean(dim=0)
    mu = class_prototypes.to(dev, torch.float32)[y]
    raw_sq = (mu - m_hat).pow(2).sum(dim=1)
    var_term = z.var(dim=0, unbiased=True).sum(dim=1) / k
    corrected_sq = raw_sq - var_term
    dist = corrected_sq.clamp_min(0).sqrt()

    sums = torch.zeros(num_classes, device=dev).index_add_(0, y, dist)
    counts = torch.zeros(num_classes, device=dev).index_add_(0, y, torch.ones_like(dist))
    per_class = torch.where(counts > 0, sums / counts.clamp_min(1), torch.nan)
    return BiasReport(
        bias=dist.mean().item(),
        raw_distance=raw_sq.sqrt().mean().item(),
        variance_term=var_term.mean().item(),
        per_class=per_class.cpu(),
        num_views=k,
        squared_bias=corrected_sq.mean().item(),
    )
