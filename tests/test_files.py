"""cl_lib.files: atomic writes never leave a partial file behind."""

from __future__ import annotations

import json
import math
import stat

import pytest

from cl_lib.files import atomic_write, write_json


def test_write_json_round_trips_and_creates_the_folder(tmp_path):
    path = tmp_path / "deep" / "folder" / "r.json"
    write_json(path, {"a": [1, 2.5], "nan": math.nan})
    back = json.loads(path.read_text())
    assert back["a"] == [1, 2.5] and math.isnan(back["nan"])
    assert path.read_text().endswith("\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_a_failing_write_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"half of the new")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError, match="killed"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.bin"]
