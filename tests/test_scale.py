"""Tests of cl_lib.scale: the chapter-6 configs, label efficiency, 2-D maps and reporting."""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import write_fake_cifar10

from cl_lib import scale as S
from cl_lib.augment import make_augment
from cl_lib.models import build_model
from cl_lib.provenance import machine
from cl_lib.train import config_from_dict, config_to_dict, load_config, pretrain

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _diff(a, b) -> set[str]:
    fa, fb = _flat(config_to_dict(a)), _flat(config_to_dict(b))
    return {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}


# =========================================================================== configs


def test_full_config_is_the_cifar_recipe_shortened(tmp_path: Path) -> None:
    """Full = configs/cifar10_resnet18.yaml except length, evaluation/checkpoint cadence, folder."""
    cfg = S.simclr_config("full", "nt_xent", tmp_path)
    assert (cfg.data.name, cfg.model.backbone, cfg.augment.name) == (
        "cifar10",
        "resnet18",
        "simclr_cifar",
    )
    assert cfg.amp and cfg.channels_last and cfg.data.download
    assert (cfg.loss.name, cfg.loss.temperature, cfg.loss.alpha) == ("nt_xent", 0.5, None)
    assert (cfg.knn_k, cfg.knn_temperature) == (200, 0.1)
    assert cfg.optim.name == "sgd" and cfg.optim.batch_size == 512
    assert cfg.optim.effective_lr == pytest.approx(0.06 * 512 / 256)
    assert cfg.optim.epochs == S.FULL_EPOCHS and cfg.out_dir == str(tmp_path)
    reference = load_config(CONFIGS / "cifar10_resnet18.yaml")
    allowed = {"optim.epochs", "out_dir", "checkpoint_every", "eval_every"}
    assert _diff(cfg, reference) <= allowed


def test_quick_config_is_the_shapes_recipe_shortened(tmp_path: Path) -> None:
    """Quick = configs/shapes_quick.yaml, shorter (same model, augmentation, optimiser, loss)."""
    cfg = S.simclr_config("quick", "nt_xent", tmp_path)
    reference = load_config(CONFIGS / "shapes_quick.yaml")
    allowed = {
        "data.size",
        "data.test_size",
        "optim.batch_size",
        "optim.epochs",
        "out_dir",
        "checkpoint_every",
        "eval_every",
        "geometry_size",
    }
    assert _diff(cfg, reference) <= allowed
    assert cfg.data.size < reference.data.size and cfg.optim.epochs == S.QUICK_EPOCHS
    # the live sizing, in one place: the quick config and live_overrides() agree with it
    sized = load_config(CONFIGS / "shapes_quick.yaml", list(S.live_overrides()))
    for key, value in S.LIVE_SIZING.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value
        assert getattr(getattr(sized, section), name) == value


@pytest.mark.parametrize("profile", S.PROFILES)
def test_balanced_run_differs_only_in_the_loss(profile: str, tmp_path: Path) -> None:
    nt = S.simclr_config(profile, "nt_xent", tmp_path)
    bal = S.simclr_config(profile, "balanced", tmp_path)
    assert _diff(nt, bal) == {"loss.name", "loss.alpha", "loss.lam", "loss.include_positive"}
    assert (bal.loss.alpha, bal.loss.lam, bal.loss.include_positive) == (1.0, 1.0, False)


def test_balanced_cell_is_chosen_from_the_stored_grid() -> None:
    """Issue 11: chapter 6's balanced run is a cell of balance_grid that no other balanced cell
    beats (paired kNN, 95% interval), from clean-tree runs none of which was flagged."""
    from cl_lib import experiments as ex

    grid = ex.load_stored("balance_grid")
    assert grid["schema_version"] >= 2 and not grid["provenance"]["git_dirty"]
    params = {c["cell"]: c["params"] for c in grid["grid"]["cells"]}
    chosen = next(
        cell
        for cell, p in params.items()
        if all(p.get(f"loss.{key}") == value for key, value in S.BALANCED.items())
    )
    row = {r["cell"]: r for r in ex.summarise(grid, "knn_acc")}[chosen]
    assert row["runs"] >= 5 and row["flagged"] == 0
    for cell, st in ex.paired_stats(grid, chosen, "knn_acc").items():
        if not params[cell].get("loss.include_positive"):  # NT-Xent is the other run
            assert st["verdict"] != "higher", f"{cell} beats the chosen cell"


@pytest.mark.parametrize("profile", S.PROFILES)
@pytest.mark.parametrize("loss", S.LOSSES)
def test_config_round_trips(profile: str, loss: str, tmp_path: Path) -> None:
    cfg = S.simclr_config(profile, loss, tmp_path / "run")
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_overrides_merge_into_sections(tmp_path: Path) -> None:
    base = S.simclr_config("quick", "balanced", tmp_path)
    cfg = S.simclr_config("quick", "balanced", tmp_path, device="cpu", optim={"epochs": 2})
    assert _diff(base, cfg) == {"device", "optim.epochs"}
    assert cfg.optim.lr == base.optim.lr  # the rest of the section is kept
    alt = S.simclr_config("quick", "balanced", tmp_path, loss={"alpha": 0.5, "lam": 1.0})
    assert (alt.loss.alpha, alt.loss.lam, alt.loss.name) == (0.5, 1.0, "balanced")
    # the module's defaults are not mutated by a call
    assert S.simclr_config("quick", "balanced", tmp_path) == base


def test_config_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="profile"):
        S.simclr_config("medium", "nt_xent", tmp_path)
    with pytest.raises(ValueError, match="loss"):
        S.simclr_config("quick", "infonce", tmp_path)
    with pytest.raises(ValueError, match="out_dir"):
        S.simclr_config("quick", "nt_xent", "")
    with pytest.raises(ValueError, match="optim.epoch"):
        S.simclr_config("quick", "nt_xent", tmp_path, optim={"epoch": 3})
    with pytest.raises(ValueError, match="optim.epochs"):
        S.simclr_config("quick", "nt_xent", tmp_path, optim={"epochs": "3"})
    with pytest.raises(ValueError, match="seed"):
        S.simclr_config("quick", "nt_xent", tmp_path, seed={"a": 1})


def test_full_profile_loads_cifar_and_encodes_with_resnet18(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The full config's data, augmentation and model fit together (no training)."""
    from cl_lib import data

    write_fake_cifar10(tmp_path / "data", per_batch=4)
    monkeypatch.setattr(
        data, "load_torchvision", partial(data.load_torchvision, check_integrity=False)
    )
    cfg = S.simclr_config(
        "full",
        "balanced",
        tmp_path / "run",
        device="cpu",
        data={"root": str(tmp_path / "data"), "download": False},
    )
    train, test = S.load_splits(cfg)
    assert train.images.shape == (20, 3, 32, 32) and len(test) == 4
    x = make_augment(cfg.augment.name, 32, cfg.augment.strength)(
        train.to_float(), torch.Generator().manual_seed(0)
    )
    assert x.shape == (20, 3, 32, 32) and 0 <= float(x.min()) and float(x.max()) <= 1
    m = cfg.model
    model = build_model(m.backbone, head_hidden=m.head_hidden, head_out=m.head_out)
    feats = S.encode(model, train, test)
    assert feats.train.shape == (20, 512) and feats.test.shape == (4, 512)
    assert torch.equal(feats.train_labels, train.labels)


def test_quick_run_end_to_end_and_resume(tmp_path: Path) -> None:
    """A tiny quick run trains, evaluates in [0, 1], and a second call resumes (no new steps)."""
    cfg = S.simclr_config(
        "quick",
        "balanced",
        tmp_path,
        device="cpu",
        geometry_size=16,
        data={"size": 64, "test_size": 40},
        optim={"batch_size": 32, "epochs": 1},
    )
    first = pretrain(cfg, progress=False)
    again = pretrain(cfg, progress=False)
    assert again.history == first.history and again.summary["steps"] == 2
    for a, b in zip(
        first.model.state_dict().values(), again.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    train, test = S.load_splits(cfg)
    acc = S.downstream_accuracy(
        S.encode(again.model, train, test), knn_k=cfg.knn_k, knn_temperature=0.07
    )
    assert set(acc) == {"knn", "linear"} and all(0 <= v <= 1 for v in acc.values())
    assert acc["knn"] == pytest.approx(again.summary["knn_trained"])  # same bank, same queries
    times = S.run_time(again.history)
    assert times["epochs"] == 1 and times["train_s"] > 0
    with pytest.raises(ValueError, match="config"):
        S.load_splits(config_to_dict(cfg))


# =========================================================================== label efficiency


def _blobs(n_per_class: int, scale: float, seed: int, dim: int = 16, classes: int = 10):
    gen = torch.Generator().manual_seed(seed)
    means = scale * torch.randn(classes, dim, generator=torch.Generator().manual_seed(99))
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    return means[labels] + torch.randn(len(labels), dim, generator=gen), labels


def test_label_efficiency_rises_to_one_on_separable_features() -> None:
    xtr, ytr = _blobs(40, 1.2, seed=0)
    xte, yte = _blobs(40, 1.2, seed=1)
    out = S.label_efficiency(xtr, ytr, xte, yte, shots=(1, 10, 40), seeds=(0, 1), epochs=20)
    assert out["shots"] == [1, 10, 40] and out["seeds"] == [0, 1]
    assert np.shape(out["accuracy"]) == (3, 2)
    mean = out["mean"]
    assert mean == pytest.approx(np.mean(out["accuracy"], axis=1).tolist())
    assert out["std"] == pytest.approx(np.std(out["accuracy"], axis=1, ddof=1).tolist())
    assert mean[0] < mean[1] - 0.05 and mean[1] <= mean[2] + 0.01
    assert mean[2] >= 0.97


def test_label_efficiency_stays_at_chance_on_random_features() -> None:
    gen = torch.Generator().manual_seed(0)
    xtr, xte = torch.randn(500, 16, generator=gen), torch.randn(1000, 16, generator=gen)
    ytr = torch.arange(10).repeat(50)
    yte = torch.randint(0, 10, (1000,), generator=gen)
    out = S.label_efficiency(xtr, ytr, xte, yte, shots=(5, 50), seeds=(0, 1), epochs=15)
    assert all(abs(m - 0.1) < 0.05 for m in out["mean"])


def test_label_efficiency_single_seed_has_zero_std() -> None:
    xtr, ytr = _blobs(5, 2.0, seed=0)
    out = S.label_efficiency(xtr, ytr, xtr, ytr, shots=(5,), seeds=(3,), epochs=5)
    assert out["std"] == [0.0] and len(out["accuracy"][0]) == 1


def test_label_efficiency_argument_errors() -> None:
    x, y = _blobs(5, 1.0, seed=0)
    for shots in [(), (0, 1), (1, 1), [1.5], "15"]:
        with pytest.raises(ValueError, match="shots"):
            S.label_efficiency(x, y, x, y, shots=shots)
    with pytest.raises(ValueError, match="shots"):  # more than the smallest class holds
        S.label_efficiency(x, y, x, y, shots=(6,))
    with pytest.raises(ValueError, match="seeds"):
        S.label_efficiency(x, y, x, y, shots=(1,), seeds=(-1,))
    with pytest.raises(ValueError, match="train_features"):
        S.label_efficiency(x[:, 0], y, x, y, shots=(1,))
    with pytest.raises(ValueError, match="train_labels"):
        S.label_efficiency(x, y[:-1], x, y, shots=(1,))
    with pytest.raises(ValueError, match="test_features"):
        S.label_efficiency(x, y, x.long(), y, shots=(1,))


# =========================================================================== 2-D maps


def test_embedding_2d_shape_determinism_and_clusters() -> None:
    x, y = _blobs(40, 3.0, seed=0, classes=4)
    a = S.embedding_2d(x, seed=0)
    b = S.embedding_2d(x.numpy(), seed=0)
    assert a.shape == (160, 2) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    # well-separated clusters stay clusters: 5 nearest neighbours in the map share the class
    d = ((a[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    nearest = np.argsort(d, axis=1)[:, :5]
    agreement = (y.numpy()[nearest] == y.numpy()[:, None]).mean()
    assert agreement > 0.95


def test_embedding_2d_argument_errors() -> None:
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="method"):
        S.embedding_2d(x, method="pca")
    with pytest.raises(ValueError, match="seed"):
        S.embedding_2d(x, seed=-1)
    with pytest.raises(ValueError, match="perplexity"):
        S.embedding_2d(x, perplexity=0)
    with pytest.raises(ValueError, match="features"):
        S.embedding_2d(x[:, 0])
    with pytest.raises(ValueError, match="features"):
        S.embedding_2d(x[:3])
    with pytest.raises(ValueError, match="features"):
        S.embedding_2d(torch.ones(10, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="threads"):
        S.embedding_2d(x, threads=0)
    if importlib.util.find_spec("umap") is None:
        with pytest.raises(ImportError, match="umap"):
            S.embedding_2d(x, method="umap")


# =========================================================================== reporting


def test_accuracy_table_rounds_to_three_significant_digits() -> None:
    text = S.accuracy_table(
        {"NT-Xent": {"kNN": 0.123456, "linear": 0.99999}, "other": {"kNN": 0.05, "linear": None}}
    )
    lines = text.splitlines()
    assert len(lines) == 3 and "kNN" in lines[0] and "linear" in lines[0]
    assert lines[1].split()[-2:] == ["12.3%", "100%"]
    assert lines[2].split()[-2:] == ["5%", "n/a"]
    with pytest.raises(ValueError, match="rows"):
        S.accuracy_table({})


def test_run_time_and_machine() -> None:
    history = [
        {"train_time_s": 1.5, "eval_time_s": 0.25},
        {"train_time_s": 2.0, "eval_time_s": None},
    ]
    assert S.run_time(history) == {"epochs": 2, "train_s": 3.5, "eval_s": 0.25}
    with pytest.raises(ValueError, match="history"):
        S.run_time("epoch 1")
    info = machine("cpu")  # the hardware description comes from cl_lib.provenance
    assert info["device"] == "cpu" and info["gpu"] is None
    assert info["torch"] == torch.__version__ and info["threads"] >= 1
