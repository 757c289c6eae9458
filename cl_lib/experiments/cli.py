"""The command line of the runner: ``python -m cl_lib.experiments NAME`` and
``python -m cl_lib experiment NAME``.

Here: the arguments (:func:`configure_parser`), the handler that runs a grid and prints its
summary (:func:`run_experiment_cli`; exit status 1 when a run failed) and :func:`main`. Not
here: the runner itself (:mod:`cl_lib.experiments.runner`).
"""

from __future__ import annotations

import argparse
import sys

import torch

from cl_lib.experiments.grids import EXPERIMENTS
from cl_lib.experiments.reporting import summarise
from cl_lib.experiments.runner import SMOKE_WARNING, run_experiment


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seeds must be like 0,1,2, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"--seeds must be ints >= 0, got {text!r}")
    return seeds


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the arguments of the ``experiment`` command to ``parser``."""
    parser.add_argument("name", choices=sorted(EXPERIMENTS), help="experiment to run")
    sizing = parser.add_mutually_exclusive_group()
    sizing.add_argument("--full", action="store_true", help="GPU sizing (default: quick)")
    sizing.add_argument(
        "--smoke",
        action="store_true",
        help="tiny pipeline check, written to OUT/smoke/NAME.json (no claims)",
    )
    parser.add_argument("--seeds", type=_seeds, default=None, help="e.g. 0,1,2")
    parser.add_argument("--out", default="results", help="folder of <name>.json")
    parser.add_argument("--runs-dir", default="runs", help="folder of the run folders")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="key.sub=value",
        help="extra config override for every run (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="per-epoch lines of each run")


def run_experiment_cli(args: argparse.Namespace) -> int:
    """Handler of the ``experiment`` subcommand; returns the exit status (1: a run failed)."""
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    results = run_experiment(
        args.name,
        full=args.full,
        smoke=getattr(args, "smoke", False),
        seeds=args.seeds,
        out=args.out,
        runs_dir=args.runs_dir,
        overrides=args.overrides,
        progress=not args.no_progress,
        verbose=args.verbose,
    )
    if results["profile"] == "smoke":
        print(f"WARNING: {SMOKE_WARNING}")
    for row in summarise(results, "knn_acc", exclude_flagged=False):
        print(
            f"{results['experiment']} {row['cell']}: kNN {100 * row['mean']:.1f}% "
            f"(median {100 * row['median']:.1f}%, n={row['n']}, flagged {row['flagged']}: "
            f"plateau {row['flagged_plateau']}, kNN not above init {row['flagged_knn']})"
        )
    failed = results["sessions"][-1].get("failed_runs", 0)
    if failed:
        for f in results.get("failures", [])[-failed:]:
            print(f"FAILED {f['cell']} seed {f['seed']}: {f['error']}", file=sys.stderr)
        print(
            f"{failed} run(s) failed (recorded under 'failures'); rerun the command to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m cl_lib.experiments <name> [--full] [--seeds 0,1,2] [--out results]``."""
    from cl_lib import experiments

    parser = argparse.ArgumentParser(
        prog="python -m cl_lib.experiments", description=experiments.__doc__
    )
    configure_parser(parser)
    return run_experiment_cli(parser.parse_args(argv))
