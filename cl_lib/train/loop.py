"""The training loop: :func:`pretrain`, its epochs, and what it writes and says.

Here: :func:`pretrain` (distributed set-up, the locked run folder, Ctrl-C turned into
:class:`~cl_lib.train.errors.TrainingInterrupted`), ``_train`` (resume, then per epoch: train,
measure, checkpoint, ``metrics.json``; then the summary against raw pixels and a randomly
initialised encoder) and :class:`TrainResult`. Not here: one step and one epoch
(:mod:`cl_lib.train.trainer`), the run-folder lock and checkpoint files
(:mod:`cl_lib.train.checkpoint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import yaml
from torch import nn

from cl_lib.files import atomic_write, write_json
from cl_lib.train.checkpoint import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    SUMMARY_NAME,
    _run_folder,
    _writing,
)
from cl_lib.train.config import TrainConfig, config_to_dict
from cl_lib.train.ddp import _Dist, _setup_distributed
from cl_lib.train.errors import TrainingInterrupted
from cl_lib.train.trainer import _Trainer


@dataclass
class TrainResult:
    """What :func:`pretrain` returns: the trained (unwrapped) model and where things are."""

    model: nn.Module
    history: list[dict[str, Any]]
    summary: dict[str, Any]
    config: TrainConfig
    out_dir: Path
    checkpoint_path: Path
    metrics_path: Path


def pretrain(config: TrainConfig, *, resume: bool = True, progress: bool = True) -> TrainResult:
    """Pre-train a contrastive model as ``config`` says; see the module docstring.

    ``resume`` continues from ``out_dir/checkpoint.pt`` when it exists. ``progress`` shows
    tqdm bars and per-epoch lines (rank 0 only). The run holds ``out_dir`` with a lock that
    ends with its process; errors, each saying what to do (what was saved is kept):

    * :class:`NonFiniteLossError` (a :class:`TrainingError`, a ``RuntimeError``): non-finite
      loss or weights; the last good checkpoint stays untouched;
    * :class:`RunFolderError` (likewise): ``out_dir`` is in use by another run, cannot be
      created, or a write into it failed (full disk);
    * :class:`CheckpointError` (a ``ValueError``): the checkpoint to resume from is damaged;
    * :class:`TrainingInterrupted` (a ``KeyboardInterrupt``): Ctrl-C; says where to resume.
    """
    if not isinstance(config, TrainConfig):
        raise ValueError(f"config must be a TrainConfig, got {type(config).__name__}")
    ctx, device = _setup_distributed(config.device)
    try:
        with _run_folder(Path(config.out_dir), ctx):
            try:
                return _pretrain(config, ctx, device, resume, progress)
            except TrainingInterrupted:
                raise
            except KeyboardInterrupt:
                message = _interrupted_message(Path(config.out_dir), None)
                raise TrainingInterrupted(message) from None
    finally:
        if ctx.owns_group:
            dist.destroy_process_group()


def _pretrain(
    config: TrainConfig, ctx: _Dist, device: torch.device, resume: bool, progress: bool
) -> TrainResult:
    out_dir = Path(config.out_dir)
    trainer = _Trainer(config, ctx, device)
    try:
        return _train(trainer, out_dir, resume, progress)
    except KeyboardInterrupt:
        raise TrainingInterrupted(_interrupted_message(out_dir, trainer)) from None


def _train(trainer: _Trainer, out_dir: Path, resume: bool, progress: bool) -> TrainResult:
    """The epochs of :func:`pretrain` and its summary (``out_dir`` is locked)."""
    config, ctx, device = trainer.cfg, trainer.ctx, trainer.device
    if resume and trainer.ckpt_path.exists():
        trainer.restore()
    if ctx.is_main:
        text = yaml.safe_dump(config_to_dict(config), sort_keys=False).encode()
        with _writing(out_dir / CONFIG_NAME):
            atomic_write(out_dir / CONFIG_NAME, lambda f: f.write(text))
    show = progress and ctx.is_main
    say = print if ctx.is_main else (lambda *a, **k: None)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    opt = config.optim
    stopped = False
    for epoch in range(trainer.epoch, opt.epochs):
        record = trainer.run_epoch(epoch, show)
        if record is None:
            stopped = True
            trainer.save(trainer.stop_state)
            break
        last = epoch + 1 == opt.epochs
        trainer.evaluate_epoch(record, last)
        trainer.history.append(record)
        every = config.checkpoint_every
        if last or (every > 0 and (epoch + 1) % every == 0):
            trainer.save(None)
        _write_metrics(trainer)
        knn = "" if record["knn_acc"] is None else f" knn {100 * record['knn_acc']:.1f}%"
        flag = " COLLAPSED" if record["collapsed"] else ""
        say(
            f"epoch {epoch + 1}/{opt.epochs} loss {record['loss']:.4f} lr {record['lr']:.3g} "
            f"align {record['alignment']:.3f} unif {record['uniformity']:.3f}{knn}{flag} "
            f"({record['train_time_s']:.1f}s)",
            flush=True,
        )
    if stopped or not trainer.history or trainer.history[-1].get("knn_acc") is None:
        final_knn = trainer.knn(trainer.model)  # max_steps runs end mid-schedule
    else:
        final_knn = trainer.history[-1]["knn_acc"]
    summary = {
        "knn_k": trainer.knn_kwargs["k"],
        "knn_trained": final_knn,
        **trainer.baselines(),
        "epochs_completed": trainer.epoch,
        "steps": trainer.epoch * trainer.steps_per_epoch + trainer.step_in_epoch,
        "stopped_by_max_steps": stopped,
        "collapsed": bool(trainer.history and trainer.history[-1]["collapsed"]),
        "collapsed_epochs": [r["epoch"] for r in trainer.history if r["collapsed"]],
    }
    _write_metrics(trainer)
    if ctx.is_main:
        with _writing(out_dir / SUMMARY_NAME):
            write_json(out_dir / SUMMARY_NAME, summary, indent=2)
    say(_summary_text(summary), flush=True)
    return TrainResult(
        model=trainer.model,
        history=trainer.history,
        summary=summary,
        config=config,
        out_dir=out_dir,
        checkpoint_path=trainer.ckpt_path,
        metrics_path=trainer.metrics_path,
    )


def _write_metrics(trainer: _Trainer) -> None:
    if trainer.ctx.is_main:
        with _writing(trainer.metrics_path):
            write_json(trainer.metrics_path, trainer.history, indent=2)


def _interrupted_message(out_dir: Path, trainer: _Trainer | None) -> str:
    """Where an interrupted run can be resumed from."""
    ckpt = out_dir / CHECKPOINT_NAME
    saved = trainer.saved_at if trainer is not None else None
    if saved is not None:
        epoch, step = saved
        at = f"after epoch {epoch}" + (f", step {step} of epoch {epoch + 1}" if step else "")
        return (
            f"interrupted; the run resumes from {ckpt} (saved {at}): run the same command again "
            f"(without --no-resume)"
        )
    if ckpt.exists():
        return f"interrupted; {ckpt} is kept: run the same command again to resume from it"
    return "interrupted before the first checkpoint; run the same command again to start over"


def _summary_text(summary: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    return (
        f"kNN accuracy (k={summary['knn_k']}): trained encoder {pct(summary['knn_trained'])}, "
        f"raw pixels {pct(summary['knn_raw_pixels'])}, "
        f"random init {pct(summary['knn_random_init'])}"
        + (" [COLLAPSED]" if summary.get("collapsed") else "")
    )
