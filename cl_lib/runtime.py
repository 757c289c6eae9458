"""Run-time settings shared by the library and the notebooks.

One place decides the *profile* a notebook or experiment runs in:

* ``quick``: small data and models that finish in about a minute on a laptop CPU;
* ``full``: real datasets and models, sized for a Colab T4 GPU.

``CL_QUICK=1`` forces quick, ``CL_QUICK=0`` forces full; otherwise the profile
is full exactly when CUDA is available.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Iterable
from typing import Literal, TypeVar

import numpy as np
import torch
from tqdm import TqdmWarning

with warnings.catch_warnings():
    # In a kernel without ipywidgets, tqdm.auto warns (with a machine path) and
    # falls back to text bars; the fallback is what we want, the warning is noise.
    warnings.simplefilter("ignore", TqdmWarning)
    from tqdm.auto import tqdm

Profile = Literal["quick", "full"]
T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def profile() -> Profile:
    """Return ``"quick"`` or ``"full"`` (see the module docstring)."""
    flag = os.environ.get("CL_QUICK", "").strip().lower()
    if flag in _TRUE:
        return "quick"
    if flag in _FALSE:
        return "full"
    if flag:
        raise ValueError(f"CL_QUICK must be one of 1/0/true/false, got {flag!r}")
    return "full" if torch.cuda.is_available() else "quick"


def is_quick() -> bool:
    """True when the quick profile is active."""
    return profile() == "quick"


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator seeded alike."""
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an int, got {type(seed).__name__}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def progress(iterable: Iterable[T] | None = None, **kwargs) -> tqdm:
    """A tqdm progress bar; ``TQDM_DISABLE=1`` (set under test) turns it off."""
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Switch off an enclosing ``torch.autocast`` on ``device`` (no-op where unsupported).

    Losses and evaluation use it to compute in float32 under mixed precision.
    """
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # a device type autocast does not know
        return contextlib.nullcontext()
