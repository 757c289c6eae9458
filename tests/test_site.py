"""Build the Jupyter Book site and check every page in headless Chromium.

The site is built once per session with warnings as errors (``-W -n --keep-going``)
into a temporary directory, served over HTTP on 127.0.0.1, and every page is opened
with Playwright. The checks: the build emits no warning; MathJax (served from
``_static``) typesets every formula; every image loads; no cell output shows an error;
every internal link and anchor resolves; no request leaves the local server; no
exercise solution (input or output) shows before the reader opens it; notebook
pages offer the ``.ipynb`` download and a Colab launch button that opens the page's own
notebook in the repository of ``_config.yml``; search finds a word.

Skipped when ``/usr/bin/chromium`` or Playwright is missing, or before any chapter
notebook exists. A screenshot of every page is written next to the build (the path is
printed; run with ``-s`` to see it).
"""

from __future__ import annotations

import functools
import http.server
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # builds the book: about a minute

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SKIPPED_PAGES = {"genindex.html", "search.html", "py-modindex.html"}
LOCAL_HOSTS = {"127.0.0.1", "localhost"}
BUILD_TIMEOUT_S = 240
PAGE_TIMEOUT_MS = 30_000

REDIRECT = re.compile(r'<meta http-equiv="Refresh" content="0; url=([^"]+)"', re.I)
# Text that must not remain visible once MathJax has run (code blocks excluded).
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RAW_MATH = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|\\begin\{")

PAGE_PROBE_JS = """
async () => {
  if (window.MathJax && window.MathJax.startup && window.MathJax.startup.promise) {
    await window.MathJax.startup.promise;
  }
  const imgs = Array.from(document.images);
  imgs.forEach((img) => { img.loading = 'eager'; });
  await Promise.all(imgs.map((img) => img.decode().catch(() => null)));
  const clone = document.querySelector('main, article, body').cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, textarea, mjx-container')
       .forEach((el) => el.remove());
  const out = (sel) => Array.from(document.querySelectorAll(sel));
  return {
    hasMathJax: Boolean(window.MathJax && window.MathJax.startup),
    mathElements: out('.math').length,
    untypesetMath: out('.math').filter((el) => !el.querySelector('mjx-container')).length,
    mjxContainers: out('mjx-container').length,
    mathErrors: out('mjx-merror').map((el) => el.textContent.slice(0, 80)),
    visibleText: clone.textContent,
    // innerText leaves out what is not rendered, e.g. the body of a closed <details>.
    renderedText: document.querySelector('main, article, body').innerText,
    brokenImages: imgs.filter((img) => !(img.complete && img.naturalWidth > 0))
                      .map((img) => img.getAttribute('src')),
    errorOutputs: out('.cell_output .traceback, .cell_output .error, .output.traceback, '
                      + '.output.error, .cell_output .ansi-red-fg').length,
    tracebackText: out('.cell_output').some((el) => el.textContent.includes('Traceback')),
    links: out('a[href]').map((a) => a.href),
    colabLinks: out('a[href*="colab.research.google.com"]').map((a) => a.getAttribute('href')),
    ipynbDownloads: out('a[href$=".ipynb"]').map((a) => a.getAttribute('href')),
    // Code cells and printouts whose lines all fit 88 characters but still scroll.
    narrowCodeOverflow: out('.bd-article div.cell pre')
      .map((el) => [Math.max(...el.textContent.split('\\n').map((l) => l.length)),
                    el.scrollWidth - el.clientWidth, el.textContent.slice(0, 60)])
      .filter(([longest, excess]) => longest <= 88 && excess > 1),
  };
}
"""


@dataclass(repr=False)
class PageReport:
    """What the browser saw on one page."""

    path: str
    probe: dict
    page_errors: list[str] = field(default_factory=list)
    screenshot: Path | None = None


@dataclass(repr=False)
class Site:
    """A built site: its HTML folder, build log and the browser's report per page."""

    html: Path
    build_log: str
    returncode: int
    pages: dict[str, PageReport] = field(default_factory=dict)
    external_requests: list[str] = field(default_factory=list)
    search_hits: int = 0


class _IdCollector(HTMLParser):
    """Collect every ``id`` and ``name`` attribute of an HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for key, value in attrs:
            if key in ("id", "name") and value:
                self.ids.add(value)


@functools.cache
def _ids_of(path: Path) -> frozenset[str]:
    collector = _IdCollector()
    collector.feed(path.read_text(encoding="utf-8", errors="replace"))
    return frozenset(collector.ids)


def _config() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))


def _notebook_pages(html: Path) -> list[str]:
    """Pages rendered from notebooks (their sources are copied as .ipynb)."""
    sources = html / "_sources"
    return sorted(
        str(p.relative_to(sources).with_suffix(".html")) for p in sources.rglob("*.ipynb")
    )


def _build(out: Path) -> tuple[str, int]:
    """Build the book from the repository into ``out``; return (log, exit code)."""
    cmd = [
        sys.executable,
        "-c",
        "from jupyter_book.cli.main import main; main()",
        "build",
        str(ROOT),
        "--path-output",
        str(out),
        "-W",
        "-n",
        "--keep-going",
        "--all",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, cwd=ROOT, check=False
    )
    return ANSI.sub("", proc.stdout + proc.stderr), proc.returncode


@functools.lru_cache(maxsize=1)
def _quiet_handler(directory: str) -> type[http.server.SimpleHTTPRequestHandler]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=directory, **kwargs)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    return Handler


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Build, serve and browse the whole site once per session."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found (install chromium to run the browser tests)")
    sync_api = pytest.importorskip("playwright.sync_api")
    if not any((ROOT / "notebooks").glob("*.ipynb")):
        pytest.skip("no notebooks yet: the table of contents lists chapters that do not exist")

    out = tmp_path_factory.mktemp("site")
    log, code = _build(out)
    html = out / "_build" / "html"
    built = Site(html=html, build_log=log, returncode=code)
    if not (html / "index.html").exists():
        pytest.fail(f"the book did not build (exit code {code}):\n{log[-5000:]}")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _quiet_handler(str(html)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    shots = out / "screenshots"
    shots.mkdir()
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                _browse(browser, base, built, shots)
            finally:
                browser.close()
    finally:
        server.shutdown()
        server.server_close()
    print(f"\nsite built in {html}\nscreenshots in {shots}")
    yield built


def _browse(browser, base: str, built: Site, shots: Path) -> None:
    """Open every page, record its probe, requests, JS errors and a screenshot."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})

    def guard(route) -> None:
        host = urlsplit(route.request.url).hostname
        if route.request.url.startswith(("data:", "blob:")) or host in LOCAL_HOSTS:
            route.continue_()
        else:
            built.external_requests.append(route.request.url)
            route.abort()

    context.route("**/*", guard)
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    paths = sorted(
        str(p.relative_to(built.html))
        for p in built.html.rglob("*.html")
        if p.name not in SKIPPED_PAGES and not {"_sources", "_static"} & set(p.parts)
    )
    for path in paths:
        if REDIRECT.search((built.html / path).read_text(encoding="utf-8", errors="replace")):
            continue  # e.g. index.html, a redirect to the root page (see test_index_redirects)
        errors.clear()
        page.goto(base + path, wait_until="load")
        probe = page.evaluate(PAGE_PROBE_JS)
        shot = shots / (path.replace("/", "__").removesuffix(".html") + ".png")
        page.screenshot(path=str(shot))
        built.pages[path] = PageReport(path, probe, list(errors), shot)

    page.goto(base + "search.html?q=prototype", wait_until="load")
    try:
        page.wait_for_selector("#search-results li", timeout=15_000)
    except Exception:  # noqa: BLE001 - reported by test_search_finds_pages
        pass
    built.search_hits = page.locator("#search-results li").count()
    context.close()


# ---------------------------------------------------------------------------- tests


def test_build_has_no_warnings(site: Site) -> None:
    warnings = [line for line in site.build_log.splitlines() if "WARNING" in line]
    assert site.returncode == 0 and not warnings, (
        f"jupyter-book build -W -n exited {site.returncode} with warnings:\n"
        + "\n".join(warnings or site.build_log.splitlines()[-30:])
    )


def test_every_page_was_opened(site: Site) -> None:
    expected = {"book/intro.html", "book/proofs.html", "book/api.html"}
    expected |= set(_notebook_pages(site.html))
    assert expected <= set(site.pages), f"pages missing: {sorted(expected - set(site.pages))}"
    assert len(_notebook_pages(site.html)) >= 1


def test_index_redirects_to_the_root_page(site: Site) -> None:
    match = REDIRECT.search((site.html / "index.html").read_text(encoding="utf-8"))
    root = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))["root"]
    assert match and match.group(1) == f"{root}.html"
    assert (site.html / match.group(1)).is_file()


def test_mathjax_is_served_locally(site: Site) -> None:
    page = (site.html / "book" / "proofs.html").read_text(encoding="utf-8")
    sources = re.findall(r'<script[^>]*src="([^"]*mathjax[^"]*)"', page, flags=re.I)
    assert sources, "no MathJax script on the proofs page"
    for src in sources:
        assert "://" not in src and "_static/" in src, f"MathJax loaded from {src}"
    assert (site.html / "_static" / "mathjax" / "tex-chtml.js").exists()


def test_math_is_typeset(site: Site) -> None:
    problems = []
    for path, report in site.pages.items():
        probe = report.probe
        if probe["mathElements"]:
            if not probe["hasMathJax"] or probe["mjxContainers"] == 0:
                problems.append(f"{path}: MathJax did not run")
            if probe["untypesetMath"]:
                problems.append(f"{path}: {probe['untypesetMath']} math elements not typeset")
        if probe["mathErrors"]:
            problems.append(f"{path}: TeX errors {probe['mathErrors'][:3]}")
        raw = RAW_MATH.findall(probe["visibleText"])
        if raw:
            problems.append(f"{path}: raw TeX left in the text: {sorted(set(raw))}")
    assert site.pages["book/proofs.html"].probe["mjxContainers"] > 20
    assert not problems, "\n".join(problems)


def test_images_load(site: Site) -> None:
    broken = {p: r.probe["brokenImages"] for p, r in site.pages.items() if r.probe["brokenImages"]}
    assert not broken, f"images that did not load: {broken}"


def test_no_error_outputs_or_script_errors(site: Site) -> None:
    problems = []
    for path, report in site.pages.items():
        if report.probe["errorOutputs"] or report.probe["tracebackText"]:
            problems.append(f"{path}: a cell output shows an error or a traceback")
        if report.page_errors:
            problems.append(f"{path}: JavaScript errors {report.page_errors[:3]}")
    assert not problems, "\n".join(problems)


def test_internal_links_resolve(site: Site) -> None:
    broken = []
    for path, report in site.pages.items():
        for href in report.probe["links"]:
            parts = urlsplit(href)
            if parts.scheme not in ("http", "https") or parts.hostname not in LOCAL_HOSTS:
                continue
            rel = unquote(parts.path).lstrip("/")
            target = site.html / rel
            if not rel or rel.endswith("/"):
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{path} -> {rel} (no such file)")
            elif parts.fragment and target.suffix == ".html":
                if unquote(parts.fragment) not in _ids_of(target):
                    broken.append(f"{path} -> {rel}#{parts.fragment} (no such anchor)")
    assert not broken, "broken internal links:\n" + "\n".join(sorted(set(broken)))


def test_no_request_leaves_the_local_server(site: Site) -> None:
    assert not site.external_requests, f"external requests: {sorted(set(site.external_requests))}"


def test_notebook_pages_offer_colab_and_download(site: Site) -> None:
    repo = _config()["repository"]
    owner_repo = urlsplit(repo["url"]).path.strip("/")
    pages = _notebook_pages(site.html)
    assert pages
    for path in pages:
        probe = site.pages[path].probe
        source = path.removesuffix(".html") + ".ipynb"
        colab = (
            f"https://colab.research.google.com/github/{owner_repo}/blob/{repo['branch']}/{source}"
        )
        assert colab in probe["colabLinks"], f"{path}: Colab links {probe['colabLinks']}"
        assert any(h.endswith(Path(source).name) for h in probe["ipynbDownloads"]), (
            f"{path}: no .ipynb download link"
        )


def _toc_files(node: object) -> list[str]:
    """Every ``file:`` entry of the table of contents, in order."""
    if isinstance(node, dict):
        own = [node["file"]] if isinstance(node.get("file"), str) else []
        return own + [f for value in node.values() for f in _toc_files(value)]
    if isinstance(node, list):
        return [f for item in node for f in _toc_files(item)]
    return []


def test_colab_button_opens_the_page_notebook(site: Site) -> None:
    """Each chapter page has one Colab target: the repository of _config.yml, its branch,
    and the very notebook the page was rendered from, which exists in the repository."""
    config = _config()
    repo = config["repository"]
    owner_repo = urlsplit(repo["url"]).path.strip("/")
    assert urlsplit(repo["url"]).hostname == "github.com" and owner_repo.count("/") == 1
    prefix = f"{config['launch_buttons']['colab_url'].rstrip('/')}/github/{owner_repo}/blob/"
    assert prefix.startswith("https://colab.research.google.com/github/")
    book_dir = repo.get("path_to_book") or ""
    toc = _toc_files(yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8")))
    chapters = {f for f in toc if (ROOT / f"{f}.ipynb").is_file()}
    pages = _notebook_pages(site.html)
    assert {p.removesuffix(".html") for p in pages} == chapters, "chapter pages != _toc notebooks"
    problems = []
    for path in pages:
        targets = set(site.pages[path].probe["colabLinks"])
        if len(targets) != 1:
            problems.append(f"{path}: expected one Colab target, got {sorted(targets)}")
            continue
        (target,) = targets
        branch, _, in_repo = target.removeprefix(prefix).partition("/")
        source = str(Path(book_dir, path).with_suffix(".ipynb"))
        if not target.startswith(prefix) or branch != repo["branch"] or in_repo != source:
            problems.append(
                f"{path}: Colab opens {target}, expected {prefix}{repo['branch']}/{source}"
            )
        elif not (ROOT / in_repo).is_file():
            problems.append(f"{path}: Colab opens {in_repo}, which is not in the repository")
    assert repo["branch"] == "main"
    assert not problems, "\n".join(problems)


def test_lines_of_88_characters_fit_at_1280_pixels(site: Site) -> None:
    """Issue 12: a code cell or printout within 88 characters does not scroll at 1280 px."""
    overflow = {
        path: report.probe["narrowCodeOverflow"]
        for path, report in site.pages.items()
        if path.startswith("notebooks/") and report.probe["narrowCodeOverflow"]
    }
    assert not overflow, f"(longest line, excess px, start) per page: {overflow}"


def test_search_finds_pages(site: Site) -> None:
    assert site.search_hits > 0, "searching for 'prototype' found nothing"


def _hidden_outputs(notebook: Path) -> list[str]:
    """Output lines of the notebook's cells tagged ``hide-cell`` (the exercise solutions)."""
    import json

    lines = []
    for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
        if "hide-cell" not in cell.get("metadata", {}).get("tags", []):
            continue
        for output in cell.get("outputs", []):
            text = "".join(output.get("text", "")) + "".join(
                output.get("data", {}).get("text/plain", "")
            )
            lines += [line.strip() for line in text.splitlines() if len(line.strip()) >= 8]
    return lines


def test_exercise_solutions_are_hidden_until_opened(site: Site) -> None:
    """No answer shows on a chapter page before the reader opens the solution: the solution
    cells are tagged hide-cell (input and output behind one toggle), while the reader's own
    answer cell and its self-check ("not answered yet") stay visible."""
    problems = []
    pages = _notebook_pages(site.html)
    for path in pages:
        shown = site.pages[path].probe["renderedText"]
        hidden = _hidden_outputs(ROOT / path.replace(".html", ".ipynb"))
        if not hidden:
            problems.append(f"{path}: no hidden solution outputs found")
        leaks = [line for line in hidden if line in shown]
        if leaks:
            problems.append(f"{path}: solution output visible: {leaks[:3]}")
        if "right:" in shown or "not answered yet" not in shown:
            problems.append(f"{path}: self-check verdicts visible, or the reader's cell missing")
    for answer in ("smallest N: 369", "tau_plus = 0.40", "N = 2718"):
        if any(answer in site.pages[p].probe["renderedText"] for p in pages):
            problems.append(f"answer {answer!r} is visible")
    assert len(pages) >= 6 and not problems, "\n".join(problems)
