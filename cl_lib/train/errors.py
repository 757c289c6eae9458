"""The typed errors of training, and the words they use for an underlying fault.

Here: :class:`TrainingError` and its kinds (:class:`NonFiniteLossError`,
:class:`RunFolderError`), :class:`CheckpointError`, :class:`TrainingInterrupted`, and the short
descriptions of exceptions and OS errors their messages include. Not here: where they are raised
(:mod:`cl_lib.train.checkpoint`, :mod:`cl_lib.train.trainer`, :mod:`cl_lib.train.loop`).
"""

from __future__ import annotations

import errno


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
