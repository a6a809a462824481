"""Pure statistics for `netlab compare`: percentiles, a least-squares slope with a bootstrap
interval, the chi-square test of a load split, and the shape verdict of a latency series.

No numpy: a compare has a few thousand samples at most, and the report must not depend on
anything the lab itself does not need.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Fit",
    "bootstrap_slope",
    "chi2_sf",
    "chi_square",
    "diff_slope_ci",
    "fit_line",
    "median",
    "percentile",
    "shape_of",
    "slope_ci",
]


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by the nearest-rank method: a value that was measured, as
    `netlab bench services` reports its p99 (sorted[ceil(q/100 * n) - 1])."""
    if not xs:
        raise ValueError("percentile of no samples")
    s = sorted(xs)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def median(xs: Sequence[float]) -> float:
    """The usual median (mean of the middle two for an even count)."""
    if not xs:
        raise ValueError("median of no samples")
    s = sorted(xs)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


@dataclass(frozen=True)
class Fit:
    """y = intercept + slope * x by ordinary least squares."""

    slope: float
    intercept: float
    r2: float | None  # None when y does not vary
    n: int


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> Fit:
    """Least-squares line through (xs, ys); needs two or more distinct x."""
    if len(xs) != len(ys):
        raise ValueError("fit_line: xs and ys differ in length")
    n = len(xs)
    if n < 2 or len(set(xs)) < 2:
        raise ValueError("fit_line needs at least two distinct x values")
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    syy = sum((y - my) ** 2 for y in ys)
    slope = sxy / sxx
    intercept = my - slope * mx
    r2 = None if syy == 0 else (sxy * sxy) / (sxx * syy)
    return Fit(slope, intercept, r2, n)


def bootstrap_slope(
    groups: Mapping[float, Sequence[Sequence[float]]],
    stat: Callable[[list[list[float]]], float],
    *,
    rounds: int = 400,
    level: float = 0.95,
    seed: int = 1,
) -> tuple[float, float]:
    """Bootstrap interval of the slope of stat(samples) versus x: each round resamples every
    sample list of every x with replacement, computes stat at each x and fits a line. The
    interval says whether a slope stands out of the per-connection noise; drift between the
    runs at different x it cannot see (the interleaved first/last pair of one run is for that)."""
    rng = random.Random(seed)
    xs = sorted(groups)
    slopes = []
    for _ in range(rounds):
        ys = [stat([[s[rng.randrange(len(s))] for _ in s] for s in groups[x]]) for x in xs]
        slopes.append(fit_line(xs, ys).slope)
    slopes.sort()
    lo = slopes[int((1 - level) / 2 * rounds)]
    hi = slopes[min(rounds - 1, int((1 + level) / 2 * rounds))]
    return lo, hi


def slope_ci(samples: Mapping[float, Sequence[float]], *, q: float = 50.0, **kw: Any) -> tuple[float, float]:
    """Bootstrap interval of the slope of the q-th percentile of the samples versus x."""
    return bootstrap_slope({x: [s] for x, s in samples.items()}, lambda g: percentile(g[0], q), **kw)


def diff_slope_ci(
    a: Mapping[float, Sequence[float]], b: Mapping[float, Sequence[float]], *, q: float = 50.0, **kw: Any
) -> tuple[float, float]:
    """Bootstrap interval of the slope of percentile(a) - percentile(b) versus x (a and b
    measured at the same x values)."""
    return bootstrap_slope({x: [a[x], b[x]] for x in a}, lambda g: percentile(g[0], q) - percentile(g[1], q), **kw)


# --- chi-square -------------------------------------------------------------------------------


def _gamma_p_series(a: float, x: float) -> float:
    term = total = 1.0 / a
    ap = a
    for _ in range(10000):
        ap += 1
        term *= x / ap
        total += term
        if abs(term) < abs(total) * 1e-15:
            break
    return total * math.exp(-x + a * math.log(x) - math.lgamma(a))


def _gamma_q_fraction(a: float, x: float) -> float:
    # Lentz's continued fraction for the upper incomplete gamma function
    tiny = 1e-300
    b = x + 1 - a
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 10000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-15:
            break
    return h * math.exp(-x + a * math.log(x) - math.lgamma(a))


def chi2_sf(x: float, df: int) -> float:
    """P(X >= x) for X chi-square with df degrees of freedom (the test's p-value)."""
    if df < 1:
        raise ValueError("chi2_sf needs df >= 1")
    if x <= 0:
        return 1.0
    a, h = df / 2, x / 2
    if h < a + 1:
        return max(0.0, 1.0 - _gamma_p_series(a, h))
    return _gamma_q_fraction(a, h)


def chi_square(counts: Sequence[int]) -> tuple[float, int, float]:
    """(statistic, degrees of freedom, p-value) of counts against an even split over all of
    them: a backend that was never chosen must be passed as 0."""
    k = len(counts)
    total = sum(counts)
    if k < 2 or total == 0:
        raise ValueError("chi_square needs two or more backends and at least one observation")
    expected = total / k
    stat = sum((c - expected) ** 2 / expected for c in counts)
    return stat, k - 1, chi2_sf(stat, k - 1)


# --- shape ------------------------------------------------------------------------------------

GROWS = "grows"
FLAT = "flat"
UNCLEAR = "unclear"


def shape_of(
    growth_us: float, ci_low_us: float, base_us: float, *, abs_floor_us: float = 5.0, rel_floor: float = 0.15
) -> str:
    """Whether a latency series grows with the number of services.

    growth_us: the fitted slope times the range of service counts measured (what the last
    service costs more at the largest count than at the smallest); ci_low_us: the same from
    the lower end of the slope's interval; base_us: the latency at the smallest count. The
    threshold is relative so that a slower machine (the VM tier: everything 25-30x slower)
    is judged on the same terms: 15 % of its own base, and at least 5 us."""
    threshold = max(abs_floor_us, rel_floor * base_us)
    if growth_us < threshold:
        return FLAT
    return GROWS if ci_low_us > 0 else UNCLEAR
