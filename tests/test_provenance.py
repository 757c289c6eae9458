"""Provenance helpers: git state and machine description."""

import re
import subprocess

import torch

from cl_lib import provenance


def test_git_state_matches_git_itself():
    commit, dirty = provenance.git_state()
    expected = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=provenance.REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    assert commit == expected and re.fullmatch(r"[0-9a-f]{40}", commit)
    assert isinstance(dirty, bool)


def test_git_outside_a_repository_gives_none(monkeypatch, tmp_path):
    monkeypatch.setattr(provenance, "REPO_ROOT", tmp_path)
    assert provenance.git("rev-parse", "HEAD") is None
    assert provenance.git_state() == (None, None)


def test_cpu_model_is_a_name():
    assert provenance.cpu_model().strip()


def test_machine_describes_the_requested_device():
    cpu = provenance.machine("cpu")
    assert cpu["device"] == "cpu" and cpu["gpu"] is None and cpu["cpu"] == provenance.cpu_model()
    assert cpu["threads"] == torch.get_num_threads() and cpu["torch"] == torch.__version__
    auto = provenance.machine("auto")
    assert auto["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert (auto["gpu"] is not None) == torch.cuda.is_available()
