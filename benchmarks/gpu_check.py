"""GPU readiness report: SimCLR training throughput through the real training step.

Usage (from the repository root; ``scripts/gpu_check.sh`` runs the ``cuda`` tests first and
passes their JUnit XML here)::

    .venv/bin/python -m benchmarks.gpu_check                          # CUDA: ResNet-18, 256 / 512
    .venv/bin/python -m benchmarks.gpu_check --device cpu --backbone small_cnn \
        --batch-sizes 16 --steps 2 --warmup 1 --out /tmp/gpu_check.json
    .venv/bin/python -m benchmarks.gpu_check --cpu-smoke --out /tmp/r.json  # tiny without a GPU

What is timed is :meth:`cl_lib.train._Trainer.train_step`, the very step of
:func:`cl_lib.train.pretrain`: view sources, gather of the uint8 images already on the
device, batched augmentation there, channels-last, autocast (bfloat16 where supported, else
float16 with a GradScaler), NT-Xent, backward, optimiser and scheduler step. The recipe is
``configs/cifar10_resnet18.yaml`` (SGD, NT-Xent at temperature 0.5, SimCLR CIFAR
augmentations) on the synthetic 32x32 uint8 shapes instead of CIFAR-10 (no download; the
content of the pixels does not change the cost of a step).

Units: an *instance* is one source image; each step sees ``batch`` instances and
``n_views * batch`` views (2 by default), so ``views_per_s = 2 * instances_per_s``. Step times
exclude ``warmup`` steps (cuDNN autotuning, allocator growth). On CUDA each step is timed
with CUDA events recorded between steps (no host sync inside the timed loop); on the CPU
with ``time.perf_counter``. Peak memory is ``torch.cuda.max_memory_allocated`` over the
timed steps (``null`` on the CPU). ``amp_speedup`` is instances/s with autocast over
instances/s in float32 (CUDA only: on the CPU the trainer never uses autocast).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import common
from cl_lib import train as T
from cl_lib.files import write_json
from cl_lib.models import BACKBONES

SCHEMA_VERSION = 1
DEFAULT_OUTPUT = common.ROOT / "results" / "gpu_check.json"
BASE_CONFIG = common.ROOT / "configs" / "cifar10_resnet18.yaml"
IMAGE_SIZE = 32  # the shapes are 32x32 RGB uint8
TEST_SIZE = 16  # the trainer needs a test split; nothing is evaluated here
DEFAULTS: dict[str, Any] = {
    "backbone": "resnet18",
    "batch_sizes": [256, 512],
    "steps": 20,
    "warmup": 5,
}
CPU_SMOKE: dict[str, Any] = {"backbone": "small_cnn", "batch_sizes": [16], "steps": 2, "warmup": 1}
UNITS = {
    "instances_per_s": "source images per second (one instance = one image, all its views)",
    "views_per_s": "augmented views per second (n_views per instance, 2 here)",
    "step_time": "seconds per training step over the timed steps (warm-up excluded)",
    "gpu_peak_memory_bytes": "torch.cuda.max_memory_allocated over the timed steps",
}


# --------------------------------------------------------------------------- arguments


def _positive_int(minimum: int) -> Any:
    """An argparse type: an int >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}, got {value}")
        return value

    return parse


def _batch_sizes(text: str) -> list[int]:
    """An argparse type: comma-separated distinct ints >= 2."""
    parts = [p.strip() for p in text.split(",")]
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated ints >= 2 (e.g. 256,512), got {text!r}"
        ) from None
    if not sizes or min(sizes) < 2 or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(f"must be distinct ints >= 2 (e.g. 256,512), got {text!r}")
    return sizes


def _device(text: str) -> str:
    """An argparse type: auto, cpu, cuda or cuda:N (CUDA only where available)."""
    if text not in ("auto", "cpu", "cuda") and not (
        text.startswith("cuda:") and text[5:].isdigit()
    ):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"is {text!r} but CUDA is not available")
        index = int(text[5:]) if ":" in text else 0
        if index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"is {text!r} but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return text


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line options; a bad value exits with a message naming the option."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_check",
        description="SimCLR training throughput through cl_lib.train's step, as a JSON report.",
    )
    parser.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--batch-sizes", type=_batch_sizes, help="default: 256,512")
    parser.add_argument("--steps", type=_positive_int(1), help="timed steps (default: 20)")
    parser.add_argument("--warmup", type=_positive_int(0), help="untimed steps (default: 5)")
    parser.add_argument("--backbone", choices=BACKBONES, help="default: resnet18")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="when the device is the CPU, default to a tiny run: "
        + ", ".join(f"{k} {v}" for k, v in CPU_SMOKE.items()),
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUTPUT, help="the JSON report")
    parser.add_argument(
        "--amp-compare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on CUDA also time float32 (autocast off) for the amp speed-up",
    )
    parser.add_argument("--junit-xml", type=Path, default=None, help="pytest results to include")
    parser.add_argument("--pytest-returncode", type=int, default=None, help="pytest exit status")
    parser.add_argument(
        "--pytest-command", default=None, help="the pytest command line (for the report)"
    )
    args = parser.parse_args(list(argv))
    smoke = args.cpu_smoke and resolve_device(args.device).type == "cpu"
    for key, value in (CPU_SMOKE if smoke else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def resolve_device(spec: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(spec)


# --------------------------------------------------------------------------- measurement


def bench_config(
    backbone: str, batch_size: int, steps: int, device: torch.device, amp: bool, out_dir: str
) -> T.TrainConfig:
    """The CIFAR-10 ResNet-18 recipe on ``batch_size`` synthetic shapes (one batch per epoch)."""
    overrides = [
        f"device={device}",
        f"amp={str(amp).lower()}",
        "channels_last=true",
        f"out_dir={out_dir}",
        f"geometry_size={TEST_SIZE}",
        "data.name=shapes",
        f"data.size={batch_size}",
        f"data.test_size={TEST_SIZE}",
        "data.download=false",
        f"model.backbone={backbone}",
        f"optim.batch_size={batch_size}",
        f"optim.epochs={steps + 1000}",  # the cosine never reaches lr = 0 while timing
    ]
    return T.load_config(BASE_CONFIG, overrides)


def _step_times(
    trainer: Any, index: torch.Tensor, gens: dict[str, torch.Generator], steps: int
) -> tuple[list[float], float, float]:
    """Per-step seconds (CUDA events or perf_counter), total wall seconds, mean loss."""
    device = trainer.device
    common.synchronize(device)
    start = time.perf_counter()
    losses = []
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(steps + 1)]
        events[0].record()
        for i in range(steps):
            losses.append(trainer.train_step(index, gens)[0])
            events[i + 1].record()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
        times = [events[i].elapsed_time(events[i + 1]) / 1e3 for i in range(steps)]
    else:
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            losses.append(trainer.train_step(index, gens)[0])
            times.append(time.perf_counter() - t0)
        wall = time.perf_counter() - start
    return times, wall, float(torch.stack(losses).mean())


def measure(
    backbone: str,
    batch_size: int,
    steps: int,
    warmup: int,
    device: torch.device | str,
    amp: bool = True,
) -> dict[str, Any]:
    """Time ``steps`` training steps of ``backbone`` at ``batch_size`` after ``warmup`` steps."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2, got {batch_size!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # CUDA events and peak memory follow the current device
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as out_dir:
        cfg = bench_config(backbone, batch_size, steps, device, amp, out_dir)
        trainer = T._Trainer(cfg, T._Dist(), device)
        index = trainer.epoch_order(0)[:batch_size]
        gens = trainer.epoch_generators(0, None)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # as pretrain() does
        for _ in range(warmup):
            trainer.train_step(index, gens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        times, wall, mean_loss = _step_times(trainer, index, gens, steps)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
        amp_dtype = None if trainer.amp_dtype is None else str(trainer.amp_dtype)
        channels_last, grad_scaler = trainer.channels_last, trainer.scaler.is_enabled()
        del trainer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    summary = common.summarise(times)
    n_views = cfg.data.n_views
    return {
        "backbone": backbone,
        "batch_size": batch_size,
        "n_views": n_views,
        "amp": amp,
        "amp_dtype": amp_dtype,
        "grad_scaler": grad_scaler,
        "channels_last": channels_last,
        "steps": steps,
        "warmup": warmup,
        "step_time": summary,
        "instances_per_s": batch_size / summary["median_s"],
        "views_per_s": n_views * batch_size / summary["median_s"],
        "instances_per_s_wall": steps * batch_size / wall,
        "gpu_peak_memory_bytes": peak,
        "gpu_peak_reserved_bytes": reserved,
        "mean_loss": mean_loss,
    }


def run_cases(
    backbone: str,
    batch_sizes: Sequence[int],
    steps: int,
    warmup: int,
    device: torch.device,
    amp_compare: bool,
) -> dict[str, Any]:
    """Every batch size with autocast (and, on CUDA with ``amp_compare``, without)."""
    variants = [True, False] if amp_compare and device.type == "cuda" else [True]
    cases = []
    for batch in batch_sizes:
        for amp in variants:
            try:
                cases.append(measure(backbone, batch, steps, warmup, device, amp))
            except torch.cuda.OutOfMemoryError as error:
                torch.cuda.empty_cache()
                first = str(error).splitlines()[0] if str(error) else "out of memory"
                cases.append(
                    {"backbone": backbone, "batch_size": batch, "amp": amp, "error": first}
                )
    return {
        "step": "cl_lib.train._Trainer.train_step (views + augment + forward + NT-Xent + "
        "backward + optimiser + scheduler), configs/cifar10_resnet18.yaml on synthetic shapes",
        "units": UNITS,
        "notes": "amp is the requested setting, amp_dtype the autocast dtype used (null: "
        "float32; the trainer uses autocast and channels-last on CUDA only); grad_scaler is "
        "true with float16 (GPUs without bfloat16)",
        "device": str(device),
        "cases": cases,
        "amp_speedup": amp_speedup(cases),
    }


def amp_speedup(cases: Sequence[dict[str, Any]]) -> dict[str, float]:
    """instances/s with autocast over float32, per batch size where both were measured."""
    rate = {(c["batch_size"], c["amp"]): c["instances_per_s"] for c in cases if "error" not in c}
    out = {}
    for (batch, amp), value in rate.items():
        ref = rate.get((batch, False))
        if amp and ref:
            out[str(batch)] = value / ref
    return out


# --------------------------------------------------------------------------- report


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi`` (None where it is missing)."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
        return out.stdout.strip().splitlines()[0] or None
    return None


def provenance(argv: Sequence[str], device: torch.device) -> dict[str, Any]:
    """Commit, date, versions and machine (:func:`benchmarks.common.provenance`) plus the GPU."""
    info = common.provenance(["python", "-m", "benchmarks.gpu_check", *argv], device)
    info["hostname"] = platform.node()
    info["cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    info["gpu"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "total_memory_bytes": props.total_memory,
            "count": torch.cuda.device_count(),
            "bf16_supported": torch.cuda.is_bf16_supported(),  # emulated bf16 counts here
            "bf16_native": props.major >= 8,
            "driver": _nvidia_driver(),
        }
    return info


def pytest_summary(
    junit_xml: Path | None, returncode: int | None = None, command: str | None = None
) -> dict[str, Any] | None:
    """Counts of a pytest JUnit XML file (None when no file was given)."""
    if junit_xml is None:
        return None
    summary: dict[str, Any] = {"command": command, "returncode": returncode}
    try:
        root = ET.parse(junit_xml).getroot()
    except (OSError, ET.ParseError) as error:
        summary["error"] = f"cannot read {junit_xml}: {error}"
        return summary
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {key: 0 for key in ("tests", "failures", "errors", "skipped")}
    failed = []
    for suite in suites:
        for key in counts:
            counts[key] += int(suite.get(key, 0))
        for case in suite.iter("testcase"):
            if case.find("failure") is not None or case.find("error") is not None:
                failed.append(f"{case.get('classname')}::{case.get('name')}")
    summary.update(
        tests=counts["tests"],
        passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        failed=counts["failures"],
        errors=counts["errors"],
        skipped=counts["skipped"],
        failed_tests=failed[:50],
        time_s=sum(float(s.get("time", 0.0)) for s in suites),
    )
    return summary


def _print_table(benchmark: dict[str, Any]) -> None:
    """One line per case on stdout."""
    for c in benchmark["cases"]:
        if "error" in c:
            print(f"{c['backbone']} batch {c['batch_size']} amp {c['amp']}: {c['error']}")
            continue
        mem = c["gpu_peak_memory_bytes"]
        mem_text = "" if mem is None else f", peak {mem / 2**30:.2f} GiB"
        print(
            f"{c['backbone']} batch {c['batch_size']} amp {c['amp_dtype'] or 'off'}: "
            f"{c['instances_per_s']:.0f} instances/s ({c['views_per_s']:.0f} views/s), "
            f"step {1e3 * c['step_time']['median_s']:.1f} ms{mem_text}"
        )
    for batch, ratio in benchmark["amp_speedup"].items():
        print(f"amp speed-up at batch {batch}: {ratio:.2f}x")


def problems(report: dict[str, Any]) -> list[str]:
    """What makes the check fail: a case that errored or had a non-finite loss, and, on a GPU,
    cuda tests of which none passed (all skipped means they did not see the GPU)."""
    found = []
    for c in report["benchmark"]["cases"]:
        if "error" in c or not math.isfinite(c["mean_loss"]):
            found.append(
                f"batch {c['batch_size']} amp {c['amp']}: {c.get('error', 'non-finite loss')}"
            )
    tests = report["pytest"]
    on_gpu = report["benchmark"]["device"].startswith("cuda")
    if on_gpu and tests is not None and tests.get("passed", 0) == 0:
        found.append("no cuda test passed on the GPU")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Measure, write the report; 1 if :func:`problems` finds any, else 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    device = resolve_device(args.device)
    if args.cpu_smoke and device.type == "cpu":
        print("gpu_check: no CUDA GPU: a tiny CPU smoke run (its numbers are not a GPU check)")
    report = {
        "schema_version": SCHEMA_VERSION,
        "provenance": provenance(argv, device),
        "pytest": pytest_summary(args.junit_xml, args.pytest_returncode, args.pytest_command),
    }
    benchmark = run_cases(
        args.backbone, args.batch_sizes, args.steps, args.warmup, device, args.amp_compare
    )
    report["benchmark"] = benchmark
    write_json(args.out, report)
    _print_table(benchmark)
    print(f"report written to {args.out}")
    found = problems(report)
    for problem in found:
        print(f"gpu_check: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
