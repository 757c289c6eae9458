"""The run folder and its files: the lock, atomic writes, and reading checkpoints back.

Here: the file names of a run folder, the keys a checkpoint must hold and the config keys that
may change on resume (:data:`RESUME_MUTABLE`); locking ``out_dir`` for one run
(``fcntl.flock``, rank 0, its error raised on every rank); turning a failed write into a
:class:`~cl_lib.train.errors.RunFolderError`; reading a checkpoint into a dict or a clear
:class:`~cl_lib.train.errors.CheckpointError`. Not here: what a checkpoint holds and how a run
restores it (:meth:`cl_lib.train.trainer._Trainer.state_dict`, ``restore``).
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows: run folders are not locked)
    fcntl = None  # type: ignore[assignment]

from cl_lib.train.ddp import _Dist
from cl_lib.train.errors import CheckpointError, RunFolderError, _brief, _os_reason

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.json"
SUMMARY_NAME = "summary.json"
CONFIG_NAME = "config.yaml"
LOCK_NAME = ".run.lock"  # advisory lock (fcntl.flock) held by the run writing the folder
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
