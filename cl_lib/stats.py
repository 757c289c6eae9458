"""Small-sample statistics for the experiment grids: Student-t quantiles and paired intervals.

The grids compare cells on the same seeds (same data, initialisation and augmentation draws),
so a claim rests on the *paired* differences ``d_s = metric(cell, s) - metric(reference, s)``.
:func:`paired_interval` gives their mean with the two-sided Student-t interval
``mean +- t_{1 - (1 - level)/2, n - 1} * sd / sqrt(n)`` (sd with ddof 1), the number of seeds
on which the sign of the mean holds, and whether the interval excludes 0. The t interval
assumes roughly normal differences; with 3 to 5 seeds nothing better is available, and it is
wide, as it should be (``t_{0.975, 4} = 2.776``). No SciPy: the t distribution function for an
integer number of degrees of freedom has a closed form (Abramowitz & Stegun 26.7.3-4), and
:func:`t_quantile` inverts it by bisection.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PairedInterval", "paired_interval", "t_cdf", "t_quantile"]


def _check_df(df: int) -> int:
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"df must be an int >= 1, got {df!r}")
    return df


def t_cdf(t: float, df: int) -> float:
    """Distribution function of Student's t with ``df`` (integer) degrees of freedom at ``t``."""
    df = _check_df(df)
    if not math.isfinite(t):
        if math.isnan(t):
            raise ValueError("t must be a number, got nan")
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:  # A&S 26.7.3: A = (2/pi) (theta + sin cos (1 + 2/3 cos^2 + ...))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for j in range(1, (df - 1) // 2):
            term *= c2 * (2 * j) / (2 * j + 1)
            total += term
        central = 2 / math.pi * (theta + s * math.cos(theta) * total)
    else:  # A&S 26.7.4: A = sin (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ...)
        term, total = 1.0, 1.0
        for j in range(1, df // 2):
            term *= c2 * (2 * j - 1) / (2 * j)
            total += term
        central = s * total
    return 0.5 + math.copysign(0.5 * central, t)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection, ~1e-12)."""
    df = _check_df(df)
    if not (isinstance(p, (int, float)) and 0.0 < p < 1.0):
        raise ValueError(f"p must be a float in (0, 1), got {p!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-13 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class PairedInterval:
    """Mean paired difference, its t interval at ``level``, and how often the sign holds.

    ``sign_holds``: seeds whose difference has the sign of the mean (a zero difference does not
    count); ``distinguishable``: the interval excludes 0 (False when ``n < 2``).
    """

    n: int
    mean: float
    std: float
    low: float
    high: float
    level: float
    sign_holds: int

    @property
    def distinguishable(self) -> bool:
        """True when the interval lies entirely above or below 0."""
        return self.n >= 2 and (self.low > 0.0 or self.high < 0.0)

    def verdict(self) -> str:
        """``'higher'``, ``'lower'`` or ``'not distinguishable at n seeds'``."""
        if not self.distinguishable:
            return f"not distinguishable at {self.n} seed{'s' if self.n != 1 else ''}"
        return "higher" if self.low > 0.0 else "lower"


def paired_interval(differences: Sequence[float], level: float = 0.95) -> PairedInterval:
    """Mean of ``differences`` with its two-sided Student-t interval at ``level``.

    ``n = 0`` gives NaN everywhere; ``n = 1`` a mean without an interval (NaN bounds).
    """
    if not (isinstance(level, float) and 0.0 < level < 1.0):
        raise ValueError(f"level must be a float in (0, 1), got {level!r}")
    values = [float(d) for d in differences]
    if any(not math.isfinite(v) for v in values):
        raise ValueError(f"differences must be finite numbers, got {values}")
    n = len(values)
    nan = math.nan
    if n == 0:
        return PairedInterval(0, nan, nan, nan, nan, level, 0)
    mean = math.fsum(values) / n
    if mean > 0:
        holds = sum(v > 0 for v in values)
    elif mean < 0:
        holds = sum(v < 0 for v in values)
    else:
        holds = 0
    if n == 1:
        return PairedInterval(1, mean, nan, nan, nan, level, holds)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return PairedInterval(n, mean, std, mean - half, mean + half, level, holds)
