"""How fast daily cases grow: a Poisson regression with a log link, the pure part (no I/O).

The model: the cases of day ``t`` (0 for the first day of the window) are Poisson with mean
``exp(a + b t)``, so the cases grow by ``exp(b) - 1`` a day. It is fitted by maximum
likelihood (Newton's method on the two parameters), and ``b``'s 95% interval is
``b ± 1.96`` standard errors from the inverse of the Fisher information. What it assumes,
and when not to trust it (docs/api.md, "Analysis and forecasting"):
- every day's cases are counted the same way: a change in testing or reporting within the
  window changes the counts, not the epidemic, and the fit cannot tell them apart;
- growth is steady over the window (7 or 14 days): a turn within it is averaged away;
- the counts vary as a Poisson count does. Real counts usually vary more (clusters,
  batches of results reported together), so the interval is too narrow then;
- a few cases carry little information: with under ``MIN_CASES`` in the window no rate is
  given at all.
The projection is the fitted mean carried 7 days on, with its 95% band (of the mean, not
of one day's count); it only says where the current trend leads.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

Z_95: Final = 1.959963984540054
MIN_CASES: Final = 10  # in the window; fewer and no rate is given
MAX_ITERATIONS: Final = 50
PROJECTION_DAYS: Final = 7


@dataclass(frozen=True, slots=True)
class Growth:
    """The fit of one window of daily counts."""

    days: int  # the window's length
    cases: int  # in the window
    level: float  # the fitted cases of the window's last day
    intercept: float  # a and b of exp(a + b t), t = 0 the window's first day
    slope: float
    daily_growth: float  # exp(b) - 1: 0.10 is 10% more cases each day
    low: float  # the 95% interval of daily_growth
    high: float
    significant: bool  # the interval excludes 0
    doubling_days: float | None  # when growing significantly
    halving_days: float | None  # when shrinking significantly
    projection: tuple[tuple[float, float, float], ...]  # (mean, low, high) per day ahead


def fitted_cases(growth: Growth, day: float) -> float:
    """The fitted mean cases of ``day`` (0: the window's first)."""
    return math.exp(growth.intercept + growth.slope * day)


def fit_growth(counts: Sequence[int], projection_days: int = PROJECTION_DAYS) -> Growth | None:
    """The growth of ``counts`` (one per day, oldest first); None with too few cases to
    say anything (under ``MIN_CASES``), or for a window under 3 days."""
    n = len(counts)
    total = sum(counts)
    if n < 3 or total < MIN_CASES or any(c < 0 for c in counts):
        return None
    a, b = _maximum_likelihood(counts)
    info = _information(n, a, b)
    det = info[0] * info[2] - info[1] * info[1]
    if det <= 0:
        return None
    # The inverse of [[i00, i01], [i01, i11]].
    var_a, cov_ab, var_b = info[2] / det, -info[1] / det, info[0] / det
    se_b = math.sqrt(var_b)
    low_b, high_b = b - Z_95 * se_b, b + Z_95 * se_b
    significant = low_b > 0 or high_b < 0
    projection = []
    for h in range(1, projection_days + 1):
        t = n - 1 + h
        eta = a + b * t
        se_eta = math.sqrt(max(0.0, var_a + 2 * t * cov_ab + t * t * var_b))
        projection.append(
            (math.exp(eta), math.exp(eta - Z_95 * se_eta), math.exp(eta + Z_95 * se_eta))
        )
    return Growth(
        days=n,
        cases=total,
        level=math.exp(a + b * (n - 1)),
        intercept=a,
        slope=b,
        daily_growth=math.expm1(b),
        low=math.expm1(low_b),
        high=math.expm1(high_b),
        significant=significant,
        doubling_days=math.log(2) / b if significant and b > 0 else None,
        halving_days=math.log(2) / -b if significant and b < 0 else None,
        projection=tuple(projection),
    )


def _maximum_likelihood(counts: Sequence[int]) -> tuple[float, float]:
    """(a, b) maximising the Poisson log-likelihood of ``counts`` under exp(a + b t)."""
    n = len(counts)
    a, b = math.log(max(sum(counts) / n, 1e-9)), 0.0
    for _ in range(MAX_ITERATIONS):
        mu = [math.exp(a + b * t) for t in range(n)]
        # Score and information of the two parameters.
        g_a = sum(c - m for c, m in zip(counts, mu, strict=True))
        g_b = sum(t * (c - m) for t, (c, m) in enumerate(zip(counts, mu, strict=True)))
        i00, i01, i11 = _information(n, a, b)
        det = i00 * i11 - i01 * i01
        if det <= 0:
            break
        step_a = (i11 * g_a - i01 * g_b) / det
        step_b = (i00 * g_b - i01 * g_a) / det
        # A day of zero cases can pull b far; halve a step that overshoots.
        scale = 1.0
        while abs(step_b * scale) > 1.0:
            scale /= 2
        a, b = a + step_a * scale, b + step_b * scale
        if abs(step_a * scale) < 1e-10 and abs(step_b * scale) < 1e-10:
            break
    return a, b


def _information(n: int, a: float, b: float) -> tuple[float, float, float]:
    """The Fisher information of (a, b): sums of mu, t mu and t² mu."""
    mu = [math.exp(a + b * t) for t in range(n)]
    return (
        sum(mu),
        sum(t * m for t, m in enumerate(mu)),
        sum(t * t * m for t, m in enumerate(mu)),
    )
