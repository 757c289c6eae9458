"""Run the benchmarks and write ``results/benchmarks.json``.

Usage (from the repository root)::

    .venv/bin/python -m benchmarks.run            # loss, augment, train (full sizes)
    .venv/bin/python -m benchmarks.run --e2e      # ... then notebooks + site build (last)
    .venv/bin/python -m benchmarks.run --quick --only loss,augment --output /tmp/b.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks import common

PARTS = ("loss", "augment", "train", "e2e")
DEFAULT_OUTPUT = common.ROOT / "results" / "benchmarks.json"
DEFAULT_BASELINE_REF = "982b096"  # the commit that introduced cl_lib/losses.py (pre-fusion)

FULL = {
    "loss_sizes": [256, 1024, 4096],
    "loss_repeats": {256: 30, 1024: 15, 4096: 7},
    "loss_warmup": 1,
    "loss_budget_s": 40.0,
    "loss_profile_n": 1024,
    "augment_batches": [256, 512],
    "augment_num_batches": 4,
    "augment_repeats": 3,
    "train_cases": [("small_cnn", 256, 3, 1), ("resnet18", 64, 3, 1)],
}
QUICK = {
    "loss_sizes": [128],
    "loss_repeats": {128: 3},
    "loss_warmup": 1,
    "loss_budget_s": 20.0,
    "loss_profile_n": 64,
    "augment_batches": [64],
    "augment_num_batches": 2,
    "augment_repeats": 2,
    "train_cases": [("small_cnn", 32, 2, 1)],
}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, few repetitions")
    parser.add_argument(
        "--only", default=None, help=f"comma-separated parts among {', '.join(PARTS)}"
    )
    parser.add_argument("--e2e", action="store_true", help="also time notebooks + site build")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--merge", action="store_true", help="keep other parts of --output")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument(
        "--baseline-ref",
        default=DEFAULT_BASELINE_REF,
        help="git revision whose cl_lib/losses.py is timed as 'before' ('none' to skip)",
    )
    parser.add_argument("--loss-sizes", default=None, help="comma-separated N (pairs)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory runs")
    parser.add_argument("--augment-batches", default=None, help="comma-separated batch sizes")
    parser.add_argument(
        "--workers", type=int, default=None, help="DataLoader workers (default: CPU cores)"
    )
    return parser.parse_args(argv)


def selected_parts(args: argparse.Namespace) -> list[str]:
    """The parts to run, e2e last."""
    if args.only is not None:
        parts = [p.strip() for p in args.only.split(",") if p.strip()]
        unknown = sorted(set(parts) - set(PARTS))
        if unknown or not parts:
            raise ValueError(f"--only must name parts among {PARTS}, got {args.only!r}")
    else:
        parts = ["loss", "augment", "train"] + (["e2e"] if args.e2e else [])
    return [p for p in PARTS if p in parts]


def devices(choice: str) -> list[torch.device]:
    """CPU, CUDA, or CPU plus CUDA when it is available (``auto``)."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    if choice == "auto":
        return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [torch.device(choice)]


def command_line(argv: Sequence[str]) -> list[str]:
    """The exact command, with the interpreter relative to the repository when inside it."""
    python = Path(sys.executable)
    try:
        shown = str(python.relative_to(common.ROOT))
    except ValueError:
        shown = str(python)
    return [shown, "-m", "benchmarks.run", *argv]


def run_part(part: str, args: argparse.Namespace, devs: list[torch.device]) -> dict[str, Any]:
    """Run one part with the quick or full settings."""
    cfg = QUICK if args.quick else FULL
    if part == "loss":
        from benchmarks import bench_loss

        sizes = cfg["loss_sizes"]
        if args.loss_sizes:
            sizes = [int(s) for s in args.loss_sizes.split(",")]
        repeats = {n: cfg["loss_repeats"].get(n, 3) for n in sizes}
        ref = None if args.baseline_ref.lower() == "none" else args.baseline_ref
        return bench_loss.run(
            sizes,
            128,
            devs,
            repeats,
            cfg["loss_warmup"],
            ref,
            memory=not args.no_memory,
            budget_s=cfg["loss_budget_s"],
            profile_n=cfg["loss_profile_n"],
        )
    if part == "augment":
        from benchmarks import bench_augment

        batches = cfg["augment_batches"]
        if args.augment_batches:
            batches = [int(b) for b in args.augment_batches.split(",")]
        return bench_augment.run(
            batches, cfg["augment_num_batches"], cfg["augment_repeats"], args.workers
        )
    if part == "train":
        from benchmarks import bench_train

        return bench_train.run(cfg["train_cases"], devs)
    from benchmarks import bench_e2e

    return bench_e2e.run()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the selected parts and write the JSON file; return its content."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    parts = selected_parts(args)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        os.environ["CL_BENCH_THREADS"] = str(args.threads)  # memory subprocesses
    devs = devices(args.device)
    command = command_line(argv)
    result: dict[str, Any] = {}
    if args.merge and args.output.exists():
        result = json.loads(args.output.read_text())
    started = time.perf_counter()
    prov = common.provenance(command, devs[-1])
    prov["devices"] = [str(d) for d in devs]
    prov["quick"] = args.quick
    result["schema_version"] = common.SCHEMA_VERSION
    result["provenance"] = prov
    result.setdefault("parts", {})
    for part in parts:
        print(f"[benchmarks] {part} ...", flush=True)
        part_start = time.perf_counter()
        section = run_part(part, args, devs)
        section["provenance"] = dict(prov)
        section["wall_s"] = time.perf_counter() - part_start
        result["parts"][part] = section
        print(f"[benchmarks] {part} done in {section['wall_s']:.0f} s", flush=True)
    prov["load_average_end"] = list(os.getloadavg())
    prov["wall_s"] = time.perf_counter() - started
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1, sort_keys=False) + "\n")
    print(f"[benchmarks] wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
