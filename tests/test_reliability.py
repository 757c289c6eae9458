"""Faults a user meets (issue 14): run folders shared by two runs, damaged checkpoints, a full
disk, no network, Ctrl-C, non-finite features, duplicate YAML keys. Each ends in a clear error
(one ``error:`` line and exit status 1 or 2 on the command line) and loses nothing saved."""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from cl_lib import __main__ as cli
from cl_lib import train as T
from cl_lib.augment import make_augment
from cl_lib.evaluate import knn_accuracy, knn_classify, linear_probe

ROOT = Path(__file__).resolve().parents[1]

TINY = {
    "device": "cpu",
    "eval_every": 0,
    "knn_k": 5,
    "geometry_size": 16,
    "data": {"name": "shapes", "size": 64, "test_size": 32},
    "model": {"backbone": "small_cnn", "head_hidden": 16, "head_out": 8},
    "loss": {"name": "nt_xent", "temperature": 0.5},
    "optim": {"name": "sgd", "lr": 0.05, "batch_size": 32, "epochs": 1},
}


def write_config(path: Path, out_dir: Path, **top: object) -> Path:
    path.write_text(yaml.safe_dump({**TINY, **top, "out_dir": str(out_dir)}))
    return path


def tiny(out_dir: Path, epochs: int = 1) -> T.TrainConfig:
    raw = {**TINY, "out_dir": str(out_dir)}
    raw["optim"] = {**TINY["optim"], "epochs": epochs}
    return T.config_from_dict(raw)


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit status and stderr of ``python -m cl_lib argv`` run in this process."""
    capsys.readouterr()
    status = cli.main(argv)
    return status, capsys.readouterr().err


def assert_one_error_line(err: str, *words: str) -> None:
    """stderr is one or two lines, starts with 'error:', no traceback, names ``words``."""
    lines = err.strip().splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in err, (word, err)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run folder (trained once per module)."""
    root = tmp_path_factory.mktemp("trained")
    T.pretrain(tiny(root / "run"), progress=False)
    return root / "run"


@pytest.fixture
def trained(trained_once: Path, tmp_path: Path) -> Path:
    """A copy of the finished run in ``tmp_path / "run"``; returns its config file."""
    shutil.copytree(trained_once, tmp_path / "run")
    return write_config(tmp_path / "c.yaml", tmp_path / "run")


# =========================================================================== run folder lock


def _hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding the run folder's lock, as a running training would."""
    folder.mkdir(parents=True, exist_ok=True)
    code = (
        "import fcntl, sys, time\n"
        f"f = open({str(folder / T.LOCK_NAME)!r}, 'a+')\n"
        "fcntl.flock(f, fcntl.LOCK_EX)\n"
        "f.write('pid of the other run'); f.flush()\n"
        "print('locked', flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


@pytest.mark.skipif(sys.platform == "win32", reason="fcntl locks are POSIX")
def test_a_second_run_in_a_locked_folder_is_refused_and_deletes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        being_written = run / ".checkpoint.pt.abcd1234.tmp"  # the other run's checkpoint write
        being_written.write_bytes(b"partial")
        with pytest.raises(T.RunFolderError, match="in use by another training run"):
            T.pretrain(tiny(run), progress=False)
        assert being_written.exists()  # not swept away as a stale temporary file
        status, err = run_cli(
            ["train", "--config", str(write_config(tmp_path / "c.yaml", run)), "--no-progress"],
            capsys,
        )
        assert status == 1
        assert_one_error_line(err, str(run), "in use", "pid of the other run", "out_dir")
        assert not (run / T.CHECKPOINT_NAME).exists()
    finally:
        holder.kill()
        holder.wait()
    # the lock died with its process: the folder is free again, stale files are cleaned up
    result = T.pretrain(tiny(run), progress=False)
    assert result.checkpoint_path.exists() and not being_written.exists()


def test_the_lock_is_released_after_a_run_and_after_a_failure(tmp_path: Path) -> None:
    T.pretrain(tiny(tmp_path / "a"), progress=False)
    T.pretrain(tiny(tmp_path / "a"), progress=False)  # same process, same folder, one after another
    with pytest.raises(ValueError, match="optim.lr"):  # a failure inside the locked section ...
        raw = T.config_to_dict(tiny(tmp_path / "a"))
        raw["optim"]["lr"] = 0.01
        T.pretrain(T.config_from_dict(raw), progress=False)
    T.pretrain(tiny(tmp_path / "a"), progress=False)  # ... released the lock as well


# =========================================================================== run folder faults


def test_an_output_folder_that_is_a_file_or_below_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    config = write_config(tmp_path / "c.yaml", blocker)
    status, err = run_cli(["train", "--config", str(config), "--no-progress"], capsys)
    assert status == 1
    assert_one_error_line(err, "out_dir", str(blocker), "is a file")
    config = write_config(tmp_path / "c.yaml", blocker / "run")
    status, err = run_cli(["train", "--config", str(config), "--no-progress"], capsys)
    assert status == 1
    assert_one_error_line(err, "out_dir", str(blocker / "run"), "a part of the path is a file")
    assert blocker.read_text() == "not a folder"


def test_an_output_folder_that_cannot_be_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(self: Path, *args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)  # as root, chmod would not stop the write
    config = write_config(tmp_path / "c.yaml", tmp_path / "locked" / "run")
    status, err = run_cli(["train", "--config", str(config), "--no-progress"], capsys)
    assert status == 1
    assert_one_error_line(err, "out_dir", "permission denied")


def test_a_full_disk_during_a_checkpoint_write_keeps_the_old_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save, saved = torch.save, []

    def full_disk_after_epoch_1(obj: object, f: object) -> None:
        if not saved:
            real_save(obj, f)
            saved.append(digest(ckpt) if ckpt.exists() else None)
            return
        f.write(b"PK\x03\x04 partial")  # type: ignore[attr-defined]
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    ckpt = tmp_path / "run" / T.CHECKPOINT_NAME
    monkeypatch.setattr(torch, "save", full_disk_after_epoch_1)
    config = write_config(tmp_path / "c.yaml", tmp_path / "run")
    argv = ["train", "--config", str(config), "optim.epochs=2", "--no-progress"]
    status, err = run_cli(argv, capsys)
    assert status == 1
    assert_one_error_line(err, str(ckpt), "disk", "previous checkpoint", "run the same command")
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1  # epoch 1 survives, intact
    assert not list(ckpt.parent.glob(".*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)  # space freed: the same command resumes
    assert run_cli(argv, capsys)[0] == 0
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2


# =========================================================================== checkpoints


def _damage(ckpt: Path, how: str) -> None:
    data = ckpt.read_bytes()
    if how == "truncated":
        ckpt.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        ckpt.write_bytes(b"")
    elif how == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all " * 10)
    else:  # a checkpoint without its optimiser state
        state = torch.load(ckpt, weights_only=True)
        del state["optimizer"]
        torch.save(state, ckpt)


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage", "no optimizer"])
def test_resuming_from_a_damaged_checkpoint(
    trained: Path, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = trained.parent / "run" / T.CHECKPOINT_NAME
    _damage(ckpt, how)
    damaged = digest(ckpt)
    status, err = run_cli(["train", "--config", str(trained), "--no-progress"], capsys)
    assert status == 2
    words = ["'optimizer'"] if how == "no optimizer" else ["truncated, damaged"]
    assert_one_error_line(err, str(ckpt), "--no-resume", *words)
    assert digest(ckpt) == damaged  # left for the user to inspect
    with pytest.raises(T.CheckpointError):  # a type the grid runner can catch
        T.pretrain(T.load_config(trained), progress=False)
    argv = ["train", "--config", str(trained), "--no-progress", "--no-resume"]
    assert run_cli(argv, capsys)[0] == 0  # the advice works


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_evaluating_a_damaged_checkpoint(
    trained: Path, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = trained.parent / "run" / T.CHECKPOINT_NAME
    _damage(ckpt, how)
    status, err = run_cli(["eval", "--checkpoint", str(ckpt), "--no-linear"], capsys)
    assert status == 2
    assert_one_error_line(err, str(ckpt), "not a checkpoint", "checkpoint.pt written by train")


def test_eval_given_a_config_file(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, err = run_cli(["eval", "--checkpoint", str(trained)], capsys)
    assert status == 2
    assert_one_error_line(err, str(trained), "config", "checkpoint.pt")


def test_eval_on_cuda_without_a_gpu(
    trained: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ckpt = trained.parent / "run" / T.CHECKPOINT_NAME
    status, err = run_cli(["eval", "--checkpoint", str(ckpt), "--device", "cuda"], capsys)
    assert status == 2
    assert_one_error_line(err, "'cuda'", "no CUDA GPU", "--device cpu")


# =========================================================================== download


def test_cifar_download_without_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    config = write_config(tmp_path / "c.yaml", tmp_path / "run")
    argv = ["train", "--config", str(config), "data.name=cifar10", "data.download=true"]
    status, err = run_cli([*argv, f"data.root={tmp_path / 'data'}", "--no-progress"], capsys)
    assert status == 1
    assert_one_error_line(err, "could not download cifar10", "network", "data.download=false")


# =========================================================================== non-finite loss


class _NaNAfter(nn.Module):
    """A loss that turns NaN after ``n`` calls."""

    def __init__(self, inner: nn.Module, n: int) -> None:
        super().__init__()
        self.inner, self.n, self.calls = inner, n, 0

    def forward(self, views: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.calls += 1
        value = self.inner(views, labels)
        return value if self.calls <= self.n else value * math.nan


def test_non_finite_loss_is_one_line_and_its_advice_works(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ckpt = tmp_path / "run" / T.CHECKPOINT_NAME
    config = write_config(tmp_path / "c.yaml", tmp_path / "run")
    argv = ["train", "--config", str(config), "optim.epochs=2", "--no-progress"]
    real = T._build_loss
    with monkeypatch.context() as patch:  # 2 steps per epoch: NaN in epoch 2
        patch.setattr(T.trainer, "_build_loss", lambda *a, **k: _NaNAfter(real(*a, **k), n=2))
        status, err = run_cli(argv, capsys)
    assert status == 1
    assert_one_error_line(err, "non-finite loss", str(ckpt), "optim.lr", "--no-resume")
    assert torch.load(ckpt, weights_only=True)["epoch"] == 1  # the last good checkpoint
    # the advice: a lower optim.lr in this folder with --no-resume (or in a new out_dir)
    assert run_cli([*argv, "optim.lr=0.01", "--no-resume"], capsys)[0] == 0
    assert torch.load(ckpt, weights_only=True)["epoch"] == 2


# =========================================================================== Ctrl-C


def test_ctrl_c_says_where_the_run_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = T._Trainer.run_epoch

    def interrupt_in_epoch_2(self: T._Trainer, epoch: int, show: bool) -> object:
        if epoch == 1:
            raise KeyboardInterrupt
        return real(self, epoch, show)

    config = write_config(tmp_path / "c.yaml", tmp_path / "run")
    argv = ["train", "--config", str(config), "optim.epochs=2", "--no-progress"]
    with monkeypatch.context() as patch:
        patch.setattr(T._Trainer, "run_epoch", interrupt_in_epoch_2)
        status, err = run_cli(argv, capsys)
        with pytest.raises(KeyboardInterrupt):  # still an interrupt for library callers
            T.pretrain(T.load_config(config, ["optim.epochs=2"]), progress=False)
    ckpt = tmp_path / "run" / T.CHECKPOINT_NAME
    assert status == 1
    assert_one_error_line(err, "interrupted", str(ckpt), "after epoch 1", "same command")
    capsys.readouterr()
    assert cli.main(argv) == 0  # the same command resumes: only epoch 2 is trained
    out = capsys.readouterr().out
    assert "epoch 2/2" in out and "epoch 1/2" not in out


def test_sigint_to_the_command_line_gives_a_line_not_a_traceback(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "run")
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "cl_lib", "train", "--config", str(config), "optim.epochs=50"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ckpt = tmp_path / "run" / T.CHECKPOINT_NAME
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert_one_error_line(err, "interrupted", str(ckpt), "run the same command again")
    assert torch.load(ckpt, weights_only=True)["epoch"] >= 1


# =========================================================================== config


def test_duplicate_yaml_keys_are_rejected_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("seed: 1\noptim:\n  lr: 0.1\ndevice: cpu\noptim:\n  lr: 0.5\n")
    with pytest.raises(ValueError, match=r"'optim' appears twice, at lines 2 and 5") as info:
        T.load_config(path)
    assert str(path) in str(info.value)
    path.write_text("optim:\n  lr: 0.1\n  epochs: 2\n  lr: 0.5\n")
    with pytest.raises(ValueError, match=r"'lr' appears twice, at lines 2 and 4"):
        T.load_config(path)
    with pytest.raises(ValueError, match="appears twice"):
        T.load_config(None, ["optim={lr: 0.1, lr: 0.2}"])


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("out_dir=''", "out_dir"),
        ("out_dir='  '", "out_dir"),
        ("data.test_size=1", "data.test_size"),
        ("augment.strength=1.5", "augment.strength"),
        ("augment.strength=-0.1", "augment.strength"),
    ],
)
def test_values_rejected_when_the_config_is_loaded(override: str, key: str) -> None:
    with pytest.raises(ValueError, match=f"config key '{key}'"):
        T.load_config(None, [override])


def test_a_config_path_that_is_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, err = run_cli(["train", "--config", str(tmp_path)], capsys)
    assert status == 2
    assert_one_error_line(err, str(tmp_path), "is a folder", "YAML file")


def test_overrides_may_follow_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "ignored")
    argv = ["train", "--config", str(config), "optim.epochs=1", "--no-resume"]
    status = cli.main([*argv, f"out_dir={tmp_path / 'x'}", "--no-progress", "seed=3"])
    assert status == 0, capsys.readouterr().err
    saved = yaml.safe_load((tmp_path / "x" / T.CONFIG_NAME).read_text())
    assert saved["seed"] == 3 and not (tmp_path / "ignored").exists()


# =========================================================================== evaluation


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("where", ["train_features", "test_features"])
def test_evaluation_refuses_non_finite_features(bad: float, where: str) -> None:
    gen = torch.Generator().manual_seed(0)
    feats = {"train_features": torch.randn(20, 4, generator=gen)}
    feats["test_features"] = torch.randn(10, 4, generator=gen)
    train_y, test_y = torch.arange(20) % 2, torch.arange(10) % 2
    feats[where][3, 1] = bad
    args = (feats["train_features"], train_y, feats["test_features"])
    with pytest.raises(ValueError, match=f"{where} must be finite"):
        knn_classify(*args, k=3)
    with pytest.raises(ValueError, match=f"{where} must be finite"):
        knn_accuracy(*args, test_y, k=3)
    with pytest.raises(ValueError, match=f"{where} must be finite"):
        linear_probe(*args, test_y, epochs=1)


# =========================================================================== augmentation


def test_augmentations_refuse_images_in_0_255_on_the_cpu() -> None:
    augment = make_augment("simclr_cifar", 16)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (4, 3, 16, 16), generator=gen, dtype=torch.uint8)
    augment(pixels.float() / 255, gen)  # the documented input: fine
    with pytest.raises(ValueError, match=r"\[0, 1\].*255"):
        augment(pixels.float(), gen)
    nan = pixels.float() / 255
    nan[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match=r"x must hold values in \[0, 1\]"):
        augment(nan, gen)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        make_augment("none", 16)(pixels.float(), gen)  # the identity is checked as well
    augment(pixels.float(), gen, check_range=False)  # opting out (e.g. for speed)


TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to python")
@pytest.mark.skipif(sys.platform == "win32", reason="fcntl locks are POSIX")
def test_a_locked_folder_stops_every_ddp_rank_without_a_hang(tmp_path: Path) -> None:
    run = tmp_path / "run"
    holder = _hold_lock(run)
    try:
        config = write_config(tmp_path / "c.yaml", run)
        env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
        cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "cl_lib", "train"]
        done = subprocess.run(
            [*cmd, "--config", str(config), "--no-progress"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,  # a rank waiting for rank 0 forever would end here
        )
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    # Every rank stops (no hang: the timeout above). Each rank that gets to report prints the
    # lock error; torchrun may stop the other rank first once one has exited, so 1 or 2 lines.
    assert 1 <= len(errors) <= 2 and all("in use by another training run" in e for e in errors)
    assert "cl_lib/train/" not in done.stderr  # no worker traceback (torchrun prints its own)
