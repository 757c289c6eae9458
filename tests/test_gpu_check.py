"""Tests of the GPU readiness check (benchmarks/gpu_check.py, scripts/gpu_check.sh) on the CPU:
the JSON report, the timing (warm-up excluded), argument validation, the pytest summary and
the shell script's refusal without a GPU and its exit status."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_check
from cl_lib import train as T

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
TINY = ["--device", "cpu", "--backbone", "small_cnn", "--steps", "2", "--warmup", "1"]
needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")


def _check_case(case: dict, batch: int) -> None:
    """A measured case: positive finite rates consistent with the median step time."""
    assert "error" not in case, case
    assert case["batch_size"] == batch and case["n_views"] == 2
    median = case["step_time"]["median_s"]
    assert math.isfinite(median) and median > 0
    assert case["instances_per_s"] == pytest.approx(batch / median)
    assert case["views_per_s"] == pytest.approx(2 * case["instances_per_s"])
    assert math.isfinite(case["instances_per_s_wall"]) and case["instances_per_s_wall"] > 0
    assert math.isfinite(case["mean_loss"]) and case["mean_loss"] > 0  # NT-Xent > 0
    # the trainer never uses autocast or channels-last on the CPU
    assert case["amp_dtype"] is None and case["channels_last"] is False
    assert case["grad_scaler"] is False
    assert case["gpu_peak_memory_bytes"] is None


def test_main_writes_the_report_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "report.json"
    assert gpu_check.main([*TINY, "--batch-sizes", "4,6", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["schema_version"] == gpu_check.SCHEMA_VERSION
    prov = report["provenance"]
    for key in ("git_commit", "git_dirty", "date_utc", "torch", "cuda", "cudnn", "hostname"):
        assert key in prov, key
    assert prov["torch"] == torch.__version__ and prov["gpu"] is None and prov["device"] == "cpu"
    assert report["pytest"] is None
    bench = report["benchmark"]
    assert [c["batch_size"] for c in bench["cases"]] == [4, 6]  # no float32 rerun on the CPU
    for case, batch in zip(bench["cases"], (4, 6), strict=True):
        _check_case(case, batch)
        assert case["steps"] == 2 and case["warmup"] == 1
    assert bench["amp_speedup"] == {}


def test_timing_excludes_warmup_and_counts_every_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a fake step (slow warm-up, 20 ms timed steps) the median is the timed step."""
    calls: list[int] = []

    def fake_step(self: T._Trainer, index: torch.Tensor, gens: dict) -> tuple:
        calls.append(int(index.numel()))
        time.sleep(0.2 if len(calls) <= 2 else 0.02)
        return torch.tensor(1.5), torch.tensor(1.0)

    monkeypatch.setattr(T._Trainer, "train_step", fake_step)
    case = gpu_check.measure("small_cnn", 4, steps=3, warmup=2, device="cpu")
    assert calls == [4] * 5  # 2 warm-up + 3 timed steps, each on one batch of 4 instances
    assert 0.02 <= case["step_time"]["median_s"] < 0.15
    assert case["step_time"]["repeats"] == 3
    assert case["instances_per_s"] == pytest.approx(4 / case["step_time"]["median_s"])
    assert case["mean_loss"] == pytest.approx(1.5)


def test_bench_config_is_the_cifar_recipe_on_shapes(tmp_path: Path) -> None:
    cfg = gpu_check.bench_config("resnet18", 256, 20, torch.device("cpu"), True, str(tmp_path))
    recipe = T.load_config(gpu_check.BASE_CONFIG)
    assert cfg.data.name == "shapes" and cfg.data.size == 256 and cfg.optim.batch_size == 256
    assert (cfg.loss, cfg.augment) == (recipe.loss, recipe.augment)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum) == ("sgd", 0.06, 0.9)
    assert cfg.amp and cfg.channels_last and cfg.model.backbone == "resnet18"


def test_amp_speedup_pairs_batch_sizes() -> None:
    cases = [
        {"batch_size": 8, "amp": True, "instances_per_s": 300.0},
        {"batch_size": 8, "amp": False, "instances_per_s": 100.0},
        {"batch_size": 16, "amp": True, "instances_per_s": 50.0},
        {"batch_size": 16, "amp": False, "error": "out of memory"},
    ]
    assert gpu_check.amp_speedup(cases) == {"8": pytest.approx(3.0)}


def test_defaults_and_the_cpu_smoke_run() -> None:
    plain = gpu_check.parse_args(["--device", "cpu"])
    assert plain.backbone == "resnet18" and plain.batch_sizes == [256, 512]
    assert (plain.steps, plain.warmup) == (20, 5)
    smoke = gpu_check.parse_args(["--device", "cpu", "--cpu-smoke", "--steps", "3"])
    assert (smoke.backbone, smoke.batch_sizes, smoke.steps) == ("small_cnn", [16], 3)  # 3 wins
    if not torch.cuda.is_available():  # auto resolves to the CPU here
        assert gpu_check.parse_args(["--cpu-smoke"]).batch_sizes == [16]


def test_problems_fail_the_check() -> None:
    case = {"batch_size": 8, "amp": True, "mean_loss": 5.0}
    passed = {"passed": 3, "failed": 0}
    report = {"benchmark": {"device": "cuda:0", "cases": [case]}, "pytest": passed}
    assert gpu_check.problems(report) == []
    report["pytest"] = {"passed": 0, "skipped": 30}  # the tests did not see the GPU
    assert gpu_check.problems(report) == ["no cuda test passed on the GPU"]
    report["benchmark"]["device"] = "cpu"  # --allow-cpu: skipped cuda tests are expected
    assert gpu_check.problems(report) == []
    report["benchmark"]["cases"] = [{**case, "mean_loss": math.nan}, {**case, "error": "oom"}]
    assert len(gpu_check.problems(report)) == 2


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--batch-sizes", "1"], "--batch-sizes"),
        (["--batch-sizes", "64,x"], "--batch-sizes"),
        (["--batch-sizes", "64,64"], "--batch-sizes"),
        (["--steps", "0"], "--steps"),
        (["--warmup", "-1"], "--warmup"),
        (["--backbone", "vit"], "--backbone"),
        (["--device", "tpu"], "--device"),
        (["--device", "cuda:x"], "--device"),
    ],
)
def test_bad_arguments_name_the_option(
    args: list[str], option: str, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(SystemExit) as info:
        gpu_check.parse_args(args)
    assert info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


@needs_no_gpu
def test_cuda_device_without_gpu_is_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cuda"])
    assert "argument --device: is 'cuda' but CUDA is not available" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"backbone": "vit"}, "backbone"),
        ({"batch_size": 1}, "batch_size"),
        ({"steps": 0}, "steps"),
        ({"warmup": -1}, "warmup"),
    ],
)
def test_measure_validates_its_arguments(kwargs: dict, name: str) -> None:
    args = {"backbone": "small_cnn", "batch_size": 4, "steps": 1, "warmup": 0, **kwargs}
    with pytest.raises(ValueError, match=name):
        gpu_check.measure(device="cpu", **args)


def test_pytest_summary_of_a_missing_file(tmp_path: Path) -> None:
    assert gpu_check.pytest_summary(None) is None
    summary = gpu_check.pytest_summary(tmp_path / "none.xml", 4, "pytest")
    assert "cannot read" in summary["error"] and summary["returncode"] == 4


# ---------------------------------------------------------------------------- the shell script


def _run_script(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "TQDM_DISABLE": "1"}
    env.pop("GPU_CHECK_OUT", None)
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


TINY_BENCH = ["--", "--batch-sizes", "4", "--steps", "1", "--warmup", "0"]


def test_script_is_executable() -> None:
    assert os.access(SCRIPT, os.X_OK)


@needs_no_gpu
def test_script_refuses_without_a_gpu(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = _run_script("--out", str(out))
    assert proc.returncode == 2
    assert "no CUDA GPU found" in proc.stderr and "--allow-cpu" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
@needs_no_gpu
def test_script_allow_cpu_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    proc = _run_script("--allow-cpu", "--skip-tests", "--out", str(out), *TINY_BENCH)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["pytest"] is None
    (case,) = report["benchmark"]["cases"]
    _check_case(case, 4)


CUDA_TESTS = """
import pytest

@pytest.mark.cuda
def test_passes():
    assert 1 + 1 == 2

@pytest.mark.cuda
@pytest.mark.skipif(True, reason="skipped on purpose")
def test_skipped():
    pass

@pytest.mark.cuda
def test_fails():
    assert 1 + 1 == 3

def test_not_cuda_is_deselected():
    assert False
"""


@pytest.mark.slow
@needs_no_gpu
def test_script_reports_test_counts_and_fails_when_a_cuda_test_fails(tmp_path: Path) -> None:
    tests = tmp_path / "test_fake_cuda.py"
    tests.write_text(CUDA_TESTS)
    out = tmp_path / "r.json"
    proc = _run_script("--allow-cpu", "--tests", str(tests), "--out", str(out), *TINY_BENCH)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "pytest -m cuda exited with 1" in proc.stderr
    summary = json.loads(out.read_text())["pytest"]  # written even though a test failed
    assert (summary["tests"], summary["passed"], summary["failed"]) == (3, 1, 1)
    assert (summary["skipped"], summary["errors"], summary["returncode"]) == (1, 0, 1)
    # junit's classname holds the module path relative to pytest's rootdir, which depends on
    # where the repository and the temporary folder lie: compare the end only
    [failed] = summary["failed_tests"]
    assert failed.split(".")[-1] == "test_fake_cuda::test_fails"
