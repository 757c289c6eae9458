"""Experiment runner: named grids of config overrides x seeds on a base config.

An :class:`Experiment` is a base config (a YAML file plus overrides, one set per sizing), a
list of *cells* (each a dict of ``key.sub -> value`` overrides) and seeds. :func:`run_experiment`
pre-trains every (cell, seed) with :func:`cl_lib.train.pretrain` in its own folder
(``runs/<name>/<cell>-s<seed>-<hash>/``), evaluates it (:func:`evaluate_run`) and, after every
finished run, atomically rewrites ``results/<name>.json`` (``SCHEMA_VERSION``): the grid, every
run (cell, seed, full config, config hash, metrics, per-epoch history, wall time) and provenance
(git commit, dates, torch version, device, CPU / GPU, threads, command line).

Sizings: the default (profile ``quick``) is the shapes recipe of ``configs/shapes_quick.yaml``
(4000 training / 2000 test images, batch 128, 22 epochs, 682 steps), the one the chapters'
claims rest on; ``--full`` is the GPU sizing; ``--smoke`` a tiny sizing to check the pipeline
on a CPU, written to ``<out>/smoke/<name>.json`` and marked ``profile: smoke`` (no claim may
rest on it). A results file holds one configuration per cell: the runner refuses to add runs
of another configuration (another sizing, other ``--set`` overrides) to an existing file and
says which keys differ.

Restarted after an interruption it skips the runs already recorded (same cell, seed and config
hash) and resumes a half-finished run from its checkpoint. A run that raises is recorded under
``failures`` and the grid goes on; the command then exits with status 1.

Readers: :func:`summarise`, :func:`paired_differences`, :func:`paired_stats`,
:func:`print_table`, :func:`print_paired`; flags of bad runs come from
:func:`cl_lib.collapse.run_flags` (:func:`flagged_runs`).

Command line::

    python -m cl_lib.experiments aug_strength [--full | --smoke] [--seeds 0,1,2] [--out results]
    python -m cl_lib experiment aug_strength ...   (the same, through the main CLI)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cl_lib import runtime
from cl_lib.files import write_json
from cl_lib.provenance import REPO_ROOT, git_state, machine

__all__ = [
    "EXPERIMENTS",
    "SCHEMA_VERSION",
    "VIEW_TEMPERATURES",
    "Experiment",
    "PROFILES",
    "READABLE_SCHEMAS",
    "REFERENCE_STRENGTH",
    "RHO_IMAGES",
    "SMOKE_WARNING",
    "cell_hash",
    "cell_id",
    "config_hash",
    "flagged_runs",
    "initial_model",
    "measure_rho",
    "paired_stats",
    "configure_parser",
    "evaluate_run",
    "load_results",
    "main",
    "measure_bias",
    "measure_loss_gap",
    "measure_views",
    "provenance",
    "run_experiment",
    "run_experiment_cli",
    "load_stored",
    "paired_differences",
    "print_paired",
    "print_provenance",
    "print_table",
    "run_metric",
    "summarise",
]

SCHEMA_VERSION = 2
"""Version 2: default sizing = the shapes recipe, rho, bias controls, one configuration per cell."""
READABLE_SCHEMAS = (1, 2)
"""Versions :func:`load_results` reads (1: the stored results of the old quick sizing)."""
# Keys that do not change what a run computes (left out of the config hash).
_HASH_IGNORED = ("out_dir", "device", "checkpoint_every")


# =========================================================================== definitions


def cell_id(cell: Mapping[str, Any]) -> str:
    """A short, filesystem-safe name for a cell: ``strength=0.5,alpha=1.0`` style."""
    if not isinstance(cell, Mapping):
        raise ValueError(f"cell must be a mapping of overrides, got {type(cell).__name__}")
    parts = []
    for key, value in cell.items():
        short = key.split(".")[-1]
        if short == "name":
            continue
        text = ("1" if value else "0") if isinstance(value, bool) else value
        parts.append(f"{short}={text}")
    return ",".join(parts) or "base"


def _override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def config_hash(config_dict: Mapping[str, Any]) -> str:
    """SHA-256 (first 16 hex digits) of the config, without the keys that do not change results."""
    clean = {k: v for k, v in config_dict.items() if k not in _HASH_IGNORED}
    return hashlib.sha256(json.dumps(clean, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Experiment:
    """A named grid: base config + per-profile overrides, cells of overrides, seeds.

    Each cell is a dict of overrides, e.g. ``{"loss.alpha": 0.5}``, applied on top of the base
    config and the profile's overrides; the cell's name is :func:`cell_id`. ``bias`` asks
    :func:`evaluate_run` to measure the prototype bias (needs the shapes label oracle);
    ``tail_classes`` are reported separately (long-tailed data).
    """

    name: str
    description: str
    cells: tuple[dict[str, Any], ...]
    base_config: str = "configs/shapes_quick.yaml"
    quick_overrides: tuple[str, ...] = ()
    full_overrides: tuple[str, ...] = ()
    full_config: str | None = None  # None: base_config
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    full_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    bias: bool = False
    tail_classes: tuple[int, ...] = ()
    notes: str = ""

    def __post_init__(self) -> None:
        """Check the grid."""
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"name must be a non-empty identifier, got {self.name!r}")
        if not self.cells:
            raise ValueError("cells must hold at least one dict of overrides")
        ids = [cell_id(c) for c in self.cells]
        if len(set(ids)) != len(ids):
            raise ValueError(f"cells must be distinct, got {ids}")
        if not self.seeds or any(s < 0 for s in self.seeds):
            raise ValueError(f"seeds must be non-empty ints >= 0, got {self.seeds}")


# Default sizing (CPU, a shared 2-core machine): the recipe of configs/shapes_quick.yaml, 4000
# training / 2000 test shapes, batch 128, 22 epochs = 682 steps (NT-Xent: 78-84% kNN, about
# 1.5 minutes of training a run on 2 cores). kNN at epoch 11 and after the last; a checkpoint
# every epoch so that an interrupted run loses little.
_QUICK = (
    "data.size=4000",
    "data.test_size=2000",
    "optim.batch_size=128",
    "optim.epochs=22",
    "eval_every=11",
    "checkpoint_every=1",
    "geometry_size=256",
)
# Long-tailed shapes: 10000 rendered images subsampled to ratio 10 keep about 4080 (31 steps of
# 128 per epoch, as in the balanced recipe); the test split stays balanced.
_QUICK_LONG_TAILED = (*_QUICK, "data.size=10000", "data.imbalance_ratio=10.0")
# Smoke sizing: checks the pipeline in seconds a run; nothing is learned, so no claim may rest on
# it. Applied after a grid's own sizing; written to <out>/smoke/<name>.json.
_SMOKE = (
    "data.size=1024",
    "data.test_size=512",
    "optim.batch_size=64",
    "optim.epochs=3",
    "eval_every=0",
)
# Full sizing (a GPU): the shapes recipe of configs/shapes_quick.yaml at full length.
_FULL_SHAPES = ("data.size=4000", "data.test_size=2000", "optim.epochs=22", "eval_every=11")
_FULL_CIFAR = ("optim.epochs=100",)  # 100 of the config's 200 epochs: 18-run grids
PROFILES = ("quick", "full", "smoke")
"""Sizings of a grid: ``quick`` (the default, CPU), ``full`` (GPU), ``smoke`` (pipeline check)."""
REFERENCE_STRENGTH = 1.0
"""Augmentation strength of the fixed reference under which every model's bias is also measured."""


def _balanced(alpha: float, lam: float, include_positive: bool = False) -> dict[str, Any]:
    return {
        "loss.name": "balanced",
        "loss.alpha": alpha,
        "loss.lam": lam,
        "loss.include_positive": include_positive,
    }


def _practice(
    name: str, description: str, cells: tuple[dict[str, Any], ...], notes: str = ""
) -> Experiment:
    """A chapter-5 grid: the shapes recipe at quick / full sizing, three seeds."""
    return Experiment(
        name=name,
        description=description,
        cells=cells,
        quick_overrides=_QUICK,
        full_overrides=_FULL_SHAPES,
        seeds=(0, 1, 2),
        full_seeds=(0, 1, 2),
        notes=notes,
    )


EXPERIMENTS: dict[str, Experiment] = {
    e.name: e
    for e in (
        Experiment(
            name="aug_strength",
            description=(
                "A: prototype bias, kNN and linear-probe accuracy against the augmentation "
                "strength s (all ranges and probabilities of the shapes recipe scaled by s); "
                "SimCLR (NT-Xent, tau 0.2)."
            ),
            cells=tuple({"augment.strength": s} for s in (0.25, 0.5, 1.0)),
            quick_overrides=_QUICK,
            full_overrides=_FULL_SHAPES,
            bias=True,
        ),
        Experiment(
            name="debiased_positives",
            description=(
                "B: with probability p the positive view comes from another image of the same "
                "class (label oracle); p = 0 is SimCLR, p = 1 supervised-contrastive-like "
                "positives. Prototype bias and accuracy against p."
            ),
            cells=tuple({"data.same_class_prob": p} for p in (0.0, 0.25, 0.5, 1.0)),
            quick_overrides=_QUICK,
            full_overrides=_FULL_SHAPES,
            bias=True,
        ),
        Experiment(
            name="balance_grid",
            description=(
                "C: balanced contrastive loss around (alpha, lambda) = (1, 1), positive left out "
                "of the denominator (the derived loss at (1, 1)): the ratio lambda/alpha in "
                "{0.5, 1, 2} at alpha = 1, the scale in {0.5, 1, 2} at ratio 1, and NT-Xent "
                "(alpha = lambda = 1 with the positive in the denominator)."
            ),
            cells=(
                _balanced(1.0, 0.5),
                _balanced(1.0, 1.0),
                _balanced(1.0, 2.0),
                _balanced(0.5, 0.5),
                _balanced(2.0, 2.0),
                _balanced(1.0, 1.0, include_positive=True),
            ),
            quick_overrides=_QUICK,
            full_config="configs/cifar10_resnet18.yaml",
            full_overrides=_FULL_CIFAR,
            notes=(
                "Ratio x scale instead of a full 3x3 (alpha, lambda) grid: the loss at (c alpha, "
                "c lambda) is c times the loss at (alpha, lambda), so only the ratio changes the "
                "balance of the forces and c acts as a learning-rate factor (AdamW, used here, "
                "is nearly invariant to it). The cell with include_positive=1 is NT-Xent."
            ),
        ),
        Experiment(
            name="long_tailed",
            description=(
                "D: long-tailed shapes (imbalance ratio 10; test split balanced), balanced loss "
                "(alpha = lambda = 1) with and without class-balancing negative weights "
                "(inverse class frequency from the oracle labels, normalised to mean 1)."
            ),
            cells=(
                {**_balanced(1.0, 1.0), "loss.class_balanced": False},
                {**_balanced(1.0, 1.0), "loss.class_balanced": True},
            ),
            quick_overrides=_QUICK_LONG_TAILED,
            full_config="configs/cifar10_resnet18.yaml",
            full_overrides=(*_FULL_CIFAR, "data.imbalance_ratio=10.0"),
            tail_classes=(7, 8, 9),
            notes="Tail classes: the three rarest (7, 8, 9).",
        ),
        _practice(
            "temperature",
            "E (chapter 5): NT-Xent at temperatures tau in {0.05, 0.1, 0.2, 0.5, 1}: kNN and "
            "linear-probe accuracy, alignment and uniformity against tau (the sharpness of the "
            "smooth max).",
            tuple({"loss.temperature": t} for t in (0.05, 0.1, 0.2, 0.5, 1.0)),
        ),
        _practice(
            "normalisation",
            "F (chapter 5): NT-Xent and the derived loss (balanced, alpha = lambda = 1) on cosine "
            "similarities (normalize=1) and on raw dot products (normalize=0), tau 0.2.",
            (
                {"loss.name": "nt_xent", "loss.normalize": True},
                {"loss.name": "nt_xent", "loss.normalize": False},
                {**_balanced(1.0, 1.0), "loss.normalize": True},
                {**_balanced(1.0, 1.0), "loss.normalize": False},
            ),
            notes="A run that stops on a non-finite loss is recorded under 'failures'.",
        ),
        _practice(
            "batch_size",
            "G (chapter 5): NT-Xent against the derived loss (balanced, alpha = lambda = 1, "
            "positive left out of the denominator) at batch sizes 16, 64 and 256 (2N - 2 "
            "negatives per anchor), the same number of epochs.",
            tuple(
                {"optim.batch_size": b, **loss}
                for b in (16, 64, 256)
                for loss in ({"loss.name": "nt_xent"}, _balanced(1.0, 1.0))
            ),
            notes=(
                "Fixed epochs, as in SimCLR's batch-size study: a larger batch takes fewer, "
                "larger steps (quick: 5500, 1364 and 330 steps), so compare the two losses at "
                "each batch size rather than across batch sizes."
            ),
        ),
        _practice(
            "projection_head",
            "H (chapter 5): no projection head, a linear head and a 2-layer MLP head; kNN and "
            "linear-probe accuracy on the representation h (before the head) and on the "
            "projection z (after it).",
            tuple({"model.head_layers": n} for n in (0, 1, 2)),
        ),
    )
}


# =========================================================================== evaluation


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
    from cl_lib.augment import make_augment

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


# =========================================================================== provenance


def provenance(device: str = "auto") -> dict[str, Any]:
    """Where and how an experiment ran: git, dates, versions, hardware, command line."""
    commit, dirty = git_state()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "start": _now(),
        "end": None,
        **machine(device),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
    }


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# =========================================================================== runner


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results file written by :func:`run_experiment` (checks JSON and schema version)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"results file {path} is not valid JSON ({error}); restore it (git checkout) or "
            f"move it away and rerun the grid"
        ) from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version not in READABLE_SCHEMAS:
        raise ValueError(
            f"results file {path} has schema_version {version!r}, "
            f"expected one of {list(READABLE_SCHEMAS)}"
        )
    return data


def _profile(full: bool, smoke: bool) -> str:
    if full and smoke:
        raise ValueError("full and smoke exclude each other; choose one sizing")
    return "full" if full else "smoke" if smoke else "quick"


def _sizing(exp: Experiment, profile: str) -> tuple[str, tuple[str, ...]]:
    """Base config and profile overrides of ``exp`` at ``profile``."""
    if profile == "full":
        return exp.full_config or exp.base_config, exp.full_overrides
    if profile == "smoke":
        return exp.base_config, (*exp.quick_overrides, *_SMOKE)
    return exp.base_config, exp.quick_overrides


def cell_hash(config_dict: Mapping[str, Any]) -> str:
    """:func:`config_hash` without the seed: equal for every run of one cell configuration."""
    return config_hash({k: v for k, v in config_dict.items() if k != "seed"})


def _plan(
    exp: Experiment,
    full: bool,
    seeds: Sequence[int],
    extra: Sequence[str],
    runs_dir: Path,
    smoke: bool = False,
) -> list[dict[str, Any]]:
    """Every (cell, seed) with its config, seed-major (all cells of a seed, then the next).

    Run folders are ``runs_dir/<name>/<cell>-s<seed>-<first 8 hex digits of the config hash>``,
    so runs of different sizings or overrides never share (and never resume) a checkpoint.
    """
    from cl_lib.train import config_to_dict, load_config

    base, profile_overrides = _sizing(exp, _profile(full, smoke))
    base_path = Path(base) if Path(base).is_absolute() else REPO_ROOT / base
    plan = []
    for seed in seeds:
        for cell in exp.cells:
            cid = cell_id(cell)
            overrides = [
                *profile_overrides,
                *(_override(k, v) for k, v in cell.items()),
                *extra,
                f"seed={seed}",
            ]
            config = load_config(base_path, overrides)
            digest = config_hash(config_to_dict(config))
            out_dir = runs_dir / exp.name / f"{cid}-s{seed}-{digest[:8]}"
            config = dataclasses.replace(config, out_dir=str(out_dir))
            cdict = config_to_dict(config)
            plan.append(
                {
                    "cell": cid,
                    "params": dict(cell),
                    "seed": seed,
                    "config": config,
                    "config_dict": cdict,
                    "config_hash": config_hash(cdict),
                }
            )
    return plan


def _merged_cells(exp: Experiment, results: dict[str, Any]) -> list[dict[str, Any]]:
    """The experiment's cells, then any stored cell that still has runs (a grid was changed)."""
    cells = [{"cell": cell_id(c), "params": dict(c)} for c in exp.cells]
    known = {c["cell"] for c in cells}
    with_runs = {r["cell"] for r in results.get("runs", [])}
    old = [c for c in results["grid"]["cells"] if c["cell"] not in known and c["cell"] in with_runs]
    return cells + old


def _done_keys(results: dict[str, Any]) -> set[tuple[str, int, str]]:
    return {(r["cell"], r["seed"], r["config_hash"]) for r in results.get("runs", [])}


def _fresh_results(
    exp: Experiment, full: bool, seeds: Sequence[int], smoke: bool = False
) -> dict[str, Any]:
    profile = _profile(full, smoke)
    base, profile_overrides = _sizing(exp, profile)
    results = {
        "schema_version": SCHEMA_VERSION,
        "experiment": exp.name,
        "description": exp.description,
        "notes": exp.notes,
        "profile": profile,
        "grid": {
            "base_config": base,
            "profile_overrides": list(profile_overrides),
            "cells": [{"cell": cell_id(c), "params": dict(c)} for c in exp.cells],
            "seeds": list(seeds),
        },
        "provenance": None,
        "sessions": [],
        "runs": [],
    }
    if profile == "smoke":
        results["warning"] = SMOKE_WARNING
    return results


SMOKE_WARNING = "smoke sizing: a pipeline check, nothing is learned; no claim may rest on it"


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """``key: old -> new`` for the keys (ignoring seed and paths) where two configs differ."""
    a, b = _flat(old), _flat(new)
    ignored = {*_HASH_IGNORED, "seed"}
    keys = sorted(k for k in a.keys() | b.keys() if k not in ignored and a.get(k) != b.get(k))
    shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:6])
    return shown + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def _check_extendable(results: Mapping[str, Any], plan: Sequence[Mapping], path: Path) -> None:
    """Refuse to add runs of another configuration (or sizing) to an existing results file."""
    advice = (
        f"A results file holds one configuration per cell: move {path} away "
        f"(e.g. mkdir -p {path.parent}/old && git mv {path} {path.parent}/old/) "
        f"or write elsewhere with --out"
    )
    if results.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"results file {path} was written by an older runner (schema_version "
            f"{results.get('schema_version')!r}, now {SCHEMA_VERSION}); it is read as it is but "
            f"not extended. {advice}"
        )
    profile = plan[0]["profile"]
    if results.get("profile") != profile:
        raise ValueError(
            f"results file {path} holds the {results.get('profile')!r} sizing, this grid runs "
            f"at {profile!r}. {advice}"
        )
    stored: dict[str, Mapping[str, Any]] = {}
    for run in results.get("runs", []):
        stored.setdefault(run["cell"], run["config"])
    for item in plan:
        old = stored.get(item["cell"])
        if old is not None and cell_hash(old) != cell_hash(item["config_dict"]):
            raise ValueError(
                f"results file {path} holds runs of cell {item['cell']!r} made with another "
                f"configuration ({_config_diff(old, item['config_dict'])}); refusing to mix "
                f"them. {advice}"
            )


def run_experiment(
    exp: Experiment | str,
    *,
    full: bool = False,
    smoke: bool = False,
    seeds: Sequence[int] | None = None,
    out: str | os.PathLike = "results",
    runs_dir: str | os.PathLike = "runs",
    overrides: Sequence[str] = (),
    progress: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run (or finish) every (cell, seed) of ``exp``; returns the results dict it wrote.

    ``out``/``<name>.json`` (``smoke``: ``out``/``smoke``/``<name>.json``) is rewritten
    atomically after each run. Runs already recorded with the same cell, seed and config hash
    are skipped; a run whose folder holds a checkpoint resumes from it. ``overrides``
    (``key.sub=value``) apply to every run after the grid. An existing file whose runs were
    made with another configuration of a cell, another sizing or an older schema raises
    ``ValueError`` (nothing is run). A run that raises is recorded under ``failures`` (and
    counted in the session's ``failed_runs``); the grid goes on.
    """
    from cl_lib.train import pretrain

    if isinstance(exp, str):
        if exp not in EXPERIMENTS:
            raise ValueError(f"exp must be one of {', '.join(EXPERIMENTS)}, got {exp!r}")
        exp = EXPERIMENTS[exp]
    profile = _profile(full, smoke)
    seeds = tuple(exp.full_seeds if full else exp.seeds) if seeds is None else tuple(seeds)
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of ints >= 0, got {seeds}")
    folder = Path(out) / "smoke" if smoke else Path(out)
    path = folder / f"{exp.name}.json"
    plan = _plan(exp, full, seeds, overrides, Path(runs_dir) / ("smoke" if smoke else ""), smoke)
    for item in plan:
        item["profile"] = profile
    if path.exists():
        results = load_results(path)
        _check_extendable(results, plan, path)
    else:
        results = _fresh_results(exp, full, seeds, smoke)
    results["grid"]["seeds"] = sorted(set(results["grid"]["seeds"]) | set(seeds))
    results["grid"]["cells"] = _merged_cells(exp, results)
    session = provenance(plan[0]["config"].device)
    session["overrides"] = list(overrides)
    results["sessions"].append(session)
    if results["provenance"] is None:
        results["provenance"] = dict(session)
    done = _done_keys(results)
    todo = [p for p in plan if (p["cell"], p["seed"], p["config_hash"]) not in done]
    session["runs_planned"] = len(todo)
    session["failed_runs"] = 0
    write_json(path, results)
    bar = runtime.progress(todo, desc=exp.name, **({} if progress else {"disable": True}))
    for item in bar:
        if progress:
            bar.set_postfix_str(f"{item['cell']} s{item['seed']}")
        start = time.perf_counter()
        try:
            train_result = pretrain(item["config"], resume=True, progress=verbose)
        except Exception as error:  # e.g. a non-finite loss, a corrupt checkpoint: record it
            session["failed_runs"] += 1
            results.setdefault("failures", []).append(
                {
                    "cell": item["cell"],
                    "seed": item["seed"],
                    "config_hash": item["config_hash"],
                    "error": f"{type(error).__name__}: {error}",
                    "at": _now(),
                }
            )
            write_json(path, results)
            continue
        trained = time.perf_counter()
        metrics = evaluate_run(train_result, bias=exp.bias, tail_classes=exp.tail_classes)
        results["runs"].append(
            {
                "cell": item["cell"],
                "params": item["params"],
                "seed": item["seed"],
                "config_hash": item["config_hash"],
                "config": item["config_dict"],
                "metrics": metrics,
                "history": train_result.history,
                "wall_time_s": time.perf_counter() - start,
                "eval_time_s": time.perf_counter() - trained,
                "finished": _now(),
            }
        )
        session["end"] = results["provenance"]["end"] = _now()
        write_json(path, results)
    session["end"] = results["provenance"]["end"] = _now()
    write_json(path, results)
    return results


# =========================================================================== summaries


def _new_style(results: Mapping[str, Any]) -> bool:
    """Files of schema 2 and later are read with flags and intervals by default."""
    return int(results.get("schema_version", 1)) >= 2


def _exclude(results: Mapping[str, Any], exclude_flagged: bool | None) -> bool:
    return _new_style(results) if exclude_flagged is None else bool(exclude_flagged)


def _cell_runs(results: Mapping[str, Any], cell: str) -> list[Mapping[str, Any]]:
    """The runs of ``cell``; ValueError when it mixes configurations or repeats a seed."""
    runs = [r for r in results["runs"] if r["cell"] == cell]
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(
            f"results hold cell {cell!r} more than once for a seed (seeds {sorted(seeds)}): a "
            f"results file must hold one configuration per cell"
        )
    hashes = {cell_hash(r["config"]) for r in runs if "config" in r}
    if len(hashes) > 1:
        raise ValueError(
            f"results mix {len(hashes)} configurations in cell {cell!r}: a results file must "
            f"hold one configuration per cell"
        )
    return runs


def _flags(run: Mapping[str, Any]) -> dict[str, Any]:
    from cl_lib.collapse import run_flags

    return run_flags(run)


def flagged_runs(results: Mapping[str, Any], **thresholds: float) -> list[dict[str, Any]]:
    """Per run (grid order): cell, seed and :func:`cl_lib.collapse.run_flags` (``thresholds``:
    its keyword arguments ``plateau_margin``, ``plateau_share``, ``knn_margin``)."""
    from cl_lib.collapse import run_flags

    out = []
    for cell in results["grid"]["cells"]:
        for r in sorted(_cell_runs(results, cell["cell"]), key=lambda r: r["seed"]):
            out.append({"cell": r["cell"], "seed": r["seed"], **run_flags(r, **thresholds)})
    return out


def summarise(
    results: Mapping[str, Any], metric: str, *, exclude_flagged: bool | None = None
) -> list[dict[str, Any]]:
    """Per cell: n, mean, std (ddof 1), median, min, max of ``metric`` and the flag counts.

    ``metric`` is a key of a run's ``metrics`` or a dotted path into it (``bias.h.bias``).
    Cells keep the order of the grid. Flags (:func:`cl_lib.collapse.run_flags`): ``flagged``
    runs, of which ``flagged_plateau`` and ``flagged_knn``, ``flagged_seeds``; with
    ``exclude_flagged`` the statistics use the unflagged runs only (``n``; ``runs``: all) and
    ``excluded`` counts the others. Default: exclude on files of schema 2, keep every run of
    the old files (schema 1; the flags are still counted where the runs hold their config and
    history). ``collapsed``: the training loop's spread flag.
    """
    exclude = _exclude(results, exclude_flagged)
    out = []
    for cell in results["grid"]["cells"]:
        runs = _cell_runs(results, cell["cell"])
        flags_known = exclude or all("config" in r and "history" in r for r in runs)
        flags = [_flags(r) if flags_known else None for r in runs]
        kept = [r for r, f in zip(runs, flags, strict=True) if not (exclude and f["flagged"])]
        values = [_lookup(r["metrics"], metric) for r in kept]
        t = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
        n = int(t.numel())
        row = {
            "cell": cell["cell"],
            "params": cell["params"],
            "n": n,
            "mean": float(t.mean()) if n else math.nan,
            "std": float(t.std()) if n > 1 else math.nan,
            "median": float(t.median()) if n else math.nan,
            "min": float(t.min()) if n else math.nan,
            "max": float(t.max()) if n else math.nan,
            "collapsed": sum(bool(r["metrics"].get("collapsed")) for r in runs),
            "seeds": [r["seed"] for r in kept],
            "runs": len(runs),
            "excluded": len(runs) - len(kept),
        }
        if flags_known:
            row["flagged"] = sum(f["flagged"] for f in flags)
            row["flagged_plateau"] = sum(f["plateau"] for f in flags)
            row["flagged_knn"] = sum(f["knn"] for f in flags)
            row["flagged_seeds"] = [
                r["seed"] for r, f in zip(runs, flags, strict=True) if f["flagged"]
            ]
        out.append(row)
    return out


def run_metric(run: Mapping[str, Any], metric: str) -> Any:
    """The value of ``metric`` (a key or dotted path such as ``bias.h.bias``) of one stored run."""
    return _lookup(run["metrics"], metric)


# =========================================================================== reading results


def load_stored(name: str) -> dict[str, Any]:
    """Stored ``results/NAME.json``: from the checkout when there is one, else from the source.

    Outside a checkout (Colab) the file comes from the repository the notebook installed
    ``cl_lib`` from (:func:`cl_lib.source.results_location`, which ``CL_BOOK_SOURCE``
    overrides); a failure raises :class:`cl_lib.source.SourceError` saying what to do.
    """
    from cl_lib.source import SOURCE_ENV, SourceError, results_location

    for folder in (REPO_ROOT / "results", Path("results"), Path("../results")):
        if (folder / f"{name}.json").exists():
            return load_results(folder / f"{name}.json")
    location = results_location()
    advice = (
        "Run the chapter inside a clone of the course repository, or set "
        f"{SOURCE_ENV} to a local clone or to the fork or branch that holds results/{name}.json."
    )
    if isinstance(location, Path):
        if not (location / f"{name}.json").is_file():
            raise SourceError(f"{location / f'{name}.json'} does not exist. {advice}")
        return load_results(location / f"{name}.json")
    url = f"{location}/{name}.json"
    target = Path(tempfile.gettempdir()) / f"{name}.json"
    try:
        urllib.request.urlretrieve(url, target)
    except (OSError, ValueError) as err:  # URLError and HTTPError are OSErrors
        raise SourceError(
            f"Could not fetch the stored results from {url} ({err}). {advice}"
        ) from None
    print(f"stored results {name}.json fetched from {url}")
    return load_results(target)


def print_provenance(results: Mapping[str, Any]) -> None:
    """Print where and how the stored runs of an experiment were made."""
    prov, runs = results["provenance"], results["runs"]
    commit = (prov["git_commit"] or "unknown")[:10] + (
        " (uncommitted changes)" if prov["git_dirty"] else ""
    )
    print(f"experiment {results['experiment']!r}, profile {results['profile']}: {len(runs)} runs")
    if results["profile"] == "smoke":
        print(f"  WARNING: {results.get('warning', SMOKE_WARNING)}")
    overrides = {}
    for item in results["grid"]["profile_overrides"]:  # later entries win, as in the runner
        key, value = item.split("=", 1)
        overrides.pop(key, None)
        overrides[key] = value
    settings = ", ".join(f"{k}={v}" for k, v in overrides.items())
    print(f"  base config {results['grid']['base_config']} with {settings}")
    machine = f"{prov['device']} ({prov['cpu']}), {prov['threads']} thread(s)"
    print(f"  code {commit}; torch {prov['torch']} on {machine}")
    total = sum(r["wall_time_s"] for r in runs)
    per_run = total / max(len(runs), 1)
    print(f"  {total / 60:.0f} min of run time in all, {per_run:.0f} s per run on average")


def print_table(
    results: Mapping[str, Any],
    metrics: Mapping[str, str],
    scale: Mapping[str, float] | None = None,
    *,
    exclude_flagged: bool | None = None,
) -> None:
    """Print per cell: mean +- std over seeds, median, runs and flagged runs of each metric.

    Files of schema 2 (and ``exclude_flagged=True``) show the flagged runs (``p``: plateau,
    ``k``: kNN not above random initialisation) and leave them out of the statistics; old
    files print as they always did (``collapsed``: the training loop's spread flag).
    """
    scale = scale or {}
    new = _new_style(results) or bool(exclude_flagged)
    width = max(len(c["cell"]) for c in results["grid"]["cells"]) + 2
    kw = {"exclude_flagged": exclude_flagged}
    rows = {label: summarise(results, key, **kw) for label, key in metrics.items()}
    first = next(iter(rows.values()))
    if new:
        header = f"{'cell':<{width}}{'runs':>5}{'flagged (p, k)':>16}{'n':>3}"
    else:
        header = f"{'cell':<{width}}{'n':>3}{'collapsed':>10}"
    for label in metrics:
        header += f"  {label + ' mean+-std (median)':>34}"
    print(header)
    for i, row in enumerate(first):
        if new:
            flags = f"{row['flagged']} ({row['flagged_plateau']}, {row['flagged_knn']})"
            line = f"{row['cell']:<{width}}{row['runs']:>5}{flags:>16}{row['n']:>3}"
        else:
            line = f"{row['cell']:<{width}}{row['n']:>3}{row['collapsed']:>10}"
        for label, cells in rows.items():
            c, f = cells[i], scale.get(label, 1.0)
            std = "  n/a" if c["n"] < 2 else f"{f * c['std']:5.3g}"
            line += f"  {f * c['mean']:>14.3g} +- {std:>6} ({f * c['median']:.3g})"
        print(line)


def _pairs(
    results: Mapping[str, Any],
    reference: str,
    metric: str,
    cells: Sequence[str] | None,
    exclude: bool,
) -> dict[str, tuple[list[float], list[int], list[int]]]:
    """Per cell: differences to ``reference`` on common seeds, their seeds, excluded seeds."""
    ref_runs = _cell_runs(results, reference)
    if not ref_runs:
        raise ValueError(f"reference must be a cell with runs, got {reference!r}")
    ref = {r["seed"]: r for r in ref_runs}
    out: dict[str, tuple[list[float], list[int], list[int]]] = {}
    for cell in results["grid"]["cells"]:
        if cell["cell"] == reference or (cells is not None and cell["cell"] not in cells):
            continue
        runs = sorted(
            (r for r in _cell_runs(results, cell["cell"]) if r["seed"] in ref),
            key=lambda r: r["seed"],
        )
        if not runs:
            continue
        diffs, seeds, excluded = [], [], []
        for r in runs:
            base = ref[r["seed"]]
            if exclude and (_flags(r)["flagged"] or _flags(base)["flagged"]):
                excluded.append(r["seed"])
                continue
            diffs.append(_lookup(r["metrics"], metric) - _lookup(base["metrics"], metric))
            seeds.append(r["seed"])
        out[cell["cell"]] = (diffs, seeds, excluded)
    return out


def paired_differences(
    results: Mapping[str, Any],
    reference: str,
    metric: str = "knn_acc",
    cells: Sequence[str] | None = None,
    *,
    exclude_flagged: bool | None = None,
) -> dict[str, list[float]]:
    """Per cell: ``metric`` minus the ``reference`` cell's on the same seed (seed order).

    The same seed means the same data, initialisation and augmentation draws, so paired
    differences remove most of the seed-to-seed spread. ``cells`` limits the comparison to these
    cells (default: all); cells without a common seed are left out. ``exclude_flagged`` drops a
    seed when either run of the pair is flagged (default: on files of schema 2); see
    :func:`paired_stats` for the counts and intervals.
    """
    pairs = _pairs(results, reference, metric, cells, _exclude(results, exclude_flagged))
    return {cell: diffs for cell, (diffs, _, _) in pairs.items()}


def paired_stats(
    results: Mapping[str, Any],
    reference: str,
    metric: str = "knn_acc",
    cells: Sequence[str] | None = None,
    *,
    exclude_flagged: bool | None = None,
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Per cell: the paired differences to ``reference`` with their Student-t interval.

    Keys: ``n`` (pairs used), ``mean``, ``std``, ``low``, ``high`` (the ``level`` interval,
    :func:`cl_lib.stats.paired_interval`), ``sign_holds`` (seeds whose difference has the sign
    of the mean), ``distinguishable`` (the interval excludes 0), ``verdict`` (``higher``,
    ``lower`` or ``not distinguishable at n seeds``), ``seeds``, ``differences``, and
    ``excluded`` / ``excluded_seeds``: pairs left out because a run was flagged.
    """
    from cl_lib.stats import paired_interval

    pairs = _pairs(results, reference, metric, cells, _exclude(results, exclude_flagged))
    out = {}
    for cell, (diffs, seeds, excluded) in pairs.items():
        iv = paired_interval(diffs, level)
        out[cell] = {
            **dataclasses.asdict(iv),
            "distinguishable": iv.distinguishable,
            "verdict": iv.verdict(),
            "seeds": seeds,
            "differences": diffs,
            "excluded": len(excluded),
            "excluded_seeds": excluded,
        }
    return out


def print_paired(
    results: Mapping[str, Any],
    reference: str,
    metric: str = "knn_acc",
    scale: float = 100.0,
    cells: Sequence[str] | None = None,
    *,
    exclude_flagged: bool | None = None,
    intervals: bool | None = None,
) -> None:
    """Print the paired differences to ``reference`` (times ``scale``), one line per cell.

    With ``intervals`` (default: on files of schema 2): :func:`paired_stats`, i.e. the mean,
    its 95% t interval, n, the seeds where the sign holds, the verdict and the pairs excluded
    for flags. Without (old files): mean, std and how many seeds gained.
    """
    if intervals is None:
        intervals = _new_style(results)
    if not intervals:
        print(
            f"paired differences to {reference} ({metric} x {scale:g}), seeds present in both "
            f"cells:"
        )
        for cell, diffs in paired_differences(
            results, reference, metric, cells, exclude_flagged=exclude_flagged
        ).items():
            t = scale * torch.tensor(diffs, dtype=torch.float64)
            sd = f"{float(t.std()):.3g}" if t.numel() > 1 else "n/a"
            better = int((t > 0).sum())
            print(
                f"  {cell:<44} mean {float(t.mean()):+.3g} (std {sd}), "
                f"better on {better} of {t.numel()} seeds"
            )
        return
    stats = paired_stats(results, reference, metric, cells, exclude_flagged=exclude_flagged)
    print(
        f"paired differences to {reference} ({metric} x {scale:g}), mean [95% t interval] "
        f"over seeds present in both cells, flagged pairs left out:"
    )
    for cell, st in stats.items():
        f = scale
        ci = "n/a" if st["n"] < 2 else f"[{f * st['low']:+.3g}, {f * st['high']:+.3g}]"
        sign = "higher" if st["mean"] > 0 else "lower"
        excluded = f"; {st['excluded']} flagged pair(s) left out" if st["excluded"] else ""
        if st["n"] == 0:
            print(f"  {cell:<44} no unflagged pair{excluded}")
            continue
        print(
            f"  {cell:<44} mean {f * st['mean']:+.3g} {ci}, n {st['n']}, {sign} on "
            f"{st['sign_holds']} of {st['n']} seeds: {st['verdict']}{excluded}"
        )


def _lookup(metrics: Mapping[str, Any], key: str) -> Any:
    node: Any = metrics
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"metric {key!r} not found (missing {part!r})")
        node = node[part]
    return node


# =========================================================================== command line


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be like 0,1,2, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds must be ints >= 0, got {text!r}")
    return seeds


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of the ``experiment`` command to ``parser``."""
    parser.add_argument("name", choices=sorted(EXPERIMENTS), help="experiment to run")
    sizing = parser.add_mutually_exclusive_group()
    sizing.add_argument("--full", action="store_true", help="GPU sizing (default: quick)")
    sizing.add_argument(
        "--smoke",
        action="store_true",
        help="tiny pipeline check, written to OUT/smoke/NAME.json (no claims)",
    )
    parser.add_argument("--seeds", type=_seeds, default=None, help="e.g. 0,1,2")
    parser.add_argument("--out", default="results", help="folder of <name>.json")
    parser.add_argument("--runs-dir", default="runs", help="folder of the run folders")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="key.sub=value",
        help="extra config override for every run (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="per-epoch lines of each run")


def run_experiment_cli(args: argparse.Namespace) -> int:
    """Handler of the ``experiment`` subcommand; returns the exit status (1: a run failed)."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    results = run_experiment(
        args.name,
        full=args.full,
        smoke=getattr(args, "smoke", False),
        seeds=args.seeds,
        out=args.out,
        runs_dir=args.runs_dir,
        overrides=args.overrides,
        progress=not args.no_progress,
        verbose=args.verbose,
    )
    if results["profile"] == "smoke":
        print(f"WARNING: {SMOKE_WARNING}")
    for row in summarise(results, "knn_acc", exclude_flagged=False):
        print(
            f"{results['experiment']} {row['cell']}: kNN {100 * row['mean']:.1f}% "
            f"(median {100 * row['median']:.1f}%, n={row['n']}, flagged {row['flagged']}: "
            f"plateau {row['flagged_plateau']}, kNN not above init {row['flagged_knn']})"
        )
    failed = results["sessions"][-1].get("failed_runs", 0)
    if failed:
        for f in results.get("failures", [])[-failed:]:
            print(f"FAILED {f['cell']} seed {f['seed']}: {f['error']}", file=sys.stderr)
        print(
            f"{failed} run(s) failed (recorded under 'failures'); rerun the command to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cl_lib.experiments <name> [--full] [--seeds 0,1,2] [--out results]``."""
    parser = argparse.ArgumentParser(prog="python -m cl_lib.experiments", description=__doc__)
    configure_parser(parser)
    return run_experiment_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
