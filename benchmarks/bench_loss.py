"""Loss benchmark: forward + backward time and peak memory of NT-Xent implementations.

Run through ``python -m benchmarks.run --only loss``. Peak memory on the CPU is measured in a
fresh subprocess per (implementation, N) as the growth of the resident set size (the RSS
high-water mark ``VmHWM``, reset just before one forward + backward, minus the RSS at that
moment), with glibc's mmap threshold pinned so that large tensors are returned to the OS when
freed; on CUDA it is ``torch.cuda.max_memory_allocated`` minus the memory allocated before.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import common
from benchmarks.naive import naive_nt_xent
from cl_lib import losses

TEMPERATURE = 0.5
BALANCED_ALPHA, BALANCED_LAM = 1.0, 0.8
REFERENCE = "cl_lib nt_xent"
PML = "pml SelfSupervisedLoss(NTXentLoss)"
MEMORY_METHOD_CPU = (
    "fresh subprocess per (implementation, N), inputs built and libraries warmed up first; "
    "the RSS high-water mark is reset (/proc/self/clear_refs = 5), one forward+backward runs, "
    "peak = VmHWM minus the RSS just before the step (MALLOC_MMAP_THRESHOLD_=131072 so freed "
    "large tensors leave the RSS); includes the input gradient and allocator overhead"
)
MEMORY_METHOD_CUDA = "torch.cuda.max_memory_allocated() minus memory_allocated() before the step"
_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}

LossFn = Callable[[torch.Tensor], torch.Tensor]


def _load_module_at(ref: str) -> Any:
    """``cl_lib/losses.py`` as it was at git revision ``ref``, imported under a private name."""
    source = subprocess.run(
        ["git", "show", f"{ref}:cl_lib/losses.py"],
        cwd=common.ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="cl_losses_")) / f"losses_{ref}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"_cl_losses_{ref}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"baseline_ref {ref!r}: cannot import cl_lib/losses.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def implementations(baseline_ref: str | None = None, only: str | None = None) -> dict[str, LossFn]:
    """Name -> function of a ``(2, N, D)`` tensor of raw embeddings returning the mean loss.

    ``only`` keeps one implementation (and imports only the library it needs).
    """
    fns: dict[str, LossFn] = {
        REFERENCE: lambda x: losses.nt_xent_loss(x, temperature=TEMPERATURE),
        f"cl_lib balanced (alpha={BALANCED_ALPHA}, lam={BALANCED_LAM})": (
            lambda x: losses.balanced_contrastive_loss(
                x, temperature=TEMPERATURE, alpha=BALANCED_ALPHA, lam=BALANCED_LAM
            )
        ),
    }
    if baseline_ref is not None and (only is None or only.startswith("cl_lib@")):
        old = _load_module_at(baseline_ref)
        fns[f"cl_lib@{baseline_ref} nt_xent"] = lambda x: old.nt_xent_loss(
            x, temperature=TEMPERATURE
        )
    fns["naive (textbook masked cross-entropy)"] = lambda x: naive_nt_xent(x[0], x[1], TEMPERATURE)
    if only is not None and only in fns:
        return {only: fns[only]}
    try:
        from lightly.loss import NTXentLoss as LightlyNTXent

        lightly_loss = LightlyNTXent(temperature=TEMPERATURE)
        fns["lightly NTXentLoss"] = lambda x: lightly_loss(x[0], x[1])
    except ImportError:
        pass
    try:
        from pytorch_metric_learning import losses as pml_losses

        pml_loss = pml_losses.SelfSupervisedLoss(pml_losses.NTXentLoss(temperature=TEMPERATURE))
        fns[PML] = lambda x: pml_loss(x[0], x[1])
    except ImportError:
        pass
    return fns


def pml_estimated_bytes(n: int) -> int:
    """Estimated peak of pml's NTXentLoss on 2N embeddings: six float32 (P, Q) tensors.

    pml builds a (positive pairs x negative pairs) matrix, P = 2N, Q = 2N (2N - 2), so memory
    grows as N^3; the factor 6 counts the mask, the masked copy, its exponential and the
    gradients held at the peak (an over-estimate: 3.2 GB against 2.3 GB measured at N = 256).
    """
    pairs, negatives = 2 * n, 2 * n * (2 * n - 2)
    return 6 * 4 * pairs * negatives


def memory_budget_bytes(device: torch.device | None = None) -> int:
    """Largest estimated footprint we allow a peer: min(4 GiB, 30% of available memory).

    Available memory is the free GPU memory on CUDA, ``MemAvailable`` of the host otherwise.
    """
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(4 * 2**30, 0.3 * free))
    available = 8 * 2**30
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(min(4 * 2**30, 0.3 * available))


def skip_reason(name: str, n: int, budget: int) -> str | None:
    """Why ``name`` is not run at ``n`` pairs, or None."""
    if name == PML and pml_estimated_bytes(n) > budget:
        gib = pml_estimated_bytes(n) / 2**30
        return (
            f"pml's NTXentLoss is O(N^3) in memory: estimated {gib:.1f} GiB at N={n} exceeds "
            f"the budget of {budget / 2**30:.1f} GiB (min(4 GiB, 30% of available memory))"
        )
    return None


def _inputs(n: int, d: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """Two correlated views ``(2, N, D)`` of raw embeddings, a leaf that requires grad."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g)
    views = torch.stack((a, a + 0.5 * torch.randn(n, d, generator=g)))
    return views.to(device).requires_grad_(True)


def _step(fn: LossFn, x: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of ``fn`` on ``x`` (the gradient is reset first)."""

    def run() -> None:
        x.grad = None
        fn(x).backward()

    return run


def measure_memory_here(name: str, n: int, d: int, device: torch.device, ref: str | None) -> int:
    """Peak extra memory (bytes) of one forward + backward of ``name``, in this process."""
    fn = implementations(ref, only=name)[name]
    _step(fn, _inputs(8, d, device))()  # initialise libraries and thread pools
    x = _inputs(n, d, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _step(fn, x)()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if not common.reset_peak_rss():
        raise ValueError("device: cannot reset the peak RSS (/proc/self/clear_refs) here")
    before = common.current_rss_bytes()
    _step(fn, x)()
    return max(0, common.peak_rss_bytes() - before)


def _memory_in_subprocess(name: str, n: int, d: int, ref: str | None, timeout: float) -> Any:
    """CPU peak memory of ``name`` measured in a fresh interpreter."""
    args = ["--child-memory", name, "--n", str(n), "--d", str(d)]
    if ref is not None:
        args += ["--baseline-ref", ref]
    result = common.run_json_subprocess(
        "benchmarks.bench_loss", args, timeout=timeout, env=_MALLOC_ENV
    )
    return result.get("peak_bytes", result.get("error"))


def run(
    sizes: Sequence[int],
    dim: int,
    devices: Sequence[torch.device],
    repeats: dict[int, int],
    warmup: int,
    baseline_ref: str | None = None,
    memory: bool = True,
    budget_s: float | None = None,
    profile_n: int | None = 1024,
) -> dict[str, Any]:
    """Time (interleaved, round-robin) and measure every implementation at every size.

    ``budget_s`` caps the timing of one size (each implementation gets an equal share of it,
    and at least 3 timings).
    """
    budget = memory_budget_bytes()
    cases: list[dict[str, Any]] = []
    for device in devices:
        budget = memory_budget_bytes(device)
        fns = implementations(baseline_ref)
        for n in sizes:
            x = _inputs(n, dim, device)
            skipped = {name: skip_reason(name, n, budget) for name in fns}
            active = {name: _step(fn, x) for name, fn in fns.items() if skipped[name] is None}
            times = common.interleaved_times(active, repeats[n], warmup, device, budget_s)
            for name in fns:
                case: dict[str, Any] = {"device": str(device), "n": n, "d": dim, "impl": name}
                case["skipped"] = skipped[name]
                case["time"] = common.summarise(times[name]) if name in times else None
                case["peak_memory_bytes"] = None
                if memory and skipped[name] is None:
                    if device.type == "cuda":
                        peak = measure_memory_here(name, n, dim, device, baseline_ref)
                    else:
                        peak = _memory_in_subprocess(name, n, dim, baseline_ref, timeout=600)
                    case["peak_memory_bytes"] = peak if isinstance(peak, int) else None
                    if not isinstance(peak, int):
                        case["memory_error"] = peak
                cases.append(case)
            del x
    _add_ratios(cases)
    profiles = {}
    if profile_n is not None:
        x = _inputs(profile_n, dim, devices[0])
        fns = implementations(None)
        for name in (REFERENCE, "naive (textbook masked cross-entropy)", "lightly NTXentLoss"):
            if name in fns:
                profiles[name] = common.profile_top_ops(_step(fns[name], x))
    return {
        "temperature": TEMPERATURE,
        "balanced": {"alpha": BALANCED_ALPHA, "lam": BALANCED_LAM, "include_positive": False},
        "dim": dim,
        "sizes": list(sizes),
        "repeats": {str(k): v for k, v in repeats.items()},
        "timing_budget_s_per_size": budget_s,
        "warmup": warmup,
        "reference": REFERENCE,
        "memory_method": {"cpu": MEMORY_METHOD_CPU, "cuda": MEMORY_METHOD_CUDA},
        "memory_budget_bytes": budget,
        "cases": cases,
        "profile": {"n": profile_n, "device": str(devices[0]), "by_impl": profiles},
    }


def _add_ratios(cases: list[dict[str, Any]]) -> None:
    """Add time and memory ratios to the cl_lib NT-Xent case of the same device and N."""
    refs = {(c["device"], c["n"]): c for c in cases if c["impl"] == REFERENCE}
    for case in cases:
        ref = refs.get((case["device"], case["n"]))
        t = case["time"]["median_s"] if case["time"] else None
        t_ref = ref["time"]["median_s"] if ref and ref["time"] else None
        case["time_ratio_to_reference"] = common.ratio(t, t_ref)
        m_ref = ref["peak_memory_bytes"] if ref else None
        case["memory_ratio_to_reference"] = common.ratio(case["peak_memory_bytes"], m_ref)


def _child_main(argv: Sequence[str]) -> None:
    """Subprocess entry point: print the peak memory of one implementation as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--child-memory", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--d", type=int, required=True)
    parser.add_argument("--baseline-ref", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("CL_BENCH_THREADS", torch.get_num_threads())))
    peak = measure_memory_here(
        args.child_memory, args.n, args.d, torch.device("cpu"), args.baseline_ref
    )
    print(json.dumps({"peak_bytes": peak}))


if __name__ == "__main__":
    _child_main(sys.argv[1:])
