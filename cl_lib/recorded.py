"""Numbers whose last digits depend on the CPU, checked against the book's recorded values.

A number that comes out of training or of a long float32 computation moves in its last digits
between CPUs (Intel, AMD, ARM), BLAS and oneDNN code paths and thread counts. A chapter prints
such a number through :meth:`Recorded.near`, with a tolerance stated in the same line of code:

* it checks the value against the value recorded when the book's outputs were made
  (``notebooks/recorded/CHAPTER.json``, written by ``scripts/execute_notebooks.sh``) and raises
  :class:`RecordedValueError` when the two differ by more than the tolerance;
* it returns the number formatted behind ``APPROX`` (``≈``). The notebook tests' sanitizer
  (``notebooks/sanitize.cfg``) replaces ``≈<number>``, so strict nbval compares the rest of the
  output exactly, while the check in the cell still fails the test when a number moves too far.

With ``CL_RECORD=1`` (set by the execution script) the values are recorded instead of checked.
Outside a checkout of the repository (Colab), where no record exists, nothing is checked.
Numbers that do not depend on the CPU (integers, float64 results printed far above round-off)
are printed as they are.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from cl_lib.files import write_json
from cl_lib.provenance import REPO_ROOT

__all__ = ["APPROX", "RECORD_ENV", "Recorded", "RecordedValueError", "check_near"]

APPROX = "≈"
RECORD_ENV = "CL_RECORD"
RECORD_DIR = REPO_ROOT / "notebooks" / "recorded"


class RecordedValueError(AssertionError):
    """A number moved further from its recorded value than its stated tolerance."""


def _real(name: str, value: float) -> float:
    """``value`` as a float; ValueError unless it is a finite real number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    return float(value)


def check_near(value: float, recorded: float, tol: float, *, label: str = "value") -> None:
    """Raise :class:`RecordedValueError` unless ``|value - recorded| <= tol``."""
    value, recorded, tol = _real(label, value), _real("recorded", recorded), _real("tol", tol)
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if abs(value - recorded) > tol:
        raise RecordedValueError(
            f"{label} = {value:.6g} is {abs(value - recorded):.3g} away from the book's recorded "
            f"{recorded:.6g}, more than its tolerance {tol:g}: the computation behind it changed, "
            "or this machine's floating point differs more than the tolerance allows"
        )


class Recorded:
    """The recorded values of one chapter: ``Recorded("01_supervised_objectives")``.

    ``path`` defaults to ``notebooks/recorded/<chapter>.json`` in the repository; ``record``
    defaults to the ``CL_RECORD`` environment variable.
    """

    def __init__(
        self, chapter: str, path: str | os.PathLike | None = None, record: bool | None = None
    ) -> None:
        if not chapter or not isinstance(chapter, str):
            raise ValueError(f"chapter must be a non-empty string, got {chapter!r}")
        self.path = Path(path) if path is not None else RECORD_DIR / f"{chapter}.json"
        if record is None:
            record = os.environ.get(RECORD_ENV, "").strip().lower() in {"1", "true", "yes", "on"}
        self.record = record
        self.values: dict[str, float] = {} if record else self._load()

    def _load(self) -> dict[str, float]:
        """The stored values, or an empty dict where there is no record (outside a checkout)."""
        if not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))["values"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{self.path} is not a recorded-values file ({err})") from err

    @property
    def checking(self) -> bool:
        """Whether :meth:`near` checks (a record exists and we are not recording)."""
        return not self.record and bool(self.values)

    def near(self, label: str, value: float, tol: float, fmt: str = ".3f") -> str:
        """``≈value`` (``fmt``, e.g. ``".3f"`` or ``".1%"``), checked against the record.

        ``tol`` is in the units of ``value`` (``0.02`` is two points for an accuracy in [0, 1]).
        Raises :class:`RecordedValueError` when the value is further than ``tol`` from its
        record, and ``KeyError`` when a record exists but lacks ``label``.
        """
        value = _real(label, value)
        if _real("tol", tol) <= 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        if self.record:
            self.values[label] = value
            write_json(self.path, {"about": __doc__.splitlines()[0], "values": self.values})
        elif self.checking:
            if label not in self.values:
                raise KeyError(
                    f"{label!r} has no recorded value in {self.path}: re-run "
                    "scripts/execute_notebooks.sh to record the chapter's outputs"
                )
            check_near(value, self.values[label], tol, label=label)
        return APPROX + format(value, fmt)
