"""netlab.compare.stats: percentiles, the slope fit and its bootstrap interval, chi-square."""

from __future__ import annotations

import math
import random

import pytest

from netlab.compare import stats


def test_percentile_is_nearest_rank() -> None:
    xs = list(range(1, 101))  # 1..100
    assert stats.percentile(xs, 50) == 50
    assert stats.percentile(xs, 99) == 99
    assert stats.percentile(xs, 100) == 100
    assert stats.percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        stats.percentile([], 50)


def test_median_of_even_count_is_the_mean_of_the_middle_two() -> None:
    assert stats.median([4, 1, 3, 2]) == 2.5
    assert stats.median([3, 1, 2]) == 2


def test_fit_line_recovers_an_exact_line() -> None:
    f = stats.fit_line([100, 1000, 5000], [25 + 0.016 * x for x in (100, 1000, 5000)])
    assert f.slope == pytest.approx(0.016)
    assert f.intercept == pytest.approx(25)
    assert f.r2 == pytest.approx(1.0)


def test_fit_line_of_a_flat_series_has_no_r2() -> None:
    f = stats.fit_line([1, 2, 3], [5, 5, 5])
    assert f.slope == 0 and f.r2 is None


def test_fit_line_needs_two_distinct_x() -> None:
    with pytest.raises(ValueError):
        stats.fit_line([1, 1], [2, 3])


def _samples(base: float, per: float, sizes: tuple[int, ...], n: int = 200, seed: int = 3) -> dict[float, list[float]]:
    rng = random.Random(seed)
    return {float(x): [base + per * x + rng.gauss(0, 3) for _ in range(n)] for x in sizes}


def test_slope_ci_brackets_a_real_slope_and_excludes_zero() -> None:
    lo, hi = stats.slope_ci(_samples(25, 0.016, (100, 1000, 5000)))
    assert lo < 0.016 < hi
    assert lo > 0


def test_slope_ci_of_a_flat_series_includes_zero() -> None:
    lo, hi = stats.slope_ci(_samples(25, 0.0, (100, 1000, 5000)))
    assert lo < 0 < hi
    assert hi - lo < 0.002  # 2 us per 1000 services: the noise (sd 3 us, 200 samples) cannot fake a slope


def test_diff_slope_ci_cancels_a_shift_common_to_both() -> None:
    # a run-to-run drift that shifts first and last alike does not show in last - first
    rng = random.Random(5)
    drift = {100.0: 0.0, 1000.0: 9.0, 5000.0: -4.0}
    first = {x: [25 + d + rng.gauss(0, 2) for _ in range(200)] for x, d in drift.items()}
    last = {x: [25 + d + rng.gauss(0, 2) for _ in range(200)] for x, d in drift.items()}
    lo, hi = stats.diff_slope_ci(last, first)
    assert lo < 0 < hi


def test_chi2_sf_matches_known_values() -> None:
    # df = 2: the survival function is exp(-x/2)
    for x in (0.5, 2.0, 13.816):
        assert stats.chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-9)
    assert stats.chi2_sf(13.816, 2) == pytest.approx(0.001, rel=1e-3)  # the critical value tests use
    assert stats.chi2_sf(3.841, 1) == pytest.approx(0.05, rel=1e-3)
    assert stats.chi2_sf(11.070, 5) == pytest.approx(0.05, rel=1e-3)
    assert stats.chi2_sf(0, 3) == 1.0


def test_chi_square_of_an_even_and_a_lopsided_split() -> None:
    stat, df, p = stats.chi_square([100, 100, 100])
    assert (stat, df, p) == (0.0, 2, 1.0)
    stat, df, p = stats.chi_square([150, 75, 75])  # 1/2, 1/4, 1/4: a broken probability chain
    assert stat == pytest.approx(37.5) and df == 2 and p < 1e-6
    stat, df, p = stats.chi_square([300, 0, 0])  # a backend never chosen counts as 0
    assert p < 1e-100


def test_chi_square_needs_two_backends_and_data() -> None:
    with pytest.raises(ValueError):
        stats.chi_square([10])
    with pytest.raises(ValueError):
        stats.chi_square([0, 0])


@pytest.mark.parametrize(
    ("growth", "ci_low", "base", "verdict"),
    [
        (80.0, 60.0, 25.0, "grows"),  # iptables at 5k: +80 us over the range
        (1.0, -2.0, 25.0, "flat"),  # nftables
        (3.0, 1.0, 25.0, "flat"),  # detectable but below max(5 us, 15 % of the base)
        (40.0, -5.0, 25.0, "unclear"),  # large but not above the noise
        (100.0, 50.0, 800.0, "flat"),  # the VM: 100 us on an 800 us base is < 15 %
        (300.0, 200.0, 800.0, "grows"),
    ],
)
def test_shape_of(growth: float, ci_low: float, base: float, verdict: str) -> None:
    assert stats.shape_of(growth, ci_low, base) == verdict
