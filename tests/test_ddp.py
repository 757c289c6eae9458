"""DDP on CPU (gloo, two processes): one step under ``torchrun`` equals one single-process
step on the combined batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cl_lib import train as T
from cl_lib.models import build_model

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).with_name("torchrun")

# SGD with lr 1, no momentum, no decay, no warm-up: after one step w1 = w0 - grad, so
# comparing weights compares the first-step gradients (after DDP averaging).
CONFIG = {
    "seed": 3,
    "device": "cpu",
    "eval_every": 0,
    "knn_k": 5,
    "geometry_size": 16,
    "data": {"name": "shapes", "size": 64, "test_size": 32},
    "augment": {"name": "none"},  # per-rank augmentation streams differ from one process
    "model": {"backbone": "small_cnn", "head_hidden": 32, "head_out": 16},
    "loss": {"name": "nt_xent", "temperature": 0.5},
    "optim": {
        "name": "sgd",
        "lr": 1.0,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "warmup_fraction": 0.0,
        "batch_size": 16,
        "epochs": 1,
        "max_steps": 1,
    },
}


@pytest.mark.slow
@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed next to python")
def test_two_process_step_equals_single_process_step(tmp_path: Path) -> None:
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "out_dir": str(tmp_path / "ddp")}))
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "-m", "cl_lib", "train"]
    done = subprocess.run(
        [*cmd, "--config", str(config), "--no-progress"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("kNN accuracy") == 1  # only rank 0 reports
    ddp = torch.load(tmp_path / "ddp" / T.CHECKPOINT_NAME, weights_only=True)
    assert (ddp["epoch"], ddp["step_in_epoch"]) == (0, 1)
    assert len(ddp["mid_epoch"]) == 2  # both ranks' unfinished-epoch state

    single_cfg = T.load_config(config, [f"out_dir={tmp_path / 'single'}"])
    single = T.pretrain(single_cfg, progress=False).model.state_dict()
    torch.manual_seed(CONFIG["seed"])
    init = build_model("small_cnn", head_hidden=32, head_out=16).state_dict()
    for key, value in ddp["model"].items():
        if not value.is_floating_point():
            assert torch.equal(value, single[key]), key
            continue
        torch.testing.assert_close(value, single[key], atol=1e-5, rtol=0, msg=key)
    moved = max((single[k] - init[k]).abs().max().item() for k in init if "weight" in k)
    assert moved > 1e-3  # the step was not trivially zero
