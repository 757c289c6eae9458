"""One pre-training run: set-up, one training step, one epoch, checkpoints and exact resume.

Here: :class:`_Trainer`, the state of a run in one process. ``__init__`` is a list of named
steps (batch split, data, precision, model, loss, optimiser, progress, held-out data). Per step
(:meth:`_Trainer.train_step`) it gathers the uint8 images of the view sources
(:func:`cl_lib.data.view_sources`) already on the device, augments them there, forwards all
views in one batch and steps the optimiser; :meth:`_Trainer.run_epoch` runs the steps of an
epoch (or what is left of it) with host-side checks for non-finite losses every
``check_every`` steps; :meth:`_Trainer.state_dict`, ``save`` and ``restore`` make resume
bit-exact on CPU. Not here: the epochs and the summary (:mod:`cl_lib.train.loop`), the
measurements (:mod:`cl_lib.train.measure`), the config (:mod:`cl_lib.train.config`).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cl_lib import runtime
from cl_lib.files import atomic_write
from cl_lib.train.checkpoint import (
    _RESUME_ADVICE,
    _RESUME_KEYS,
    CHECKPOINT_NAME,
    METRICS_NAME,
    RESUME_MUTABLE,
    _read_checkpoint,
    _writing,
)
from cl_lib.train.components import (
    _build_loss,
    _class_weights,
    _embedding_spread,
    _load_data,
    _nonfinite_message,
)
from cl_lib.train.config import TrainConfig, _flatten, config_to_dict
from cl_lib.train.ddp import AllReduceBatchNorm, _Dist
from cl_lib.train.errors import CheckpointError, NonFiniteLossError, _brief
from cl_lib.train.measure import _Measurements
from cl_lib.train.optim import WarmupCosine, _make_optimizer
from cl_lib.train.rng import (
    _AUGMENT,
    _ORDER,
    _VIEWS,
    _derive_seed,
    _generator,
    _rng_state,
    _set_rng_state,
)


class _Trainer(_Measurements):
    """State of one pre-training run (one per process under DDP)."""

    def __init__(self, config: TrainConfig, ctx: _Dist, device: torch.device) -> None:
        self.cfg, self.ctx, self.device = config, ctx, device
        self.out_dir = Path(config.out_dir)
        self.ckpt_path = self.out_dir / CHECKPOINT_NAME
        self.metrics_path = self.out_dir / METRICS_NAME
        self._split_batch()
        self._setup_data()
        self._setup_precision()
        runtime.seed_everything(config.seed)  # the model's initialisation
        self._setup_model()
        self._setup_loss()
        self._setup_optimizer()
        self._reset_progress()
        self._eval_setup()

    # ------------------------------------------------------------------ set-up
    def _split_batch(self) -> None:
        """The local batch of this process: the global batch split evenly across ranks."""
        opt, ctx = self.cfg.optim, self.ctx
        if opt.batch_size % ctx.world:
            raise ValueError(
                f"config key 'optim.batch_size' ({opt.batch_size}) must be divisible by the "
                f"number of processes ({ctx.world})"
            )
        self.local_batch = opt.batch_size // ctx.world
        if self.local_batch < 2:
            raise ValueError("config key 'optim.batch_size' must give >= 2 images per process")

    def _setup_data(self) -> None:
        """Both splits, the training images on the device, the steps and the augmentation."""
        from cl_lib.augment import make_augment

        config, opt = self.cfg, self.cfg.optim
        train, test = _load_data(config, self.ctx)
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
        self.images = train.images.to(self.device)
        self.labels = train.labels.to(self.device)
        size = train.images.shape[-1]
        self.augment = make_augment(config.augment.name, size, config.augment.strength)

    def _setup_precision(self) -> None:
        """Channels-last and autocast on CUDA (bf16 where native, else fp16)."""
        config = self.cfg
        self.use_cuda = self.device.type == "cuda"
        self.channels_last = self.use_cuda and config.channels_last
        self.amp_dtype: torch.dtype | None = None
        if self.use_cuda and config.amp:
            # native bf16 only (Ampere+); a T4 emulates it slowly: fp16 + GradScaler there
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            self.amp_dtype = torch.bfloat16 if bf16 else torch.float16

    def _setup_model(self) -> None:
        """The model (``self.model``, unwrapped) and what is called (``self.net``: DDP or not)."""
        from cl_lib.models import build_model

        m, ctx, device = self.cfg.model, self.ctx, self.device
        self.model_kwargs = {
            "in_channels": self.train_data.images.shape[1],
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

    def _setup_loss(self) -> None:
        """The loss (all-gathered under DDP), with inverse class frequencies when balanced."""
        config, train = self.cfg, self.train_data
        weights = None
        if config.loss.class_balanced:
            weights = _class_weights(train.labels, train.num_classes).to(self.device)
        self.loss_fn = _build_loss(config.loss, weights, gather=self.ctx.world > 1).to(self.device)
        self.loss_needs_labels = config.loss.name == "supcon" or weights is not None

    def _setup_optimizer(self) -> None:
        """Optimiser, per-step warm-up cosine schedule and (fp16 only) the gradient scaler."""
        opt = self.cfg.optim
        self.optimizer = _make_optimizer(self.model, opt)
        warmup = int(round(opt.warmup_fraction * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, WarmupCosine(warmup, self.total_steps)
        )
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.use_cuda
        )

    def _reset_progress(self) -> None:
        """A run at its start: no epoch done, no checkpoint."""
        self.epoch = 0  # epochs completed (or the epoch in progress, see step_in_epoch)
        self.step_in_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.mid_epoch: dict[str, Any] | None = None  # restored state of an unfinished epoch
        self.last_checkpoint: Path | None = None
        self.saved_at: tuple[int, int] | None = None  # (epoch, step_in_epoch) of last_checkpoint
        self.stop_state: dict[str, Any] | None = None  # unfinished epoch at a max_steps stop

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
