"""cl_lib.recorded: CPU-dependent numbers checked against recorded values within a tolerance."""

from __future__ import annotations

import configparser
import json
import re
from pathlib import Path

import pytest

from cl_lib.recorded import APPROX, Recorded, RecordedValueError, check_near

ROOT = Path(__file__).resolve().parents[1]


def test_check_near_accepts_within_and_rejects_beyond_the_tolerance() -> None:
    check_near(0.956, 0.961, 0.01)
    check_near(0.95, 0.96, 0.0100001)
    with pytest.raises(RecordedValueError, match="more than its tolerance 0.01"):
        check_near(0.94, 0.961, 0.01, label="accuracy")


@pytest.mark.parametrize(
    ("value", "recorded", "tol", "name"),
    [(float("nan"), 1.0, 0.1, "value"), (1.0, float("inf"), 0.1, "recorded"), (1.0, 1.0, 0, "tol")],
)
def test_check_near_rejects_bad_input(value: float, recorded: float, tol: float, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        check_near(value, recorded, tol)


def test_record_then_check_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "chapter.json"
    recorder = Recorded("chapter", path=path, record=True)
    assert recorder.near("acc", 83.84, 3, ".3g") == f"{APPROX}83.8"
    assert recorder.near("loss", -0.4386, 0.01) == f"{APPROX}-0.439"
    assert json.loads(path.read_text())["values"] == {"acc": 83.84, "loss": -0.4386}

    checker = Recorded("chapter", path=path, record=False)
    assert checker.checking
    assert checker.near("acc", 81.0, 3, ".3g") == f"{APPROX}81"  # 2.84 points away: within 3
    with pytest.raises(RecordedValueError, match="acc = 80"):
        checker.near("acc", 80.0, 3)  # a regression of 3.84 points fails
    with pytest.raises(KeyError, match="no recorded value"):
        checker.near("missing", 1.0, 1)
    with pytest.raises(ValueError, match="tol must be > 0"):
        checker.near("acc", 83.0, -1)


def test_without_a_record_nothing_is_checked(tmp_path: Path) -> None:
    """Outside a checkout (Colab) there is no record: the value is only formatted."""
    recorder = Recorded("chapter", path=tmp_path / "absent.json", record=False)
    assert not recorder.checking
    assert recorder.near("anything", 12.345, 0.1, ".1f") == f"{APPROX}12.3"


def test_record_mode_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CL_RECORD", "1")
    assert Recorded("c", path=tmp_path / "c.json").record
    monkeypatch.setenv("CL_RECORD", "0")
    assert not Recorded("c", path=tmp_path / "c.json").record


def _sanitizer() -> list[tuple[re.Pattern, str]]:
    parser = configparser.ConfigParser()
    parser.read(ROOT / "notebooks" / "sanitize.cfg", encoding="utf-8")
    return [(re.compile(parser[s]["regex"]), parser[s]["replace"]) for s in parser.sections()]


def _sanitize(text: str) -> str:
    for pattern, replacement in _sanitizer():
        text = pattern.sub(replacement, text)
    return text


def test_the_notebook_sanitizer_hides_only_the_approximate_numbers() -> None:
    """Two CPUs' outputs compare equal after sanitizing; the exact numbers beside them do not."""
    a = "kNN: trained ≈13.3%, random init 20.7%, loss ≈-4.82e-01"
    b = "kNN: trained ≈12.9%, random init 20.7%, loss ≈-4.79e-01"
    assert _sanitize(a) == _sanitize(b) == "kNN: trained≈NUM%, random init 20.7%, loss≈NUM"
    assert _sanitize(a) != _sanitize(a.replace("20.7%", "21.7%"))
    # a padded table column: the padding follows the width of the number
    row_a = f"{'≈9.87 +- ≈1%':>17} | {'≈0.310':<9}| 20.7"
    row_b = f"{'≈10.1 +- ≈0.98%':>17} | {'≈0.31':<9}| 20.7"
    assert _sanitize(row_a) == _sanitize(row_b) == "≈NUM+-≈NUM% |≈NUM| 20.7"


def test_every_recorded_file_matches_its_chapter() -> None:
    """Each record belongs to a chapter that creates a Recorded of the same name."""
    for path in (ROOT / "notebooks" / "recorded").glob("*.json"):
        notebook = ROOT / "notebooks" / f"{path.stem}.ipynb"
        assert notebook.exists(), f"{path.name} has no chapter"
        assert f'Recorded(\\"{path.stem}\\")' in notebook.read_text(encoding="utf-8")
        values = json.loads(path.read_text(encoding="utf-8"))["values"]
        assert values and all(isinstance(v, float) for v in values.values())
