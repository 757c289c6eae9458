"""Tests of the command line (``python -m cl_lib``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cl_lib import __main__ as cli
from cl_lib import train as T

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "device": "cpu",
    "eval_every": 1,
    "knn_k": 5,
    "geometry_size": 16,
    "data": {"name": "shapes", "size": 96, "test_size": 48},
    "model": {"backbone": "small_cnn", "head_hidden": 16, "head_out": 8},
    "loss": {"name": "nt_xent", "temperature": 0.5},
    "optim": {"name": "sgd", "lr": 0.05, "batch_size": 32, "epochs": 2},
}


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, "out_dir": str(tmp_path / "run")}))
    return path


def test_parser_lists_the_commands() -> None:
    parser = cli.build_parser()
    assert set(cli.COMMANDS) >= {"train", "eval"}
    args = parser.parse_args(["train", "--config", "x.yaml", "seed=1", "optim.lr=0.1"])
    assert args.overrides == ["seed=1", "optim.lr=0.1"] and not args.no_resume
    with pytest.raises(SystemExit):
        parser.parse_args(["frobnicate"])


def test_train_then_eval(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--config", str(config_file), "optim.epochs=1", "--no-progress"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "epoch 1/1" in out and "raw pixels" in out and "random init" in out
    summary = json.loads((tmp_path / "run" / T.SUMMARY_NAME).read_text())
    ckpt = tmp_path / "run" / T.CHECKPOINT_NAME
    assert cli.main(["eval", "--checkpoint", str(ckpt)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("kNN accuracy") and "linear probe" in lines[0]
    result = json.loads(lines[-1])
    # the same protocol as the training summary: the same number
    assert result["knn_accuracy"] == pytest.approx(summary["knn_trained"], abs=1e-6)
    assert 0.0 <= result["linear_probe_accuracy"] <= 1.0 and result["epoch"] == 1


def test_train_resumes_unless_told_not_to(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["train", "--config", str(config_file), "optim.epochs=1"]) == 0
    capsys.readouterr()
    # same config: the finished run is picked up, no epoch is trained again
    assert cli.main(["train", "--config", str(config_file), "optim.epochs=1"]) == 0
    assert "epoch 1/1" not in capsys.readouterr().out
    assert cli.main(["train", "--config", str(config_file), "optim.epochs=1", "--no-resume"]) == 0
    assert "epoch 1/1" in capsys.readouterr().out


def test_bad_input_returns_2_with_a_message(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["train", "--config", str(config_file), "optim.lrr=1"]) == 2
    assert "optim.lrr" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(config_file), "optim.epochs=two"]) == 2
    assert "optim.epochs" in capsys.readouterr().err
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint" in capsys.readouterr().err


def test_module_entry_point_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "cl_lib", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0 and "train" in done.stdout and "eval" in done.stdout
