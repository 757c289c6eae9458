"""Shared helpers: provenance, interleaved timing, robust statistics, peak memory."""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from cl_lib.provenance import REPO_ROOT, cpu_model, git_state

ROOT = REPO_ROOT
SCHEMA_VERSION = 1


def _version(module: str) -> str | None:
    """``module.__version__`` or None when it is not installed."""
    try:
        return str(importlib.import_module(module).__version__)
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return None


def device_description(device: torch.device) -> str:
    """Human-readable name of ``device``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({cpu_model()})"


def provenance(argv: Sequence[str], device: torch.device) -> dict[str, Any]:
    """Where and how the numbers were produced (commit, versions, machine, command)."""
    commit, dirty = git_state()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "lightly": _version("lightly"),
        "pytorch_metric_learning": _version("pytorch_metric_learning"),
        "device": str(device),
        "device_name": device_description(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()),
        "platform": platform.platform(),
    }


def summarise(samples: Sequence[float]) -> dict[str, float]:
    """Median, interquartile range, min and count of timing samples (seconds)."""
    if len(samples) == 0:
        raise ValueError("samples must be non-empty")
    values = sorted(float(s) for s in samples)
    if len(values) >= 2:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    return {
        "median_s": statistics.median(values),
        "iqr_s": q3 - q1,
        "q1_s": q1,
        "q3_s": q3,
        "min_s": values[0],
        "repeats": len(values),
    }


def ratio(value: float | None, reference: float | None) -> float | None:
    """``value / reference``, None when either is missing or the reference is not positive."""
    if value is None or reference is None or reference <= 0:
        return None
    return value / reference


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels on CUDA (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_times(
    fns: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int,
    device: torch.device,
    budget_s: float | None = None,
    min_repeats: int = 3,
) -> dict[str, list[float]]:
    """Time each callable up to ``repeats`` times, round-robin, after ``warmup`` calls of each.

    With ``budget_s``, each callable gets about ``budget_s / len(fns)`` seconds (estimated
    from its last warm-up call), but never fewer than ``min_repeats`` timings; callables that
    have all their timings sit out the later rounds. The order is reversed every other round.
    """
    last: dict[str, float] = {}
    for _ in range(warmup):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            last[name] = time.perf_counter() - start
    wanted = dict.fromkeys(fns, repeats)
    if budget_s is not None and last:
        share = budget_s / len(fns)
        for name, seconds in last.items():
            fit = int(share / seconds) if seconds > 0 else repeats
            wanted[name] = max(min(repeats, min_repeats), min(repeats, fit))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(max(wanted.values())):
        order = list(fns) if rep % 2 == 0 else list(reversed(fns))  # cancel order effects
        for name in order:
            if len(times[name]) >= wanted[name]:
                continue
            synchronize(device)
            start = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul_out", "aten::baddbmm")


def profile_top_ops(fn: Callable[[], object], top: int = 6) -> dict[str, Any]:
    """One call of ``fn`` under ``torch.profiler`` (CPU): self time, matmul share, top ops."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm-up outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "self_cpu_ms": total / 1e3,
        "matmul_share": matmul / total if total > 0 else None,
        "top_ops": [
            {"op": e.key, "self_cpu_ms": e.self_cpu_time_total / 1e3, "calls": e.count}
            for e in ranked
        ],
    }


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc/self/statm)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _status_kib(key: str) -> int:
    """A ``kB`` field of /proc/self/status (e.g. ``VmHWM``, ``VmRSS``) in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise ValueError(f"key {key!r} not found in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark (VmHWM) of this process; False where Linux refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """High-water mark of the resident set size of this process (VmHWM)."""
    return _status_kib("VmHWM") * 1024


def run_json_subprocess(
    module: str, args: Sequence[str], timeout: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python -m module args`` and parse the JSON object printed on its last line."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-5:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)}
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if not lines:
        return {"error": "no JSON output"}
    return json.loads(lines[-1])
