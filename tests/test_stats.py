"""Tests for cl_lib.stats: Student-t quantiles and paired t intervals."""

from __future__ import annotations

import math

import pytest
import torch

from cl_lib.stats import paired_interval, t_cdf, t_quantile

# Two-sided 95% critical values t_{0.975, df} from standard tables (3 decimals).
TABLE_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 10: 2.228, 30: 2.042}


def test_t_quantile_matches_closed_forms_and_tables():
    for p in (0.6, 0.9, 0.975, 0.995):
        assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-10)
        q = 2 * p - 1  # df = 2: F(t) = 1/2 + t / (2 sqrt(2 + t^2))
        assert t_quantile(p, 2) == pytest.approx(q * math.sqrt(2 / (1 - q * q)), rel=1e-10)
    for df, value in TABLE_975.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)
    assert t_quantile(0.975, 2000) == pytest.approx(1.95996, abs=2e-3)  # -> normal quantile
    assert t_quantile(0.025, 4) == -t_quantile(0.975, 4)


def test_t_cdf_inverts_the_quantile_and_is_a_distribution_function():
    for df in (1, 2, 3, 4, 7, 12):
        for p in (0.01, 0.3, 0.5, 0.8, 0.975):
            assert t_cdf(t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)
        values = [t_cdf(x / 4, df) for x in range(-40, 41)]
        assert all(b >= a for a, b in zip(values, values[1:], strict=False))
        assert t_cdf(0.0, df) == 0.5 and t_cdf(math.inf, df) == 1.0 and t_cdf(-math.inf, df) == 0
        assert t_cdf(1.3, df) + t_cdf(-1.3, df) == pytest.approx(1.0, abs=1e-14)


def test_t_matches_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 5, 9, 20):
        assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)
        assert t_cdf(0.7, df) == pytest.approx(stats.t.cdf(0.7, df), abs=1e-12)


def test_paired_interval_known_case():
    iv = paired_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)  # t_{0.975,4} sd / sqrt(n)
    assert iv.n == 5 and iv.mean == 3.0 and iv.std == pytest.approx(math.sqrt(2.5))
    assert iv.low == pytest.approx(3.0 - half, rel=1e-9) and iv.high == pytest.approx(3 + half)
    assert iv.sign_holds == 5 and iv.distinguishable and iv.verdict() == "higher"
    mixed = paired_interval([0.02, -0.01, 0.03, -0.02, 0.01])
    assert mixed.sign_holds == 3 and not mixed.distinguishable
    assert mixed.verdict() == "not distinguishable at 5 seeds"
    assert paired_interval([-1.0, -2.0, -1.5]).verdict() == "lower"


def test_paired_interval_small_n_and_bad_input():
    one = paired_interval([0.3])
    assert one.n == 1 and one.mean == 0.3 and math.isnan(one.low) and not one.distinguishable
    empty = paired_interval([])
    assert empty.n == 0 and math.isnan(empty.mean)
    assert empty.verdict() == "not distinguishable at 0 seeds"
    with pytest.raises(ValueError, match="level"):
        paired_interval([1.0, 2.0], level=95)
    with pytest.raises(ValueError, match="differences"):
        paired_interval([1.0, math.nan])
    with pytest.raises(ValueError, match="df"):
        t_quantile(0.9, 0)
    with pytest.raises(ValueError, match="p must"):
        t_quantile(1.0, 3)


def test_paired_interval_covers_the_mean_95_percent_of_the_time():
    """Normal differences, 5 seeds: the interval holds the true mean in about 95% of draws."""
    gen = torch.Generator().manual_seed(0)
    draws = 0.3 + torch.randn(2000, 5, generator=gen, dtype=torch.float64)
    hits = sum(iv.low <= 0.3 <= iv.high for iv in map(paired_interval, draws.tolist()))
    assert abs(hits / 2000 - 0.95) < 0.015  # binomial sd 0.005
