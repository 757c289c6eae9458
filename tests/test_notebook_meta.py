"""Structural checks of the chapter notebooks and the book's sources (no kernel needed).

Every chapter notebook must: install ``cl_lib`` from the repository named in
``_config.yml`` in its first code cell (only when it is missing), store the outputs of
one in-order run without errors, state its learning goals at the start and end with a
summary, and be listed in ``_toc.yml``. Every ``{cite}`` key used in the notebooks and
the book pages must exist in ``book/references.bib``.
"""

from __future__ import annotations

import json
import re
from itertools import pairwise
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(
    p for p in (ROOT / "notebooks").glob("*.ipynb") if ".ipynb_checkpoints" not in p.parts
)
BOOK_PAGES = sorted((ROOT / "book").glob("*.md"))
BIB = ROOT / "book" / "references.bib"

FIND_SPEC_GUARD = 'if importlib.util.find_spec("cl_lib") is None:'
HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(?P<title>.+?)\s*#*\s*$", re.M)
BOLD_LEAD = re.compile(r"^\s*\*\*(?P<title>[^*\n]+)\*\*", re.M)
GOALS = re.compile(r"learning goals|learning objectives|what you will learn|you will learn", re.I)
SUMMARY = re.compile(r"\bsummary\b", re.I)
CITE = re.compile(r"\{cite(?::[a-z]+)?\}`(?P<keys>[^`]+)`")
BIB_ENTRY = re.compile(r"^\s*@(?P<kind>\w+)\s*\{\s*(?P<key>[^,\s]+)\s*,", re.M)
REQUIRED_FIELDS = ("author", "title", "year")

needs_notebooks = pytest.mark.skipif(not NOTEBOOKS, reason="no notebooks yet")


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _source(cell: dict) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def _cells(nb: dict, kind: str) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == kind]


def _titles(markdown: str) -> list[str]:
    """Headings and bold lead-ins (``**Learning goals.** ...``) of a markdown cell."""
    return [m["title"] for m in HEADING.finditer(markdown)] + [
        m["title"] for m in BOLD_LEAD.finditer(markdown)
    ]


def _toc_files() -> set[str]:
    """Every ``file:`` entry of ``_toc.yml`` (without suffix), the root included."""
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    found = {toc["root"]}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if "file" in node:
                found.add(str(node["file"]))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(toc)
    return {str(Path(f).with_suffix("")) for f in found}


def _bib_keys() -> list[str]:
    return [m["key"] for m in BIB_ENTRY.finditer(BIB.read_text(encoding="utf-8"))]


def _cited_keys(text: str) -> set[str]:
    return {k.strip() for m in CITE.finditer(text) for k in m["keys"].split(",") if k.strip()}


def _nb_id(path: Path) -> str:
    return path.stem


# ------------------------------------------------------------------ per-notebook checks


@needs_notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_nb_id)
def test_first_code_cell_installs_cl_lib_from_the_repository(path: Path) -> None:
    url = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))["repository"]["url"]
    code = _cells(_load(path), "code")
    assert code, "the notebook has no code cell"
    first = _source(code[0])
    assert url in first, f"first code cell does not install from {url}"
    assert FIND_SPEC_GUARD in first, "first code cell lacks the find_spec guard"
    assert "pip" in first and "install" in first


@needs_notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_nb_id)
def test_cells_were_executed_once_in_order(path: Path) -> None:
    code = [c for c in _cells(_load(path), "code") if _source(c).strip()]
    counts = [c.get("execution_count") for c in code]
    unexecuted = [i for i, n in enumerate(counts) if n is None]
    assert not unexecuted, f"code cells never executed (indices among code cells): {unexecuted}"
    assert counts and counts[0] == 1, f"the run did not start in a fresh kernel: {counts[:3]}"
    assert all(a < b for a, b in pairwise(counts)), f"cells ran out of order: {counts}"


@needs_notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_nb_id)
def test_no_error_outputs(path: Path) -> None:
    for index, cell in enumerate(_cells(_load(path), "code")):
        for output in cell.get("outputs", []):
            assert output.get("output_type") != "error", (
                f"code cell {index} stored an error: {output.get('ename')}: {output.get('evalue')}"
            )
            text = output.get("text", "")
            text = "".join(text) if isinstance(text, list) else text
            assert "Traceback (most recent call last)" not in text, f"code cell {index}: traceback"


@needs_notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_nb_id)
def test_learning_goals_at_the_start_and_summary_at_the_end(path: Path) -> None:
    markdown = [_source(c) for c in _cells(_load(path), "markdown")]
    assert markdown, "the notebook has no markdown cell"
    assert HEADING.search(markdown[0]), "the first markdown cell should open with a title"
    start = [t for cell in markdown[:3] for t in _titles(cell)]
    assert any(GOALS.search(t) for t in start), f"no 'Learning goals' among {start}"
    end = [m["title"] for cell in markdown[-3:] for m in HEADING.finditer(cell)]
    assert any(SUMMARY.search(t) for t in end), (
        f"no 'Summary' heading in the last three markdown cells (headings there: {end})"
    )


@needs_notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_nb_id)
def test_notebook_is_in_the_table_of_contents(path: Path) -> None:
    entry = str(path.relative_to(ROOT).with_suffix(""))
    assert entry in _toc_files(), f"{entry} is missing from _toc.yml"


# ------------------------------------------------------------------ book-wide checks


def test_toc_entries_exist() -> None:
    missing = []
    for entry in sorted(_toc_files()):
        if not any((ROOT / f"{entry}{suffix}").is_file() for suffix in (".md", ".ipynb")):
            missing.append(entry)
    if missing and not NOTEBOOKS and all(m.startswith("notebooks/") for m in missing):
        pytest.skip("no notebooks yet")
    assert not missing, f"_toc.yml lists files that do not exist: {missing}"


def test_bibliography_keys_are_unique_and_complete() -> None:
    keys = _bib_keys()
    assert keys, "book/references.bib has no entries"
    assert len(keys) == len(set(keys)), "duplicate keys in references.bib"
    assert keys[0] == "lee2025understanding", "the TMLR paper should come first"
    text = BIB.read_text(encoding="utf-8")
    starts = [m.start() for m in BIB_ENTRY.finditer(text)] + [len(text)]
    for key, begin, end in zip(keys, starts[:-1], starts[1:], strict=True):
        entry = text[begin:end]
        for name in REQUIRED_FIELDS:
            assert re.search(rf"^\s*{name}\s*=", entry, re.M), f"{key} has no {name}"


def test_every_cited_key_exists() -> None:
    keys = set(_bib_keys())
    used: dict[str, set[str]] = {}
    for page in BOOK_PAGES:
        used[str(page.relative_to(ROOT))] = _cited_keys(page.read_text(encoding="utf-8"))
    for path in NOTEBOOKS:
        cells = _cells(_load(path), "markdown")
        used[str(path.relative_to(ROOT))] = _cited_keys("\n".join(_source(c) for c in cells))
    unknown = {where: sorted(k - keys) for where, k in used.items() if k - keys}
    assert not unknown, f"citation keys missing from references.bib: {unknown}"
    assert any(used.values()), "no page cites anything"
