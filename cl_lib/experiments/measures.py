"""What is measured of a finished run: accuracies, bias, the loss gap, views and rho.

Here: :func:`evaluate_run` (every metric a results file records for a run), the prototype
representation bias (:func:`measure_bias`, with the controls of the initial encoder and the
reference augmentation), the NT-Xent gap (:func:`measure_loss_gap`), the view measurements
(:func:`measure_views`), rho (:func:`measure_rho`) and :func:`initial_model`. Not here: the
training itself (:mod:`cl_lib.train`), the grid that calls them
(:mod:`cl_lib.experiments.runner`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from cl_lib.experiments.grids import REFERENCE_STRENGTH


@torch.no_grad()
def _embed_both(
    model: nn.Module, images: Tensor, augment: Callable | None, gen: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Backbone features h and projections z of (augmented) images, float32 on CPU."""
    dev = next(model.parameters()).device
    hs, zs = [], []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, images.shape[0], 512):
            x = images[start : start + 512].to(dev).float().div_(255.0)
            if augment is not None:
                x = augment(x, generator=gen)
            h, z = model(x)
            hs.append(h.float().cpu())
            zs.append(z.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(hs), torch.cat(zs)


def measure_bias(
    model: nn.Module,
    augment: Callable,
    *,
    seed: int,
    per_class: int = 100,
    instances: int = 300,
    num_views: int = 8,
    image_size: int = 32,
) -> dict[str, dict[str, Any]]:
    """Prototype bias of a shapes encoder, measured with the label oracle.

    Class prototypes: ``per_class`` fresh images per class (:class:`cl_lib.data.ShapesRenderer`),
    one augmented view each, mean of the normalised embeddings. Surrogates: ``num_views``
    augmented views of each of ``instances`` further fresh images. Returns, for the backbone
    representation ``h`` and the projection ``z``, the fields of
    :class:`cl_lib.evaluate.BiasReport` plus the mean prototype norm.
    """
    from cl_lib.data import SHAPE_CLASSES, ShapesRenderer
    from cl_lib.evaluate import prototype_bias
    from cl_lib.losses import class_prototypes

    if num_views < 2:
        raise ValueError(f"num_views must be >= 2, got {num_views}")
    classes = len(SHAPE_CLASSES)
    renderer = ShapesRenderer(image_size)
    gen = torch.Generator().manual_seed(10_000 + seed)
    proto_labels = torch.arange(classes).repeat_interleave(per_class)
    proto_images = renderer.render(proto_labels, gen)
    inst_labels = torch.randint(0, classes, (instances,), generator=gen)
    inst_images = renderer.render(inst_labels, gen)
    dev = next(model.parameters()).device
    aug_gen = torch.Generator(device=dev).manual_seed(20_000 + seed)
    proto = _embed_both(model, proto_images, augment, aug_gen)
    views = [_embed_both(model, inst_images, augment, aug_gen) for _ in range(num_views)]
    out: dict[str, dict[str, Any]] = {}
    for i, rep in enumerate(("h", "z")):
        mu = class_prototypes(proto[i], proto_labels, classes)
        report = prototype_bias(torch.stack([v[i] for v in views]), inst_labels, mu)
        out[rep] = {
            "bias": report.bias,
            "raw_distance": report.raw_distance,
            "variance_term": report.variance_term,
            "squared_bias": report.squared_bias,
            "per_class": [None if math.isnan(x) else x for x in report.per_class.tolist()],
            "num_views": report.num_views,
            "prototype_norm": float(mu.norm(dim=1).mean()),
        }
    return out


@torch.no_grad()
def measure_loss_gap(
    model: nn.Module,
    images: Tensor,
    augment: Callable,
    *,
    temperature: float,
    batch_sizes: Sequence[int] = (16, 64, 256),
    seed: int = 0,
) -> dict[str, float]:
    """Mean NT-Xent minus derived loss, ``log(1 + exp(s_ip/tau) / sum_k exp(s_ik/tau))``.

    Two augmented views of ``images`` are embedded once; the gap is averaged over every anchor
    of consecutive batches of each size (the batches' negatives only). Keys: batch sizes.
    """
    from cl_lib.evaluate import embed_views
    from cl_lib.losses import contrastive_components

    sizes = [b for b in batch_sizes if 2 <= b <= images.shape[0]]
    if not sizes:
        raise ValueError(
            f"batch_sizes must hold a size in [2, {images.shape[0]}], got {list(batch_sizes)}"
        )
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(30_000 + seed)
    z = embed_views(model, images, augment, 2, generator=gen, use_projection=True)
    out = {}
    for b in sizes:
        usable = (z.shape[1] // b) * b
        views = z[:, :usable].reshape(2, usable // b, b, -1).transpose(0, 1)  # (batches, 2, b, D)
        gaps = [contrastive_components(v, temperature=temperature).nt_xent_gap for v in views]
        out[str(b)] = float(torch.cat(gaps).mean())
    return out


VIEW_TEMPERATURES = (0.05, 0.1, 0.2, 0.5, 1.0)
"""Temperatures at which :func:`measure_views` evaluates the Jensen gap and effective negatives."""


@torch.no_grad()
def measure_views(
    model: nn.Module,
    images: Tensor,
    augment: Callable,
    *,
    num_views: int = 17,
    seed: int = 0,
) -> dict[str, Any]:
    """Chapter 5's measurements on ``num_views`` augmented views of ``images`` (projections z).

    The error of the attraction estimator with ``k`` views
    (:func:`cl_lib.practice.attraction_estimates`), the repulsion's Jensen gap and the effective
    number of negatives of a two-view batch of all the images at :data:`VIEW_TEMPERATURES`, and
    the lengths ``||z||`` the loss sees before any normalisation.
    """
    from cl_lib.evaluate import embed_views
    from cl_lib.practice import attraction_estimates, effective_negatives, jensen_gap

    if num_views < 3:
        raise ValueError(f"num_views must be >= 3, got {num_views}")
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(40_000 + seed)
    z = embed_views(model, images, augment, num_views, generator=gen, use_projection=True)
    ks = [k for k in (1, 2, 4, 8) if k < num_views - 1]
    estimates = attraction_estimates(z, ks)
    lengths = z.norm(dim=-1)
    return {
        "num_views": num_views,
        "num_images": int(images.shape[0]),
        "attraction_rms_error": {str(e.k): e.rms_error for e in estimates},
        "attraction_mean_error": {str(e.k): e.mean_error for e in estimates},
        "jensen_gap": {f"{t:g}": v for t, v in jensen_gap(z, VIEW_TEMPERATURES).items()},
        "effective_negatives": {
            f"{t:g}": v for t, v in effective_negatives(z, VIEW_TEMPERATURES).items()
        },
        "z_norm_mean": float(lengths.mean()),
        "z_norm_max": float(lengths.max()),
    }


@torch.no_grad()
def measure_rho(model: nn.Module, images: Tensor, augment: Callable, *, seed: int = 0) -> float:
    """:func:`cl_lib.collapse.collapse_ratio` of two augmented views of ``images`` (projections z).

    The views are drawn from a generator seeded with ``seed`` alone, so the same ``seed`` gives
    the same augmentations for any model (the initial and the trained encoder are compared on
    identical views).
    """
    from cl_lib.collapse import collapse_ratio
    from cl_lib.evaluate import embed_views

    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(50_000 + seed)
    z = embed_views(model, images, augment, 2, generator=gen, use_projection=True)
    return collapse_ratio(z[0], z[1])


def initial_model(config: Any, in_channels: int) -> nn.Module:
    """The encoder of a run at initialisation: as :func:`cl_lib.train.pretrain` builds it."""
    from cl_lib.models import build_model

    m = config.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # as the trainer does before building the model
        return build_model(
            m.backbone,
            in_channels=in_channels,
            head_hidden=m.head_hidden,
            head_out=m.head_out,
            head_layers=m.head_layers,
        )


RHO_IMAGES = 512
"""Test images whose two views measure rho (:func:`measure_rho`) at initialisation and the end."""


def evaluate_run(
    result: Any,
    *,
    bias: bool,
    tail_classes: Sequence[int] = (),
    reference_strength: float = REFERENCE_STRENGTH,
) -> dict[str, Any]:
    """Metrics of a finished :func:`cl_lib.train.pretrain` run (its ``TrainResult``).

    kNN (weighted, the run's k and temperature; clean training images as the memory bank, the
    test split as queries) with per-class accuracy, a linear probe, the same two on the
    projection ``z`` (``*_head``), the final alignment and uniformity of the training loop, the
    NT-Xent gap (:func:`measure_loss_gap`), the view measurements of :func:`measure_views` (on
    256 test images), ``rho`` at initialisation and at the end (:func:`measure_rho`, on
    :data:`RHO_IMAGES` test images), collapse flags and, with ``bias``, :func:`measure_bias`
    (``bias``) with its controls: the randomly initialised encoder of the same seed under the
    run's augmentation (``bias_init``), and the trained and the initial encoder under the
    reference augmentation of strength ``reference_strength`` (``bias_ref``,
    ``bias_init_ref``).
    """
    from cl_lib.augment import make_augment
    from cl_lib.data import load_dataset
    from cl_lib.evaluate import extract_features, knn_classify, linear_probe

    cfg = result.config
    d = cfg.data
    kw = {"root": d.root, "download": d.download, "seed": cfg.seed}
    train = load_dataset(d.name, "train", size=d.size, imbalance_ratio=d.imbalance_ratio, **kw)
    test = load_dataset(d.name, "test", size=d.test_size, **kw)
    model = result.model
    dev = next(model.parameters()).device
    bank = extract_features(model, train.images, device=dev)
    query = extract_features(model, test.images, device=dev)
    classes = train.num_classes
    k = min(cfg.knn_k, len(train))
    pred = knn_classify(
        bank, train.labels, query, k=k, temperature=cfg.knn_temperature, num_classes=classes
    )
    correct = (pred == test.labels).float()
    counts = torch.bincount(test.labels, minlength=classes).float()
    per_class = torch.bincount(test.labels, weights=correct, minlength=classes) / counts.clamp(1)
    last = result.history[-1] if result.history else {}
    summary = result.summary
    knn = float(correct.mean())
    bank_z = extract_features(model, train.images, device=dev, use_projection=True)
    query_z = extract_features(model, test.images, device=dev, use_projection=True)
    pred_z = knn_classify(
        bank_z, train.labels, query_z, k=k, temperature=cfg.knn_temperature, num_classes=classes
    )
    size = int(train.images.shape[-1])
    augment = make_augment(cfg.augment.name, size, cfg.augment.strength)
    init = initial_model(cfg, int(train.images.shape[1])).to(dev)
    rho_images = test.images[:RHO_IMAGES]
    metrics: dict[str, Any] = {
        "knn_acc": knn,
        "knn_per_class": per_class.tolist(),
        "linear_acc": linear_probe(bank, train.labels, query, test.labels, seed=cfg.seed),
        "knn_acc_head": float((pred_z == test.labels).float().mean()),
        "linear_acc_head": linear_probe(bank_z, train.labels, query_z, test.labels, seed=cfg.seed),
        "loss_gap": measure_loss_gap(
            model, test.images, augment, temperature=cfg.loss.temperature, seed=cfg.seed
        ),
        "views": measure_views(model, test.images[:256], augment, seed=cfg.seed),
        "rho": {
            "init": measure_rho(init, rho_images, augment, seed=cfg.seed),
            "final": measure_rho(model, rho_images, augment, seed=cfg.seed),
            "num_images": int(rho_images.shape[0]),
        },
        "alignment": last.get("alignment"),
        "uniformity": last.get("uniformity"),
        "final_loss": last.get("loss"),
        "knn_raw_pixels": summary.get("knn_raw_pixels"),
        "knn_random_init": summary.get("knn_random_init"),
        "collapsed": bool(summary.get("collapsed")),
        "collapsed_epochs": summary.get("collapsed_epochs", []),
        "chance_level": knn < 1.5 / classes,
        "train_class_counts": torch.bincount(train.labels, minlength=classes).tolist(),
        "steps": summary.get("steps"),
    }
    if tail_classes:
        tail = torch.tensor(list(tail_classes))
        head = torch.tensor([c for c in range(classes) if c not in set(tail_classes)])
        metrics["knn_tail"] = float(per_class[tail].mean())
        metrics["knn_head"] = float(per_class[head].mean())
    if bias:
        metrics.update(_bias_with_controls(model, init, cfg, size, reference_strength))
    return metrics


def _bias_with_controls(
    model: nn.Module, init: nn.Module, cfg: Any, size: int, reference_strength: float
) -> dict[str, Any]:
    """Bias of the trained and the initial encoder, under the run's and the reference augment."""
    from cl_lib import experiments  # the package: a measure_bias patched there is used
    from cl_lib.augment import make_augment

    measure_bias = experiments.measure_bias
    own = make_augment(cfg.augment.name, size, cfg.augment.strength)
    out = {
        "bias": measure_bias(model, own, seed=cfg.seed, image_size=size),
        "bias_init": measure_bias(init, own, seed=cfg.seed, image_size=size),
        "bias_reference_strength": reference_strength,
    }
    if cfg.augment.strength == reference_strength:  # the same measurement: reuse it
        out["bias_ref"], out["bias_init_ref"] = out["bias"], out["bias_init"]
    else:
        ref = make_augment(cfg.augment.name, size, reference_strength)
        out["bias_ref"] = measure_bias(model, ref, seed=cfg.seed, image_size=size)
        out["bias_init_ref"] = measure_bias(init, ref, seed=cfg.seed, image_size=size)
    return out
