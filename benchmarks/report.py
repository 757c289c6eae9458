"""Render ``results/benchmarks.json`` into the Performance page and its figure.

``python -m benchmarks.report`` rewrites the generated blocks of ``book/performance.md``
(between ``<!-- BEGIN GENERATED: name -->`` and ``<!-- END GENERATED: name -->``) and the
figure ``book/_static/performance/benchmarks.png``; ``--check`` only verifies that the page
matches the JSON (exit status 1 if not), so the numbers on the page are exactly those of
the committed file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import common

RESULTS = common.ROOT / "results" / "benchmarks.json"
PAGE = common.ROOT / "book" / "performance.md"
FIGURE = common.ROOT / "book" / "_static" / "performance" / "benchmarks.png"
_BLOCK = re.compile(
    r"(<!-- BEGIN GENERATED: (?P<name>[a-z0-9_]+) -->\n)(?P<body>.*?)"
    r"(<!-- END GENERATED: (?P=name) -->)",
    re.DOTALL,
)
AUGMENT_TARGET = 5.0
BALANCED_TOLERANCE = 0.10


def _fmt(value: float | None, digits: int = 3) -> str:
    """``value`` with ``digits`` significant digits, an en dash when missing."""
    if value is None:
        return "–"
    return f"{value:.{digits}g}"


def _num(value: float) -> str:
    """Three significant digits, without exponent notation for values up to 10^6."""
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _ms(summary: dict[str, float] | None) -> str:
    """Median (IQR) in milliseconds."""
    if summary is None:
        return "–"
    return f"{_num(summary['median_s'] * 1e3)} ({_num(summary['iqr_s'] * 1e3)})"


def _mib(value: int | None) -> str:
    """Bytes as MiB."""
    return "–" if value is None else f"{value / 2**20:.4g}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown pipe table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_provenance(data: dict[str, Any]) -> str:
    """Machine, software and command of the run."""
    p = data["provenance"]
    dirty = " (uncommitted changes in the tree)" if p.get("git_dirty") else ""
    rows = [
        ("date (UTC)", p["date_utc"]),
        ("commit", f"`{p['git_commit']}`{dirty}"),
        (
            "CPU",
            f"{p['cpu_model']}, {p['cpu_count']} cores, {p['torch_num_threads']} torch threads",
        ),
        ("devices", ", ".join(p.get("devices", [p["device"]]))),
        (
            "load average (1, 5, 15 min) at start",
            ", ".join(f"{x:.2f}" for x in p["load_average_start"]),
        ),
        ("load average at end", ", ".join(f"{x:.2f}" for x in p.get("load_average_end", []))),
        (
            "software",
            f"Python {p['python']}, torch {p['torch']}, torchvision {p['torchvision']}, "
            f"lightly {p['lightly']}, pytorch-metric-learning {p['pytorch_metric_learning']}",
        ),
        ("wall time of the whole run", f"{p.get('wall_s', 0):.0f} s"),
    ]
    text = _table(["", ""], [(k, v) for k, v in rows])
    return text + f"\nCommand:\n\n```bash\n{p['command']}\n```\n"


def _loss_cases(data: dict[str, Any]) -> list[dict[str, Any]]:
    return data["parts"]["loss"]["cases"]


def render_loss(data: dict[str, Any]) -> str:
    """One table per device: time, memory and ratios to cl_lib NT-Xent."""
    part = data["parts"]["loss"]
    out = []
    for device in dict.fromkeys(c["device"] for c in part["cases"]):
        rows = []
        for c in (c for c in part["cases"] if c["device"] == device):
            if c["skipped"]:
                rows.append((str(c["n"]), c["impl"], "skipped", "–", "–", "–"))
                continue
            rows.append(
                (
                    str(c["n"]),
                    c["impl"],
                    _ms(c["time"]),
                    _fmt(c["time_ratio_to_reference"]),
                    _mib(c["peak_memory_bytes"]),
                    _fmt(c["memory_ratio_to_reference"]),
                )
            )
        header = [
            "N",
            "implementation",
            "fwd+bwd ms, median (IQR)",
            "time / cl_lib",
            "peak MiB",
            "memory / cl_lib",
        ]
        out.append(
            f"**{device}** (D = {part['dim']}, tau = {part['temperature']})\n\n"
            + _table(header, rows)
        )
    skipped = {c["skipped"] for c in part["cases"] if c["skipped"]}
    notes = "".join(f"\n- skipped: {s}" for s in sorted(skipped))
    method = part["memory_method"]["cpu"]
    return "\n".join(out) + f"\nPeak memory (CPU): {method}.{notes}\n"


def _profile_table(profile: dict[str, Any]) -> str:
    """Top operators of one profiled call."""
    rows = [
        (f"`{op['op']}`", _num(op["self_cpu_ms"]), str(op["calls"])) for op in profile["top_ops"]
    ]
    return _table(["operator", "self CPU ms", "calls"], rows)


def render_profile(data: dict[str, Any]) -> str:
    """torch.profiler evidence: the loss at one N and the batched augmentation."""
    out = []
    loss = data["parts"].get("loss", {}).get("profile")
    if loss and loss["by_impl"]:
        rows = [
            (
                name,
                _num(p["self_cpu_ms"]),
                _fmt(p["matmul_share"], 2),
                ", ".join(f"`{op['op']}` {_num(op['self_cpu_ms'])}" for op in p["top_ops"][:4]),
            )
            for name, p in loss["by_impl"].items()
        ]
        out.append(
            f"One forward + backward at N = {loss['n']} ({loss['device']}), profiled once:\n\n"
            + _table(["implementation", "self CPU ms", "matmul share", "top operators (ms)"], rows)
        )
    aug = data["parts"].get("augment", {}).get("profile_simclr_cifar")
    if aug:
        out.append(
            f"`make_views` (simclr_cifar, two views of a batch of {aug['batch']}), profiled once "
            f"({_num(aug['self_cpu_ms'])} ms of operator time):\n\n" + _profile_table(aug)
        )
    return "\n".join(out) if out else "No profile in this run.\n"


def render_augment(data: dict[str, Any]) -> str:
    """Images/s of each pipeline and speed-up over torchvision."""
    part = data["parts"]["augment"]
    rows = [
        (
            str(c["batch"]),
            c["impl"],
            f"{c['images_per_s']['median']:.0f} ({c['images_per_s']['iqr']:.0f})",
            _fmt(c["speedup_vs_torchvision"]),
        )
        for c in part["cases"]
    ]
    header = ["batch", "pipeline", "images/s, median (IQR)", "× torchvision"]
    return _table(header, rows) + (
        f"\n{part['unit']}; {part['num_batches']} batches per pass, {part['repeats']} passes "
        f"per pipeline, torch threads in the main process: {part.get('torch_threads', '–')}.\n"
    )


def render_train(data: dict[str, Any]) -> str:
    """Images/s of a pre-training step and the share of each phase."""
    part = data["parts"]["train"]
    rows = []
    for c in part["cases"]:
        frac = c["phase_fraction"]
        rows.append(
            (
                c["backbone"],
                str(c["batch"]),
                c["device"]
                + (" amp" if c["amp"] else "")
                + (" channels_last" if c["channels_last"] else ""),
                f"{c['step_time']['median_s']:.3g}",
                f"{c['images_per_s']:.3g}",
                " / ".join(
                    f"{100 * frac[k]:.0f}"
                    for k in ("augment", "forward", "loss", "backward", "optimizer")
                ),
            )
        )
    header = [
        "backbone",
        "batch",
        "device",
        "step s (median)",
        "images/s",
        "% augment / forward / loss / backward / optimizer",
    ]
    return _table(header, rows) + f"\nA step: {part['step']}; {part['unit']}.\n"


def render_e2e(data: dict[str, Any]) -> str:
    """Notebook and site-build wall times against their limits."""
    part = data["parts"].get("e2e")
    if part is None:
        return "Not measured in this run (`--e2e`).\n"
    rows = [
        (
            f"`{n['notebook']}`",
            f"{n['wall_s']:.1f}",
            f"{n['limit_s']:.0f}",
            "yes" if n["within_limit"] else ("failed" if not n["ok"] else "no"),
        )
        for n in part["notebooks"]
    ]
    build = part.get("site_build")
    if build is not None:
        rows.append(
            (
                "site build",
                f"{build['wall_s']:.1f}",
                f"{build['limit_s']:.0f}",
                "yes" if build["within_limit"] else ("failed" if not build["ok"] else "no"),
            )
        )
    return _table(["what", "wall s", "limit s", "within limit"], rows)


def _median(case: dict[str, Any] | None) -> float | None:
    return None if case is None or case["time"] is None else case["time"]["median_s"]


def targets(data: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for every target of the issue that the JSON covers."""
    rows: list[tuple[str, str, bool | None]] = []
    parts = data["parts"]
    if "loss" in parts:
        cases = _loss_cases(data)
        for device in dict.fromkeys(c["device"] for c in cases):
            for n in (1024, 4096):
                at_n = [c for c in cases if c["device"] == device and c["n"] == n]
                ours = next((c for c in at_n if c["impl"] == "cl_lib nt_xent"), None)
                peers = [c for c in at_n if not c["impl"].startswith("cl_lib") and c["time"]]
                if ours is None or not peers:
                    continue
                fastest = min(peers, key=_median)
                lean = min(
                    (c for c in peers if c["peak_memory_bytes"]),
                    key=lambda c: c["peak_memory_bytes"],
                    default=None,
                )
                t_ok = _median(ours) <= _median(fastest)
                m_ok = None
                mem_text = ""
                if lean is not None and ours["peak_memory_bytes"]:
                    m_ok = ours["peak_memory_bytes"] <= lean["peak_memory_bytes"]
                    mem_text = (
                        f"; peak {_mib(ours['peak_memory_bytes'])} MiB vs "
                        f"{_mib(lean['peak_memory_bytes'])} MiB ({lean['impl']})"
                    )
                rows.append(
                    (
                        f"NT-Xent at N = {n} ({device}) at least as fast as the fastest peer, "
                        "no more peak memory",
                        f"{_num(_median(ours) * 1e3)} ms vs {_num(_median(fastest) * 1e3)} ms "
                        f"({fastest['impl']}){mem_text}",
                        t_ok and (m_ok is not False),
                    )
                )
            bal = [
                c
                for c in cases
                if c["device"] == device and c["impl"].startswith("cl_lib balanced")
            ]
            ratios = [c["time_ratio_to_reference"] for c in bal if c["time_ratio_to_reference"]]
            if ratios:
                worst = max(ratios)
                rows.append(
                    (
                        f"balanced loss within {BALANCED_TOLERANCE:.0%} of cl_lib NT-Xent "
                        f"({device})",
                        "time ratios " + ", ".join(_fmt(r) for r in ratios) + " over N",
                        worst <= 1 + BALANCED_TOLERANCE,
                    )
                )
    if "augment" in parts:
        ours = [
            c for c in parts["augment"]["cases"] if c["impl"] == "cl_lib simclr_cifar (batched)"
        ]
        speedups = [c["speedup_vs_torchvision"] for c in ours]
        rows.append(
            (
                f"batched augmentation >= {AUGMENT_TARGET:g}x torchvision's DataLoader",
                "speed-ups "
                + ", ".join(
                    f"{s:.3g}x (batch {c['batch']})" for s, c in zip(speedups, ours, strict=True)
                ),
                min(speedups) >= AUGMENT_TARGET,
            )
        )
    if "e2e" in parts:
        e2e = parts["e2e"]
        worst = max(e2e["notebooks"], key=lambda n: n["wall_s"], default=None)
        if worst is not None:
            rows.append(
                (
                    "every notebook's quick profile within 90 s",
                    f"slowest: `{worst['notebook']}` {worst['wall_s']:.1f} s",
                    all(n["within_limit"] for n in e2e["notebooks"]),
                )
            )
        if e2e.get("site_build"):
            b = e2e["site_build"]
            rows.append(
                (
                    "site build within 2 minutes",
                    f"{b['wall_s']:.1f} s (exit {b['returncode']})",
                    b["within_limit"],
                )
            )
    return rows


def render_targets(data: dict[str, Any]) -> str:
    """The targets table."""
    label = {True: "met", False: "**missed**", None: "–"}
    return _table(
        ["target", "measured", "status"], [(t, m, label[ok]) for t, m, ok in targets(data)]
    )


def render_summary(data: dict[str, Any]) -> str:
    """Key ratios as bullets: before/after the fused loss, peers, augmentation, step phases."""
    parts, bullets = data["parts"], []
    if "loss" in parts:
        cases = _loss_cases(data)
        for device in dict.fromkeys(c["device"] for c in cases):
            at = [c for c in cases if c["device"] == device]
            for n in dict.fromkeys(c["n"] for c in at):
                row = [c for c in at if c["n"] == n and c["time"]]
                ours = next((c for c in row if c["impl"] == "cl_lib nt_xent"), None)
                if ours is None:
                    continue
                texts = []
                for c in row:
                    if c is ours or c["impl"].startswith("cl_lib balanced"):
                        continue
                    mem = c["memory_ratio_to_reference"]
                    texts.append(
                        f"{c['impl']} {_fmt(c['time_ratio_to_reference'])}x the time"
                        + (f", {_fmt(mem)}x the memory" if mem else "")
                    )
                bullets.append(
                    f"{device}, N = {n}: relative to `cl_lib` NT-Xent, " + "; ".join(texts)
                )
    if "augment" in parts:
        for c in parts["augment"]["cases"]:
            if c["impl"].startswith("cl_lib"):
                bullets.append(
                    f"augmentation, batch {c['batch']}: {c['impl']} runs at "
                    f"{_fmt(c['speedup_vs_torchvision'])}x torchvision's DataLoader"
                )
    if "train" in parts:
        for c in parts["train"]["cases"]:
            f = c["phase_fraction"]
            bullets.append(
                f"training step, {c['backbone']} batch {c['batch']} ({c['device']}): loss "
                f"{100 * f['loss']:.1f}% of the step, augmentation {100 * f['augment']:.0f}%"
            )
    return "".join(f"- {b}\n" for b in bullets) or "Nothing measured.\n"


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "summary": render_summary,
    "provenance": render_provenance,
    "targets": render_targets,
    "loss": render_loss,
    "augment": render_augment,
    "train": render_train,
    "e2e": render_e2e,
    "profile": render_profile,
}


def render_page(page: str, data: dict[str, Any]) -> str:
    """``page`` with every generated block re-rendered from ``data``."""

    def replace(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in RENDERERS:
            raise ValueError(f"page: unknown generated block {name!r}")
        try:
            body = RENDERERS[name](data)
        except KeyError:
            body = f"Not measured in this run (part `{name}` missing).\n"
        return match.group(1) + "\n" + body + "\n" + match.group(4)

    return _BLOCK.sub(replace, page)


def plot(data: dict[str, Any], path: Path) -> None:
    """Loss time and memory against N, and augmentation throughput, on a white background."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), facecolor="white")
    cases = [c for c in _loss_cases(data) if c["device"] == "cpu"]
    for impl in dict.fromkeys(c["impl"] for c in cases):
        own = [c for c in cases if c["impl"] == impl and c["time"]]
        style = "-" if impl.startswith("cl_lib") and "@" not in impl else "--"
        axes[0].plot(
            [c["n"] for c in own],
            [c["time"]["median_s"] * 1e3 for c in own],
            style,
            marker="o",
            label=impl,
        )
        mem = [c for c in own if c["peak_memory_bytes"]]
        axes[1].plot(
            [c["n"] for c in mem],
            [c["peak_memory_bytes"] / 2**20 for c in mem],
            style,
            marker="o",
            label=impl,
        )
    for ax, ylabel, title in (
        (axes[0], "forward + backward time (ms, median)", "Loss time (CPU)"),
        (axes[1], "peak memory (MiB)", "Loss peak memory (CPU)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        sizes = sorted({c["n"] for c in cases})
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.minorticks_off()
        ax.set_xlabel("N (pairs), D = 128")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7)
    aug = data["parts"]["augment"]["cases"]
    batches = sorted({c["batch"] for c in aug})
    impls = list(dict.fromkeys(c["impl"] for c in aug))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        values = [
            next(c["images_per_s"]["median"] for c in aug if c["impl"] == impl and c["batch"] == b)
            for b in batches
        ]
        axes[2].bar([i + k * width for i in range(len(batches))], values, width, label=impl)
    axes[2].set_xticks(
        [i + 0.4 - width / 2 for i in range(len(batches))], [str(b) for b in batches]
    )
    top = max(c["images_per_s"]["median"] for c in aug)
    axes[2].set_ylim(0, 1.4 * top)  # room for the legend above the bars
    axes[2].set_xlabel("batch size")
    axes[2].set_ylabel("source images / s (two views each)")
    axes[2].set_title("Augmentation throughput (CPU)")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, facecolor="white")
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite (or ``--check``) the page and the figure from the JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--page", type=Path, default=PAGE)
    parser.add_argument("--figure", type=Path, default=FIGURE)
    parser.add_argument("--check", action="store_true", help="verify only, write nothing")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    data = json.loads(args.results.read_text())
    page = args.page.read_text()
    rendered = render_page(page, data)
    if args.check:
        if rendered != page:
            print(
                f"{args.page} is out of date with {args.results}; run python -m benchmarks.report"
            )
            return 1
        return 0
    args.page.write_text(rendered)
    if "loss" in data["parts"] and "augment" in data["parts"]:
        plot(data, args.figure)
    print(f"wrote {args.page} and {args.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
