"""The named experiment grids: cells of config overrides, seeds and sizings.

Here: :class:`Experiment` (a base config, its quick / full overrides, the cells, the seeds),
:data:`EXPERIMENTS` (every grid of the book, by name), the sizings (:data:`PROFILES`; quick,
full and smoke overrides), :func:`cell_id` and :func:`config_hash`. To add a grid, add an
:class:`Experiment` to :data:`EXPERIMENTS`; nothing else changes. Not here: running a grid
(:mod:`cl_lib.experiments.runner`), what a run measures (:mod:`cl_lib.experiments.measures`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Keys that do not change what a run computes (left out of the config hash).
_HASH_IGNORED = ("out_dir", "device", "checkpoint_every")


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
"""Sizings of a grid, ``quick`` (the default, CPU), ``full`` (GPU) or ``smoke`` (pipeline check)."""
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
