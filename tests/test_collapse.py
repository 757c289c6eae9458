"""Tests for cl_lib.collapse: collapse values, plateau / kNN flags and rho."""

from __future__ import annotations

import math

import pytest
import torch

from cl_lib import collapse as C
from cl_lib import experiments as ex
from cl_lib.train import _class_weights

OLD = ex.REPO_ROOT / "results" / "old"  # the grids of the old, under-trained sizing

# Per-epoch training losses copied from results/old/debiased_positives.json (old quick sizing:
# NT-Xent, batch 64, 13 epochs, seed 0): p = 1 sits at ln(127) = 4.844 from epoch 2 on,
# p = 0 leaves it after the first epoch.
COLLAPSED = [4.935, 4.848, 4.846, 4.847, 4.845, 4.846, 4.845, 4.844, 4.845, 4.844, 4.844, 4.845]
COLLAPSED += [4.844]
HEALTHY = [4.865, 4.792, 4.753, 4.719, 4.726, 4.698, 4.598, 4.503, 4.342, 4.264, 4.140, 4.044]
HEALTHY += [4.021]


def stored_run(losses, knn, knn_init, loss=None, batch=64, counts=None) -> dict:
    """A run record with the fields the detector reads."""
    metrics = {"knn_acc": knn, "knn_random_init": knn_init}
    if counts is not None:
        metrics["train_class_counts"] = counts
    return {
        "config": {"loss": loss or {"name": "nt_xent", "temperature": 0.2}, "optim": {}}
        | {"optim": {"batch_size": batch}},
        "history": [{"epoch": i + 1, "loss": v} for i, v in enumerate(losses)],
        "metrics": metrics,
    }


def test_collapse_values_match_the_loss_definitions():
    for n in (16, 64, 128):
        nt = C.collapse_loss_value({"name": "nt_xent", "temperature": 0.2}, n)
        assert nt == pytest.approx(math.log(2 * n - 1), abs=1e-5)
        for alpha, lam, tau in ((1.0, 1.0, 0.2), (1.0, 0.5, 0.2), (2.0, 1.0, 0.5)):
            cfg = {"name": "balanced", "alpha": alpha, "lam": lam, "temperature": tau}
            want = (lam - alpha) / tau + lam * math.log(2 * n - 2)
            assert C.collapse_loss_value(cfg, n) == pytest.approx(want, abs=1e-4)
            with_pos = C.collapse_loss_value({**cfg, "include_positive": True}, n)
            assert with_pos == pytest.approx((lam - alpha) / tau + lam * math.log(2 * n - 1), 1e-5)
    raw = {"name": "balanced", "temperature": 0.2, "normalize": False}  # unit embeddings
    assert C.collapse_loss_value(raw, 64) == pytest.approx(math.log(126), abs=1e-5)


def test_class_balanced_collapse_value_uses_the_weights_of_the_batch():
    counts = [40, 30, 20, 10]
    cfg = {"name": "balanced", "temperature": 0.2, "class_balanced": True}
    n = 10  # labels by largest remainders: 4, 3, 2, 1 of each class
    labels = torch.tensor([0] * 4 + [1] * 3 + [2] * 2 + [3])
    w = _class_weights(torch.repeat_interleave(torch.arange(4), torch.tensor(counts)), 4)
    per_image = w[labels]
    # anchor i: negatives are both views of the other n - 1 images
    want = sum(math.log(2 * float(per_image.sum() - per_image[i])) for i in range(n)) / n
    assert C.collapse_loss_value(cfg, n, counts) == pytest.approx(want, abs=1e-5)
    with pytest.raises(ValueError, match="class_counts"):
        C.collapse_loss_value(cfg, n)
    with pytest.raises(ValueError, match="batch_size"):
        C.collapse_loss_value(cfg, 1, counts)


def test_detector_flags_the_collapsed_history_and_not_the_healthy_one():
    bad = C.run_flags(stored_run(COLLAPSED, knn=0.161, knn_init=0.234))
    assert bad["flagged"] and bad["plateau"] and bad["knn"]
    assert bad["plateau_epochs"] == list(range(1, 14))
    assert bad["collapse_value"] == pytest.approx(math.log(127), abs=1e-5)
    good = C.run_flags(stored_run(HEALTHY, knn=0.434, knn_init=0.234))
    assert not good["flagged"] and good["plateau_epochs"] == [1]
    assert good["knn_gain_over_init"] == pytest.approx(0.2)
    # the same healthy history, but no better than the random encoder: the kNN flag alone
    only_knn = C.run_flags(stored_run(HEALTHY, knn=0.25, knn_init=0.234))
    assert only_knn["knn"] and not only_knn["plateau"] and only_knn["flagged"]
    # the margin scales with lam (balanced loss at lam = 2 sits 0.06 below its plateau)
    lam2 = {"name": "balanced", "lam": 2.0, "temperature": 0.2}
    c2 = C.collapse_loss_value(lam2, 64)
    near = C.run_flags(stored_run([c2 - 0.05] * 5, 0.5, 0.2, loss=lam2))
    assert near["plateau"] and near["plateau_margin"] == pytest.approx(0.06)


def test_detector_on_the_stored_results_known_cases():
    """The flags catch what the spread-based collapse flag missed in the stored grids."""
    b = ex.load_results(OLD / "debiased_positives.json")
    flags = {(f["cell"], f["seed"]): f for f in ex.flagged_runs(b)}
    for r in b["runs"]:
        p = r["params"]["data.same_class_prob"]
        f = flags[(r["cell"], r["seed"])]
        if p == 1.0:  # all five at ln(2N - 1) from epoch 2 to the end; spread flag: none
            assert f["plateau"] and f["knn"] and not r["metrics"]["collapsed"]
            assert set(range(2, 14)) <= set(f["plateau_epochs"])
        elif p == 0.5:  # 7 or more epochs on the plateau
            assert f["plateau"] and len(f["plateau_epochs"]) >= 7
        elif p == 0.0:
            assert not f["flagged"]
    c = ex.load_results(OLD / "balance_grid.json")
    for f in ex.flagged_runs(c):
        params = next(x["params"] for x in c["grid"]["cells"] if x["cell"] == f["cell"])
        ratio = params["loss.lam"] / params["loss.alpha"]
        assert f["flagged"] == (ratio < 1)  # lambda / alpha = 0.5 collapses on every seed
    rows = ex.summarise(b, "knn_acc")  # old file: every run counted, flags reported
    by_cell = {row["cell"]: row for row in rows}
    assert by_cell["same_class_prob=1.0"]["flagged_plateau"] == 5
    assert by_cell["same_class_prob=1.0"]["n"] == 5 and by_cell["same_class_prob=1.0"]["runs"] == 5
    kept = {row["cell"]: row for row in ex.summarise(b, "knn_acc", exclude_flagged=True)}
    assert kept["same_class_prob=1.0"]["n"] == 0 and kept["same_class_prob=1.0"]["excluded"] == 5


def test_collapse_ratio_on_constructed_embeddings():
    """Orthonormal anchors, positives rotated by theta: rho = 1 - cos(theta)."""
    n = 6
    eye = torch.eye(2 * n, dtype=torch.float64)
    for theta in (0.1, 0.5, 1.2):
        z1 = eye[:n]
        z2 = math.cos(theta) * eye[:n] + math.sin(theta) * eye[n:]
        assert C.collapse_ratio(z1, 3.0 * z2) == pytest.approx(1 - math.cos(theta), rel=1e-12)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(32, 8, generator=gen)
    assert C.collapse_ratio(z, z) == 0.0  # identical views
    same = torch.ones(4, 3)
    assert math.isnan(C.collapse_ratio(same, same))  # exact collapse: undefined
    # independent random directions: positives are as far apart as negatives
    a, b = torch.randn(400, 64, generator=gen), torch.randn(400, 64, generator=gen)
    assert C.collapse_ratio(a, b) == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError, match="z1 and z2"):
        C.collapse_ratio(z[:4], z[:5])


def test_plateau_epochs_and_argument_checks():
    assert C.plateau_epochs([5.0, 4.9, 4.0], 4.95, 0.06) == [1, 2]
    with pytest.raises(ValueError, match="margin"):
        C.plateau_epochs([1.0], 1.0, -0.1)
    with pytest.raises(ValueError, match="plateau_share"):
        C.run_flags(stored_run(HEALTHY, 0.4, 0.2), plateau_share=0.0)
