"""Provenance of stored results: the code revision and the machine that produced them."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def git(*args: str) -> str | None:
    """Output of ``git args`` in the repository root, or None where git or the repo is missing."""
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def git_state() -> tuple[str | None, bool | None]:
    """``(commit, dirty)``: HEAD's hash and whether tracked files differ from it."""
    status = git("status", "--porcelain", "--untracked-files=no")
    return git("rev-parse", "HEAD"), None if status is None else bool(status)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (``platform.processor()`` elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine(device: torch.device | str | None = None) -> dict[str, Any]:
    """The hardware and software of this process for ``device`` (None or ``"auto"``: CUDA if any).

    Device, GPU name (None off CUDA), CPU model and count, torch threads, torch and Python
    versions, host name.
    """
    spec = None if device is None or device == "auto" else torch.device(device)
    cuda = torch.cuda.is_available() and (spec is None or spec.type == "cuda")
    return {
        "device": str(spec) if spec is not None else ("cuda" if cuda else "cpu"),
        "gpu": torch.cuda.get_device_name(spec if spec is not None else 0) if cuda else None,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "hostname": platform.node(),
    }
