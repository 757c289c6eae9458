"""Sphinx extension: drop repeated <script> entries from every HTML page.

With Jupyter Book 1.0.4 the inline configuration script of sphinx-thebe is added
twice, and its second copy fails in the browser ("Identifier 'THEBE_JS_URL' has
already been declared"). Keeping the first copy of each script fixes that.
"""

from __future__ import annotations

from typing import Any


def _key(script: Any) -> tuple:
    """Identity of a script: its file (``None`` and ``""`` both mean inline) and attributes."""
    filename = getattr(script, "filename", script) or ""
    attributes = getattr(script, "attributes", {}) or {}
    return (str(filename), tuple(sorted((k, str(v)) for k, v in attributes.items())))


def _dedupe(app: Any, pagename: str, templatename: str, context: dict, doctree: Any) -> None:
    """Keep the first copy of each script of the page."""
    scripts = context.get("script_files")
    if not scripts:
        return
    seen: set[tuple] = set()
    unique = []
    for script in scripts:
        key = _key(script)
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique  # in place: later handlers (MathJax) append to this same list


def setup(app: Any) -> dict:
    """Register the page-context hook.

    It runs early (priority 100): ``html-page-context`` stops at the first handler that
    returns a template name, so a late handler might never be called.
    """
    app.connect("html-page-context", _dedupe, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
