"""The stored pretrained encoder (results/pretrained/) loads and scores what its record says."""

from __future__ import annotations

import pytest
import torch

from cl_lib.pretrained import PRETRAINED, load_pretrained
from cl_lib.provenance import REPO_ROOT
from cl_lib.train import evaluate_checkpoint

STORED = REPO_ROOT / "results" / "pretrained" / f"{PRETRAINED}.pt"


@pytest.fixture(scope="module")
def pretrained():
    if not STORED.is_file():
        pytest.fail(f"{STORED} is missing: it is part of the repository")
    return load_pretrained(device="cpu")


def test_the_record_is_a_working_encoder_from_a_clean_tree(pretrained) -> None:
    """Chapters may analyse it only because it learned: far above its baselines."""
    _, record = pretrained
    summary = record["summary"]
    assert summary["knn_trained"] >= 0.75
    assert summary["knn_trained"] > summary["knn_random_init"] + 0.3
    assert summary["knn_trained"] > summary["knn_raw_pixels"] + 0.3
    assert record["provenance"]["git_dirty"] is False
    assert record["config"]["optim"]["epochs"] == 22 and record["config"]["data"]["size"] == 4000


def test_the_stored_encoder_scores_as_recorded(pretrained) -> None:
    """The same kNN protocol on the stored weights gives the recorded accuracy (float32
    features differ between CPUs in their last digits: one test image of 2000 is 0.05 points)."""
    model, record = pretrained
    assert not model.training
    with torch.no_grad():
        h, z = model(torch.rand(4, 3, 32, 32))
    assert h.shape[0] == z.shape[0] == 4
    result = evaluate_checkpoint(STORED, linear=False, device="cpu")
    assert result["knn_accuracy"] == pytest.approx(record["summary"]["knn_trained"], abs=0.005)
