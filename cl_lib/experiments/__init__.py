"""Experiment runner: named grids of config overrides x seeds on a base config.

An :class:`Experiment` is a base config (a YAML file plus overrides, one set per sizing), a
list of *cells* (each a dict of ``key.sub -> value`` overrides) and seeds. :func:`run_experiment`
pre-trains every (cell, seed) with :func:`cl_lib.train.pretrain` in its own folder
(``runs/<name>/<cell>-s<seed>-<hash>/``), evaluates it (:func:`evaluate_run`) and, after every
finished run, atomically rewrites ``results/<name>.json`` (``SCHEMA_VERSION``): the grid, every
run (cell, seed, full config, config hash, metrics, per-epoch history, wall time) and provenance
(git commit, dates, torch version, device, CPU / GPU, threads, command line).

Sizings: the default (profile ``quick``) is the shapes recipe of ``configs/shapes_quick.yaml``
(4000 training / 2000 test images, batch 128, 22 epochs, 682 steps), the one the chapters'
claims rest on; ``--full`` is the GPU sizing; ``--smoke`` a tiny sizing to check the pipeline
on a CPU, written to ``<out>/smoke/<name>.json`` and marked ``profile: smoke`` (no claim may
rest on it). A results file holds one configuration per cell: the runner refuses to add runs
of another configuration (another sizing, other ``--set`` overrides) to an existing file and
says which keys differ.

Restarted after an interruption it skips the runs already recorded (same cell, seed and config
hash) and resumes a half-finished run from its checkpoint. A run that raises is recorded under
``failures`` and the grid goes on; the command then exits with status 1.

Readers: :func:`summarise`, :func:`paired_differences`, :func:`paired_stats`,
:func:`metric_difference_stats`, :func:`unflagged_runs`, :func:`print_table`,
:func:`print_paired`, :func:`print_intervals`, :func:`print_flagged`, :func:`print_plateau_table`,
:func:`compare_rerun` and :func:`print_rerun_comparison` (a rerun against the stored runs);
flags of bad runs come from :func:`cl_lib.collapse.run_flags` (:func:`flagged_runs`).

Command line::

    python -m cl_lib.experiments aug_strength [--full | --smoke] [--seeds 0,1,2] [--out results]
    python -m cl_lib experiment aug_strength ...   (the same, through the main CLI)

Modules, one concern each (this package re-exports their public names):
``grids`` (:class:`Experiment`, ``EXPERIMENTS``, sizings: add a grid there), ``measures``
(:func:`evaluate_run` and the measurements of a run), ``runner`` (:func:`run_experiment`, the
results file), ``reporting`` (summaries, paired statistics, printing, :func:`load_stored`),
``cli`` (the command line).
"""

from __future__ import annotations

from cl_lib.experiments import grids, measures, runner
from cl_lib.experiments.cli import configure_parser, main, run_experiment_cli
from cl_lib.experiments.grids import (
    EXPERIMENTS,
    Experiment,
    cell_id,
    config_hash,
)
from cl_lib.experiments.measures import (
    _bias_with_controls,
    evaluate_run,
    initial_model,
    measure_bias,
    measure_loss_gap,
    measure_rho,
    measure_views,
)
from cl_lib.experiments.reporting import (
    compare_rerun,
    flagged_runs,
    load_stored,
    metric_difference_stats,
    paired_differences,
    paired_stats,
    print_flagged,
    print_intervals,
    print_paired,
    print_plateau_table,
    print_provenance,
    print_rerun_comparison,
    print_table,
    run_metric,
    summarise,
    unflagged_runs,
)
from cl_lib.experiments.runner import (
    SMOKE_WARNING,
    _merged_cells,
    _plan,
    cell_hash,
    load_results,
    provenance,
    run_experiment,
)
from cl_lib.provenance import REPO_ROOT

__all__ = [
    "EXPERIMENTS",
    "SCHEMA_VERSION",
    "VIEW_TEMPERATURES",
    "Experiment",
    "PROFILES",
    "READABLE_SCHEMAS",
    "REFERENCE_STRENGTH",
    "RHO_IMAGES",
    "SMOKE_WARNING",
    "cell_hash",
    "cell_id",
    "compare_rerun",
    "config_hash",
    "flagged_runs",
    "initial_model",
    "measure_rho",
    "paired_stats",
    "configure_parser",
    "evaluate_run",
    "load_results",
    "main",
    "measure_bias",
    "measure_loss_gap",
    "measure_views",
    "provenance",
    "run_experiment",
    "run_experiment_cli",
    "load_stored",
    "metric_difference_stats",
    "paired_differences",
    "print_intervals",
    "print_rerun_comparison",
    "print_flagged",
    "print_paired",
    "print_plateau_table",
    "print_provenance",
    "print_table",
    "run_metric",
    "unflagged_runs",
    "summarise",
]
# The documented constants (autodoc reads attribute docstrings from this file only).
SCHEMA_VERSION = runner.SCHEMA_VERSION
"""Version of the results files written now (2 added the shapes recipe as default sizing, rho,
bias controls and one configuration per cell)."""
READABLE_SCHEMAS = runner.READABLE_SCHEMAS
"""Versions :func:`load_results` reads (1: the stored results of the old quick sizing)."""
PROFILES = grids.PROFILES
"""Sizings of a grid, ``quick`` (the default, CPU), ``full`` (GPU) or ``smoke`` (pipeline check)."""
REFERENCE_STRENGTH = grids.REFERENCE_STRENGTH
"""Augmentation strength of the fixed reference under which every model's bias is also measured."""
VIEW_TEMPERATURES = measures.VIEW_TEMPERATURES
"""Temperatures at which :func:`measure_views` evaluates the Jensen gap and effective negatives."""
RHO_IMAGES = measures.RHO_IMAGES
"""Test images whose two views measure rho (:func:`measure_rho`) at initialisation and the end."""
# Not in __all__ but kept here: REPO_ROOT (the runner and load_stored read it from this package
# at call time, so that it can be pointed elsewhere), and private helpers the tests use.
_REEXPORTED = (REPO_ROOT, _bias_with_controls, _merged_cells, _plan)
