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

Randomness. Every epoch derives its own generators from ``(seed, epoch, rank)``: the batch
order (shared by all ranks), the view sources and the augmentations. Together with the saved
generator, optimiser and scheduler states this makes resume exact.

BatchNorm under DDP. Per-rank BatchNorm statistics would differ from those of the combined
batch, so BatchNorm layers are synchronised: :class:`torch.nn.SyncBatchNorm` on CUDA, and on CPU
(where torch's SyncBatchNorm refuses CPU tensors) the small :class:`AllReduceBatchNorm`, which
all-reduces the batch sums differentiably. Either way one DDP step equals one single-process step
on the concatenated global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import math
import os
import random
import re
import socket
import time
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows: run folders are not locked)
    fcntl = None  # type: ignore[assignment]

from cl_lib import runtime
from cl_lib.files import atomic_write, write_json

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

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
SUMMARY_NAME = "summary.json"
CONFIG_NAME = "config.yaml"
LOCK_NAME = ".run.lock"  # advisory lock (fcntl.flock) held by the run writing the folder
OPTIMIZERS = ("sgd", "lars", "adamw")
# Config keys that may change between a checkpoint and its resumption.
RESUME_MUTABLE = frozenset(
    {
        "device",
        "out_dir",
        "checkpoint_every",
        "eval_every",
        "check_every",
        "optim.max_steps",
        "data.root",
        "data.download",
    }
)
# What a checkpoint must hold to resume training, and to be evaluated.
_RESUME_KEYS = (
    "config",
    "epoch",
    "step_in_epoch",
    "model",
    "model_kwargs",
    "optimizer",
    "scheduler",
    "scaler",
    "history",
    "rng",
    "mid_epoch",
)
_MODEL_KEYS = ("config", "epoch", "model", "model_kwargs")
_RESUME_ADVICE = (
    "start afresh in this folder with --no-resume (resume=False), which replaces it, "
    "or choose another out_dir"
)
# Streams of per-epoch randomness (see _derive_seed).
_ORDER, _VIEWS, _AUGMENT, _GEOMETRY = 0, 1, 2, 3


# =========================================================================== errors


class TrainingError(RuntimeError):
    """A run stopped by a fault it cannot repair itself; the message says what to do.

    Whatever was saved before (checkpoint, metrics) is kept.
    """


class NonFiniteLossError(TrainingError):
    """The loss or the weights became NaN or inf; the last good checkpoint is kept."""


class RunFolderError(TrainingError):
    """The run folder cannot be used: another run holds it, or it cannot be created or written."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: truncated, damaged, not a checkpoint, or incomplete."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during :func:`pretrain`; the message says where the run resumes from."""


# =========================================================================== configuration


@dataclass(frozen=True)
class DataConfig:
    """Dataset and positive-view sampling (see :func:`cl_lib.data.load_dataset`)."""

    name: str = "shapes"
    size: int | None = None  # number of training images (None: the dataset's default / all)
    test_size: int | None = None  # number of test images (None: default / all)
    imbalance_ratio: float | None = None  # long-tailed training split when set
    root: str = "data"
    download: bool = False
    same_class_prob: float = 0.0  # "debiased" positives from the label oracle
    n_views: int = 2

    def __post_init__(self) -> None:
        """Check value ranges."""
        _require(self.size is None or self.size >= 1, "data.size", "an int >= 1 or null")
        _require(
            self.test_size is None or self.test_size >= 2, "data.test_size", "an int >= 2 or null"
        )
        _require(
            self.imbalance_ratio is None or self.imbalance_ratio >= 1,
            "data.imbalance_ratio",
            "a float >= 1 or null",
        )
        _require(0.0 <= self.same_class_prob <= 1.0, "data.same_class_prob", "a float in [0, 1]")
        _require(self.n_views >= 2, "data.n_views", "an int >= 2")


@dataclass(frozen=True)
class AugmentConfig:
    """Batch augmentation (see :func:`cl_lib.augment.make_augment`)."""

    name: str = "shapes"
    strength: float = 1.0

    def __post_init__(self) -> None:
        """Check value ranges."""
        _require(0 <= self.strength <= 1, "augment.strength", "a float in [0, 1]")


@dataclass(frozen=True)
class ModelConfig:
    """Backbone and projection head (see :func:`cl_lib.models.build_model`)."""

    backbone: str = "small_cnn"
    head_hidden: int = 256
    head_out: int = 128
    head_layers: int = 2

    def __post_init__(self) -> None:
        """Check value ranges."""
        _require(self.head_hidden >= 1, "model.head_hidden", "an int >= 1")
        _require(self.head_out >= 1, "model.head_out", "an int >= 1")
        _require(self.head_layers >= 0, "model.head_layers", "an int >= 0")


@dataclass(frozen=True)
class LossConfig:
    """Contrastive loss (see :func:`cl_lib.losses.make_loss`); ``None`` keeps the loss default."""

    name: str = "nt_xent"
    temperature: float = 0.5
    alpha: float | None = None
    lam: float | None = None
    include_positive: bool | None = None
    tau_plus: float | None = None
    class_balanced: bool = False  # negatives weighted by inverse class frequency ("balanced")
    normalize: bool = True  # False: raw dot products (nt_xent, decoupled, balanced; chapter 5)

    def __post_init__(self) -> None:
        """Check value ranges."""
        _require(self.temperature > 0, "loss.temperature", "a float > 0")
        _require(self.alpha is None or self.alpha > 0, "loss.alpha", "a float > 0 or null")
        _require(self.lam is None or self.lam > 0, "loss.lam", "a float > 0 or null")
        if self.class_balanced and self.name != "balanced":
            raise ValueError(
                f"loss.class_balanced needs loss.name 'balanced', got loss.name {self.name!r}"
            )


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule: linear warm-up then cosine decay to 0, stepped every batch."""

    name: str = "adamw"
    lr: float = 1e-3
    base_batch_size: int | None = None  # if set, the lr used is lr * batch_size / base_batch_size
    weight_decay: float = 0.0
    momentum: float = 0.9  # sgd and lars
    lars_eta: float = 0.001  # LARS trust coefficient
    warmup_fraction: float = 0.1  # fraction of all steps spent warming up
    batch_size: int = 128  # global batch (all ranks together)
    epochs: int = 10
    max_steps: int | None = None  # stop early after this many steps (the schedule is unchanged)

    def __post_init__(self) -> None:
        """Check value ranges."""
        _require(self.name in OPTIMIZERS, "optim.name", f"one of {', '.join(OPTIMIZERS)}")
        _require(math.isfinite(self.lr) and self.lr > 0, "optim.lr", "a finite float > 0")
        _require(
            self.base_batch_size is None or self.base_batch_size >= 1,
            "optim.base_batch_size",
            "an int >= 1 or null",
        )
        _require(self.weight_decay >= 0, "optim.weight_decay", "a float >= 0")
        _require(0 <= self.momentum < 1, "optim.momentum", "a float in [0, 1)")
        _require(self.lars_eta > 0, "optim.lars_eta", "a float > 0")
        _require(0 <= self.warmup_fraction < 1, "optim.warmup_fraction", "a float in [0, 1)")
        _require(self.batch_size >= 2, "optim.batch_size", "an int >= 2")
        _require(self.epochs >= 1, "optim.epochs", "an int >= 1")
        _require(
            self.max_steps is None or self.max_steps >= 1, "optim.max_steps", "an int >= 1 or null"
        )

    @property
    def effective_lr(self) -> float:
        """Peak learning rate after the optional linear batch-size scaling."""
        if self.base_batch_size is None:
            return self.lr
        return self.lr * self.batch_size / self.base_batch_size


@dataclass(frozen=True)
class TrainConfig:
    """Everything a pre-training run needs; sections ``data``, ``augment``, ``model``, ``loss``,
    ``optim`` plus run-level settings."""

    seed: int = 0
    device: str = "auto"  # "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
    amp: bool = True  # CUDA only: bf16 autocast if supported, else fp16 with a GradScaler
    channels_last: bool = True  # CUDA only
    out_dir: str = "runs/default"
    checkpoint_every: int = 1  # epochs; 0: only at the end
    eval_every: int = 5  # kNN every k epochs (and after the last); 0: only after the last
    knn_k: int = 20
    knn_temperature: float = 0.07
    geometry_size: int = 512  # held-out test images for alignment / uniformity
    check_every: int = 50  # steps between host-side checks of the non-finite flag
    collapse_std: float = 0.05  # collapse flag: embedding spread below this
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def __post_init__(self) -> None:
        """Check value ranges."""
        _require(self.seed >= 0, "seed", "an int >= 0")
        _require(_valid_device(self.device), "device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
        _require(self.out_dir.strip() != "", "out_dir", "a non-empty folder path")
        _require(self.checkpoint_every >= 0, "checkpoint_every", "an int >= 0")
        _require(self.eval_every >= 0, "eval_every", "an int >= 0")
        _require(self.knn_k >= 1, "knn_k", "an int >= 1")
        _require(self.knn_temperature > 0, "knn_temperature", "a float > 0")
        _require(self.geometry_size >= 2, "geometry_size", "an int >= 2")
        _require(self.check_every >= 1, "check_every", "an int >= 1")
        _require(self.collapse_std >= 0, "collapse_std", "a float >= 0")


def _require(ok: bool, key: str, expected: str) -> None:
    if not ok:
        raise ValueError(f"config key {key!r} must be {expected}")


def _valid_device(device: str) -> bool:
    return device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", device) is not None


class _DuplicateKeyError(yaml.YAMLError):
    """A mapping that names the same key twice (YAML would silently keep the last one)."""

    def __init__(self, key: Any, line: int, first: int) -> None:
        super().__init__(f"key {key!r} appears twice, at lines {first} and {line}; keep one")
        self.key, self.line, self.first = key, line, first


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads ``1e-3`` (no dot) as a float, as YAML 1.2 does, and rejects
    duplicate keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """The mapping of ``node``; a key given twice raises :class:`_DuplicateKeyError`."""
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = self.construct_object(key_node), key_node.start_mark.line + 1
            if key in first:
                raise _DuplicateKeyError(key, line, first[key])
            first[key] = line
        return super().construct_mapping(node, deep=deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    args = typing.get_args(tp)
    return " or ".join("null" if a is type(None) else _type_name(a) for a in args)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; int -> float is the only widening."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            try:
                return _coerce(value, inner[0], key)
            except ValueError:
                pass
        raise ValueError(f"config key {key!r} must be {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if ok is None:
        raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module
    if not ok:
        raise ValueError(
            f"config key {key!r} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )
    return float(value) if tp is float else value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate the dataclass ``cls`` from the mapping ``raw`` with strict type checks."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"config key {prefix or '<root>'!r} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise ValueError(
                f"unknown config key {full!r}; expected one of {', '.join(sorted(names))}"
            )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in raw.items()}
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> TrainConfig:
    """A :class:`TrainConfig` from a nested mapping (unknown keys / wrong types: ValueError)."""
    return _build(TrainConfig, raw, "")


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as a nested dict of plain values (YAML / JSON / checkpoint friendly)."""
    return dataclasses.asdict(config)


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one ``key.sub=value`` override (value parsed as YAML) to the nested dict ``raw``."""
    if not isinstance(override, str) or "=" not in override:
        raise ValueError(f"overrides must be 'key.sub=value' strings, got {override!r}")
    key, text = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"override {override!r}: the key must be like 'optim.lr'")
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as error:
        raise ValueError(f"override {override!r}: the value is not valid YAML ({error})") from None
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            sub = ".".join(parts[: i + 1])
            raise ValueError(f"override {override!r}: config key {sub!r} is not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config (``None``: the defaults) and apply ``key.sub=value`` overrides.

    Values are parsed with a safe YAML loader (``1e-3`` is a float, ``null`` is None). Unknown
    keys and values of the wrong type raise ``ValueError`` naming the key and the expected type;
    an int where a float is expected is the only accepted widening.
    """
    raw: dict[str, Any] = {}
    if path is not None:
        text = _read_config_text(Path(path))
        try:
            loaded = yaml.load(text, Loader=_Loader)  # noqa: S506
        except _DuplicateKeyError as error:
            raise ValueError(f"config file {path}: {error}") from None
        except yaml.YAMLError as error:
            raise ValueError(f"config file {path}: invalid YAML ({error})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"config file {path} must hold a mapping, got {type(loaded).__name__}")
        raw = loaded or {}
    if isinstance(overrides, str):
        raise ValueError("overrides must be a list of 'key=value' strings, not one string")
    for override in overrides:
        _apply_override(raw, override)
    return config_from_dict(raw)


def _read_config_text(path: Path) -> str:
    """The text of a config file; a folder or an unreadable file raises ValueError."""
    if path.is_dir():
        raise ValueError(f"config file {path} is a folder; give a YAML file such as configs/*.yaml")
    try:
        return path.read_text()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not a text file"
        raise ValueError(f"config file {path} cannot be read ({reason})") from None


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# =========================================================================== optimisation


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017).

    For parameter groups with ``lars=True`` the update ``g + wd * w`` is scaled by the trust
    ratio ``eta * ||w|| / ||g + wd * w||`` (1 when either norm is 0); groups with
    ``lars=False`` (biases, normalisation parameters) get plain momentum SGD without weight
    decay. Everything stays on the device: no host syncs.
    """

    def __init__(
        self,
        params: Any,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "lars": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:  # type: ignore[override]
        """One update of every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if group["lars"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    u_norm = torch.linalg.vector_norm(update)
                    trust = torch.where(
                        (w_norm > 0) & (u_norm > 0),
                        group["eta"] * w_norm / u_norm,
                        torch.ones_like(w_norm),
                    )
                    update = update.mul(trust)
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = update.clone()
                else:
                    buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-group["lr"])
        return loss


class WarmupCosine:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to 0."""

    def __init__(self, warmup: int, total: int) -> None:
        self.warmup = warmup
        self.total = total

    def __call__(self, step: int) -> float:
        """Factor for the 0-based ``step``."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _make_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD, LARS (biases / norm parameters excluded from adaptation and decay) or AdamW."""
    lr = cfg.effective_lr
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    groups = [
        {"params": [p for p in params if p.ndim > 1], "lars": True},
        {"params": [p for p in params if p.ndim <= 1], "lars": False, "weight_decay": 0.0},
    ]
    return LARS(
        [g for g in groups if g["params"]],
        lr=lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
        eta=cfg.lars_eta,
    )


# =========================================================================== distributed


@dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # initialised by us: destroy at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"config key 'device' is {spec!r} but CUDA is not available")
    return device


def _setup_distributed(device_spec: str) -> tuple[_Dist, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(device_spec, local_rank if world > 1 else 0)
    if world <= 1:
        return _Dist(), device
    owns = False
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), local_rank, owns), device


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the backward all-reduces the gradient as well."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:  # type: ignore[override]
        """Sum ``tensor`` over all ranks."""
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        """The gradient of every rank's input is the sum of the output gradients."""
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics span all ranks (a CPU-capable SyncBatchNorm).

    The per-channel sums and squared deviations are all-reduced with the differentiable
    all-reduce of :class:`_AllReduceSum` (two passes, like a single-process
    BatchNorm on the concatenated batch). Without an initialised multi-rank process group, or
    in eval mode, it is a plain BatchNorm. Accepts ``(N, C)`` and ``(N, C, *)`` inputs.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"input must have shape (N, C, *), got {tuple(input.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        """Normalise ``x`` with global batch statistics when training under DDP."""
        self._check_input_dim(x)
        multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not (self.training and multi):
            return super().forward(x)
        all_reduce = _AllReduceSum.apply
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        local = torch.full((1,), x.numel() // x.shape[1], dtype=x.dtype, device=x.device)
        sums = all_reduce(torch.cat([x.sum(dims), local]))
        count = sums[-1]
        mean = sums[:-1] / count
        centred = x - mean.view(shape)
        var = all_reduce(centred.pow(2).sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum
                weight: float | Tensor = (
                    1.0 / self.num_batches_tracked if momentum is None else momentum
                )
                self.running_mean.lerp_(mean.detach(), weight)
                unbiased = var.detach() * count / (count - 1).clamp(min=1)
                self.running_var.lerp_(unbiased, weight)
        return y

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm1d/2d/3d of ``module`` by this class (same parameters)."""
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, cls):
            new = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
            )
            new.load_state_dict(module.state_dict())
            new.to(next(iter(module.state_dict().values())).device)
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module


# =========================================================================== helpers


def _derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed from ``(seed, *keys)`` (independent streams via NumPy's SeedSequence)."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """Global RNG states as plain values (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _nonfinite_message(epoch: int, step: int, last: Path | None) -> str:
    kept = f"the last good checkpoint is kept at {last}" if last else "no checkpoint was written"
    return (
        f"non-finite loss at epoch {epoch + 1}, step {step} (global, 0-based); stopping "
        f"({kept}). Try a lower optim.lr, a higher loss.temperature or a longer "
        f"optim.warmup_fraction: rerun with the new value in a new out_dir, or in this one "
        f"with --no-resume (resume=False), which starts afresh and replaces the checkpoint."
    )


def _embedding_spread(z: Tensor) -> Tensor:
    """Std of the normalised embeddings across the batch, times sqrt(D): ~0 when collapsed."""
    zn = F.normalize(z.detach().float(), dim=-1)
    return zn.std(dim=0).mean() * math.sqrt(zn.shape[-1])


# =========================================================================== results


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


# =========================================================================== training


def _load_data(cfg: TrainConfig, rank_zero_first: _Dist) -> tuple[Any, Any]:
    from cl_lib.data import load_dataset

    d = cfg.data

    def load() -> tuple[Any, Any]:
        kw = {"root": d.root, "download": d.download, "seed": cfg.seed}
        train = load_dataset(d.name, "train", size=d.size, imbalance_ratio=d.imbalance_ratio, **kw)
        test = load_dataset(d.name, "test", size=d.test_size, **kw)
        return train, test

    if rank_zero_first.world == 1:
        return load()
    if rank_zero_first.is_main:  # one rank downloads, the others wait for it
        out = load()
        dist.barrier()
        return out
    dist.barrier()
    return load()


def _labelled(images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """The labelled part of a dataset (drops UNLABELLED = -1 images)."""
    keep = labels >= 0
    if bool(keep.all()):
        return images, labels
    return images[keep], labels[keep]


def _loss_kwargs(cfg: LossConfig, class_weights: Tensor | None, gather: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"temperature": cfg.temperature}
    for key in ("alpha", "lam", "include_positive", "tau_plus"):
        value = getattr(cfg, key)
        if value is not None:
            kwargs[key] = value
    if not cfg.normalize:
        kwargs["normalize"] = False
    if class_weights is not None:
        kwargs["class_weights"] = class_weights
    if gather:
        kwargs["gather_distributed"] = True
    return kwargs


def _build_loss(cfg: LossConfig, class_weights: Tensor | None, gather: bool) -> nn.Module:
    from cl_lib.losses import make_loss

    kwargs = _loss_kwargs(cfg, class_weights, gather)
    try:
        return make_loss(cfg.name, **kwargs)
    except TypeError as error:
        raise ValueError(
            f"config section 'loss' sets a parameter that loss {cfg.name!r} does not take "
            f"({', '.join(sorted(kwargs))}): {error}"
        ) from None


def _class_weights(labels: Tensor, num_classes: int) -> Tensor:
    """Inverse class frequencies, normalised to mean 1 over the classes present."""
    counts = torch.bincount(labels[labels >= 0], minlength=num_classes).float()
    weights = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
    weights = weights * (counts > 0).sum() / weights.sum()
    return weights.clamp(min=1e-6)


class _Trainer:
    """State of one pre-training run (one per process under DDP)."""

    def __init__(self, config: TrainConfig, ctx: _Dist, device: torch.device) -> None:
        from cl_lib.augment import make_augment
        from cl_lib.models import build_model

        self.cfg, self.ctx, self.device = config, ctx, device
        opt = config.optim
        if opt.batch_size % ctx.world:
            raise ValueError(
                f"config key 'optim.batch_size' ({opt.batch_size}) must be divisible by the "
                f"number of processes ({ctx.world})"
            )
        self.local_batch = opt.batch_size // ctx.world
        if self.local_batch < 2:
            raise ValueError("config key 'optim.batch_size' must give >= 2 images per process")
        self.out_dir = Path(config.out_dir)
        self.ckpt_path = self.out_dir / CHECKPOINT_NAME
        self.metrics_path = self.out_dir / METRICS_NAME

        train, test = _load_data(config, ctx)
        self.train_data, self.test_data = train, test
        if len(test) < 2 or not bool((test.labels >= 0).any()):
            raise ValueError(
                f"config key 'data.test_size': the test split needs >= 2 images, some labelled "
                f"(alignment, uniformity and kNN use it), got {len(test)}"
            )
        self.steps_per_epoch = len(train) // opt.batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"config key 'optim.batch_size' ({opt.batch_size}) exceeds the number of "
                f"training images ({len(train)})"
            )
        self.total_steps = self.steps_per_epoch * opt.epochs
        self.images = train.images.to(device)
        self.labels = train.labels.to(device)
        channels, size = train.images.shape[1], train.images.shape[-1]
        self.augment = make_augment(config.augment.name, size, config.augment.strength)
        self.use_cuda = device.type == "cuda"
        self.channels_last = self.use_cuda and config.channels_last
        self.amp_dtype: torch.dtype | None = None
        if self.use_cuda and config.amp:
            # native bf16 only (Ampere+); a T4 emulates it slowly: fp16 + GradScaler there
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            self.amp_dtype = torch.bfloat16 if bf16 else torch.float16

        runtime.seed_everything(config.seed)
        m = config.model
        self.model_kwargs = {
            "in_channels": channels,
            "head_hidden": m.head_hidden,
            "head_out": m.head_out,
            "head_layers": m.head_layers,
        }
        model = build_model(m.backbone, **self.model_kwargs).to(device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model  # unwrapped
        self.net: nn.Module = model
        if ctx.world > 1:
            if self.use_cuda:
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            else:
                model = AllReduceBatchNorm.convert(model)
            self.model = model
            ids = [device.index] if self.use_cuda else None
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=ids)

        weights = None
        if config.loss.class_balanced:
            weights = _class_weights(train.labels, train.num_classes).to(device)
        self.loss_fn = _build_loss(config.loss, weights, gather=ctx.world > 1).to(device)
        self.loss_needs_labels = config.loss.name == "supcon" or weights is not None

        self.optimizer = _make_optimizer(self.model, opt)
        warmup = int(round(opt.warmup_fraction * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(warmup, self.total_steps)
        )
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.use_cuda
        )
        self.epoch = 0  # epochs completed (or the epoch in progress, see step_in_epoch)
        self.step_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.mid_epoch: dict[str, Any] | None = None  # restored state of an unfinished epoch
        self.last_checkpoint: Path | None = None
        self.saved_at: tuple[int, int] | None = None  # (epoch, step_in_epoch) of last_checkpoint
        self.stop_state: dict[str, Any] | None = None  # unfinished epoch at a max_steps stop
        self._eval_setup()

    # ------------------------------------------------------------------ evaluation data
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

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, mid_epoch: dict[str, Any] | None) -> dict[str, Any]:
        """Everything needed to continue exactly where the run is now."""
        return {
            "format": 1,
            "config": config_to_dict(self.cfg),
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "model": self.model.state_dict(),
            "model_kwargs": {"backbone": self.cfg.model.backbone, **self.model_kwargs},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "history": self.history,
            "rng": _rng_state(),
            "mid_epoch": self._all_mid_epoch(mid_epoch),
        }

    def _all_mid_epoch(self, local: dict[str, Any] | None) -> list[Any]:
        """Unfinished-epoch state of every rank (rank order); [] at an epoch boundary."""
        if local is None:
            return []
        if self.ctx.world == 1:
            return [local]
        states: list[Any] = [None] * self.ctx.world
        dist.all_gather_object(states, local)
        return states

    def save(self, mid_epoch: dict[str, Any] | None) -> None:
        """Write the checkpoint atomically (rank 0 only); ``mid_epoch``: see run_epoch."""
        state = self.state_dict(mid_epoch)  # collective under DDP: every rank builds it
        if self.ctx.is_main:
            with _writing(self.ckpt_path):
                atomic_write(self.ckpt_path, lambda f: torch.save(state, f))
        self.last_checkpoint = self.ckpt_path
        self.saved_at = (self.epoch, self.step_in_epoch)

    def restore(self) -> None:
        """Continue from ``out_dir/checkpoint.pt`` (config must match except RESUME_MUTABLE)."""
        state = _read_checkpoint(self.ckpt_path, _RESUME_KEYS, _RESUME_ADVICE)
        saved, now = _flatten(state["config"]), _flatten(config_to_dict(self.cfg))
        diff = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
        diff = [k for k in diff if k not in RESUME_MUTABLE]
        if diff:
            changes = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
            raise ValueError(
                f"cannot resume from {self.ckpt_path}: the config differs ({changes}); "
                f"use another out_dir or resume=False (--no-resume)"
            )
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
            self.history = list(state["history"])
            _set_rng_state(state["rng"])
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError) as error:
            raise CheckpointError(
                f"checkpoint {self.ckpt_path} is damaged ({_brief(error)}); {_RESUME_ADVICE}"
            ) from None
        self.saved_at = (self.epoch, self.step_in_epoch)
        mid = state["mid_epoch"]
        if mid and len(mid) != self.ctx.world:
            raise ValueError(
                f"cannot resume from {self.ckpt_path}: it stopped mid-epoch with "
                f"{len(mid)} processes, now there are {self.ctx.world}"
            )
        self.mid_epoch = mid[self.ctx.rank] if mid else None
        self.last_checkpoint = self.ckpt_path

    # ------------------------------------------------------------------ training
    def epoch_generators(
        self, epoch: int, saved: dict[str, Tensor] | None
    ) -> dict[str, torch.Generator]:
        """Per-epoch generators derived from (seed, epoch[, rank]), or their ``saved`` states."""
        seed, rank = self.cfg.seed, self.ctx.rank
        gens = {
            "views": _generator(self.device, _derive_seed(seed, _VIEWS, epoch, rank)),
            "augment": _generator(self.device, _derive_seed(seed, _AUGMENT, epoch, rank)),
        }
        for key, st in (saved or {}).items():
            gens[key].set_state(st)
        return gens

    def epoch_order(self, epoch: int) -> Tensor:
        """The shuffled training indices of ``epoch`` (identical on every rank)."""
        gen = torch.Generator().manual_seed(_derive_seed(self.cfg.seed, _ORDER, epoch))
        return torch.randperm(len(self.labels), generator=gen).to(self.device)

    def train_step(self, index: Tensor, gens: dict[str, torch.Generator]) -> tuple[Tensor, Tensor]:
        """One optimisation step on the local batch ``index``; returns (loss, spread), on device."""
        cfg = self.cfg
        from cl_lib.data import view_sources

        n_views = cfg.data.n_views
        sources = view_sources(
            self.labels, index, n_views, cfg.data.same_class_prob, generator=gens["views"]
        )
        x = self.images[sources.reshape(-1)].float().div_(255.0)
        x = self.augment(x, generator=gens["augment"])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = (
            torch.autocast(self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype is not None
            else contextlib.nullcontext()
        )
        with amp:
            _, z = self.net(x)
        z = z.float().reshape(n_views, index.shape[0], -1)
        labels = self.labels[index] if self.loss_needs_labels else None
        try:
            loss = self.loss_fn(z, labels)
        except ValueError:
            if not bool(torch.isfinite(z).all()):  # the losses reject non-finite inputs on CPU
                return torch.full((), math.nan, device=z.device), _embedding_spread(z)
            raise
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach(), _embedding_spread(z)

    def _check_finite(self, first_bad: Tensor, epoch: int) -> None:
        flag = first_bad.clone()
        if self.ctx.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        step = int(flag)
        if step >= 0:
            raise NonFiniteLossError(_nonfinite_message(epoch, step, self.last_checkpoint))

    def _params_finite(self) -> bool:
        flags = [torch.isfinite(p).all() for p in self.model.parameters()]
        return bool(torch.stack(flags).all())

    def run_epoch(self, epoch: int, show: bool) -> dict[str, Any] | None:
        """Train one epoch (or what is left of it); None when max_steps stopped it early."""
        cfg, opt = self.cfg, self.cfg.optim
        mid, self.mid_epoch = self.mid_epoch, None
        gens = self.epoch_generators(epoch, mid["generators"] if mid else None)
        order = self.epoch_order(epoch)
        self.net.train()
        zero = torch.zeros((), device=self.device)
        loss_sum, spread_sum, steps = zero.clone(), zero.clone(), 0
        start = time.perf_counter()
        if mid:  # continue the sums exactly where the unfinished epoch left them
            loss_sum, spread_sum = mid["sums"].to(self.device).unbind()
            steps, start = mid["steps"], start - mid["time_s"]
        first_bad = torch.full((), -1, dtype=torch.int64, device=self.device)
        b, lo = self.local_batch, self.ctx.rank * self.local_batch
        bar = runtime.progress(
            range(self.step_in_epoch, self.steps_per_epoch),
            desc=f"epoch {epoch + 1}/{opt.epochs}",
            leave=False,
            **({} if show else {"disable": True}),  # otherwise TQDM_DISABLE decides
        )
        stopped = False
        lr = self.optimizer.param_groups[0]["lr"]
        for i in bar:
            global_step = epoch * self.steps_per_epoch + i
            if opt.max_steps is not None and global_step >= opt.max_steps:
                stopped = True
                break
            begin = i * opt.batch_size + lo
            lr = self.optimizer.param_groups[0]["lr"]
            loss, spread = self.train_step(order[begin : begin + b], gens)
            bad = ~torch.isfinite(loss)
            first_bad = torch.where(bad & (first_bad < 0), global_step, first_bad)
            loss_sum += torch.where(bad, zero, loss)
            spread_sum += spread
            steps += 1
            self.step_in_epoch = i + 1
            if steps % cfg.check_every == 0:
                self._check_finite(first_bad, epoch)
                if show:
                    bar.set_postfix(loss=f"{float(loss_sum) / steps:.4f}")
        self._check_finite(first_bad, epoch)
        if not self._params_finite():
            step = epoch * self.steps_per_epoch + self.step_in_epoch - 1
            raise NonFiniteLossError(_nonfinite_message(epoch, step, self.last_checkpoint))
        if stopped:
            self.stop_state = {
                "generators": {k: g.get_state() for k, g in gens.items()},
                "sums": torch.stack([loss_sum, spread_sum]).cpu(),
                "steps": steps,
                "time_s": time.perf_counter() - start,
            }
            return None
        totals = torch.stack([loss_sum, spread_sum, torch.tensor(float(steps), device=self.device)])
        if self.ctx.world > 1:
            dist.all_reduce(totals)
        n = max(float(totals[2]), 1.0)
        spread_mean = float(totals[1]) / n
        self.epoch, self.step_in_epoch = epoch + 1, 0
        return {
            "epoch": epoch + 1,
            "step": self.epoch * self.steps_per_epoch,
            "loss": float(totals[0]) / n,
            "lr": lr,
            "embedding_spread": spread_mean,
            "collapsed": spread_mean < cfg.collapse_std,
            "train_time_s": time.perf_counter() - start,
        }

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


def _write_metrics(trainer: _Trainer) -> None:
    if trainer.ctx.is_main:
        with _writing(trainer.metrics_path):
            write_json(trainer.metrics_path, trainer.history, indent=2)


# =========================================================================== run folder


def _brief(error: BaseException) -> str:
    """``Type: first line of the message`` (at most 160 characters)."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return text if len(text) <= 160 else text[:157] + "..."


def _os_reason(error: OSError) -> str:
    """What an OSError from creating or writing a run folder means, in words."""
    if isinstance(error, FileExistsError):
        return "it is a file, not a folder"
    if isinstance(error, NotADirectoryError):
        return "a part of the path is a file, not a folder"
    if isinstance(error, PermissionError):
        return "permission denied"
    if error.errno == errno.ENOSPC:
        return "no space left on the disk"
    return error.strerror or str(error)


def _lock_run_folder(out_dir: Path) -> Any:
    """Create ``out_dir``, lock it for this process (``fcntl.flock``, released when the process
    ends) and remove stale temporary files; the open lock file is returned."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = open(out_dir / LOCK_NAME, "a+")  # noqa: SIM115 (held until the run ends)
    except OSError as error:
        raise RunFolderError(
            f"config key 'out_dir' ({out_dir}) cannot be used as the run folder: "
            f"{_os_reason(error)}; choose another out_dir"
        ) from None
    if fcntl is not None:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise RunFolderError(
                f"run folder {out_dir} is in use by another training run ({holder}, lock file "
                f"{out_dir / LOCK_NAME}); wait for it to finish or choose another out_dir"
            ) from None
        except OSError:  # pragma: no cover (a file system without flock, e.g. some NFS)
            pass
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        for stale in out_dir.glob(".*.tmp"):  # left by a process killed while writing
            stale.unlink(missing_ok=True)
    except OSError as error:
        lock.close()
        raise RunFolderError(
            f"run folder {out_dir} cannot be written ({_os_reason(error)}); fix its "
            f"permissions or choose another out_dir"
        ) from None
    return lock


@contextlib.contextmanager
def _run_folder(out_dir: Path, ctx: _Dist) -> Iterator[None]:
    """Hold ``out_dir`` for this run: rank 0 creates and locks it; its error is raised on every
    rank (so no rank waits for a rank 0 that gave up)."""
    lock, error = None, None
    if ctx.is_main:
        try:
            lock = _lock_run_folder(out_dir)
        except RunFolderError as e:
            error = e
    if ctx.world > 1:
        box = [None if error is None else str(error)]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None and error is None:
            error = RunFolderError(box[0])
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.close()


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Around an atomic write of ``path`` into the run folder: a failure (full disk, lost
    permission) raises :class:`RunFolderError` saying what was kept."""
    try:
        yield
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as RuntimeError
        reason = _os_reason(error) if isinstance(error, OSError) else _brief(error)
        ckpt = path.parent / CHECKPOINT_NAME
        kept = f"the previous checkpoint {ckpt} is kept" if ckpt.exists() else "no checkpoint yet"
        raise RunFolderError(
            f"cannot write {path} ({reason}; is the disk full?); {kept}. Free space or fix the "
            f"folder's permissions, then run the same command again to resume"
        ) from None


def _read_checkpoint(path: Path, needed: Sequence[str], advice: str) -> dict[str, Any]:
    """``torch.load`` of a checkpoint that must hold the keys ``needed``; anything unreadable
    raises :class:`CheckpointError` (``advice`` says what to do)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as error:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({_os_reason(error)}); {advice}"
        ) from None
    except Exception as error:  # EOFError, UnpicklingError, zip-archive RuntimeError, ...
        raise CheckpointError(
            f"checkpoint {path} is truncated, damaged or not a checkpoint ({_brief(error)}); "
            f"{advice}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of train; {advice}")
    missing = [key for key in needed if key not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} lacks {', '.join(repr(k) for k in missing)}, so it cannot be "
            f"used here; {advice}"
        )
    return state


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


# =========================================================================== evaluation


def load_checkpoint_model(
    path: str | os.PathLike, device: torch.device | str | None = None
) -> tuple[nn.Module, TrainConfig, dict[str, Any]]:
    """The model stored in a checkpoint of :func:`pretrain`, its config and the raw state."""
    from cl_lib.models import build_model

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint must be an existing file, got {str(path)!r}")
    dev = _eval_device(device)
    advice = "give a checkpoint.pt written by train (python -m cl_lib train)"
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        advice = f"{path.name} looks like a config or metrics file; {advice}"
    state = _read_checkpoint(path, _MODEL_KEYS, advice)
    config = config_from_dict(state["config"])
    try:
        kwargs = dict(state["model_kwargs"])
        model = build_model(kwargs.pop("backbone"), **kwargs)
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {path} is damaged ({_brief(error)}); {advice}") from None
    return model.to(dev).eval(), config, state


def _eval_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a torch.device (None: the default); CUDA must be available."""
    if device is None:
        return runtime.default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be like 'cpu', 'cuda' or 'cuda:0', got {device!r}") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(
                f"device {str(device)!r} is not available: this machine has no CUDA GPU; "
                f"use device 'cpu' (eval --device cpu)"
            )
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {str(device)!r} does not exist: there are {count} GPUs")
    return dev


def evaluate_checkpoint(
    path: str | os.PathLike,
    *,
    split: str = "test",
    linear: bool = True,
    device: torch.device | str | None = None,
    data_root: str | None = None,
) -> dict[str, Any]:
    """kNN (and linear-probe) accuracy of a checkpoint's encoder on ``split``.

    The memory bank / probe training set is the clean training split of the checkpoint's
    dataset; queries are ``split``. Returns a JSON-friendly dict.
    """
    from cl_lib.data import load_dataset
    from cl_lib.evaluate import extract_features, knn_accuracy, linear_probe

    model, cfg, state = load_checkpoint_model(path, device)
    dev = next(model.parameters()).device
    d = cfg.data
    kw = {"root": data_root or d.root, "download": d.download, "seed": cfg.seed}
    train = load_dataset(d.name, "train", size=d.size, imbalance_ratio=d.imbalance_ratio, **kw)
    size = d.test_size if split == "test" else d.size
    query = load_dataset(d.name, split, size=size, **kw)
    bank_x, bank_y = _labelled(train.images, train.labels)
    query_x, query_y = _labelled(query.images, query.labels)
    bank_f = extract_features(model, bank_x, device=dev)
    query_f = extract_features(model, query_x, device=dev)
    k = min(cfg.knn_k, len(bank_y))
    result: dict[str, Any] = {
        "checkpoint": str(path),
        "split": split,
        "epoch": state["epoch"],
        "knn_k": k,
        "knn_accuracy": knn_accuracy(
            bank_f, bank_y, query_f, query_y, k=k, temperature=cfg.knn_temperature
        ),
    }
    if linear:
        result["linear_probe_accuracy"] = linear_probe(
            bank_f, bank_y, query_f, query_y, seed=cfg.seed, device=dev
        )
    return result
