"""What a run measures of itself while it trains, beside the loss.

Here: the mixin :class:`_Measurements` of :class:`~cl_lib.train.trainer._Trainer`: the fixed
held-out subset, alignment and uniformity of two views of it, weighted kNN accuracy (clean
training images as the memory bank, the test split as queries) every ``eval_every`` epochs,
and the baselines of the final summary (raw pixels, the encoder at its initialisation). Not
here: the metrics themselves (:mod:`cl_lib.evaluate`), the evaluation of a checkpoint file
(:mod:`cl_lib.train.evaluation`).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from cl_lib.train.components import _labelled
from cl_lib.train.rng import _GEOMETRY, _derive_seed, _generator


class _Measurements:
    """Per-epoch measurements of a :class:`~cl_lib.train.trainer._Trainer` (its mixin)."""

    def _eval_setup(self) -> None:
        cfg = self.cfg
        n_test = len(self.test_data)
        n_geo = min(cfg.geometry_size, n_test)
        order = torch.randperm(n_test, generator=torch.Generator().manual_seed(cfg.seed))
        self.geometry_images = self.test_data.images[order[:n_geo]]
        self.bank_images, self.bank_labels = _labelled(
            self.train_data.images, self.train_data.labels
        )
        self.query_images, self.query_labels = _labelled(
            self.test_data.images, self.test_data.labels
        )
        k = min(cfg.knn_k, len(self.bank_labels))
        self.knn_kwargs = {"k": k, "temperature": cfg.knn_temperature}

    def knn(self, model: nn.Module) -> float:
        """Weighted kNN accuracy: clean training images as memory bank, test split as queries."""
        from cl_lib.evaluate import extract_features, knn_accuracy

        dev = self.device
        bank = extract_features(model, self.bank_images, device=dev).to(dev)
        query = extract_features(model, self.query_images, device=dev).to(dev)
        return knn_accuracy(bank, self.bank_labels, query, self.query_labels, **self.knn_kwargs)

    def geometry(self) -> tuple[float, float]:
        """Alignment and uniformity of two augmented views of the fixed held-out subset."""
        from cl_lib.evaluate import alignment, embed_views, uniformity

        gen = _generator(self.device, _derive_seed(self.cfg.seed, _GEOMETRY))
        z = embed_views(
            self.model,
            self.geometry_images,
            self.augment,
            2,
            generator=gen,
            device=self.device,
            use_projection=True,
        )
        unif = 0.5 * (uniformity(z[0]) + uniformity(z[1]))
        return float(alignment(z[0], z[1])), float(unif)

    def evaluate_epoch(self, record: dict[str, Any], last: bool) -> None:
        """Add alignment / uniformity and (every ``eval_every`` epochs) kNN to ``record``."""
        start = time.perf_counter()
        align, unif = self.geometry()
        record["alignment"], record["uniformity"] = align, unif
        every = self.cfg.eval_every
        due = last or (every > 0 and record["epoch"] % every == 0)
        record["knn_acc"] = self.knn(self.model) if due else None
        record["eval_time_s"] = time.perf_counter() - start

    def baselines(self) -> dict[str, float]:
        """kNN accuracy of raw pixels and of the same architecture at its initialisation."""
        from cl_lib.evaluate import knn_accuracy
        from cl_lib.models import build_model

        dev = self.device
        pixels = knn_accuracy(
            self.bank_images.to(dev).flatten(1).float() / 255,
            self.bank_labels,
            self.query_images.to(dev).flatten(1).float() / 255,
            self.query_labels,
            **self.knn_kwargs,
        )
        cuda = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(self.cfg.seed)  # the very initialisation of the trained model
            init = build_model(self.cfg.model.backbone, **self.model_kwargs).to(self.device)
        return {"knn_raw_pixels": pixels, "knn_random_init": self.knn(init)}
