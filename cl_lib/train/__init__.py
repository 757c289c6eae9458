"""Contrastive pre-training: typed configuration, training loop with exact resume, DDP.

* :class:`TrainConfig` (nested frozen dataclasses) and :func:`load_config` (YAML plus
  ``key.sub=value`` overrides, strictly typed);
* :func:`pretrain`: the training loop. Per step it samples a batch of indices, picks the view
  sources (:func:`cl_lib.data.view_sources`), gathers the uint8 images already on the device,
  augments them there, forwards all views in one batch and steps the optimiser (SGD, LARS or
  AdamW with linear warm-up and per-step cosine decay);
* atomic checkpoints (model, optimiser, scheduler, RNG states, history, config) and exact resume:
  on CPU a run killed after epoch ``k`` and resumed ends with bit-identical weights;
* per-epoch metrics (``metrics.json``): loss, lr, embedding spread and a collapse flag,
  alignment/uniformity on a fixed held-out subset, weighted kNN accuracy every ``eval_every``
  epochs, wall time; a final summary against raw pixels and a randomly initialised encoder;
* multi-process training under ``torchrun`` (DDP; gloo on CPU, nccl on CUDA).

This package re-exports the public names of its modules, one concern each:

========================================  =====================================================
``cl_lib.train.config``                   :class:`TrainConfig`, YAML loading and overrides
``cl_lib.train.optim``                    :class:`LARS`, :class:`WarmupCosine`, the optimisers
``cl_lib.train.ddp``                      process group, device, :class:`AllReduceBatchNorm`
``cl_lib.train.rng``                      the per-epoch random streams, saved RNG states
``cl_lib.train.components``               data, loss and helpers a run is built from
``cl_lib.train.trainer``                  one run: set-up, one step, one epoch, resume
``cl_lib.train.measure``                  kNN, alignment / uniformity, baselines during training
``cl_lib.train.loop``                     :func:`pretrain`, its epochs and summary
``cl_lib.train.checkpoint``               run-folder lock, atomic writes, reading checkpoints
``cl_lib.train.evaluation``               :func:`evaluate_checkpoint` of a finished run
``cl_lib.train.errors``                   the typed training errors
========================================  =====================================================
"""

from __future__ import annotations

from cl_lib.train.checkpoint import (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    LOCK_NAME,
    METRICS_NAME,
    RESUME_MUTABLE,
    SUMMARY_NAME,
)
from cl_lib.train.components import _build_loss, _class_weights, _loss_kwargs
from cl_lib.train.config import (
    OPTIMIZERS,
    AugmentConfig,
    DataConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)
from cl_lib.train.ddp import AllReduceBatchNorm, _Dist
from cl_lib.train.errors import (
    CheckpointError,
    NonFiniteLossError,
    RunFolderError,
    TrainingError,
    TrainingInterrupted,
)
from cl_lib.train.evaluation import evaluate_checkpoint, load_checkpoint_model
from cl_lib.train.loop import TrainResult, pretrain
from cl_lib.train.optim import LARS, WarmupCosine, _make_optimizer
from cl_lib.train.trainer import _Trainer

__all__ = [
    "AugmentConfig",
    "CheckpointError",
    "DataConfig",
    "LARS",
    "LossConfig",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimConfig",
    "RunFolderError",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "TrainingInterrupted",
    "AllReduceBatchNorm",
    "WarmupCosine",
    "config_from_dict",
    "config_to_dict",
    "evaluate_checkpoint",
    "load_checkpoint_model",
    "load_config",
    "pretrain",
]
# Not in __all__ but kept importable from here: the run-folder file names and
# RESUME_MUTABLE (users and tests read them), and the private helpers that cl_lib.collapse,
# benchmarks/gpu_check.py and the tests use (_Trainer, _Dist, _build_loss, _class_weights,
# _loss_kwargs, _make_optimizer).
_REEXPORTED = (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    LOCK_NAME,
    METRICS_NAME,
    OPTIMIZERS,
    RESUME_MUTABLE,
    SUMMARY_NAME,
    _Dist,
    _Trainer,
    _build_loss,
    _class_weights,
    _loss_kwargs,
    _make_optimizer,
)
