"""Profile selection, seeding and progress bars."""

import random

import numpy as np
import pytest
import torch

from cl_lib import runtime


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_cl_quick_forces_quick(monkeypatch, value):
    monkeypatch.setenv("CL_QUICK", value)
    assert runtime.profile() == "quick"
    assert runtime.is_quick()


@pytest.mark.parametrize("value", ["0", "false", "No", "off"])
def test_cl_quick_zero_forces_full(monkeypatch, value):
    monkeypatch.setenv("CL_QUICK", value)
    assert runtime.profile() == "full"
    assert not runtime.is_quick()


def test_default_profile_follows_cuda(monkeypatch):
    monkeypatch.delenv("CL_QUICK", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert runtime.profile() == "full"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert runtime.profile() == "quick"


def test_bad_cl_quick_value_is_rejected(monkeypatch):
    monkeypatch.setenv("CL_QUICK", "maybe")
    with pytest.raises(ValueError, match="CL_QUICK"):
        runtime.profile()


def test_seed_everything_reproduces_all_generators():
    def draw(gen):
        return random.random(), np.random.rand(), torch.rand(3), torch.rand(3, generator=gen)

    first = draw(runtime.seed_everything(123))
    second = draw(runtime.seed_everything(123))
    assert first[0] == second[0] and first[1] == second[1]
    assert torch.equal(first[2], second[2]) and torch.equal(first[3], second[3])
    third = draw(runtime.seed_everything(124))
    assert not torch.equal(first[2], third[2])


@pytest.mark.parametrize("seed", [1.5, "3", True, None])
def test_seed_must_be_int(seed):
    with pytest.raises(ValueError, match="seed"):
        runtime.seed_everything(seed)


def test_progress_respects_tqdm_disable(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    bar = runtime.progress(range(3))
    assert bar.disable
    assert list(bar) == [0, 1, 2]


def test_autocast_off_restores_float32_inside_autocast():
    a = torch.randn(4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (a @ a).dtype == torch.bfloat16
        with runtime.autocast_off(a.device):
            assert (a @ a).dtype == torch.float32
