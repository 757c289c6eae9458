"""Command line: ``python -m cl_lib <command> ...`` (also ``cl-lib``, and under ``torchrun``).

* ``train --config FILE [key.sub=value ...] [--no-resume] [--no-progress]``: pre-train
  (:func:`cl_lib.train.pretrain`); ``torchrun --nproc_per_node=2 -m cl_lib train ...`` runs DDP.
* ``eval --checkpoint FILE [--split test] [--no-linear]``: kNN and linear-probe accuracy of a
  checkpoint, printed as text and as one JSON line.
* ``experiment NAME [--full] [--seeds 0,1,2]``: run a named experiment grid, resumable, into
  ``results/NAME.json`` (:mod:`cl_lib.experiments`).

Add a command by adding an entry to :data:`COMMANDS`: name -> (help, add_arguments, handler);
the handler takes the parsed ``argparse.Namespace`` and returns the exit status.

Errors end in one ``error: ...`` line on stderr, never a traceback: exit status 2 for bad
input (config, arguments, a damaged checkpoint), 1 for a run that stopped (non-finite loss,
run folder in use or not writable, full disk, no network, Ctrl-C); what was saved is kept.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence

from cl_lib.train import TrainingError

Handler = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], None]


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="config overrides, YAML values"
    )
    parser.add_argument(
        "--no-resume", action="store_true", help="start afresh even if out_dir has a checkpoint"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _train(args: argparse.Namespace) -> int:
    from cl_lib.train import load_config, pretrain

    config = load_config(args.config, args.overrides)
    result = pretrain(config, resume=not args.no_resume, progress=not args.no_progress)
    if result.summary.get("collapsed"):
        print("warning: the final epoch looks collapsed (embedding spread ~ 0)", file=sys.stderr)
    return 0


def _eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="checkpoint.pt written by train")
    parser.add_argument("--split", default="test", help="query split (default: test)")
    parser.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: auto)")
    parser.add_argument("--data-root", default=None, help="override the config's data.root")


def _eval(args: argparse.Namespace) -> int:
    from cl_lib.train import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint,
        split=args.split,
        linear=not args.no_linear,
        device=args.device,
        data_root=args.data_root,
    )
    text = f"kNN accuracy (k={result['knn_k']}, {args.split}): {100 * result['knn_accuracy']:.2f}%"
    if "linear_probe_accuracy" in result:
        text += f"; linear probe: {100 * result['linear_probe_accuracy']:.2f}%"
    print(text)
    print(json.dumps(result))
    return 0


def _experiment_arguments(parser: argparse.ArgumentParser) -> None:
    from cl_lib.experiments import configure_parser

    configure_parser(parser)


def _experiment(args: argparse.Namespace) -> int:
    from cl_lib.experiments import run_experiment_cli

    return run_experiment_cli(args)


COMMANDS: dict[str, tuple[str, Configure, Handler]] = {
    "train": ("pre-train a contrastive model from a YAML config", _train_arguments, _train),
    "eval": ("evaluate a checkpoint (kNN and linear probe)", _eval_arguments, _eval),
    "experiment": ("run a named experiment grid", _experiment_arguments, _experiment),
}
"""Subcommands: name -> (help, add_arguments(parser), handler(args) -> exit status)."""


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; a command's own arguments are parsed intermixed, so overrides may come
    after flags (``train --config C a=1 --no-resume b=2``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        return parser.parse_args(argv)  # help, or an error listing the commands
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    args = sub.choices[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def _fail(message: object, status: int) -> int:
    """Print ``error: message`` on stderr and return ``status``."""
    print(f"error: {message}", file=sys.stderr)
    return status


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="python -m cl_lib", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for name, (help_text, configure, handler) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        configure(p)
        p.set_defaults(handler=handler)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; errors print one line (no traceback) and return 2 (bad input) or 1."""
    args = _parse(build_parser(), argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:
        return _fail(error, 2)
    except KeyboardInterrupt as error:
        return _fail(str(error) or "interrupted", 1)
    except (TrainingError, OSError) as error:  # run folder, full disk, no network, NaN loss
        return _fail(error, 1)


if __name__ == "__main__":
    raise SystemExit(main())
