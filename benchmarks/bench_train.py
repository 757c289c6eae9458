"""Training-throughput benchmark: one SimCLR pre-training step, timed by phase.

A step = two augmented views on the device (:func:`cl_lib.augment.make_views`) + forward of
the encoder and projection head (:func:`cl_lib.models.build_model`) + NT-Xent
(:func:`cl_lib.losses.nt_xent_loss`) + backward + SGD step. Throughput is in source images
per second (each step sees ``2 * batch`` views). On CUDA, ``amp`` (bfloat16 autocast) and
``channels_last`` can be switched on.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks import common
from cl_lib.augment import make_augment, make_views
from cl_lib.losses import nt_xent_loss
from cl_lib.models import build_model

PHASES = ("augment", "forward", "loss", "backward", "optimizer")


def _step_phases(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    augment: torch.nn.Module,
    generator: torch.Generator,
    amp: bool,
    channels_last: bool,
) -> dict[str, float]:
    """Run one pre-training step and return the seconds spent in each phase."""
    device = images.device
    marks = [time.perf_counter()]

    def mark() -> None:
        common.synchronize(device)
        marks.append(time.perf_counter())

    views = make_views(images, augment, 2, generator)  # (2, B, C, H, W)
    batch = views.flatten(0, 1)
    if channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    mark()
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    )
    with autocast:
        _, z = model(batch)
        mark()
        loss = nt_xent_loss(z.view(2, images.shape[0], -1), temperature=0.5)
    mark()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    mark()
    optimizer.step()
    mark()
    return {name: marks[i + 1] - marks[i] for i, name in enumerate(PHASES)}


def run_case(
    backbone: str,
    batch: int,
    steps: int,
    warmup: int,
    device: torch.device,
    amp: bool = False,
    channels_last: bool = False,
    augment: str = "simclr_cifar",
) -> dict[str, Any]:
    """Images/s of ``steps`` timed pre-training steps after ``warmup`` steps."""
    torch.manual_seed(0)
    generator = torch.Generator(device=device).manual_seed(0)
    model = build_model(backbone).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    images = torch.rand(batch, 3, 32, 32, generator=generator, device=device)
    aug = make_augment(augment, 32)
    model.train()
    for _ in range(warmup):
        _step_phases(model, optimizer, images, aug, generator, amp, channels_last)
    per_step: list[dict[str, float]] = []
    for _ in range(steps):
        per_step.append(_step_phases(model, optimizer, images, aug, generator, amp, channels_last))
    totals = [sum(p.values()) for p in per_step]
    time_summary = common.summarise(totals)
    phases = {name: common.summarise([p[name] for p in per_step])["median_s"] for name in PHASES}
    return {
        "backbone": backbone,
        "batch": batch,
        "device": str(device),
        "amp": amp,
        "channels_last": channels_last,
        "augment": augment,
        "steps": steps,
        "warmup": warmup,
        "step_time": time_summary,
        "images_per_s": batch / time_summary["median_s"],
        "phase_median_s": phases,
        "phase_fraction": {k: v / sum(phases.values()) for k, v in phases.items()},
    }


def run(
    cases: Sequence[tuple[str, int, int, int]],
    devices: Sequence[torch.device],
) -> dict[str, Any]:
    """Every (backbone, batch, steps, warmup) on every device; CUDA adds amp/channels_last."""
    results = []
    for device in devices:
        variants = [(False, False)]
        if device.type == "cuda":
            variants += [(True, False), (True, True)]
        for backbone, batch, steps, warmup in cases:
            for amp, channels_last in variants:
                results.append(run_case(backbone, batch, steps, warmup, device, amp, channels_last))
    return {
        "step": "2 views (make_views) + forward + nt_xent_loss + backward + SGD step",
        "unit": "source images per second (2 views each)",
        "cases": results,
    }
