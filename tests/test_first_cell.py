"""The notebooks' first cell on a fresh runtime (Colab), simulated with a new virtualenv.

The first code cell of every chapter installs ``cl_lib`` with pip from the course repository
when it is not importable, and does nothing otherwise. The test

1. snapshots the working tree (tracked and untracked, non-ignored files, as ``git ls-files
   -co --exclude-standard`` lists them) into a temporary git repository, so the current tree
   is what gets installed, and points the cell's ``REPO`` at it (``file://``);
2. creates a virtualenv where ``cl_lib`` is not importable. Installing torch and friends
   would take minutes, so the venv sees the dependencies of this interpreter through a
   ``.pth`` file naming a folder of symlinks to its site-packages *without* anything of
   ``cl_lib`` (no package, no editable finder, no dist-info);
3. runs the cell unchanged, with ``CL_BOOK_SOURCE`` naming the snapshot (the variable a reader
   sets for a fork, a branch or a local clone), with the venv's python; pip runs offline
   (``PIP_NO_INDEX``; no build isolation, so setuptools comes from the dependencies): the
   dependencies are found satisfied and only ``cl_lib`` is installed;
4. checks ``import cl_lib; cl_lib.profile()`` there and the setup cell (second code cell) of
   every chapter, then runs the first cell again with every way of starting a process
   replaced by one that raises: it must not invoke pip;
5. executes chapter 1 whole in a fresh runtime (its kernel is the venv's python), and, with
   ``CL_BOOK_SOURCE`` naming nothing, checks that the cell ends in one clear message (in
   IPython: no traceback), not a ``CalledProcessError`` followed by a cascade of ``NameError``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sysconfig
import venv
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("0*.ipynb"))
REPO_LINE_START = 'REPO = "'
NO_PROCESSES = """import os, subprocess

def _forbidden(*args, **kwargs):
    raise AssertionError(f"the first cell started a process: {args!r}")

subprocess.run = subprocess.call = subprocess.check_call = _forbidden
subprocess.check_output = subprocess.Popen = os.system = _forbidden
"""


def _code_cells(path: Path) -> list[str]:
    """The sources of the code cells of a notebook."""
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]


def _first_cell() -> str:
    return _code_cells(NOTEBOOKS[0])[0]


def _repo_line(cell: str) -> str:
    lines = [line for line in cell.splitlines() if line.strip().startswith(REPO_LINE_START)]
    assert len(lines) == 1, f"the first cell must set REPO once:\n{cell}"
    return lines[0]


def test_every_chapter_has_the_same_first_cell() -> None:
    """One install cell for all chapters, pointing at the repository of _config.yml."""
    assert NOTEBOOKS, "no chapter notebooks"
    first = _first_cell()
    for path in NOTEBOOKS[1:]:
        assert _code_cells(path)[0] == first, f"{path.name}: first code cell differs"
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    assert _repo_line(first).strip() == f'{REPO_LINE_START}{url}"'


# ---------------------------------------------------------------------------- fresh runtime


@dataclass
class FreshRuntime:
    """A virtualenv without cl_lib and a snapshot repository of the working tree."""

    python: Path
    site_packages: Path
    source: str  # CL_BOOK_SOURCE: the snapshot repository (a local clone)
    workdir: Path  # an empty working directory (the repository is not on sys.path)
    env: dict[str, str]

    def run(self, code: str, name: str) -> subprocess.CompletedProcess:
        script = self.workdir / f"step_{name}.py"  # never a stdlib name (e.g. profile.py)
        script.write_text(code, encoding="utf-8")
        return subprocess.run(
            [str(self.python), str(script)],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )


def _git(*args: str, cwd: Path) -> str:
    out = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=True
    )
    return out.stdout


def _snapshot(dest: Path) -> None:
    """Copy the tracked and untracked, non-ignored files into a new one-commit repository."""
    listed = _git("ls-files", "-z", "-co", "--exclude-standard", cwd=ROOT).split("\0")
    for rel in filter(None, listed):
        source = ROOT / rel
        if source.is_file():  # tracked files deleted in the working tree are skipped
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    _git("init", "-q", cwd=dest)
    _git("add", "-A", cwd=dest)
    ident = ["-c", "user.name=first-cell test", "-c", "user.email=test@example.invalid"]
    _git(*ident, "commit", "-q", "--no-gpg-sign", "-m", "snapshot", cwd=dest)


def _dependency_overlay(dest: Path) -> Path:
    """Symlinks to this interpreter's site-packages, leaving out everything of cl_lib."""
    dest.mkdir()
    folders = {Path(sysconfig.get_paths()[key]) for key in ("purelib", "platlib")}
    for folder in folders:
        for entry in folder.iterdir():
            name = entry.name.lower()
            if "cl_lib" in name or "cl-lib" in name or (dest / entry.name).exists():
                continue
            (dest / entry.name).symlink_to(entry)
    return dest


def _fresh_runtime(base: Path) -> FreshRuntime:
    """A new venv without cl_lib, borrowing this interpreter's dependencies, and a snapshot."""
    if shutil.which("git") is None:
        pytest.skip("git is not installed (pip installs the cell's git+ URL with it)")
    if importlib.util.find_spec("pip") is None:
        pytest.skip("pip is not installed for this interpreter (the venv borrows it)")
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot list the working tree's files")
    repo = base / "course"
    _snapshot(repo)
    env_dir = base / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env_dir)
    python = env_dir / "bin" / "python"
    site = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    overlay = _dependency_overlay(base / "dependencies")
    (site / "dependencies.pth").write_text(f"{overlay}\n", encoding="utf-8")
    workdir = base / "work"
    workdir.mkdir()
    drop = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "CL_QUICK")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PIP_")}
    env.update(
        PIP_NO_INDEX="1",  # offline: every dependency must already be satisfied
        PIP_NO_BUILD_ISOLATION="0",  # pip's inverted switch: 0 turns build isolation off
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_CACHE_DIR=str(base / "pip-cache"),
        MPLBACKEND="Agg",
        TQDM_DISABLE="1",
        CL_BOOK_SOURCE=str(repo),
    )
    return FreshRuntime(python, site, str(repo), workdir, env)


@pytest.fixture(scope="module")
def fresh(tmp_path_factory: pytest.TempPathFactory) -> FreshRuntime:
    return _fresh_runtime(tmp_path_factory.mktemp("fresh_runtime"))


def _cell_for(runtime: FreshRuntime) -> str:
    """The first cell, unchanged: the runtime's CL_BOOK_SOURCE points it at the snapshot."""
    return _first_cell()


PROBE = """import importlib.util, json, sys
spec = importlib.util.find_spec("cl_lib")
print(json.dumps({"cl_lib": None if spec is None else spec.origin,
                  "torch": importlib.util.find_spec("torch") is not None}))
"""


@pytest.mark.slow
def test_first_cell_installs_cl_lib_once(fresh: FreshRuntime) -> None:
    before = fresh.run(PROBE, "probe_before")
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout) == {"cl_lib": None, "torch": True}
    guarded = fresh.run(NO_PROCESSES + _cell_for(fresh), "guard_control")
    assert guarded.returncode != 0 and "started a process" in guarded.stderr  # the guard works

    first = fresh.run(_cell_for(fresh), "first_cell")
    assert first.returncode == 0, f"first cell failed:\n{first.stdout}\n{first.stderr}"
    installed = sorted(p.name for p in fresh.site_packages.iterdir() if p.name != "__pycache__")
    assert installed[0] == "cl_lib" and installed[1].startswith("cl_lib-")  # and nothing else
    assert installed[2:] == ["dependencies.pth"], installed

    check = fresh.run(
        "import cl_lib, torch\nprint(cl_lib.__file__)\nprint(cl_lib.profile())\n",
        "profile",
    )
    assert check.returncode == 0, check.stderr
    origin, profile = check.stdout.split()
    assert Path(origin).is_relative_to(fresh.site_packages)  # the installed copy, not ROOT
    assert profile == ("full" if torch.cuda.is_available() else "quick")  # CL_QUICK unset

    setups = [_code_cells(path)[1] for path in NOTEBOOKS]
    runner = "".join(
        f"exec(compile({src!r}, {path.name!r}, 'exec'), {{}})\n"
        for src, path in zip(setups, NOTEBOOKS, strict=True)
    )
    setup = fresh.run(runner, "setup_cells")
    assert setup.returncode == 0, f"a setup cell failed:\n{setup.stderr[-3000:]}"
    assert setup.stdout.count("Profile: ") == len(NOTEBOOKS)

    second = fresh.run(NO_PROCESSES + _cell_for(fresh), "second_run")
    assert second.returncode == 0, f"second run invoked a process:\n{second.stderr}"


NOWHERE = "/nonexistent/course-clone"


@pytest.mark.slow
def test_a_failed_install_ends_in_one_clear_message(tmp_path: Path) -> None:
    """CL_BOOK_SOURCE naming nothing: pip fails, and the cell says what failed and what to do."""
    runtime = _fresh_runtime(tmp_path)
    runtime.env["CL_BOOK_SOURCE"] = NOWHERE
    plain = runtime.run(_cell_for(runtime), "failed_install")
    assert plain.returncode != 0
    assert f"Could not install cl_lib from {NOWHERE}" in plain.stderr
    assert "set CL_BOOK_SOURCE to a fork" in plain.stderr
    assert "CalledProcessError" not in plain.stderr

    # In Jupyter (IPython) the message is shown alone, without a traceback.
    shell = (
        "from IPython.core.interactiveshell import InteractiveShell\n"
        "shell = InteractiveShell.instance()\n"
        f"result = shell.run_cell({_cell_for(runtime)!r})\n"
        "print('ERROR TYPE', type(result.error_in_exec).__name__)\n"
    )
    ipython = runtime.run(shell, "failed_install_ipython")
    shown = ipython.stdout + ipython.stderr
    assert "ERROR TYPE InstallError" in shown, shown
    assert f"Could not install cl_lib from {NOWHERE}" in shown
    assert "Traceback" not in shown and "CalledProcessError" not in shown


def _execute_chapter_one(runtime: FreshRuntime, name: str) -> subprocess.CompletedProcess:
    """Execute chapter 1 with nbclient in the venv (the kernel is the venv's python)."""
    env = {k: v for k, v in runtime.env.items() if k != "MPLBACKEND"}  # the kernel's own backend
    script = runtime.workdir / f"execute_{name}.py"
    script.write_text(
        "import nbclient, nbformat, sys\n"
        f"nb = nbformat.read({str(NOTEBOOKS[0])!r}, as_version=4)\n"
        "for cell in nb.cells:\n"
        "    cell.pop('outputs', None) if cell.cell_type != 'code' else cell.update(outputs=[])\n"
        "client = nbclient.NotebookClient(nb, kernel_name='python3', timeout=600,\n"
        f"    resources={{'metadata': {{'path': {str(runtime.workdir)!r}}}}})\n"
        "try:\n"
        "    client.execute()\n"
        "except nbclient.exceptions.CellExecutionError as err:\n"
        "    ran = [c for c in nb.cells if c.cell_type == 'code' and c.get('outputs')]\n"
        "    print('FAILED AFTER', len(ran), 'CELLS WITH OUTPUT'); print(err.ename, err.evalue)\n"
        "    sys.exit(3)\n"
        "print('EXECUTED', sum(c.cell_type == 'code' for c in nb.cells), 'CODE CELLS')\n",
        encoding="utf-8",
    )
    return subprocess.run(
        [str(runtime.python), str(script)],
        cwd=runtime.workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )


@pytest.mark.slow
def test_chapter_one_runs_in_a_fresh_runtime_and_fails_clearly_without_a_source(
    tmp_path: Path,
) -> None:
    """Chapter 1, top to bottom, in a venv without cl_lib: installed from CL_BOOK_SOURCE."""
    nowhere = _fresh_runtime(tmp_path / "nowhere")
    nowhere.env["CL_BOOK_SOURCE"] = NOWHERE
    failed = _execute_chapter_one(nowhere, "nowhere")
    assert failed.returncode == 3, failed.stdout + failed.stderr[-2000:]
    assert "FAILED AFTER 1 CELLS WITH OUTPUT" in failed.stdout  # stopped at the first cell
    assert f"InstallError Could not install cl_lib from {NOWHERE}" in failed.stdout

    runtime = _fresh_runtime(tmp_path / "clone")
    done = _execute_chapter_one(runtime, "clone")
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "EXECUTED" in done.stdout
