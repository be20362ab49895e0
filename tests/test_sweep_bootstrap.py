"""Bootstrap intervals of the isoFLOP exponents when every budget has only 3 sizes: the
per-budget parabolas pass through their points, so the noise is told by one parabola
curvature shared by all budgets; the intervals must still cover the truth at their rate."""

from __future__ import annotations

import numpy as np
import pytest

from altup_cli.sweep.analyze import analyze_rows, bootstrap_exponents
from altup_cli.sweep.bootstrap import t_quantile
from tests.test_sweep import isoflop_draw


def test_three_sizes_at_two_budgets_give_intervals_that_cover_the_truth() -> None:
    """200 synthetic 3 × 2 sweeps (known exponents a = 0.6, b = 0.4, known noise): each
    95% interval has width, and about 95% of them contain the truth. With one residual
    degree of freedom they are wide, but not every one covers (not vacuous)."""
    rng = np.random.default_rng(32)
    hits = {"a": 0, "b": 0}
    for _ in range(200):
        entry = analyze_rows(isoflop_draw((3, 3), rng), samples=300)["dense"]["params"]
        assert entry["ci"]["residual_dof"] == 1  # 6 losses, 2 × 2 + 1 parameters
        for name, true in (("a", 0.6), ("b", 0.4)):
            assert entry["ci"][name] is not None, entry["ci"].get("why")
            low, high = entry["ci"][name]
            assert high > low
            hits[name] += low <= true <= high
    assert all(180 <= h <= 198 for h in hits.values()), hits


def test_one_budget_of_three_sizes_leaves_the_exponents_undetermined() -> None:
    """Even the shared-curvature model needs 2 budgets to have a residual."""
    rows = isoflop_draw((3,), np.random.default_rng(0))
    ci = bootstrap_exponents(rows, "params", 200)
    assert ci["a"] is None and ci["b"] is None and "fewer than 2 budgets" in ci["why"]


def three_size_draw(curvatures: tuple[float, ...], rng: np.random.Generator) -> list[dict]:
    """`isoflop_draw` with 3 sizes per budget and each budget's own curvature in ln N."""
    rows = isoflop_draw((3,) * len(curvatures), rng)
    for row in rows:
        i = sorted({r["budget"] for r in rows}).index(row["budget"])
        n_opt = 0.1 * row["budget"] ** 0.6
        row["val_loss"] += (curvatures[i] - 0.04) * np.log(row["params"] / n_opt) ** 2
    return rows


def test_curvatures_that_differ_widen_the_intervals_rather_than_narrow_them() -> None:
    """The shared-curvature model counts the budgets' differing curvatures as noise: the
    intervals get wider (or undetermined, saying why), and still cover the truth."""
    widths: dict[tuple[float, float], list[float]] = {(0.04, 0.04): [], (0.045, 0.035): []}
    covered = 0
    for curvatures, found in widths.items():
        rng = np.random.default_rng(5)
        for _ in range(100):
            ci = bootstrap_exponents(three_size_draw(curvatures, rng), "params", 300)
            if ci["a"] is None:
                assert "shared by all budgets" in ci["why"]
                continue
            found.append(ci["a"][1] - ci["a"][0])
            covered += curvatures != (0.04, 0.04) and ci["a"][0] <= 0.6 <= ci["a"][1]
    assert len(widths[(0.045, 0.035)]) >= 90
    assert covered >= 0.95 * len(widths[(0.045, 0.035)])
    assert np.median(widths[(0.045, 0.035)]) > 2 * np.median(widths[(0.04, 0.04)])


@pytest.mark.parametrize("dof", [1, 2, 3, 5, 30, 1000])
def test_the_student_quantile_is_scipys(dof: int) -> None:
    stats = pytest.importorskip("scipy.stats")
    assert t_quantile(dof) == pytest.approx(stats.t.ppf(0.975, dof), rel=1e-6)
