"""Tests for the experiment runner (cl_lib.experiments): grids, JSON schema, resume."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import cl_lib.augment as augment_mod
import cl_lib.train as train_mod
from cl_lib import experiments as ex
from cl_lib import losses as L
from cl_lib.data import load_dataset
from cl_lib.evaluate import extract_features
from cl_lib.models import build_model

TINY = (
    "data.size=64",
    "data.test_size=32",
    "optim.batch_size=16",
    "optim.epochs=2",
    "geometry_size=16",
    "eval_every=0",
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_experiment(name: str = "tiny", bias: bool = False) -> ex.Experiment:
    """Two cells of the balanced loss on a few steps of tiny shapes data."""
    return ex.Experiment(
        name=name,
        description="smoke grid",
        cells=(
            {"loss.name": "balanced", "loss.lam": 1.0},
            {"loss.name": "balanced", "loss.lam": 2.0},
        ),
        quick_overrides=TINY,
        seeds=(0,),
        bias=bias,
    )


def run(tmp_path, exp, **kw):
    return ex.run_experiment(
        exp, out=tmp_path / "results", runs_dir=tmp_path / "runs", progress=False, **kw
    )


def test_smoke_grid_schema_and_provenance(tmp_path):
    results = run(tmp_path, tiny_experiment())
    on_disk = ex.load_results(tmp_path / "results" / "tiny.json")
    assert on_disk["runs"] == json.loads(json.dumps(results["runs"]))
    assert on_disk["schema_version"] == ex.SCHEMA_VERSION
    assert on_disk["experiment"] == "tiny" and on_disk["profile"] == "quick"
    assert [c["cell"] for c in on_disk["grid"]["cells"]] == ["lam=1.0", "lam=2.0"]
    prov = on_disk["provenance"]
    for key in ("git_commit", "git_dirty", "start", "end", "torch", "device", "cpu", "threads"):
        assert key in prov
    assert prov["torch"] == torch.__version__ and prov["threads"] >= 1
    assert prov["start"] <= prov["end"] and isinstance(prov["command"], list)
    assert len(on_disk["runs"]) == 2
    for r, lam in zip(on_disk["runs"], (1.0, 2.0), strict=True):
        assert r["config"]["loss"]["lam"] == lam and r["config"]["seed"] == 0
        assert r["config_hash"] == ex.config_hash(r["config"])
        assert r["params"]["loss.lam"] == lam and r["wall_time_s"] > 0
        m = r["metrics"]
        assert 0.0 <= m["knn_acc"] <= 1.0 and 0.0 <= m["linear_acc"] <= 1.0
        assert 0.0 <= m["alignment"] <= 4.0 and m["uniformity"] <= 0.0
        assert 0.0 <= m["knn_acc_head"] <= 1.0 and 0.0 <= m["linear_acc_head"] <= 1.0
        # the gap log(1 + e^{s_ip/tau} / sum_k e^{s_ik/tau}) lies in (0, log(1 + e^{2/tau}))
        assert list(m["loss_gap"]) == ["16"]  # 32 test images: the larger batches do not fit
        assert 0.0 < m["loss_gap"]["16"] < math.log1p(math.exp(2 / 0.2))
        v = m["views"]
        assert v["num_images"] == 32 and list(v["attraction_rms_error"]) == ["1", "2", "4", "8"]
        assert max(abs(e) for e in v["attraction_mean_error"].values()) < 1e-6  # k divides 16
        assert all(g >= 0 for g in v["jensen_gap"].values())
        assert all(1.0 <= e <= 62.0 for e in v["effective_negatives"].values())  # 2N - 2 = 62
        assert 0 < v["z_norm_mean"] <= v["z_norm_max"]
        assert len(r["history"]) == 2 and [h["epoch"] for h in r["history"]] == [1, 2]
        # the per-class accuracies, weighted by the test counts, give the overall accuracy
        counts = torch.bincount(load_dataset("shapes", "test", size=32).labels, minlength=10)
        per_class = torch.tensor(m["knn_per_class"], dtype=torch.float64)
        weighted = float((per_class * counts).sum() / counts.sum())
        assert weighted == pytest.approx(m["knn_acc"], abs=1e-6)
    # the two cells really differ in their config (distinct hashes)
    assert on_disk["runs"][0]["config_hash"] != on_disk["runs"][1]["config_hash"]


def test_resume_after_kill_runs_only_the_rest(tmp_path, monkeypatch):
    exp = tiny_experiment("resume")
    calls: list[str] = []
    real = train_mod.pretrain

    def dying(config, **kw):
        calls.append(config.out_dir)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed during the second run
        return real(config, **kw)

    monkeypatch.setattr(train_mod, "pretrain", dying)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, exp)
    first = ex.load_results(tmp_path / "results" / "resume.json")
    assert [r["cell"] for r in first["runs"]] == ["lam=1.0"]

    calls.clear()
    monkeypatch.setattr(
        train_mod,
        "pretrain",
        lambda config, **kw: calls.append(config.out_dir) or real(config, **kw),
    )
    second = run(tmp_path, exp)
    assert len(calls) == 1 and Path(calls[0]).name.startswith("lam=2.0-s0-")
    assert [r["cell"] for r in second["runs"]] == ["lam=1.0", "lam=2.0"]
    assert second["runs"][0] == json.loads(json.dumps(first["runs"][0]))  # kept as it was
    assert len(second["sessions"]) == 2

    calls.clear()  # a third call has nothing left to do
    run(tmp_path, exp)
    assert calls == []


def test_half_finished_run_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    exp = tiny_experiment("half")
    real_eval = ex.evaluate_run

    def failing(*a, **kw):
        raise RuntimeError("killed while evaluating")

    monkeypatch.setattr(ex, "evaluate_run", failing)
    with pytest.raises(RuntimeError):
        run(tmp_path, exp, seeds=(0,))
    assert len(list((tmp_path / "runs" / "half").glob("lam=1.0-s0-*/checkpoint.pt"))) == 1

    epochs_trained: list[int] = []
    real_epoch = train_mod._Trainer.run_epoch

    def counting(self, epoch, show):
        epochs_trained.append(epoch)
        return real_epoch(self, epoch, show)

    monkeypatch.setattr(train_mod._Trainer, "run_epoch", counting)
    monkeypatch.setattr(ex, "evaluate_run", real_eval)
    results = run(tmp_path, exp, seeds=(0,))
    assert len(results["runs"]) == 2
    assert epochs_trained == [0, 1]  # only the second cell trained; the first resumed at its end
    assert len(results["runs"][0]["history"]) == 2


def test_changed_config_is_refused_not_mixed_into_the_file(tmp_path, monkeypatch):
    """Issue 14: other overrides into the same file are refused (nothing runs); elsewhere run."""
    exp = tiny_experiment("changed")
    first = run(tmp_path, exp, seeds=(0,))
    before = (tmp_path / "results" / "changed.json").read_text()
    calls: list[str] = []
    real = train_mod.pretrain
    monkeypatch.setattr(
        train_mod, "pretrain", lambda c, **kw: calls.append(c.out_dir) or real(c, **kw)
    )
    with pytest.raises(ValueError, match=r"loss\.temperature: 0\.2 -> 0\.3.*one configuration"):
        run(tmp_path, exp, overrides=["loss.temperature=0.3"])
    with pytest.raises(ValueError, match="'quick' sizing, this grid runs at 'full'"):
        run(tmp_path, exp, full=True)
    assert calls == [] and (tmp_path / "results" / "changed.json").read_text() == before
    # written elsewhere, the changed configuration runs in fresh folders of its own
    other = ex.run_experiment(
        exp,
        out=tmp_path / "other",
        runs_dir=tmp_path / "runs",
        overrides=["loss.temperature=0.3"],
        progress=False,
    )
    assert len(calls) == 2 and len(other["runs"]) == 2
    assert {Path(c).parent for c in calls} == {tmp_path / "runs" / "changed"}
    assert not {Path(c).name for c in calls} & {
        Path(r["config"]["out_dir"]).name for r in first["runs"]
    }


def test_readers_refuse_files_that_mix_configurations():
    def run_(seed: int, temperature: float) -> dict:
        config = train_mod.config_to_dict(
            train_mod.load_config(None, [f"loss.temperature={temperature}", f"seed={seed}"])
        )
        return {"cell": "a", "seed": seed, "config": config, "metrics": {"knn_acc": 0.5}}

    grid = {"cells": [{"cell": "a", "params": {}}]}
    mixed = {"grid": grid, "runs": [run_(0, 0.2), run_(1, 0.3)]}
    with pytest.raises(ValueError, match="mix 2 configurations in cell 'a'"):
        ex.summarise(mixed, "knn_acc")
    twice = {"grid": grid, "runs": [run_(0, 0.2), run_(0, 0.2)]}
    with pytest.raises(ValueError, match="more than once"):
        ex.paired_differences(twice, "a")
    assert (
        ex.summarise({"grid": grid, "runs": [run_(0, 0.2), run_(1, 0.2)]}, "knn_acc")[0]["n"] == 2
    )


def test_old_schema_files_are_read_but_not_extended(tmp_path):
    exp = tiny_experiment("old")
    run(tmp_path, exp, seeds=(0,))
    path = tmp_path / "results" / "old.json"
    data = json.loads(path.read_text())
    data["schema_version"] = 1
    path.write_text(json.dumps(data))
    assert ex.load_results(path)["schema_version"] == 1
    with pytest.raises(ValueError, match="older runner.*move .*old.json away"):
        run(tmp_path, exp, seeds=(0, 1))


def test_undecodable_results_file_is_named(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"schema_version": 2, "runs": [')
    with pytest.raises(ValueError, match=r"results file .*broken\.json is not valid JSON"):
        ex.load_results(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="broken.json has schema_version None"):
        ex.load_results(path)


def test_smoke_sizing_writes_elsewhere_and_is_marked(tmp_path, capsys):
    exp = tiny_experiment("smk")
    plan = ex._plan(exp, False, (0,), (), tmp_path, smoke=True)
    assert plan[0]["config"].data.size == 1024 and plan[0]["config"].optim.epochs == 3
    small = ["data.size=64", "data.test_size=32", "geometry_size=16"]  # keep the test fast
    results = run(tmp_path, exp, smoke=True, overrides=small)
    assert not (tmp_path / "results" / "smk.json").exists()
    on_disk = ex.load_results(tmp_path / "results" / "smoke" / "smk.json")
    assert on_disk["profile"] == results["profile"] == "smoke"
    assert on_disk["warning"] == ex.SMOKE_WARNING
    assert on_disk["runs"][0]["config"]["optim"]["epochs"] == 3  # the smoke sizing, after TINY
    ex.print_provenance(on_disk)
    assert "WARNING: smoke sizing" in capsys.readouterr().out
    with pytest.raises(ValueError, match="exclude each other"):
        run(tmp_path, exp, smoke=True, full=True)


def test_config_hash_ignores_paths_only():
    a = train_mod.config_to_dict(train_mod.load_config(None, ["out_dir=x"]))
    b = train_mod.config_to_dict(train_mod.load_config(None, ["out_dir=y", "device=cpu"]))
    c = train_mod.config_to_dict(train_mod.load_config(None, ["loss.temperature=0.3"]))
    assert ex.config_hash(a) == ex.config_hash(b) != ex.config_hash(c)


def test_cell_ids_and_registry():
    assert ex.cell_id({"loss.name": "balanced", "loss.alpha": 0.5}) == "alpha=0.5"
    assert ex.cell_id({"loss.include_positive": True}) == "include_positive=1"
    assert set(ex.EXPERIMENTS) == {
        "aug_strength",
        "debiased_positives",
        "balance_grid",
        "long_tailed",
        "temperature",
        "normalisation",
        "batch_size",
        "projection_head",
    }
    for exp in ex.EXPERIMENTS.values():
        assert len(exp.seeds) >= 3
    grid = ex.EXPERIMENTS["balance_grid"]
    nt = [c for c in grid.cells if c["loss.include_positive"]]
    assert nt == [
        {"loss.name": "balanced", "loss.alpha": 1.0, "loss.lam": 1.0, "loss.include_positive": True}
    ]
    with pytest.raises(ValueError, match="cells"):
        ex.Experiment(name="x", description="", cells=({"a": 1}, {"a": 1}))
    with pytest.raises(ValueError, match="exp"):
        ex.run_experiment("nope")
    with pytest.raises(ValueError, match="seeds"):
        ex.run_experiment("aug_strength", seeds=())


def test_every_registered_grid_builds_valid_configs(tmp_path):
    for exp in ex.EXPERIMENTS.values():
        for full in (False, True):
            plan = ex._plan(exp, full, exp.seeds, (), tmp_path)
            assert len(plan) == len(exp.cells) * len(exp.seeds)
            assert len({p["config_hash"] for p in plan}) == len(plan)


def test_summarise_matches_torch_statistics():
    runs = [
        {
            "cell": "a",
            "seed": s,
            "metrics": {"knn_acc": v, "collapsed": c, "bias": {"h": {"bias": v}}},
        }
        for s, (v, c) in enumerate([(0.5, False), (0.7, True), (0.9, False)])
    ]
    results = {
        "grid": {"cells": [{"cell": "a", "params": {}}, {"cell": "b", "params": {}}]},
        "runs": runs,
    }
    rows = ex.summarise(results, "knn_acc")
    t = torch.tensor([0.5, 0.7, 0.9], dtype=torch.float64)
    assert rows[0]["n"] == 3 and rows[0]["collapsed"] == 1
    assert math.isclose(rows[0]["mean"], float(t.mean())) and math.isclose(
        rows[0]["std"], float(t.std())
    )
    assert rows[0]["median"] == 0.7 and rows[1]["n"] == 0 and math.isnan(rows[1]["mean"])
    assert ex.summarise(results, "bias.h.bias")[0]["max"] == 0.9
    with pytest.raises(ValueError, match="metric"):
        ex.summarise(results, "bias.q")


def test_paired_differences_match_seeds_and_skip_missing_ones(capsys):
    def run(cell: str, seed: int, acc: float) -> dict:
        return {"cell": cell, "seed": seed, "metrics": {"knn_acc": acc}}

    runs = [run("ref", 0, 0.5), run("ref", 1, 0.6), run("x", 1, 0.7), run("x", 0, 0.4)]
    runs += [run("y", 2, 0.9)]  # seed 2 has no reference run: left out
    results = {"grid": {"cells": [{"cell": c} for c in ("ref", "x", "y")]}, "runs": runs}
    diffs = ex.paired_differences(results, "ref")
    assert list(diffs) == ["x"] and diffs["x"] == pytest.approx([-0.1, 0.1])
    assert list(ex.paired_differences(results, "ref", cells=["y"])) == []  # y: no common seed
    ex.print_paired(results, "ref")
    assert "better on 1 of 2 seeds" in capsys.readouterr().out
    with pytest.raises(ValueError, match="reference"):
        ex.paired_differences(results, "nope")


def test_measure_bias_without_augmentation_has_no_variance():
    torch.manual_seed(0)
    model = build_model("small_cnn")
    identity = lambda x, generator=None: x  # noqa: E731
    out = ex.measure_bias(model, identity, seed=0, per_class=4, instances=12, num_views=3)
    for rep in ("h", "z"):
        r = out[rep]
        assert r["variance_term"] == pytest.approx(0.0, abs=1e-10)  # K identical views
        assert r["bias"] == pytest.approx(r["raw_distance"], rel=1e-5)
        assert 0.0 <= r["bias"] <= 2.0 and 0.0 < r["prototype_norm"] <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="num_views"):
        ex.measure_bias(model, identity, seed=0, num_views=1)


def test_loss_gap_matches_the_losses_and_shrinks_with_the_batch():
    """measure_loss_gap = NT-Xent - derived per batch, averaged; more negatives, smaller gap."""
    torch.manual_seed(0)
    model = build_model("small_cnn")
    images = load_dataset("shapes", "test", size=128, seed=0).images
    identity = lambda x, generator=None: x  # noqa: E731
    gaps = ex.measure_loss_gap(model, images, identity, temperature=0.2, batch_sizes=(4, 16, 64))
    assert list(gaps) == ["4", "16", "64"]
    assert gaps["4"] > gaps["16"] > gaps["64"] > 0
    z = extract_features(model, images, use_projection=True)
    views = torch.stack([z, z]).reshape(2, 8, 16, -1).transpose(0, 1)
    want = [
        L.nt_xent_loss(v, temperature=0.2) - L.decoupled_contrastive_loss(v, temperature=0.2)
        for v in views
    ]
    assert gaps["16"] == pytest.approx(float(torch.stack(want).mean()), rel=1e-4)
    with pytest.raises(ValueError, match="batch_sizes"):
        ex.measure_loss_gap(model, images, identity, temperature=0.2, batch_sizes=(1, 500))


def test_changed_grid_keeps_stored_cells_with_runs():
    exp = tiny_experiment("grid")
    stored = {
        "grid": {
            "cells": [{"cell": "old=1", "params": {"x": 1}}, {"cell": "gone=2", "params": {}}]
        },
        "runs": [{"cell": "old=1"}],
    }
    cells = [c["cell"] for c in ex._merged_cells(exp, stored)]
    assert cells == ["lam=1.0", "lam=2.0", "old=1"]  # the cell without runs is dropped


def test_cli_parses_and_rejects(tmp_path):
    from cl_lib.__main__ import build_parser

    parser = build_parser()
    args = parser.parse_args(
        ["experiment", "long_tailed", "--seeds", "3,4", "--set", "optim.lr=1e-3"]
    )
    assert (
        args.name == "long_tailed" and args.seeds == (3, 4) and args.overrides == ["optim.lr=1e-3"]
    )
    assert args.command == "experiment"
    with pytest.raises(SystemExit):
        parser.parse_args(["experiment", "long_tailed", "--seeds", "a"])
    with pytest.raises(SystemExit):
        parser.parse_args(["experiment", "unknown"])


def test_failed_run_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch):
    exp = tiny_experiment("fails")
    real = train_mod.pretrain

    def flaky(config, **kw):
        if config.loss.lam == 1.0:
            raise RuntimeError("non-finite loss at epoch 1")
        return real(config, **kw)

    monkeypatch.setattr(train_mod, "pretrain", flaky)
    results = run(tmp_path, exp)
    assert [r["cell"] for r in results["runs"]] == ["lam=2.0"]
    assert (
        results["failures"][0]["cell"] == "lam=1.0"
        and "non-finite" in results["failures"][0]["error"]
    )


def test_stored_results_load_and_print(capsys):
    results = ex.load_stored("long_tailed")
    assert results["experiment"] == "long_tailed" and results["runs"]
    ex.print_provenance(results)
    ex.print_table(results, {"kNN %": "knn_acc"}, scale={"kNN %": 100.0})
    out = capsys.readouterr().out
    assert f"{len(results['runs'])} runs" in out
    for cell in results["grid"]["cells"]:
        assert cell["cell"] in out


def test_failed_run_makes_the_cli_exit_nonzero(tmp_path, monkeypatch, capsys):
    """Issue 14: a corrupt checkpoint fails its run; the grid records it and exits 1."""
    exp = tiny_experiment("corrupt")
    monkeypatch.setitem(ex.EXPERIMENTS, "corrupt", exp)
    plan = ex._plan(exp, False, (0,), (), tmp_path / "runs")
    bad = Path(plan[0]["config"].out_dir)
    bad.mkdir(parents=True)
    (bad / "checkpoint.pt").write_bytes(b"not a checkpoint")
    argv = ["corrupt", "--out", str(tmp_path / "results"), "--runs-dir", str(tmp_path / "runs")]
    assert ex.main([*argv, "--no-progress"]) == 1
    results = ex.load_results(tmp_path / "results" / "corrupt.json")
    assert [f["cell"] for f in results["failures"]] == ["lam=1.0"]
    assert [r["cell"] for r in results["runs"]] == ["lam=2.0"]  # the grid went on
    assert results["sessions"][-1]["failed_runs"] == 1
    assert "FAILED lam=1.0 seed 0" in capsys.readouterr().err
    (bad / "checkpoint.pt").unlink()  # repaired: the rerun retries only the failed run
    assert ex.main([*argv, "--no-progress"]) == 0
    assert len(ex.load_results(tmp_path / "results" / "corrupt.json")["runs"]) == 2


def schema2_results(knn: dict[str, list[float]], plateau: set[tuple[str, int]]) -> dict:
    """A schema-2 results dict: NT-Xent runs with a healthy or a plateau loss history."""
    config = train_mod.config_to_dict(train_mod.load_config(None, ["loss.temperature=0.2"]))
    n = config["optim"]["batch_size"]
    runs = []
    for cell, values in knn.items():
        for seed, acc in enumerate(values):
            flat = (cell, seed) in plateau
            losses = [math.log(2 * n - 1)] * 4 if flat else [4.0, 3.0, 2.0, 1.5]
            runs.append(
                {
                    "cell": cell,
                    "seed": seed,
                    "config": {**config, "seed": seed},
                    "history": [{"loss": v} for v in losses],
                    "metrics": {"knn_acc": acc, "knn_random_init": 0.2},
                }
            )
    cells = [{"cell": c, "params": {}} for c in knn]
    return {"schema_version": 2, "grid": {"cells": cells}, "runs": runs}


def test_paired_stats_intervals_and_flag_exclusion(capsys):
    results = schema2_results(
        {
            "ref": [0.80, 0.78, 0.82, 0.79, 0.81],
            "up": [0.85, 0.84, 0.86, 0.83, 0.90],  # seed 4 is on the plateau: left out
            "same": [0.81, 0.77, 0.83, 0.78, 0.82],
        },
        plateau={("up", 4)},
    )
    stats = ex.paired_stats(results, "ref")
    up = stats["up"]
    diffs = [0.05, 0.06, 0.04, 0.04]
    assert up["n"] == 4 and up["differences"] == pytest.approx(diffs)
    assert up["excluded"] == 1 and up["excluded_seeds"] == [4] and up["seeds"] == [0, 1, 2, 3]
    t = torch.tensor(diffs, dtype=torch.float64)
    half = 3.182446305284263 * float(t.std()) / 2  # t_{0.975,3} sd / sqrt(4)
    assert up["mean"] == pytest.approx(float(t.mean())) and up["high"] == pytest.approx(
        float(t.mean()) + half
    )
    assert up["distinguishable"] and up["verdict"] == "higher" and up["sign_holds"] == 4
    same = stats["same"]
    assert same["n"] == 5 and same["verdict"] == "not distinguishable at 5 seeds"
    assert same["sign_holds"] == 3
    # the raw differences: the flagged pair is dropped on schema-2 files unless asked to keep it
    assert len(ex.paired_differences(results, "ref")["up"]) == 4
    assert len(ex.paired_differences(results, "ref", exclude_flagged=False)["up"]) == 5
    row = {r["cell"]: r for r in ex.summarise(results, "knn_acc")}["up"]
    assert row["runs"] == 5 and row["n"] == 4 and row["flagged"] == row["flagged_plateau"] == 1
    assert row["flagged_seeds"] == [4] and row["median"] == pytest.approx(0.84)  # torch: lower
    ex.print_paired(results, "ref")
    ex.print_table(results, {"kNN %": "knn_acc"}, scale={"kNN %": 100.0})
    out = capsys.readouterr().out
    assert "not distinguishable (3/5)" in out
    paired = {line.split()[0]: line for line in out.splitlines() if " of " in line}
    mean, low, high = (100 * up[k] for k in ("mean", "low", "high"))
    # three significant digits of the largest bound (6.27) give two decimals
    assert f"4 of 5{mean:+9.2f}" in paired["up"] and f"[{low:+.2f}, {high:+.2f}]" in out
    assert "higher (4/4)" in out and "1 (1p)" in out  # 1 flagged run, on the plateau
    ex.print_paired(results, "ref", cells=["up"], metric="knn_acc", scale=1.0)
    gone = schema2_results({"ref": [0.8, 0.8], "flat": [0.1, 0.1]}, {("flat", 0), ("flat", 1)})
    ex.print_paired(gone, "ref")
    last = capsys.readouterr().out
    assert "0 of 2" in last and "no unflagged pair" in last


def test_flagged_runs_and_plateau_epochs_print_per_run(capsys):
    """What the chapters show of flagged runs: flags, plateau epochs, kNN, rho per cell."""
    results = schema2_results({"ref": [0.80, 0.78], "flat": [0.10, 0.50]}, {("flat", 0)})
    for run in results["runs"]:
        rho = {"init": 0.9 + 0.1 * run["seed"], "final": 0.2}
        run["metrics"].update(alignment=0.01, rho=rho)
    ex.print_flagged(results, {"flat": "F"})
    ex.print_plateau_table(results, {"flat": "F"})
    out = capsys.readouterr().out
    assert "flagged runs: 1 of 4" in out and "F seed 1" not in out
    assert "F seed 0: plateau+knn; plateau 4 of 4 epochs, kNN 10.0%, alignment 0.0100" in out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[-2:]}
    assert rows["ref"] == ["0.90", "0.20", "0/2", "0", "0"]
    assert rows["F"] == ["0.90", "0.20", "1/2", "4", "0"]
    assert max(len(line) for line in out.splitlines()) <= 88


def test_compact_tables_fit_88_columns_and_use_labels(capsys):
    """Issue 12: the printed tables of the chapters fit a code cell without scrolling."""
    long = "alpha=1.0,lam=1.0,include_positive=0"
    results = schema2_results({"ref": [0.81, 0.79, 0.80], long: [0.7, 0.72, 0.69]}, set())
    for run in results["runs"]:
        run["metrics"]["bias"] = {"h": {"bias": 0.18 + 0.01 * run["seed"]}}
    labels = {long: "lam/alpha=1"}
    metrics = {"kNN %": "knn_acc", "bias": "bias.h.bias", "kNN init %": "knn_random_init"}
    ex.print_table(results, metrics, scale={"kNN %": 100, "kNN init %": 100}, labels=labels)
    ex.print_paired(results, "ref", labels=labels)
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 88 and long not in out
    assert "80.0 +- 1.0" in out and "0.190 +- 0.010" in out  # median +- std, 3 digits
    assert "lam/alpha=1" in out and "lower (3/3)" in out


def test_initial_model_is_the_runs_initialisation_and_rho_is_recorded(tmp_path):
    from cl_lib.evaluate import knn_accuracy

    results = run(tmp_path, tiny_experiment("init"), seeds=(1,))
    r = results["runs"][0]
    config = train_mod.load_config(None, [])
    config = train_mod.TrainConfig(**{**config.__dict__, "seed": 1})
    init = ex.initial_model(config, 3)
    train = load_dataset("shapes", "train", size=64, seed=1)
    test = load_dataset("shapes", "test", size=32, seed=1)
    bank, query = extract_features(init, train.images), extract_features(init, test.images)
    knn = knn_accuracy(bank, train.labels, query, test.labels, k=20, temperature=0.07)
    assert knn == pytest.approx(r["metrics"]["knn_random_init"], abs=1e-9)
    rho = r["metrics"]["rho"]
    assert rho["num_images"] == 32 and 0.0 <= rho["init"] <= 2.0 and 0.0 <= rho["final"] <= 2.0
    assert r["eval_time_s"] > 0


def test_bias_controls_measure_the_initial_encoder_and_the_reference_augmentation(monkeypatch):
    calls = []

    def fake(model, augment, *, seed, image_size):
        calls.append((model, augment.strength))
        return {"h": {"bias": float(len(calls))}}

    monkeypatch.setattr(ex, "measure_bias", fake)
    monkeypatch.setattr(
        augment_mod, "make_augment", lambda name, size, strength: SimpleNamespace(strength=strength)
    )
    torch.manual_seed(0)
    trained, init = build_model("small_cnn"), build_model("small_cnn")
    config = train_mod.load_config(None, ["augment.strength=0.5"])
    out = ex._bias_with_controls(trained, init, config, 32, 1.0)
    assert [(m is trained, s) for m, s in calls] == [
        (True, 0.5),
        (False, 0.5),
        (True, 1.0),
        (False, 1.0),
    ]
    assert [out[k]["h"]["bias"] for k in ("bias", "bias_init", "bias_ref", "bias_init_ref")] == [
        1.0,
        2.0,
        3.0,
        4.0,
    ]
    calls.clear()  # at the reference strength the own measurement is the reference one
    out = ex._bias_with_controls(trained, init, train_mod.load_config(None, []), 32, 1.0)
    assert len(calls) == 2 and out["bias_ref"] is out["bias"]


def test_every_shapes_grid_runs_the_recipe_with_enough_seeds(tmp_path):
    """Issue 11: one working recipe (682 steps of 128) for all shapes grids; 5 seeds for A-D."""
    for name, exp in ex.EXPERIMENTS.items():
        assert len(exp.seeds) >= (5 if exp.bias or name in ("balance_grid", "long_tailed") else 3)
        plan = ex._plan(exp, False, exp.seeds[:1], (), tmp_path)
        for item in plan:
            c = item["config"]
            assert c.data.name == "shapes" and c.optim.epochs == 22 and c.data.test_size == 2000
            if name != "batch_size":
                assert c.optim.batch_size == 128
            if name == "long_tailed":  # 10000 rendered, about 4080 kept at ratio 10: 31 steps
                assert c.data.size == 10000 and c.data.imbalance_ratio == 10.0
            else:
                assert c.data.size == 4000 and 4000 // 128 * 22 == 682
    for name in ("aug_strength", "debiased_positives", "balance_grid", "long_tailed"):
        assert len(ex.EXPERIMENTS[name].seeds) >= 5


OLD_GRID = Path(__file__).parent / "fixtures" / "old_grid"


def old_grid_experiment() -> ex.Experiment:
    """The grid of tests/fixtures/make_old_grid.py (written by the runner before issue 15)."""
    return ex.Experiment(
        name="old_grid",
        description="issue 15 fixture",
        cells=(
            {"loss.name": "balanced", "loss.lam": 1.0},
            {"loss.name": "balanced", "loss.lam": 2.0},
        ),
        quick_overrides=(
            *TINY,
            "model.head_hidden=8",
            "model.head_out=4",
            "checkpoint_every=1",
        ),
        seeds=(0,),
    )


def test_results_file_of_the_old_runner_resumes(tmp_path, monkeypatch):
    """Issue 15: a grid interrupted before train and experiments became packages resumes: the
    recorded run is skipped (same config and hash), the unfinished one runs in its old folder."""
    shutil.copytree(OLD_GRID, tmp_path, dirs_exist_ok=True)
    monkeypatch.chdir(tmp_path)  # the stored configs name their folders relative to it
    stored = ex.load_results("results/old_grid.json")
    plan = ex._plan(old_grid_experiment(), False, (0,), (), Path("runs"))
    assert stored["runs"][0]["config"] == plan[0]["config_dict"]
    assert stored["runs"][0]["config_hash"] == plan[0]["config_hash"]
    assert (Path(plan[1]["config"].out_dir) / "metrics.json").is_file()  # same folder hash
    calls: list[str] = []
    real = train_mod.pretrain
    monkeypatch.setattr(
        train_mod, "pretrain", lambda c, **kw: calls.append(c.out_dir) or real(c, **kw)
    )
    results = ex.run_experiment(
        old_grid_experiment(), out="results", runs_dir="runs", progress=False
    )
    assert calls == [plan[1]["config"].out_dir]
    assert [r["cell"] for r in results["runs"]] == ["lam=1.0", "lam=2.0"]
    assert results["runs"][0] == stored["runs"][0]  # kept as it was
    assert len(results["sessions"]) == 2
    assert all(r["config_hash"] == ex.config_hash(r["config"]) for r in results["runs"])


def test_stored_grids_are_the_registered_grids_run_from_a_clean_commit(tmp_path):
    """Issue 11: every results file in results/ holds exactly the runs its registered grid
    plans (same configuration hashes, every cell and seed), made from a clean commit with
    schema 2; and a configuration that two grids share gave identical numbers in both, so a
    rerun of a cell reproduces its stored values."""
    shared: dict[tuple[str, int], list[tuple[str, float]]] = {}
    for name, exp in ex.EXPERIMENTS.items():
        stored = ex.load_stored(name)
        assert stored["schema_version"] >= 2 and stored["profile"] == "quick", name
        assert stored["provenance"]["git_dirty"] is False, name
        plan = ex._plan(exp, False, exp.seeds, (), tmp_path)
        planned = sorted((item["config_hash"], item["config"].seed) for item in plan)
        runs = sorted((r["config_hash"], r["seed"]) for r in stored["runs"])
        assert runs == planned, f"{name}: stored runs differ from the registered grid"
        for r in stored["runs"]:
            key = (r["config_hash"], r["seed"])
            shared.setdefault(key, []).append((name, r["metrics"]["knn_acc"]))
    repeated = [v for v in shared.values() if len(v) > 1]
    assert len(repeated) >= 6  # NT-Xent at the recipe is in A, B, E, F and H (3+ seeds)
    for values in repeated:
        assert len({knn for _, knn in values}) == 1, f"one configuration, two results: {values}"


def test_compare_rerun_tells_identical_within_spread_and_foreign_runs(capsys):
    """A rerun equal to the stored runs is identical; a shift of half the cell's spread is
    within it, three spreads are not; a run of another configuration is refused by name."""
    import copy

    stored = ex.load_stored("long_tailed")
    rows = ex.compare_rerun(stored, stored)
    assert len(rows) == len(stored["runs"]) and all(r["identical"] for r in rows)
    std = {
        row["cell"]: row["std"] for row in ex.summarise(stored, "knn_acc", exclude_flagged=False)
    }
    rerun = copy.deepcopy(stored)
    first, second = rerun["runs"][0], rerun["runs"][1]
    first["metrics"]["knn_acc"] += 0.5 * std[first["cell"]]
    second["metrics"]["knn_acc"] -= 3.0 * std[second["cell"]]
    rows = ex.compare_rerun(stored, rerun)
    assert not rows[0]["identical"] and rows[0]["within_spread"]
    assert not rows[1]["within_spread"]
    assert rows[1]["diff"]["knn_acc"] == pytest.approx(-3.0 * std[second["cell"]])
    assert all(r["identical"] for r in rows[2:])
    ex.print_rerun_comparison(stored, rerun)
    out = capsys.readouterr().out
    assert "OUTSIDE the cell's spread" in out
    assert f"{len(rows) - 2} of {len(rows)} runs identical" in out
    rerun["runs"][0]["config_hash"] = "not-a-stored-hash"
    with pytest.raises(ValueError, match=first["cell"]):
        ex.compare_rerun(stored, rerun)


def test_compare_rerun_script_writes_the_comparison_and_fails_outside_the_spread(tmp_path):
    """scripts/compare_rerun.py: exit 0 and a JSON record for a faithful rerun, 1 when a run
    lies outside its cell's spread."""
    import importlib.util

    path = Path(__file__).parents[1] / "scripts" / "compare_rerun.py"
    spec = importlib.util.spec_from_file_location("compare_rerun", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rerun = ex.load_stored("long_tailed")
    (tmp_path / "long_tailed.json").write_text(json.dumps(rerun))
    assert script.main([str(tmp_path), "--write", str(tmp_path / "cmp.json")]) == 0
    record = json.loads((tmp_path / "cmp.json").read_text())
    assert all(r["identical"] for r in record["long_tailed"]["runs"])
    rerun["runs"][0]["metrics"]["final_loss"] += 10.0
    (tmp_path / "long_tailed.json").write_text(json.dumps(rerun))
    assert script.main([str(tmp_path)]) == 1


def test_stored_reproduction_covers_every_cell_from_a_clean_commit():
    """results/reproduction.json (scripts/compare_rerun.py): seed 0 of every cell of every
    registered grid was rerun from a clean commit, and each run lies within its cell's
    spread (they were in fact identical)."""
    record = json.loads((ex.REPO_ROOT / "results" / "reproduction.json").read_text())
    assert set(record) == set(ex.EXPERIMENTS)
    for name, entry in record.items():
        assert entry["rerun_provenance"]["git_dirty"] is False, name
        cells = {c["cell"] for c in ex.load_stored(name)["grid"]["cells"]}
        assert {r["cell"] for r in entry["runs"]} == cells, name
        assert all(r["within_spread"] for r in entry["runs"]), name


def test_metric_difference_stats_and_unflagged_runs_on_a_stored_grid(capsys):
    """Within-run differences of two metrics get the interval of cl_lib.stats from exactly the
    unflagged runs of the cell; unflagged_runs is the complement of the flagged ones."""
    from cl_lib.stats import paired_interval

    grid = ex.load_stored("normalisation")
    flagged = {(f["cell"], f["seed"]) for f in ex.flagged_runs(grid) if f["flagged"]}
    kept = ex.unflagged_runs(grid)
    assert {(r["cell"], r["seed"]) for r in kept} == {
        (r["cell"], r["seed"]) for r in grid["runs"]
    } - flagged
    assert flagged  # the raw-dot-product cells are flagged
    for cell in ("normalize=1", "normalize=0"):
        st = ex.metric_difference_stats(grid, cell, "knn_acc", "knn_acc_head")
        runs = [r for r in kept if r["cell"] == cell]
        expected = paired_interval(
            [r["metrics"]["knn_acc"] - r["metrics"]["knn_acc_head"] for r in runs]
        )
        assert st["n"] == expected.n == len(runs)
        assert st["excluded"] == 3 - len(runs)
        if runs:
            assert st["mean"] == pytest.approx(expected.mean)
            assert (st["low"], st["high"]) == pytest.approx((expected.low, expected.high))
    with pytest.raises(ValueError, match="no such cell"):
        ex.metric_difference_stats(grid, "no such cell", "knn_acc", "knn_acc_head")
    ex.print_intervals(
        {"h - z": ex.metric_difference_stats(grid, "normalize=1", "knn_acc", "knn_acc_head")}
    )
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("h - z") and "3 of 3" in out[1] and len(max(out, key=len)) <= 88
