"""The resumable runner: every (cell, seed) of a grid, trained, measured and recorded.

Here: :func:`run_experiment` (plan, skip what is recorded, resume a half-finished run from its
checkpoint, record failures, rewrite ``results/<name>.json`` atomically after every run), the
results file's schema (:data:`SCHEMA_VERSION`, :func:`load_results`), the refusal to mix
configurations in one file, and :func:`provenance`. Not here: the grids
(:mod:`cl_lib.experiments.grids`), the command line (:mod:`cl_lib.experiments.cli`), reading
results back (:mod:`cl_lib.experiments.reporting`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cl_lib import runtime
from cl_lib.experiments.grids import (
    _HASH_IGNORED,
    _SMOKE,
    EXPERIMENTS,
    Experiment,
    _override,
    cell_id,
    config_hash,
)
from cl_lib.files import write_json
from cl_lib.provenance import git_state, machine

SCHEMA_VERSION = 2
"""Version of the results files written now (2 added the shapes recipe as default sizing, rho,
bias controls and one configuration per cell)."""
READABLE_SCHEMAS = (1, 2)
"""Versions :func:`load_results` reads (1: the stored results of the old quick sizing)."""


def provenance(device: str = "auto") -> dict[str, Any]:
    """Where and how an experiment ran: git, dates, versions, hardware, command line."""
    commit, dirty = git_state()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "start": _now(),
        "end": None,
        **machine(device),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
    }


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results file written by :func:`run_experiment` (checks JSON and schema version)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(
            f"results file {path} is not valid JSON ({error}); restore it (git checkout) or "
            f"move it away and rerun the grid"
        ) from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version not in READABLE_SCHEMAS:
        raise ValueError(
            f"results file {path} has schema_version {version!r}, "
            f"expected one of {list(READABLE_SCHEMAS)}"
        )
    return data


def _profile(full: bool, smoke: bool) -> str:
    if full and smoke:
        raise ValueError("full and smoke exclude each other; choose one sizing")
    return "full" if full else "smoke" if smoke else "quick"


def _sizing(exp: Experiment, profile: str) -> tuple[str, tuple[str, ...]]:
    """Base config and profile overrides of ``exp`` at ``profile``."""
    if profile == "full":
        return exp.full_config or exp.base_config, exp.full_overrides
    if profile == "smoke":
        return exp.base_config, (*exp.quick_overrides, *_SMOKE)
    return exp.base_config, exp.quick_overrides


def cell_hash(config_dict: Mapping[str, Any]) -> str:
    """:func:`config_hash` without the seed: equal for every run of one cell configuration."""
    return config_hash({k: v for k, v in config_dict.items() if k != "seed"})


def _plan(
    exp: Experiment,
    full: bool,
    seeds: Sequence[int],
    extra: Sequence[str],
    runs_dir: Path,
    smoke: bool = False,
) -> list[dict[str, Any]]:
    """Every (cell, seed) with its config, seed-major (all cells of a seed, then the next).

    Run folders are ``runs_dir/<name>/<cell>-s<seed>-<first 8 hex digits of the config hash>``,
    so runs of different sizings or overrides never share (and never resume) a checkpoint.
    """
    from cl_lib import experiments  # the package: a REPO_ROOT patched there is used
    from cl_lib.train import config_to_dict, load_config

    base, profile_overrides = _sizing(exp, _profile(full, smoke))
    base_path = Path(base) if Path(base).is_absolute() else experiments.REPO_ROOT / base
    plan = []
    for seed in seeds:
        for cell in exp.cells:
            cid = cell_id(cell)
            overrides = [
                *profile_overrides,
                *(_override(k, v) for k, v in cell.items()),
                *extra,
                f"seed={seed}",
            ]
            config = load_config(base_path, overrides)
            digest = config_hash(config_to_dict(config))
            out_dir = runs_dir / exp.name / f"{cid}-s{seed}-{digest[:8]}"
            config = dataclasses.replace(config, out_dir=str(out_dir))
            cdict = config_to_dict(config)
            plan.append(
                {
                    "cell": cid,
                    "params": dict(cell),
                    "seed": seed,
                    "config": config,
                    "config_dict": cdict,
                    "config_hash": config_hash(cdict),
                }
            )
    return plan


def _merged_cells(exp: Experiment, results: dict[str, Any]) -> list[dict[str, Any]]:
    """The experiment's cells, then any stored cell that still has runs (a grid was changed)."""
    cells = [{"cell": cell_id(c), "params": dict(c)} for c in exp.cells]
    known = {c["cell"] for c in cells}
    with_runs = {r["cell"] for r in results.get("runs", [])}
    old = [c for c in results["grid"]["cells"] if c["cell"] not in known and c["cell"] in with_runs]
    return cells + old


def _done_keys(results: dict[str, Any]) -> set[tuple[str, int, str]]:
    return {(r["cell"], r["seed"], r["config_hash"]) for r in results.get("runs", [])}


def _fresh_results(
    exp: Experiment, full: bool, seeds: Sequence[int], smoke: bool = False
) -> dict[str, Any]:
    profile = _profile(full, smoke)
    base, profile_overrides = _sizing(exp, profile)
    results = {
        "schema_version": SCHEMA_VERSION,
        "experiment": exp.name,
        "description": exp.description,
        "notes": exp.notes,
        "profile": profile,
        "grid": {
            "base_config": base,
            "profile_overrides": list(profile_overrides),
            "cells": [{"cell": cell_id(c), "params": dict(c)} for c in exp.cells],
            "seeds": list(seeds),
        },
        "provenance": None,
        "sessions": [],
        "runs": [],
    }
    if profile == "smoke":
        results["warning"] = SMOKE_WARNING
    return results


SMOKE_WARNING = "smoke sizing: a pipeline check, nothing is learned; no claim may rest on it"


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """``key: old -> new`` for the keys (ignoring seed and paths) where two configs differ."""
    a, b = _flat(old), _flat(new)
    ignored = {*_HASH_IGNORED, "seed"}
    keys = sorted(k for k in a.keys() | b.keys() if k not in ignored and a.get(k) != b.get(k))
    shown = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys[:6])
    return shown + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")


def _check_extendable(results: Mapping[str, Any], plan: Sequence[Mapping], path: Path) -> None:
    """Refuse to add runs of another configuration (or sizing) to an existing results file."""
    advice = (
        f"A results file holds one configuration per cell: move {path} away "
        f"(e.g. mkdir -p {path.parent}/old && git mv {path} {path.parent}/old/) "
        f"or write elsewhere with --out"
    )
    if results.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"results file {path} was written by an older runner (schema_version "
            f"{results.get('schema_version')!r}, now {SCHEMA_VERSION}); it is read as it is but "
            f"not extended. {advice}"
        )
    profile = plan[0]["profile"]
    if results.get("profile") != profile:
        raise ValueError(
            f"results file {path} holds the {results.get('profile')!r} sizing, this grid runs "
            f"at {profile!r}. {advice}"
        )
    stored: dict[str, Mapping[str, Any]] = {}
    for run in results.get("runs", []):
        stored.setdefault(run["cell"], run["config"])
    for item in plan:
        old = stored.get(item["cell"])
        if old is not None and cell_hash(old) != cell_hash(item["config_dict"]):
            raise ValueError(
                f"results file {path} holds runs of cell {item['cell']!r} made with another "
                f"configuration ({_config_diff(old, item['config_dict'])}); refusing to mix "
                f"them. {advice}"
            )


def run_experiment(
    exp: Experiment | str,
    *,
    full: bool = False,
    smoke: bool = False,
    seeds: Sequence[int] | None = None,
    out: str | os.PathLike = "results",
    runs_dir: str | os.PathLike = "runs",
    overrides: Sequence[str] = (),
    progress: bool = True,
    verbose: bool = False,
) -> dict[str, Any]:
    """Run (or finish) every (cell, seed) of ``exp``; returns the results dict it wrote.

    ``out``/``<name>.json`` (``smoke``: ``out``/``smoke``/``<name>.json``) is rewritten
    atomically after each run. Runs already recorded with the same cell, seed and config hash
    are skipped; a run whose folder holds a checkpoint resumes from it. ``overrides``
    (``key.sub=value``) apply to every run after the grid. An existing file whose runs were
    made with another configuration of a cell, another sizing or an older schema raises
    ``ValueError`` (nothing is run). A run that raises is recorded under ``failures`` (and
    counted in the session's ``failed_runs``); the grid goes on.
    """
    from cl_lib import experiments  # the package: an evaluate_run patched there is used
    from cl_lib.train import pretrain

    if isinstance(exp, str):
        if exp not in EXPERIMENTS:
            raise ValueError(f"exp must be one of {', '.join(EXPERIMENTS)}, got {exp!r}")
        exp = EXPERIMENTS[exp]
    profile = _profile(full, smoke)
    seeds = tuple(exp.full_seeds if full else exp.seeds) if seeds is None else tuple(seeds)
    if not seeds or any(not isinstance(s, int) or s < 0 for s in seeds):
        raise ValueError(f"seeds must be a non-empty sequence of ints >= 0, got {seeds}")
    folder = Path(out) / "smoke" if smoke else Path(out)
    path = folder / f"{exp.name}.json"
    plan = _plan(exp, full, seeds, overrides, Path(runs_dir) / ("smoke" if smoke else ""), smoke)
    for item in plan:
        item["profile"] = profile
    if path.exists():
        results = load_results(path)
        _check_extendable(results, plan, path)
    else:
        results = _fresh_results(exp, full, seeds, smoke)
    results["grid"]["seeds"] = sorted(set(results["grid"]["seeds"]) | set(seeds))
    results["grid"]["cells"] = _merged_cells(exp, results)
    session = provenance(plan[0]["config"].device)
    session["overrides"] = list(overrides)
    results["sessions"].append(session)
    if results["provenance"] is None:
        results["provenance"] = dict(session)
    done = _done_keys(results)
    todo = [p for p in plan if (p["cell"], p["seed"], p["config_hash"]) not in done]
    session["runs_planned"] = len(todo)
    session["failed_runs"] = 0
    write_json(path, results)
    bar = runtime.progress(todo, desc=exp.name, **({} if progress else {"disable": True}))
    for item in bar:
        if progress:
            bar.set_postfix_str(f"{item['cell']} s{item['seed']}")
        start = time.perf_counter()
        try:
            train_result = pretrain(item["config"], resume=True, progress=verbose)
        except Exception as error:  # e.g. a non-finite loss, a corrupt checkpoint: record it
            session["failed_runs"] += 1
            results.setdefault("failures", []).append(
                {
                    "cell": item["cell"],
                    "seed": item["seed"],
                    "config_hash": item["config_hash"],
                    "error": f"{type(error).__name__}: {error}",
                    "at": _now(),
                }
            )
            write_json(path, results)
            continue
        trained = time.perf_counter()
        metrics = experiments.evaluate_run(
            train_result, bias=exp.bias, tail_classes=exp.tail_classes
        )
        results["runs"].append(
            {
                "cell": item["cell"],
                "params": item["params"],
                "seed": item["seed"],
                "config_hash": item["config_hash"],
                "config": item["config_dict"],
                "metrics": metrics,
                "history": train_result.history,
                "wall_time_s": time.perf_counter() - start,
                "eval_time_s": time.perf_counter() - trained,
                "finished": _now(),
            }
        )
        session["end"] = results["provenance"]["end"] = _now()
        write_json(path, results)
    session["end"] = results["provenance"]["end"] = _now()
    write_json(path, results)
    return results
