"""The growth fit on series drawn from known rates: it recovers them, its 95% interval
covers them as often as it claims, and a flat series shows no significant growth."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from storage.growth import MIN_CASES, fit_growth, fitted_cases


def poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw (Knuth's method for small means, a normal one above 500)."""
    if mean > 500:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


def series(seed: int, first: float, growth: float, days: int) -> list[int]:
    rng = random.Random(seed)
    return [poisson(rng, first * (1 + growth) ** t) for t in range(days)]


@pytest.mark.parametrize("days", [7, 14])
def test_it_recovers_a_growing_rate_and_its_interval_covers_it(days: int) -> None:
    """30 cases a day growing 10% a day. In at least 90 of 100 seeds: the fitted daily
    rate of cases (at the window's middle, where the fit knows it best) is within 10% of
    the generating one, and the growth's 95% interval holds 0.10. Over the seeds the
    growth estimate averages within 10% of 0.10. With 14 days the growth is significant
    in every seed."""
    covered = level_within = 0
    estimates = []
    for seed in range(100):
        fit = fit_growth(series(seed, 30, 0.10, days))
        assert fit is not None
        estimates.append(fit.daily_growth)
        covered += fit.low <= 0.10 <= fit.high
        middle = (days - 1) / 2
        level_within += abs(fitted_cases(fit, middle) / (30 * 1.1**middle) - 1) <= 0.10
        if days == 14:
            assert fit.significant and fit.doubling_days is not None
    assert covered >= 90, covered
    assert level_within >= 90, level_within
    mean = sum(estimates) / len(estimates)
    assert abs(mean - 0.10) <= 0.01, mean
    if days == 14:
        # Doubling at 10% a day: ln 2 / ln 1.1 = 7.27 days; the median fit within 10%.
        doublings = sorted(
            d for seed in range(100) if (f := fit_growth(series(seed, 30, 0.10, days)))
            if (d := f.doubling_days) is not None
        )  # fmt: skip
        median = doublings[len(doublings) // 2]
        assert abs(median / (math.log(2) / math.log(1.1)) - 1) <= 0.10, median


def test_a_flat_series_shows_no_significant_growth_in_most_seeds() -> None:
    significant = 0
    for seed in range(100):
        fit = fit_growth(series(seed, 30, 0.0, 14))
        assert fit is not None
        significant += fit.significant
        assert fit.low <= fit.daily_growth <= fit.high
    assert significant <= 10, significant  # a 95% interval: about 5 in 100 by chance


def test_a_shrinking_series_halves() -> None:
    fit = fit_growth(series(1, 200, -0.08, 14))
    assert fit is not None and fit.significant
    assert fit.halving_days is not None and fit.doubling_days is None
    assert abs(fit.halving_days - math.log(2) / -math.log(0.92)) < 2


def test_the_projection_carries_the_trend_a_week_on_with_a_band() -> None:
    fit = fit_growth(series(2, 30, 0.10, 14))
    assert fit is not None and len(fit.projection) == 7
    for mean, low, high in fit.projection:
        assert low < mean < high
    means = [p[0] for p in fit.projection]
    assert all(later > earlier for earlier, later in itertools.pairwise(means))
    # Day 20 of 30 x 1.1^t: about 202 cases.
    assert fit.projection[-1][1] < 30 * 1.1**20 < fit.projection[-1][2]


def test_too_few_cases_give_no_rate() -> None:
    assert fit_growth([0, 1, 0, 2, 1, 0, 1]) is None  # under MIN_CASES
    assert fit_growth([MIN_CASES, 0]) is None  # under 3 days
    assert fit_growth([1, 2, 1, 3, 2, 4, 3]) is not None  # 16 cases: enough
