"""End-to-end benchmark: quick-profile notebook execution and the site build.

Each notebook is executed with nbclient in memory (quick profile, progress bars off; the
committed notebooks are never written), with the kernel's working directory in
``notebooks/``; the site is built with ``jupyter-book build`` into a temporary folder
(``--path-output``), so ``_build/`` is left alone.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import common

NOTEBOOK_LIMIT_S = 90.0
BUILD_LIMIT_S = 120.0
QUICK_ENV = {"CL_QUICK": "1", "TQDM_DISABLE": "1", "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg"}


def notebooks() -> list[Path]:
    """The chapters, ``notebooks/*.ipynb`` in order."""
    return sorted((common.ROOT / "notebooks").glob("*.ipynb"))


def time_notebook(path: Path, timeout: int = 600) -> dict[str, Any]:
    """Wall time of executing ``path`` in the quick profile (nothing is written)."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    saved = {k: os.environ.get(k) for k in QUICK_ENV}
    os.environ.update(QUICK_ENV)  # the kernel inherits this environment
    start = time.perf_counter()
    error = None
    try:
        client = NotebookClient(
            notebook,
            timeout=timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        )
        client.execute()
    except Exception as exc:  # noqa: BLE001 - a failing notebook is a result, not a crash
        error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    seconds = time.perf_counter() - start
    return {
        "notebook": str(path.relative_to(common.ROOT)),
        "wall_s": seconds,
        "ok": error is None,
        "error": error,
        "limit_s": NOTEBOOK_LIMIT_S,
        "within_limit": error is None and seconds <= NOTEBOOK_LIMIT_S,
    }


def time_site_build(timeout: int = 900) -> dict[str, Any]:
    """Wall time of ``jupyter-book build . -W -n --keep-going`` into a temporary folder."""
    jupyter_book = Path(sys.executable).with_name("jupyter-book")
    with tempfile.TemporaryDirectory(prefix="cl_book_build_") as out:
        command = [str(jupyter_book), "build", ".", "-W", "-n", "--keep-going"]
        command += ["--path-output", out]
        start = time.perf_counter()
        proc = subprocess.run(
            command, cwd=common.ROOT, capture_output=True, text=True, timeout=timeout
        )
        seconds = time.perf_counter() - start
    lines = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr).splitlines()
    problems = [line for line in lines if "WARNING" in line or "ERROR" in line][:10]
    tail = problems + lines[-2:]
    return {
        "command": "jupyter-book build . -W -n --keep-going --path-output <tmp>",
        "wall_s": seconds,
        "returncode": proc.returncode,
        "ok": proc.returncode == 0,
        "output_tail": tail if proc.returncode != 0 else [],
        "limit_s": BUILD_LIMIT_S,
        "within_limit": proc.returncode == 0 and seconds <= BUILD_LIMIT_S,
    }


def run(paths: Sequence[Path] | None = None, build: bool = True) -> dict[str, Any]:
    """Time every notebook (quick profile), then the site build."""
    results = [time_notebook(p) for p in (notebooks() if paths is None else paths)]
    return {
        "profile": "quick (CL_QUICK=1, TQDM_DISABLE=1)",
        "notebooks": results,
        "site_build": time_site_build() if build else None,
    }
