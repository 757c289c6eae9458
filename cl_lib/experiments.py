"""Experiment runner: named grids of config overrides x seeds on a base config.

An :class:`Experiment` is a base config (a YAML file plus overrides, one set per profile), a
list of *cells* (each a dict of ``key.sub -> value`` overrides) and seeds. :func:`run_experiment`
pre-trains every (cell, seed) with :func:`cl_lib.train.pretrain` in its own folder
(``runs/<name>/<cell>-s<seed>/``), evaluates it (:func:`evaluate_run`) and, after every finished
run, atomically rewrites ``results/<name>.json`` (``SCHEMA_VERSION``): the grid, every run
(cell, seed, full config, config hash, metrics, per-epoch history, wall time) and provenance
(git commit, dates, torch version, device, CPU / GPU, threads, command line).

Restarted after an interruption it skips the runs already recorded (same cell, seed and config
hash) and resumes a half-finished run from its checkpoint.

Command line::

    python -m cl_lib.experiments aug_strength [--full] [--seeds 0,1,2] [--out results]
    python -m cl_lib experiment aug_strength ...   (the same, through the main CLI)
"""

from __future__ import annotations

import argparse
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
    "cell_id",
    "config_hash",
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

SCHEMA_VERSION = 1
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


# Quick sizing (CPU, a shared 2-core machine): 2000 training / 1000 test shapes, batch 64,
# 13 epochs = 403 steps, no per-epoch kNN (only after the last epoch); about 2 minutes a run
# with one thread on a busy machine.
_QUICK = (
    "data.size=2000",
    "data.test_size=1000",
    "optim.batch_size=64",
    "optim.epochs=13",
    "eval_every=0",
    "checkpoint_every=1",
    "geometry_size=256",
)
# Full sizing (a GPU): the shapes recipe of configs/shapes_quick.yaml at full length.
_FULL_SHAPES = ("data.size=4000", "data.test_size=2000", "optim.epochs=22", "eval_every=11")
_FULL_CIFAR = ("optim.epochs=100",)  # 100 of the config's 200 epochs: 18-run grids


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
            quick_overrides=(
                *_QUICK,
                "data.size=4000",
                "data.imbalance_ratio=10.0",
                "optim.epochs=16",
            ),
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
                "larger steps (quick: 1625, 403 and 91 steps), so compare the two losses at "
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


def evaluate_run(result: Any, *, bias: bool, tail_classes: Sequence[int] = ()) -> dict[str, Any]:
    """Metrics of a finished :func:`cl_lib.train.pretrain` run (its ``TrainResult``).

    kNN (weighted, the run's k and temperature; clean training images as the memory bank, the
    test split as queries) with per-class accuracy, a linear probe, the same two on the
    projection ``z`` (``*_head``), the final alignment and uniformity of the training loop, the
    NT-Xent gap (:func:`measure_loss_gap`), the view measurements of :func:`measure_views` (on
    256 test images), collapse flags and, with ``bias``, :func:`measure_bias`.
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
        metrics["bias"] = measure_bias(model, augment, seed=cfg.seed, image_size=size)
    return metrics


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
    """Read a results file written by :func:`run_experiment` (checks the schema version)."""
    data = json.loads(Path(path).read_text())
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"results file {path} has schema_version {data.get('schema_version')!r}, "
            f"expected {SCHEMA_VERSION}"
        )
    return data


def _plan(
    exp: Experiment, full: bool, seeds: Sequence[int], extra: Sequence[str], runs_dir: Path
) -> list[dict[str, Any]]:
    """Every (cell, seed) with its config, seed-major (all cells of a seed, then the next)."""
    from cl_lib.train import config_to_dict, load_config

    base = exp.full_config if full and exp.full_config else exp.base_config
    base_path = Path(base) if Path(base).is_absolute() else REPO_ROOT / base
    profile_overrides = exp.full_overrides if full else exp.quick_overrides
    plan = []
    for seed in seeds:
        for cell in exp.cells:
            cid = cell_id(cell)
            out_dir = runs_dir / exp.name / f"{cid}-s{seed}"
            overrides = [
                *profile_overrides,
                *(_override(k, v) for k, v in cell.items()),
                *extra,
                f"seed={seed}",
                f"out_dir={json.dumps(str(out_dir))}",
            ]
            config = load_config(base_path, overrides)
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


def _fresh_results(exp: Experiment, full: bool, seeds: Sequence[int]) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "experiment": exp.name,
        "description": exp.description,
        "notes": exp.notes,
        "profile": "full" if full else "quick",
        "grid": {
            "base_config": exp.full_config if full and exp.full_config else exp.base_config,
            "profile_overrides": list(exp.full_overrides if full else exp.quick_overrides),
            "cells": [{"cell": cell_id(c), "params": dict(c)} for c in exp.cells],
            "seeds": list(seeds),
        },
        "provenance": None,
        "sessions": [],
        "runs": [],
    }


def run_experiment(
    exp: Experiment | str,
    *,
    full: bool = False,
    seeds: Sequence[int] | None = None,
    out: str | os.PathLike = "results",
    runs_dir: str | os.PathLike = "runs",
    overrides: Sequence[str] = (),
    progress: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run (or finish) every (cell, seed) of ``exp``; returns the results dict it wrote.

    ``out``/``<name>.json`` is rewritten atomically after each run. Runs already recorded
    with the same cell, seed and config hash are skipped; a run whose folder holds a
    checkpoint resumes from it. ``overrides`` (``key.sub=value``) apply to every run after
    the grid (e.g. a tiny smoke configuration).
    """
    from cl_lib.train import pretrain

    if isinstance(exp, str):
        if exp not in EXPERIMENTS:
            raise ValueError(f"exp must be one of {', '.join(EXPERIMENTS)}, got {exp!r}")
        exp = EXPERIMENTS[exp]
    seeds = tuple(exp.full_seeds if full else exp.seeds) if seeds is None else tuple(seeds)
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of ints >= 0, got {seeds}")
    path = Path(out) / f"{exp.name}.json"
    plan = _plan(exp, full, seeds, overrides, Path(runs_dir))
    results = load_results(path) if path.exists() else _fresh_results(exp, full, seeds)
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
    write_json(path, results)
    bar = runtime.progress(todo, desc=exp.name, **({} if progress else {"disable": True}))
    for item in bar:
        if progress:
            bar.set_postfix_str(f"{item['cell']} s{item['seed']}")
        start = time.perf_counter()
        try:
            train_result = pretrain(item["config"], resume=True, progress=verbose)
        except RuntimeError as error:  # e.g. a non-finite loss: record it, go on with the grid
            results.setdefault("failures", []).append(
                {"cell": item["cell"], "seed": item["seed"], "error": str(error), "at": _now()}
            )
            write_json(path, results)
            continue
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
                "finished": _now(),
            }
        )
        session["end"] = results["provenance"]["end"] = _now()
        write_json(path, results)
    session["end"] = results["provenance"]["end"] = _now()
    write_json(path, results)
    return results


# =========================================================================== summaries


def summarise(results: Mapping[str, Any], metric: str) -> list[dict[str, Any]]:
    """Per cell: n, mean, std (ddof 1), median, min, max of ``metric`` and the collapse count.

    ``metric`` is a key of a run's ``metrics`` or a dotted path into it (``bias.h.bias``).
    Cells keep the order of the grid; collapsed runs are included (and counted).
    """
    out = []
    for cell in results["grid"]["cells"]:
        runs = [r for r in results["runs"] if r["cell"] == cell["cell"]]
        values = [_lookup(r["metrics"], metric) for r in runs]
        t = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
        n = int(t.numel())
        out.append(
            {
                "cell": cell["cell"],
                "params": cell["params"],
                "n": n,
                "mean": float(t.mean()) if n else math.nan,
                "std": float(t.std()) if n > 1 else math.nan,
                "median": float(t.median()) if n else math.nan,
                "min": float(t.min()) if n else math.nan,
                "max": float(t.max()) if n else math.nan,
                "collapsed": sum(bool(r["metrics"].get("collapsed")) for r in runs),
                "seeds": [r["seed"] for r in runs],
            }
        )
    return out


def run_metric(run: Mapping[str, Any], metric: str) -> Any:
    """The value of ``metric`` (a key or dotted path such as ``bias.h.bias``) of one stored run."""
    return _lookup(run["metrics"], metric)


# =========================================================================== reading results

RESULTS_URL = "https://raw.githubusercontent.com/cl-book/contrastive-learning-book/main/results"
"""Web copy of the repository's ``results/`` (used on a fresh runtime such as Colab)."""


def load_stored(name: str) -> dict[str, Any]:
    """Stored ``results/NAME.json``: from the repository when present, else from its web copy."""
    for folder in (REPO_ROOT / "results", Path("results"), Path("../results")):
        if (folder / f"{name}.json").exists():
            return load_results(folder / f"{name}.json")
    target = Path(tempfile.gettempdir()) / f"{name}.json"
    urllib.request.urlretrieve(f"{RESULTS_URL}/{name}.json", target)  # fresh runtime (Colab)
    return load_results(target)


def print_provenance(results: Mapping[str, Any]) -> None:
    """Print where and how the stored runs of an experiment were made."""
    prov, runs = results["provenance"], results["runs"]
    commit = (prov["git_commit"] or "unknown")[:10] + (
        " (uncommitted changes)" if prov["git_dirty"] else ""
    )
    print(f"experiment {results['experiment']!r}, profile {results['profile']}: {len(runs)} runs")
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
    results: Mapping[str, Any], metrics: Mapping[str, str], scale: Mapping[str, float] | None = None
) -> None:
    """Print per cell: mean +- std over seeds, median, runs and collapsed runs of each metric."""
    scale = scale or {}
    width = max(len(c["cell"]) for c in results["grid"]["cells"]) + 2
    header = f"{'cell':<{width}}{'n':>3}{'collapsed':>10}"
    for label in metrics:
        header += f"  {label + ' mean+-std (median)':>34}"
    print(header)
    rows = {label: summarise(results, key) for label, key in metrics.items()}
    first = next(iter(rows.values()))
    for i, row in enumerate(first):
        line = f"{row['cell']:<{width}}{row['n']:>3}{row['collapsed']:>10}"
        for label, cells in rows.items():
            c, f = cells[i], scale.get(label, 1.0)
            std = "  n/a" if c["n"] < 2 else f"{f * c['std']:5.3g}"
            line += f"  {f * c['mean']:>14.3g} +- {std:>6} ({f * c['median']:.3g})"
        print(line)


def paired_differences(
    results: Mapping[str, Any],
    reference: str,
    metric: str = "knn_acc",
    cells: Sequence[str] | None = None,
) -> dict[str, list[float]]:
    """Per cell: ``metric`` minus the ``reference`` cell's on the same seed (seed order).

    The same seed means the same data, initialisation and augmentation draws, so paired
    differences remove most of the seed-to-seed spread. ``cells`` limits the comparison to these
    cells (default: all); cells without a common seed are left out.
    """
    ref = {
        r["seed"]: _lookup(r["metrics"], metric) for r in results["runs"] if r["cell"] == reference
    }
    if not ref:
        raise ValueError(f"reference must be a cell with runs, got {reference!r}")
    out: dict[str, list[float]] = {}
    for cell in results["grid"]["cells"]:
        if cell["cell"] == reference or (cells is not None and cell["cell"] not in cells):
            continue
        runs = sorted(
            (r for r in results["runs"] if r["cell"] == cell["cell"] and r["seed"] in ref),
            key=lambda r: r["seed"],
        )
        if runs:
            out[cell["cell"]] = [_lookup(r["metrics"], metric) - ref[r["seed"]] for r in runs]
    return out


def print_paired(
    results: Mapping[str, Any],
    reference: str,
    metric: str = "knn_acc",
    scale: float = 100.0,
    cells: Sequence[str] | None = None,
) -> None:
    """Print :func:`paired_differences` (times ``scale``): mean, std and how many seeds gained."""
    print(f"paired differences to {reference} ({metric} x {scale:g}), seeds present in both cells:")
    for cell, diffs in paired_differences(results, reference, metric, cells).items():
        t = scale * torch.tensor(diffs, dtype=torch.float64)
        sd = f"{float(t.std()):.3g}" if t.numel() > 1 else "n/a"
        better = int((t > 0).sum())
        print(
            f"  {cell:<44} mean {float(t.mean()):+.3g} (std {sd}), "
            f"better on {better} of {t.numel()} seeds"
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
    parser.add_argument("--full", action="store_true", help="GPU sizing (default: quick)")
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
    """Handler of the ``experiment`` subcommand; returns the exit status."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    results = run_experiment(
        args.name,
        full=args.full,
        seeds=args.seeds,
        out=args.out,
        runs_dir=args.runs_dir,
        overrides=args.overrides,
        progress=not args.no_progress,
        verbose=args.verbose,
    )
    metric = "knn_acc"
    for row in summarise(results, metric):
        print(
            f"{results['experiment']} {row['cell']}: kNN {100 * row['mean']:.1f}% "
            f"(n={row['n']}, std {100 * row['std']:.1f}, collapsed {row['collapsed']})"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cl_lib.experiments <name> [--full] [--seeds 0,1,2] [--out results]``."""
    parser = argparse.ArgumentParser(prog="python -m cl_lib.experiments", description=__doc__)
    configure_parser(parser)
    return run_experiment_cli(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
