"""Fake dataset files in torchvision's on-disk formats, for tests that must not download."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

CIFAR10_FILES = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]


def write_fake_cifar10(
    root: Path, per_batch: int, seed: int = 0
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """CIFAR-10 python batches (``root/cifar-10-batches-py``) of random pixels and labels.

    Every batch file holds ``per_batch`` images; returns ``{file: (data, labels)}``. The files
    cannot match torchvision's md5 sums: load them with ``check_integrity=False``.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in CIFAR10_FILES:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": labels}))
        written[name] = (data, labels)
    meta = {"label_names": [f"class{k}" for k in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return written
