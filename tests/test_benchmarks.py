"""Smoke tests of the benchmark suite: like-for-like losses, JSON schema and provenance, ratios."""

from __future__ import annotations

import json
import re
import statistics

import pytest
import torch

from benchmarks import bench_loss, common, report, run
from benchmarks.naive import naive_nt_xent
from cl_lib import losses as L


def _views(n: int, d: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Two correlated views (2, n, d)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=dtype)
    return torch.stack((a, a + 0.5 * torch.randn(n, d, generator=g, dtype=dtype)))


@pytest.mark.parametrize(
    ("n", "d", "tau"), [(5, 3, 0.1), (32, 16, 0.5), (17, 128, 1.0), (9, 4, 0.02), (12, 8, 0.005)]
)
def test_naive_reference_equals_cl_lib_nt_xent(n: int, d: int, tau: float) -> None:
    """The textbook reference computes cl_lib's NT-Xent: same value, same gradient."""
    x = _views(n, d, seed=n)
    ours_in, ref_in = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours = L.nt_xent_loss(ours_in, temperature=tau)
    ref = naive_nt_xent(ref_in[0], ref_in[1], tau)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=1e-10, atol=1e-12)


def test_naive_reference_rejects_mismatched_views() -> None:
    """Views of different shapes raise ValueError naming the arguments."""
    with pytest.raises(ValueError, match="view0 and view1"):
        naive_nt_xent(torch.randn(4, 3), torch.randn(5, 3))


def test_every_timed_nt_xent_computes_the_same_loss() -> None:
    """All NT-Xent entries of the benchmark agree, the balanced one is the analytic variant."""
    x = _views(12, 8, seed=3, dtype=torch.float32)
    fns = bench_loss.implementations(baseline_ref=None)
    expected = L.nt_xent_loss(x, temperature=bench_loss.TEMPERATURE)
    for name, fn in fns.items():
        value = fn(x)
        if "balanced" in name:
            target = L.contrastive_components(x, temperature=bench_loss.TEMPERATURE)
            manual = (bench_loss.BALANCED_LAM * target.negative_lse - target.positive).mean()
            torch.testing.assert_close(value, manual, rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5, msg=name)


def test_summary_statistics_and_ratios() -> None:
    """Median, IQR (inclusive quartiles) and ratios on known samples; missing data gives None."""
    stats = common.summarise([5.0, 1.0, 3.0, 2.0, 4.0])
    assert stats["median_s"] == 3.0 and stats["iqr_s"] == 2.0 and stats["min_s"] == 1.0
    assert stats["repeats"] == 5
    assert common.ratio(3.0, 1.5) == 2.0
    assert common.ratio(None, 1.0) is None and common.ratio(1.0, 0.0) is None
    with pytest.raises(ValueError, match="samples"):
        common.summarise([])


def test_pml_is_skipped_only_where_its_cubic_memory_exceeds_the_budget() -> None:
    """The O(N^3) estimate decides: small N runs, large N is skipped with a reason."""
    budget = 2**30
    assert bench_loss.skip_reason(bench_loss.PML, 16, budget) is None
    reason = bench_loss.skip_reason(bench_loss.PML, 4096, budget)
    assert reason is not None and "N^3" in reason
    assert bench_loss.skip_reason(bench_loss.REFERENCE, 4096, budget) is None
    assert bench_loss.pml_estimated_bytes(2 * 64) == pytest.approx(
        8 * bench_loss.pml_estimated_bytes(64), rel=0.05
    )


def test_peak_rss_sees_a_known_allocation() -> None:
    """The CPU memory probe reports at least the size of a tensor allocated after a reset."""
    if not common.reset_peak_rss():
        pytest.skip("cannot reset the RSS high-water mark here")
    before = common.current_rss_bytes()
    block = torch.ones(16 * 2**20 // 4)  # 16 MiB, touched
    peak = common.peak_rss_bytes() - before
    del block
    assert peak >= 15 * 2**20


@pytest.fixture(scope="module")
def quick_json(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny quick run of the loss and augment parts into a temporary file."""
    out = tmp_path_factory.mktemp("bench") / "b.json"
    argv = ["--quick", "--only", "loss,augment", "--output", str(out), "--loss-sizes", "16"]
    argv += ["--no-memory", "--baseline-ref", "none", "--device", "cpu"]
    argv += ["--augment-batches", "32", "--workers", "1"]
    run.main(argv)
    return json.loads(out.read_text())


def test_quick_run_provenance(quick_json: dict) -> None:
    """Provenance names the commit, date, versions, machine and the exact command."""
    p = quick_json["provenance"]
    assert p["git_commit"] is None or re.fullmatch(r"[0-9a-f]{40}", p["git_commit"])
    assert p["git_dirty"] in (True, False, None)
    assert re.match(r"\d{4}-\d\d-\d\dT", p["date_utc"])
    assert p["torch"] == torch.__version__
    for key in ("lightly", "pytorch_metric_learning", "cpu_model", "device", "python"):
        assert key in p
    assert p["torch_num_threads"] >= 1 and p["cpu_count"] >= 1
    assert "-m benchmarks.run" in p["command"] and "--loss-sizes 16" in p["command"]
    assert len(p["load_average_start"]) == 3 and len(p["load_average_end"]) == 3
    assert set(quick_json["parts"]) == {"loss", "augment"}


def test_quick_run_loss_schema_and_ratios(quick_json: dict) -> None:
    """Every loss case has timings and ratios equal to median / cl_lib's median."""
    part = quick_json["parts"]["loss"]
    assert part["memory_method"]["cpu"] and part["sizes"] == [16]
    cases = part["cases"]
    ref = next(c for c in cases if c["impl"] == bench_loss.REFERENCE)
    assert ref["time_ratio_to_reference"] == 1.0
    for case in cases:
        assert {"device", "n", "d", "impl", "time", "skipped", "peak_memory_bytes"} <= set(case)
        assert case["skipped"] is None
        t = case["time"]
        assert 0 < t["q1_s"] <= t["median_s"] <= t["q3_s"]
        assert t["iqr_s"] == pytest.approx(t["q3_s"] - t["q1_s"])
        expected = t["median_s"] / ref["time"]["median_s"]
        assert case["time_ratio_to_reference"] == pytest.approx(expected)


def test_quick_run_augment_schema_and_speedups(quick_json: dict) -> None:
    """Augment cases report images/s; speed-ups are ratios to the torchvision pipeline."""
    part = quick_json["parts"]["augment"]
    cases = part["cases"]
    peer = next(c for c in cases if c["impl"].startswith("torchvision"))
    assert peer["speedup_vs_torchvision"] == 1.0
    for case in cases:
        rate = case["images_per_s"]["median"]
        assert rate > 0
        assert case["speedup_vs_torchvision"] == pytest.approx(
            rate / peer["images_per_s"]["median"]
        )
    assert part["num_workers"] == 1 and {c["batch"] for c in cases} == {32}


def test_report_renders_every_block_from_the_json(quick_json: dict) -> None:
    """The page renderer fills the generated blocks with the JSON's numbers."""
    page = "x\n<!-- BEGIN GENERATED: loss -->\nold\n<!-- END GENERATED: loss -->\ny\n"
    rendered = report.render_page(page, quick_json)
    ref = next(c for c in quick_json["parts"]["loss"]["cases"] if c["impl"] == "lightly NTXentLoss")
    assert f"{ref['time']['median_s'] * 1e3:.3g}" in rendered and "old" not in rendered
    assert report.render_page(rendered, quick_json) == rendered  # idempotent


def test_committed_page_matches_committed_json() -> None:
    """book/performance.md shows exactly the numbers of results/benchmarks.json."""
    if not report.RESULTS.exists():
        pytest.skip("results/benchmarks.json has not been produced yet")
    assert report.main(["--check"]) == 0


def test_interleaved_times_alternates_order() -> None:
    """Round-robin timing calls every function warmup + repeats times."""
    calls: list[str] = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = common.interleaved_times(fns, repeats=3, warmup=1, device=torch.device("cpu"))
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert all(len(v) == 3 and min(v) >= 0 for v in times.values())
    assert statistics.median(times["a"]) >= 0


# ---------------------------------------------------------------- the speed-ups change nothing


def test_chunked_cpu_augmentation_equals_small_batches() -> None:
    """A batch above the CPU chunk size gives the images of separately augmented sub-batches."""
    from cl_lib.augment import make_augment

    augment = make_augment("simclr_cifar", 32)
    x = torch.rand(300, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    params = augment.sample_params(
        300, "cpu", torch.Generator().manual_seed(1), image_shape=(32, 32)
    )
    whole = augment.apply(x, params)
    parts = [
        augment.apply(x[i : i + 100], {k: v[i : i + 100] for k, v in params.items()})
        for i in range(0, 300, 100)
    ]
    torch.testing.assert_close(whole, torch.cat(parts), rtol=0, atol=1e-6)


@pytest.mark.parametrize("tau", [0.005, 0.02, 0.1, 0.5])
@pytest.mark.parametrize("num_views", [2, 3])
@pytest.mark.parametrize("include_positive", [False, True])
def test_fused_loss_equals_the_unfused_path(
    tau: float, num_views: int, include_positive: bool
) -> None:
    """The fused negatives' log-sum-exp matches the masked-logits path (values, gradients).

    Unit negative weights route the same loss through the unfused implementation.
    """
    g = torch.Generator().manual_seed(7)
    x = torch.randn(1, 20, 6, generator=g, dtype=torch.float64)
    x = x + 0.3 * torch.randn(num_views, 20, 6, generator=g, dtype=torch.float64)
    kwargs = {"temperature": tau, "alpha": 0.7, "lam": 0.8, "include_positive": include_positive}
    ones = torch.ones(num_views * 20, dtype=torch.float64)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    fused = L.balanced_contrastive_loss(a, reduction="none", **kwargs)
    unfused = L.balanced_contrastive_loss(b, reduction="none", negative_weights=ones, **kwargs)
    torch.testing.assert_close(fused, unfused, rtol=1e-10, atol=1e-10)
    weights = torch.rand(fused.shape, generator=g, dtype=torch.float64)
    (fused * weights).sum().backward()
    (unfused * weights).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-11)
