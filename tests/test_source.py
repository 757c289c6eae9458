"""cl_lib.source: the repository address in one place and the CL_BOOK_SOURCE override."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import yaml

from cl_lib import experiments as ex
from cl_lib import source
from cl_lib.source import REPOSITORY_URL, SourceError, install_source, results_location

ROOT = Path(__file__).resolve().parents[1]


def test_the_repository_address_agrees_everywhere() -> None:
    """_config.yml, the README and every chapter's first cell name REPOSITORY_URL."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
    assert config["repository"]["url"] == REPOSITORY_URL
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"git+{REPOSITORY_URL}.git" in readme
    assert "CL_BOOK_SOURCE" in readme
    for path in sorted((ROOT / "notebooks").glob("0*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        first = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
        assert f'REPO = "{REPOSITORY_URL}"' in first, path.name
        assert 'os.environ.get("CL_BOOK_SOURCE"' in first, path.name


def test_install_source_default_and_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CL_BOOK_SOURCE", raising=False)
    assert install_source() == f"git+{REPOSITORY_URL}.git"
    monkeypatch.setenv("CL_BOOK_SOURCE", " /content/clone ")
    assert install_source() == "/content/clone"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (
            f"git+{REPOSITORY_URL}.git",
            "https://raw.githubusercontent.com/cl-book/contrastive-learning-book/main/results",
        ),
        (
            "git+https://github.com/you/fork.git@teaching",
            "https://raw.githubusercontent.com/you/fork/teaching/results",
        ),
        ("https://github.com/you/fork", "https://raw.githubusercontent.com/you/fork/main/results"),
    ],
)
def test_results_location_of_a_github_source(given: str, expected: str) -> None:
    assert results_location(given) == expected


def test_results_location_of_a_local_clone(tmp_path: Path) -> None:
    assert results_location(str(tmp_path)) == tmp_path / "results"
    assert results_location(f"file://{tmp_path}") == tmp_path / "results"
    with pytest.raises(ValueError, match="CL_BOOK_SOURCE='/no/such/folder'"):
        results_location("/no/such/folder")


@pytest.fixture
def outside_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """load_stored as on Colab: no results folder beside the library or the working folder."""
    monkeypatch.setattr(ex, "REPO_ROOT", tmp_path / "installed")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_load_stored_reads_a_local_clone_named_by_the_variable(
    outside_checkout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clone = outside_checkout / "clone"
    (clone / "results").mkdir(parents=True)
    stored = (ROOT / "results" / "long_tailed.json").read_text(encoding="utf-8")
    (clone / "results" / "long_tailed.json").write_text(stored, encoding="utf-8")
    monkeypatch.setenv("CL_BOOK_SOURCE", str(clone))
    assert ex.load_stored("long_tailed")["experiment"] == "long_tailed"
    with pytest.raises(SourceError, match=r"results/aug_strength\.json does not exist"):
        ex.load_stored("aug_strength")


def test_load_stored_says_where_from_and_what_to_do_when_the_fetch_fails(
    outside_checkout: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CL_BOOK_SOURCE", "git+https://github.com/you/fork.git@teaching")

    def offline(url: str, target: Path) -> None:
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlretrieve", offline)
    with pytest.raises(SourceError) as caught:
        ex.load_stored("balance_grid")
    message = str(caught.value)
    assert "raw.githubusercontent.com/you/fork/teaching/results/balance_grid.json" in message
    assert "network is unreachable" in message and "CL_BOOK_SOURCE" in message
    assert caught.value._render_traceback_() == [f"SourceError: {message}"]  # Jupyter: no trace
    assert source.SOURCE_ENV == "CL_BOOK_SOURCE"
