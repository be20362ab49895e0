"""Paired statistics of a comparison: variants trained with the same seeds, each compared
with the first (baseline) variant seed by seed.

For a variant v and the baseline b, over the n seeds both finished: the difference
d_s = L_v,s − L_b,s of final validation losses (negative: v is better), its mean d̄, its
sample standard deviation s_d (n − 1 in the denominator) and the 95% t-interval
d̄ ± t_{0.975, n−1} · s_d / √n. The variant is reported "lower" or "higher" only when the
interval excludes 0 ("not resolved" when it covers 0); it "wins" a seed when d_s < 0. One
seed gives no interval.

Plain Python (the t quantile is computed here, so scipy is only needed by the tests).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

LEVEL = 0.95
CONVENTION = (
    "Δ = variant − baseline final val loss, paired by seed; mean Δ with its 95% "
    "t-interval over seeds (Student t, n − 1 degrees of freedom); wins: seeds with Δ < 0"
)


def t_cdf(t: float, df: int) -> float:
    """P(T ≤ t) for Student's t with an integer `df` ≥ 1 (Abramowitz & Stegun 26.7.3-4:
    finite sums in θ = atan(t/√df), exact up to rounding)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    theta = math.atan(abs(t) / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # A = sinθ (1 + ½cos²θ + (1·3)/(2·4)cos⁴θ + …), df/2 terms
        term = total = 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        inside = s * total
    else:  # A = (2/π)(θ + sinθ (cosθ + (2/3)cos³θ + …)), (df−1)/2 terms
        total = 0.0
        if df > 1:
            term = total = math.cos(theta)
            for k in range(1, (df - 1) // 2):
                term *= (2 * k) / (2 * k + 1) * c2
                total += term
        inside = 2 / math.pi * (theta + s * total)
    return 0.5 + math.copysign(inside / 2, t)


def t_quantile(p: float, df: int) -> float:
    """The t with P(T ≤ t) = p (bisection on the exact CDF, to float precision)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        if mid in (low, high):
            break
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2


def mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def sd(values: list[float]) -> float | None:
    """Sample standard deviation (n − 1), None for fewer than 2 values."""
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


@dataclass(frozen=True)
class Paired:
    """A variant against the baseline over the seeds both have."""

    seeds: list[int]
    differences: list[float]  # variant − baseline, by seed
    mean: float
    sd: float | None
    low: float | None  # the interval; None with one seed
    high: float | None
    wins: int  # seeds where the variant's loss is lower

    @property
    def verdict(self) -> str:
        if self.low is None or self.high is None:
            return "one seed: no interval"
        if self.high < 0:
            return "lower (95%)"
        if self.low > 0:
            return "higher (95%)"
        return "not resolved"


def paired(variant: Mapping[int, float], baseline: Mapping[int, float]) -> Paired | None:
    """The paired difference over the seeds both have (None if they share none)."""
    seeds = sorted(set(variant) & set(baseline))
    if not seeds:
        return None
    diffs = [variant[s] - baseline[s] for s in seeds]
    m, spread = mean(diffs), sd(diffs)
    low = high = None
    if spread is not None:
        half = t_quantile(0.5 + LEVEL / 2, len(diffs) - 1) * spread / math.sqrt(len(diffs))
        low, high = m - half, m + half
    wins = sum(d < 0 for d in diffs)
    return Paired(seeds, diffs, m, spread, low, high, wins)


@dataclass(frozen=True)
class Summary:
    """One variant's final validation losses across seeds, and against the baseline."""

    variant: str
    losses: dict[int, float]  # by seed
    mean: float | None
    sd: float | None
    versus_baseline: Paired | None  # None for the baseline itself


def summarize(losses: Mapping[str, Mapping[int, float]]) -> list[Summary]:
    """Per variant (in order; the first is the baseline): mean and sd of its losses and
    its paired difference to the baseline. Non-finite losses (a diverged run) are left
    out of every statistic."""
    finite = {
        v: {s: x for s, x in by_seed.items() if math.isfinite(x)} for v, by_seed in losses.items()
    }
    names = list(finite)
    out = []
    for i, name in enumerate(names):
        values = [finite[name][s] for s in sorted(finite[name])]
        out.append(
            Summary(
                name,
                dict(sorted(finite[name].items())),
                mean(values) if values else None,
                sd(values),
                paired(finite[name], finite[names[0]]) if i else None,
            )
        )
    return out
