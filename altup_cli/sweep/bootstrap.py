"""Residual bootstrap of the isoFLOP minima: the noise the per-budget parabolas leave, each
budget's parabola refitted to its fitted losses plus resampled noise (every budget in
every replicate), and the 95% interval of a power-law exponent from the replicates.

The noise comes from the per-budget parabolas' residuals where any budget has more than 3
runs. Where none has (3 sizes everywhere: each parabola passes through its points), it
comes from one model with fewer parameters than losses: parabolas in ln N with one
curvature shared by all budgets, each budget keeping its own minimum and level (K budgets
of 3 sizes: 3K losses, 2K + 1 parameters, K − 1 degrees of freedom; 1 at 3 × 2). A shared
curvature is an assumption: Chinchilla's L = E + A/N^α + B/D^β (Hoffmann et al. 2022,
approach 3) makes an isoFLOP curve's curvature in ln N αβ·(L_opt − E), so it falls with
the budget. Any difference between the budgets' own curvatures is then counted as noise,
which widens the intervals (or leaves them undetermined): it cannot narrow them.

Residuals are leverage-corrected r/√(1 − h), centred and scaled to σ̂² = RSS/dof (Davison &
Hinkley 1997, Bootstrap Methods and their Application, ch. 6). σ̂ is itself estimated from
`dof` residuals, so the percentile interval, which behaves like θ̂ ± z·se, is widened about
θ̂ by t_dof/z to θ̂ ± t_dof·se, Student's interval (cf. Hesterberg 2015, "What teachers
should know about the bootstrap", The American Statistician 69(4), on the percentile
interval's narrowness in small samples and its t-expanded form). Depends on numpy only."""

from __future__ import annotations

from functools import cache

import numpy as np

Z_975 = 1.959963984540054  # the standard normal's 97.5th percentile


def residuals(x: list[np.ndarray], y: list[np.ndarray]) -> tuple[np.ndarray, int, str]:
    """(noise to resample, its degrees of freedom, its source) from the budgets' ln N `x`
    and losses `y`: the per-budget parabolas' residuals, or the shared-curvature model's
    when every budget has exactly 3 runs. Degrees of freedom 0 (and no noise) only with a
    single budget of 3 runs."""
    pieces = [_modified(np.vander(xi, 3), yi) for xi, yi in zip(x, y, strict=True)]
    dof = sum(len(yi) - 3 for yi in y)
    source = "per-budget parabolas"
    if dof == 0:
        pieces = [_modified(_shared_design(x), np.concatenate(y))]
        dof = sum(len(yi) for yi in y) - (2 * len(y) + 1)
        source = "one curvature shared by all budgets"
    if dof <= 0:
        return np.zeros(0), 0, source
    e = np.concatenate([p[0] for p in pieces])
    e = e - e.mean()
    rms = np.sqrt(np.mean(e**2))
    rss = sum(p[1] for p in pieces)
    return (e * np.sqrt(rss / dof) / rms if rms > 0 else e), dof, source


def _modified(design: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Residuals of a least-squares fit divided by √(1 − leverage), so each has the noise's
    variance (a point fitted exactly, leverage 1, has none), and the residual sum of squares."""
    residual = y - design @ np.linalg.lstsq(design, y, rcond=None)[0]
    leverage = np.einsum("ij,ji->i", design, np.linalg.pinv(design))
    keep = leverage < 1 - 1e-9
    return residual[keep] / np.sqrt(1 - leverage[keep]), float(np.sum(residual**2))


def _shared_design(x: list[np.ndarray]) -> np.ndarray:
    """Columns: x² for every budget (the shared curvature), then per budget its own x and 1."""
    design = np.zeros((sum(len(xi) for xi in x), 1 + 2 * len(x)))
    row = 0
    for i, xi in enumerate(x):
        rows = slice(row, row + len(xi))
        design[rows, 0], design[rows, 1 + 2 * i], design[rows, 2 + 2 * i] = xi**2, xi, 1.0
        row += len(xi)
    return design


def log_n_opt(
    x: np.ndarray, coef: np.ndarray, noise: np.ndarray, samples: int, rng: np.random.Generator
) -> np.ndarray:
    """ln N_opt of one budget's parabola (coefficients `coef` in ln N `x`) refitted to its
    fitted losses plus resampled noise, one per replicate (NaN where the refitted parabola
    opens downwards: no minimum)."""
    design = np.vander(x, 3)
    draws = (design @ coef)[:, None] + noise[rng.integers(0, noise.size, (len(x), samples))]
    quad, lin, _ = np.linalg.pinv(design) @ draws
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(quad > 0, -lin / (2 * quad), np.nan)


def slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least-squares slope of each column of y (budgets × replicates) against x."""
    xc = x - x.mean()
    return (xc[:, None] * (y - y.mean(0))).sum(0) / (xc**2).sum()


def interval(values: np.ndarray, estimate: float, dof: int) -> list[float] | None:
    """The 2.5th and 97.5th percentiles of the replicates, counting a replicate without a
    value (no minimum somewhere) against the interval: as −∞ for the low end and +∞ for the
    high end; then widened about the estimate by t_dof/z. None when either end is
    unbounded or the interval has no width."""
    finite = values[np.isfinite(values)]
    missing = np.full(values.size - finite.size, np.inf)
    low = float(np.quantile(np.concatenate([finite, -missing]), 0.025, method="lower"))
    high = float(np.quantile(np.concatenate([finite, missing]), 0.975, method="higher"))
    if not (np.isfinite(low) and np.isfinite(high) and high > low):
        return None
    widen = t_quantile(dof) / Z_975
    return [estimate + widen * (low - estimate), estimate + widen * (high - estimate)]


@cache
def t_quantile(dof: int, p: float = 0.975) -> float:
    """Student's t quantile (numpy has none): with x = √dof·tan θ the density is ∝ cos^(dof−1) θ
    on [0, π/2], integrated by the trapezoid rule (relative error < 1e-6 for dof ≤ 1000)."""
    theta = np.linspace(0.0, np.pi / 2, 20_001)
    w = np.cos(theta) ** (dof - 1)
    cdf = np.concatenate([[0.0], np.cumsum(w[1:] + w[:-1])])
    return float(np.sqrt(dof) * np.tan(np.interp((2 * p - 1) * cdf[-1], cdf, theta)))
