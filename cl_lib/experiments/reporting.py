"""Reading results back: summaries, paired differences and intervals, printed tables.

Here: :func:`summarise` (per cell, flagged runs left out by default), :func:`flagged_runs`,
:func:`unflagged_runs`, :func:`run_metric`, :func:`paired_differences`, :func:`paired_stats` and
:func:`metric_difference_stats` (95% t intervals across seeds), :func:`print_table`,
:func:`print_paired`, :func:`print_intervals`, :func:`print_flagged`,
:func:`print_plateau_table`, :func:`print_provenance`, :func:`compare_rerun` and
:func:`print_rerun_comparison` (a rerun against the stored runs), and
:func:`load_stored` (a stored results file from the checkout or the course's source). Not here:
writing results (:mod:`cl_lib.experiments.runner`), the statistics (:mod:`cl_lib.stats`).
"""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from cl_lib.experiments.runner import SMOKE_WARNING, cell_hash, load_results


def _new_style(results: Mapping[str, Any]) -> bool:
    """Files of schema 2 and later are read with flags and intervals by default."""
    return int(results.get("schema_version", 1)) >= 2


def _exclude(results: Mapping[str, Any], exclude_flagged: bool | None) -> bool:
    return _new_style(results) if exclude_flagged is None else bool(exclude_flagged)


def _cell_runs(results: Mapping[str, Any], cell: str) -> list[Mapping[str, Any]]:
    """The runs of ``cell``; ValueError when it mixes configurations or repeats a seed."""
    runs = [r for r in results["runs"] if r["cell"] == cell]
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(
            f"results hold cell {cell!r} more than once for a seed (seeds {sorted(seeds)}): a "
            f"results file must hold one configuration per cell"
        )
    hashes = {cell_hash(r["config"]) for r in runs if "config" in r}
    if len(hashes) > 1:
        raise ValueError(
            f"results mix {len(hashes)} configurations in cell {cell!r}: a results file must "
            f"hold one configuration per cell"
        )
    return runs


def _flags(run: Mapping[str, Any]) -> dict[str, Any]:
    from cl_lib.collapse import run_flags

    return run_flags(run)


def flagged_runs(results: Mapping[str, Any], **thresholds: float) -> list[dict[str, Any]]:
    """Per run (grid order): cell, seed and :func:`cl_lib.collapse.run_flags` (``thresholds``:
    its keyword arguments ``plateau_margin``, ``plateau_share``, ``knn_margin``)."""
    from cl_lib.collapse import run_flags

    out = []
    for cell in results["grid"]["cells"]:
        for r in sorted(_cell_runs(results, cell["cell"]), key=lambda r: r["seed"]):
            out.append({"cell": r["cell"], "seed": r["seed"], **run_flags(r, **thresholds)})
    return out


def unflagged_runs(results: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The runs a conclusion may rest on: neither flag of :func:`cl_lib.collapse.run_flags`."""
    return [r for r in results["runs"] if not _flags(r)["flagged"]]


def summarise(
    results: Mapping[str, Any], metric: str, *, exclude_flagged: bool | None = None
) -> list[dict[str, Any]]:
    """Per cell: n, mean, std (ddof 1), median, min, max of ``metric`` and the flag counts.

    ``metric`` is a key of a run's ``metrics`` or a dotted path into it (``bias.h.bias``).
    Cells keep the order of the grid. Flags (:func:`cl_lib.collapse.run_flags`): ``flagged``
    runs, of which ``flagged_plateau`` and ``flagged_knn``, ``flagged_seeds``; with
    ``exclude_flagged`` the statistics use the unflagged runs only (``n``; ``runs``: all) and
    ``excluded`` counts the others. Default: exclude on files of schema 2, keep every run of
    the old files (schema 1; the flags are still counted where the runs hold their config and
    history). ``collapsed``: the training loop's spread flag.
    """
    exclude = _exclude(results, exclude_flagged)
    out = []
    for cell in results["grid"]["cells"]:
        runs = _cell_runs(results, cell["cell"])
        flags_known = exclude or all("config" in r and "history" in r for r in runs)
        flags = [_flags(r) if flags_known else None for r in runs]
        kept = [r for r, f in zip(runs, flags, strict=True) if not (exclude and f["flagged"])]
        values = [_lookup(r["metrics"], metric) for r in kept]
        t = torch.tensor([v for v in values if v is not None], dtype=torch.float64)
        n = int(t.numel())
        row = {
            "cell": cell["cell"],
            "params": cell["params"],
            "n": n,
            "mean": float(t.mean()) if n else math.nan,
            "std": float(t.std()) if n > 1 else math.nan,
            "median": float(t.median()) if n else math.nan,
            "min": float(t.min()) if n else math.nan,
            "max": float(t.max()) if n else math.nan,
            "collapsed": sum(bool(r["metrics"].get("collapsed")) for r in runs),
            "seeds": [r["seed"] for r in kept],
            "runs": len(runs),
            "excluded": len(runs) - len(kept),
        }
        if flags_known:
            row["flagged"] = sum(f["flagged"] for f in flags)
            row["flagged_plateau"] = sum(f["plateau"] for f in flags)
            row["flagged_knn"] = sum(f["knn"] for f in flags)
            row["flagged_seeds"] = [
                r["seed"] for r, f in zip(runs, flags, strict=True) if f["flagged"]
            ]
        out.append(row)
    return out


def run_metric(run: Mapping[str, Any], metric: str) -> Any:
    """The value of ``metric`` (a key or dotted path such as ``bias.h.bias``) of one stored run."""
    return _lookup(run["metrics"], metric)


# =========================================================================== reading results


def load_stored(name: str) -> dict[str, Any]:
    """Stored ``results/NAME.json``: from the checkout when there is one, else from the source.

    Outside a checkout (Colab) the file comes from the repository the notebook installed
    ``cl_lib`` from (:func:`cl_lib.source.results_location`, which ``CL_BOOK_SOURCE``
    overrides); a failure raises :class:`cl_lib.source.SourceError` saying what to do.
    """
    from cl_lib import experiments  # the package: a REPO_ROOT patched there is used
    from cl_lib.source import fetch_result

    return load_results(fetch_result(f"{name}.json", experiments.REPO_ROOT))


def print_provenance(results: Mapping[str, Any]) -> None:
    """Print where and how the stored runs of an experiment were made."""
    prov, runs = results["provenance"], results["runs"]
    commit = (prov["git_commit"] or "unknown")[:10] + (
        " (uncommitted changes)" if prov["git_dirty"] else ""
    )
    print(f"experiment {results['experiment']!r}, profile {results['profile']}: {len(runs)} runs")
    if results["profile"] == "smoke":
        print(f"  WARNING: {results.get('warning', SMOKE_WARNING)}")
    overrides = {}
    for item in results["grid"]["profile_overrides"]:  # later entries win, as in the runner
        key, value = item.split("=", 1)
        overrides.pop(key, None)
        overrides[key] = value
    settings = ", ".join(f"{k}={v}" for k, v in overrides.items())
    base = f"base config {results['grid']['base_config']} with {settings}"
    print(textwrap.fill(base, 88, initial_indent="  ", subsequent_indent="    "))
    machine = f"{prov['device']} ({prov['cpu']}), {prov['threads']} thread(s)"
    print(f"  code {commit}; torch {prov['torch']} on {machine}")
    total = sum(r["wall_time_s"] for r in runs)
    per_run = total / max(len(runs), 1)
    print(f"  {total / 60:.0f} min of run time in all, {per_run:.0f} s per run on average")


def print_table(
    results: Mapping[str, Any],
    metrics: Mapping[str, str],
    scale: Mapping[str, float] | None = None,
    *,
    exclude_flagged: bool | None = None,
    labels: Mapping[str, str] | None = None,
) -> None:
    """Print per cell the runs, the flagged runs and each metric's median +- std over seeds.

    Files of schema 2 (and ``exclude_flagged=True``) print one compact line per cell: runs,
    flagged runs (``p``: plateau, ``k``: kNN not above random initialisation), the runs used,
    and ``median +- std`` of the unflagged runs; ``labels`` renames cells (default: the cell
    ids). Old files print as they always did (``collapsed``: the training loop's spread flag).
    """
    scale = scale or {}
    kw = {"exclude_flagged": exclude_flagged}
    rows = {label: summarise(results, key, **kw) for label, key in metrics.items()}
    if _new_style(results) or bool(exclude_flagged):
        _print_compact_table(rows, scale, labels or {})
        return
    width = max(len(c["cell"]) for c in results["grid"]["cells"]) + 2
    first = next(iter(rows.values()))
    header = f"{'cell':<{width}}{'n':>3}{'collapsed':>10}"
    for label in metrics:
        header += f"  {label + ' mean+-std (median)':>34}"
    print(header)
    for i, row in enumerate(first):
        line = f"{row['cell']:<{width}}{row['n']:>3}{row['collapsed']:>10}"
        for label, cells in rows.items():
            c, f = cells[i], scale.get(label, 1.0)
            std = "  n/a" if c["n"] < 2 else f"{f * c['std']:5.3g}"
            line += f"  {f * c['mean']:>14.3g} +- {std:>6} ({f * c['median']:.3g})"
        print(line)


def _flag_text(row: Mapping[str, Any]) -> str:
    """``0``, or the flagged count with its kinds: ``3 (3p)``, ``2 (1p 1k)``."""
    if not row["flagged"]:
        return "0"
    kinds = (("flagged_plateau", "p"), ("flagged_knn", "k"))
    return f"{row['flagged']} ({' '.join(f'{row[key]}{tag}' for key, tag in kinds if row[key])})"


def _decimals(values: Sequence[float]) -> int:
    """Decimals that show about three significant digits of the largest finite value."""
    finite = [abs(v) for v in values if math.isfinite(v) and v != 0.0]
    return max(0, 2 - math.floor(math.log10(max(finite)))) if finite else 1


def _median_std(row: Mapping[str, Any], factor: float, decimals: int) -> str:
    """``median +- std`` of one summary row, times ``factor``; ``n/a`` without runs."""
    if row["n"] == 0:
        return "n/a"
    std = f"{factor * row['std']:.{decimals}f}" if row["n"] > 1 else "n/a"
    return f"{factor * row['median']:.{decimals}f} +- {std}"


def _print_compact_table(
    rows: Mapping[str, list[dict[str, Any]]],
    scale: Mapping[str, float],
    labels: Mapping[str, str],
) -> None:
    """The schema-2 table of :func:`print_table`: one line per cell, one column per metric."""
    first = next(iter(rows.values()))
    names = [labels.get(row["cell"], row["cell"]) for row in first]
    width = max(len(n) for n in [*names, "cell"]) + 2
    cols = {}
    for label, cells in rows.items():
        f = scale.get(label, 1.0)
        digits = _decimals([f * r["median"] for r in cells])
        cols[label] = [_median_std(r, f, digits) for r in cells]
    widths = {
        label: max(len(label), 13, *(len(v) for v in vals)) + 2 for label, vals in cols.items()
    }
    head = f"{'cell':<{width}}{'runs':>4}{'flagged':>11}{'used':>5}"
    print(head + "".join(f"{label:>{widths[label]}}" for label in cols))
    print(" " * len(head) + "".join(f"{'median +- std':>{w}}" for w in widths.values()))
    for i, row in enumerate(first):
        line = f"{names[i]:<{width}}{row['runs']:>4}{_flag_text(row):>11}{row['n']:>5}"
        print(line + "".join(f"{vals[i]:>{widths[label]}}" for label, vals in cols.items()))


def print_flagged(results: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> None:
    """Print every flagged run: its flags, epochs on the plateau, final kNN and alignment."""
    labels = labels or {}
    runs = {(r["cell"], r["seed"]): r for r in results["runs"]}
    flagged = [f for f in flagged_runs(results) if f["flagged"]]
    print(f"flagged runs: {len(flagged)} of {len(runs)}")
    for f in flagged:
        run = runs[f["cell"], f["seed"]]
        kinds = "+".join(kind for kind in ("plateau", "knn") if f[kind])
        epochs = f"{len(f['plateau_epochs'])} of {len(run['history'])}"
        print(
            f"  {labels.get(f['cell'], f['cell'])} seed {f['seed']}: {kinds}; plateau {epochs} "
            f"epochs, kNN {100 * run['metrics']['knn_acc']:.1f}%, "
            f"alignment {run['metrics']['alignment']:.4f}"
        )


def print_plateau_table(
    results: Mapping[str, Any], labels: Mapping[str, str] | None = None
) -> None:
    """Print per cell the median rho at initialisation and at the end, the flagged runs, and
    each seed's epochs on the collapse plateau (:func:`cl_lib.collapse.run_flags`)."""
    labels = labels or {}
    flags = {(f["cell"], f["seed"]): f for f in flagged_runs(results)}
    names = {c["cell"]: labels.get(c["cell"], c["cell"]) for c in results["grid"]["cells"]}
    width = max(len(n) for n in [*names.values(), "cell"]) + 2
    epochs = len(results["runs"][0]["history"]) if results["runs"] else 0
    print(f"{'cell':<{width}}rho init  end  flagged  epochs on the plateau (of {epochs})")
    for cell, name in names.items():
        runs = sorted(_cell_runs(results, cell), key=lambda r: r["seed"])
        cell_flags = [flags[cell, r["seed"]] for r in runs]
        rho0 = torch.tensor([r["metrics"]["rho"]["init"] for r in runs]).median()
        rho1 = torch.tensor([r["metrics"]["rho"]["final"] for r in runs]).median()
        flagged = f"{sum(f['flagged'] for f in cell_flags)}/{len(runs)}"
        plateau = " ".join(f"{len(f['plateau_epochs']):2d}" for f in cell_flags)
        print(f"{name:<{width}}{float(rho0):8.2f}{float(rho1):5.2f}{flagged:>9}  {plateau}")


def _pairs(
    results: Mapping[str, Any],
    reference: str,
    metric: str,
    cells: Sequence[str] | None,
    exclude: bool,
) -> dict[str, tuple[list[float], list[int], list[int]]]:
    """Per cell: differences to ``reference`` on common seeds, their seeds, excluded seeds."""
    ref_runs = _cell_runs(results, reference)
    if not ref_runs:
        raise ValueError(f"reference must be a cell with runs, got {reference!r}")
    ref = {r["seed"]: r for r in ref_runs}
    out: dict[str, tuple[list[float], list[int], list[int]]] = {}
    for cell in results["grid"]["cells"]:
        if cell["cell"] == reference or (cells is not None and cell["cell"] not in cells):
            continue
        runs = sorted(
            (r for r in _cell_runs(results, cell["cell"]) if r["seed"] in ref),
            key=lambda r: r["seed"],
        )
        if not runs:
            continue
        diffs, seeds, excluded = [], [], []
        for r in runs:
            base = ref[r["seed"]]
            if exclude and (_flags(r)["flagged"] or _flags(base)["flagged"]):
                excluded.append(r["seed"])
                continue
            diffs.append(_lookup(r["metrics"], metric) - _lookup(base["metrics"], metric))
            seeds.append(r["seed"])
        out[cell["cell"]] = (diffs, seeds, excluded)
    return out


def paired_differences(
    results: Mapping[str, Any],
    reference: str,
    metric: str = "knn_acc",
    cells: Sequence[str] | None = None,
    *,
    exclude_flagged: bool | None = None,
) -> dict[str, list[float]]:
    """Per cell: ``metric`` minus the ``reference`` cell's on the same seed (seed order).

    The same seed means the same data, initialisation and augmentation draws, so paired
    differences remove most of the seed-to-seed spread. ``cells`` limits the comparison to these
    cells (default: all); cells without a common seed are left out. ``exclude_flagged`` drops a
    seed when either run of the pair is flagged (default: on files of schema 2); see
    :func:`paired_stats` for the counts and intervals.
    """
    pairs = _pairs(results, reference, metric, cells, _exclude(results, exclude_flagged))
    return {cell: diffs for cell, (diffs, _, _) in pairs.items()}


def paired_stats(
    results: Mapping[str, Any],
    reference: str,
    metric: str = "knn_acc",
    cells: Sequence[str] | None = None,
    *,
    exclude_flagged: bool | None = None,
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Per cell: the paired differences to ``reference`` with their Student-t interval.

    Keys: ``n`` (pairs used), ``mean``, ``std``, ``low``, ``high`` (the ``level`` interval,
    :func:`cl_lib.stats.paired_interval`), ``sign_holds`` (seeds whose difference has the sign
    of the mean), ``distinguishable`` (the interval excludes 0), ``verdict`` (``higher``,
    ``lower`` or ``not distinguishable at n seeds``), ``seeds``, ``differences``, and
    ``excluded`` / ``excluded_seeds``: pairs left out because a run was flagged.
    """
    pairs = _pairs(results, reference, metric, cells, _exclude(results, exclude_flagged))
    return {
        cell: _interval_row(diffs, seeds, excluded, level)
        for cell, (diffs, seeds, excluded) in pairs.items()
    }


def _interval_row(
    diffs: list[float], seeds: list[int], excluded: list[int], level: float
) -> dict[str, Any]:
    """The statistics of :func:`paired_stats` for one list of paired differences."""
    from cl_lib.stats import paired_interval

    iv = paired_interval(diffs, level)
    return {
        **dataclasses.asdict(iv),
        "distinguishable": iv.distinguishable,
        "verdict": iv.verdict(),
        "seeds": seeds,
        "differences": diffs,
        "excluded": len(excluded),
        "excluded_seeds": excluded,
    }


def metric_difference_stats(
    results: Mapping[str, Any],
    cell: str,
    metric: str,
    minus: str,
    *,
    exclude_flagged: bool | None = None,
    level: float = 0.95,
) -> dict[str, Any]:
    """``metric`` minus ``minus`` within each run of ``cell`` (say kNN on h minus kNN on z),
    with the keys of :func:`paired_stats`; flagged runs are left out as there."""
    exclude = _exclude(results, exclude_flagged)
    runs = sorted(_cell_runs(results, cell), key=lambda r: r["seed"])
    if not runs:
        raise ValueError(f"cell must be a cell with runs, got {cell!r}")
    kept = [r for r in runs if not (exclude and _flags(r)["flagged"])]
    diffs = [_lookup(r["metrics"], metric) - _lookup(r["metrics"], minus) for r in kept]
    excluded = [r["seed"] for r in runs if r not in kept]
    return _interval_row(diffs, [r["seed"] for r in kept], excluded, level)


def print_paired(
    results: Mapping[str, Any],
    reference: str,
    metric: str = "knn_acc",
    scale: float = 100.0,
    cells: Sequence[str] | None = None,
    *,
    exclude_flagged: bool | None = None,
    intervals: bool | None = None,
    labels: Mapping[str, str] | None = None,
) -> None:
    """Print the paired differences to ``reference`` (times ``scale``), one line per cell.

    With ``intervals`` (default: on files of schema 2): :func:`paired_stats`, i.e. the pairs
    used of those present, the mean, its 95% t interval, and the verdict (``higher``, ``lower``
    or ``not distinguishable``) with the seeds that agree with the sign of the mean;
    ``labels`` renames cells. Without (old files): mean, std and how many seeds gained.
    """
    if intervals is None:
        intervals = _new_style(results)
    if not intervals:
        print(
            f"paired differences to {reference} ({metric} x {scale:g}), seeds present in both "
            f"cells:"
        )
        for cell, diffs in paired_differences(
            results, reference, metric, cells, exclude_flagged=exclude_flagged
        ).items():
            t = scale * torch.tensor(diffs, dtype=torch.float64)
            sd = f"{float(t.std()):.3g}" if t.numel() > 1 else "n/a"
            better = int((t > 0).sum())
            print(
                f"  {cell:<44} mean {float(t.mean()):+.3g} (std {sd}), "
                f"better on {better} of {t.numel()} seeds"
            )
        return
    labels = labels or {}
    stats = paired_stats(results, reference, metric, cells, exclude_flagged=exclude_flagged)
    ref = labels.get(reference, reference)
    print(f"{metric} x {scale:g} minus {ref} on the same seed; pairs with a flagged run left out")
    print_intervals({labels.get(cell, cell): st for cell, st in stats.items()}, scale)


def print_intervals(rows: Mapping[str, Mapping[str, Any]], scale: float = 100.0) -> None:
    """Print one line per named row of :func:`paired_stats` or :func:`metric_difference_stats`
    statistics (times ``scale``): pairs used, mean, 95% t interval, and the verdict with the
    seeds that agree with the sign of the mean."""
    width = max(len(n) for n in [*rows, "cell"]) + 2
    bounds = [scale * st[k] for st in rows.values() for k in ("mean", "low", "high")]
    d = _decimals(bounds)
    head = f"{'cell':<{width}}{'pairs':>8}{'mean':>9}{'95% t interval':>20}"
    print(f"{head}  verdict (seeds agreeing)")
    for name, st in rows.items():
        used = f"{st['n']} of {st['n'] + st['excluded']}"
        line = f"{name:<{width}}{used:>8}"
        if st["n"] == 0:
            print(f"{line}{'':>29}  no unflagged pair")
            continue
        f = scale
        ci = "n/a" if st["n"] < 2 else f"[{f * st['low']:+.{d}f}, {f * st['high']:+.{d}f}]"
        verdict = "not distinguishable" if not st["distinguishable"] else st["verdict"]
        sign = f"({st['sign_holds']}/{st['n']})"
        print(f"{line}{f * st['mean']:>+9.{d}f}{ci:>20}  {verdict} {sign}")


REPRODUCED_METRICS = ("knn_acc", "linear_acc", "final_loss")
"""The metrics :func:`compare_rerun` compares between a rerun and the stored runs."""


def compare_rerun(
    stored: Mapping[str, Any],
    rerun: Mapping[str, Any],
    metrics: Sequence[str] = REPRODUCED_METRICS,
) -> list[dict[str, Any]]:
    """Per run of ``rerun`` (grid order): how far it lies from the stored run it repeats.

    A rerun run repeats the stored run with the same configuration hash and seed; ValueError
    when there is none (the rerun used another grid or sizing). Keys: ``cell``, ``seed``,
    ``diff`` (rerun minus stored, per metric), ``identical`` (every metric equal) and
    ``within_spread``: ``|diff|`` of each metric at most the standard deviation of the stored
    cell over its seeds (every run counted; ``False`` for a single-seed cell that differs).
    """
    by_key = {(r["config_hash"], r["seed"]): r for r in stored["runs"]}
    spread = {
        metric: {
            row["cell"]: row["std"] for row in summarise(stored, metric, exclude_flagged=False)
        }
        for metric in metrics
    }
    out = []
    for run in rerun["runs"]:
        old = by_key.get((run["config_hash"], run["seed"]))
        if old is None:
            raise ValueError(
                f"rerun of cell {run['cell']!r}, seed {run['seed']}, has no stored run with its "
                f"configuration (hash {run['config_hash']}): compare files of the same grid and "
                "sizing"
            )
        diff = {
            m: float(_lookup(run["metrics"], m)) - float(_lookup(old["metrics"], m))
            for m in metrics
        }
        within = all(
            d == 0.0 or abs(d) <= spread[m][old["cell"]] for m, d in diff.items()
        )  # a NaN spread (one seed) compares False
        out.append(
            {
                "cell": old["cell"],
                "seed": run["seed"],
                "diff": diff,
                "identical": all(d == 0.0 for d in diff.values()),
                "within_spread": within,
            }
        )
    return out


def print_rerun_comparison(
    stored: Mapping[str, Any],
    rerun: Mapping[str, Any],
    metrics: Sequence[str] = REPRODUCED_METRICS,
) -> list[dict[str, Any]]:
    """Print :func:`compare_rerun`, one line per rerun run and a count; return its rows."""
    rows = compare_rerun(stored, rerun, metrics)
    print(
        f"{rerun['experiment']}: rerun at {(rerun['provenance']['git_commit'] or '?')[:10]} "
        f"against the stored runs at {(stored['provenance']['git_commit'] or '?')[:10]}"
    )
    for row in rows:
        if row["identical"]:
            verdict = "identical"
        elif row["within_spread"]:
            verdict = "within the cell's spread"
        else:
            verdict = "OUTSIDE the cell's spread"
        diffs = ", ".join(f"{m} {d:+.3g}" for m, d in row["diff"].items())
        print(f"  {row['cell']} seed {row['seed']}: {verdict} ({diffs})")
    same = sum(r["identical"] for r in rows)
    within = sum(r["within_spread"] for r in rows)
    print(f"  {same} of {len(rows)} runs identical, {within} within the stored spread")
    return rows


def _lookup(metrics: Mapping[str, Any], key: str) -> Any:
    node: Any = metrics
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ValueError(f"metric {key!r} not found (missing {part!r})")
        node = node[part]
    return node
