"""Where the course comes from: the repository address and the ``CL_BOOK_SOURCE`` override.

``REPOSITORY_URL`` is the one place the address lives in the library; ``_config.yml``, the
README and the notebooks' first cell carry copies, and ``tests/test_notebook_meta.py`` checks
that they agree. A notebook opened outside a checkout (Colab) installs ``cl_lib`` and fetches
stored results from there; ``CL_BOOK_SOURCE`` points both at something else:

* a fork or branch: ``git+https://github.com/you/fork.git@branch`` (pip's syntax);
* a local clone: ``/content/my-clone``.
"""

from __future__ import annotations

import os
import re
import tempfile
import urllib.request
from pathlib import Path

__all__ = [
    "REPOSITORY_URL",
    "SOURCE_ENV",
    "SourceError",
    "fetch_result",
    "install_source",
    "results_location",
]

REPOSITORY_URL = "https://github.com/cl-book/contrastive-learning-book"
SOURCE_ENV = "CL_BOOK_SOURCE"
_GITHUB = re.compile(r"^(?:git\+)?https://github\.com/([^/]+)/([^/@]+?)(?:\.git)?(?:@([^#]+))?$")


class SourceError(RuntimeError):
    """Something could not be fetched from the course's source; the message says what to do."""

    def _render_traceback_(self) -> list[str]:
        """In Jupyter, show the message alone instead of a traceback."""
        return [f"{type(self).__name__}: {self}"]


def install_source() -> str:
    """What the first cell gives pip: ``$CL_BOOK_SOURCE``, else ``git+REPOSITORY_URL.git``."""
    return os.environ.get(SOURCE_ENV, "").strip() or f"git+{REPOSITORY_URL}.git"


def results_location(source: str | None = None) -> str | Path:
    """The ``results/`` folder of ``source`` (default :func:`install_source`): a URL or a path.

    A GitHub source (``git+https://github.com/OWNER/REPO.git[@REF]``) maps to its raw files at
    REF (default ``main``); a local path to its ``results`` folder. Anything else raises
    ``ValueError`` naming ``CL_BOOK_SOURCE``.
    """
    source = install_source() if source is None else source.strip()
    match = _GITHUB.match(source)
    if match:
        owner, repo, ref = match.groups()
        return f"https://raw.githubusercontent.com/{owner}/{repo}/{ref or 'main'}/results"
    path = Path(source.removeprefix("file://")).expanduser()
    if path.is_dir():
        return path / "results"
    raise ValueError(
        f"{SOURCE_ENV}={source!r} is neither a GitHub repository "
        "(git+https://github.com/OWNER/REPO.git[@BRANCH]) nor a local folder"
    )


def fetch_result(relative: str, checkout: Path) -> Path:
    """A local path to ``results/RELATIVE``: from the checkout when there is one, else fetched.

    ``checkout`` is the repository root the library sits in; ``results`` and ``../results`` of
    the working folder are tried next (a notebook run from ``notebooks/``). Outside a checkout
    the file comes from :func:`results_location` (``CL_BOOK_SOURCE``); a failure raises
    :class:`SourceError` saying what failed and what to do.
    """
    for folder in (checkout / "results", Path("results"), Path("../results")):
        if (folder / relative).is_file():
            return folder / relative
    location = results_location()
    advice = (
        "Run the chapter inside a clone of the course repository, or set "
        f"{SOURCE_ENV} to a local clone or to the fork or branch that holds results/{relative}."
    )
    if isinstance(location, Path):
        if not (location / relative).is_file():
            raise SourceError(f"{location / relative} does not exist. {advice}")
        return location / relative
    url = f"{location}/{relative}"
    target = Path(tempfile.gettempdir()) / "cl_book_results" / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        urllib.request.urlretrieve(url, target)
    except (OSError, ValueError) as err:  # URLError and HTTPError are OSErrors
        raise SourceError(
            f"Could not fetch the stored results from {url} ({err}). {advice}"
        ) from None
    print(f"results/{relative} fetched from {url}")
    return target
