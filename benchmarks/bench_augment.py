"""Augmentation benchmark: cl_lib's batched recipes against torchvision's per-sample pipeline.

Both produce two SimCLR views of every image of a synthetic uint8 CIFAR-sized dataset (no
download). cl_lib converts a uint8 batch to float and calls :func:`cl_lib.augment.make_views`
in the main process (``torch.get_num_threads()`` threads); torchvision runs the classic
per-sample PIL pipeline (RandomResizedCrop, RandomHorizontalFlip, RandomApply(ColorJitter),
RandomGrayscale, ToTensor) in a ``DataLoader`` with one worker per CPU core. Throughput is in
source images per second (each yields two views); repetitions alternate between pipelines.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from benchmarks import common
from cl_lib.augment import make_augment, make_views

IMAGE_SIZE = 32
REFERENCE = "cl_lib simclr_cifar (batched)"


def synthetic_images(count: int, seed: int = 0) -> torch.Tensor:
    """``count`` random uint8 images ``(count, 3, 32, 32)`` with smooth structure."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(count, 3, 8, 8, generator=g)
    smooth = torch.nn.functional.interpolate(coarse, size=IMAGE_SIZE, mode="bilinear")
    noise = 0.1 * torch.rand(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    return ((smooth + noise).clamp(0, 1) * 255).to(torch.uint8)


def torchvision_simclr_transform() -> T.Compose:
    """SimCLR's CIFAR augmentation as per-sample torchvision (v1) transforms on PIL images."""
    return T.Compose(
        [
            T.RandomResizedCrop(IMAGE_SIZE),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToTensor(),
        ]
    )


class TwoViewDataset(Dataset):
    """PIL images of a uint8 tensor, each returned as two independently transformed views."""

    def __init__(self, images: torch.Tensor, transform: Callable[[Image.Image], torch.Tensor]):
        self.images = [Image.fromarray(img.permute(1, 2, 0).numpy()) for img in images]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        return self.transform(image), self.transform(image)


def _cl_lib_epoch(
    images: torch.Tensor,
    recipe: str,
    batch: int,
    generator: torch.Generator,
    threads: int | None = None,
) -> Callable[[], int]:
    """One pass over ``images`` in batches with cl_lib (uint8 -> float, two views).

    ``threads`` pins torch's intra-op threads for the pass (restored afterwards).
    """
    augment = make_augment(recipe, IMAGE_SIZE)

    def run() -> int:
        saved = torch.get_num_threads()
        if threads is not None:
            torch.set_num_threads(threads)
        done = 0
        try:
            for start in range(0, images.shape[0], batch):
                x = images[start : start + batch].float().div_(255.0)
                views = make_views(x, augment, 2, generator)
                done += views.shape[1]
        finally:
            torch.set_num_threads(saved)
        return done

    return run


def _torchvision_epoch(loader: DataLoader) -> Callable[[], int]:
    """One pass over the DataLoader."""

    def run() -> int:
        done = 0
        for view0, _ in loader:
            done += view0.shape[0]
        return done

    return run


def run(
    batches: Sequence[int],
    num_batches: int,
    repeats: int,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Images/s of cl_lib (simclr_cifar, shapes) and torchvision for each batch size."""
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    cases: list[dict[str, Any]] = []
    for batch in batches:
        images = synthetic_images(batch * num_batches)
        loader = DataLoader(
            TwoViewDataset(images, torchvision_simclr_transform()),
            batch_size=batch,
            num_workers=workers,
            persistent_workers=workers > 0,
        )
        generator = torch.Generator().manual_seed(0)
        threads = torch.get_num_threads()
        pipelines = {
            REFERENCE: _cl_lib_epoch(images, "simclr_cifar", batch, generator),
            "cl_lib shapes (batched)": _cl_lib_epoch(images, "shapes", batch, generator),
        }
        if threads > 1:
            pipelines["cl_lib simclr_cifar (batched, 1 thread)"] = _cl_lib_epoch(
                images, "simclr_cifar", batch, generator, threads=1
            )
        pipelines[f"torchvision per-sample (DataLoader, {workers} workers)"] = _torchvision_epoch(
            loader
        )
        rates = _interleaved_rates(pipelines, repeats)
        reference = rates[REFERENCE]
        peer = rates[f"torchvision per-sample (DataLoader, {workers} workers)"]
        for name, samples in rates.items():
            summary = _rate_summary(samples)
            cases.append(
                {
                    "impl": name,
                    "batch": batch,
                    "images": batch * num_batches,
                    "images_per_s": summary,
                    "speedup_vs_torchvision": common.ratio(
                        summary["median"], _rate_summary(peer)["median"]
                    ),
                    "ratio_to_simclr_cifar": common.ratio(
                        summary["median"], _rate_summary(reference)["median"]
                    ),
                }
            )
        del loader
    augment = make_augment("simclr_cifar", IMAGE_SIZE)
    sample = synthetic_images(batches[-1]).float().div_(255.0)
    profile = common.profile_top_ops(lambda: make_views(sample, augment, 2), top=8)
    profile["batch"] = batches[-1]
    return {
        "image_size": IMAGE_SIZE,
        "views": 2,
        "num_batches": num_batches,
        "repeats": repeats,
        "num_workers": workers,
        "unit": "source images per second, two views each",
        "torch_threads": torch.get_num_threads(),
        "cases": cases,
        "profile_simclr_cifar": profile,
    }


def _interleaved_rates(pipelines: dict[str, Callable[[], int]], repeats: int) -> dict[str, list]:
    """Images/s of each pipeline per repetition, round-robin after one warm-up pass each."""
    for fn in pipelines.values():
        fn()
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    for rep in range(repeats):
        order = list(pipelines) if rep % 2 == 0 else list(reversed(pipelines))
        for name in order:
            start = time.perf_counter()
            count = pipelines[name]()
            rates[name].append(count / (time.perf_counter() - start))
    return rates


def _rate_summary(samples: Sequence[float]) -> dict[str, float]:
    """Median, IQR and count of throughput samples."""
    stats = common.summarise(samples)
    return {
        "median": stats["median_s"],
        "iqr": stats["iqr_s"],
        "q1": stats["q1_s"],
        "q3": stats["q3_s"],
        "repeats": stats["repeats"],
    }
