"""isoFLOP sweeps: the planner spends each budget, the fits recover known curves, a tiny
real sweep runs end to end, an interrupted sweep resumes to the same table, submitit's
local executor runs points, and bad input starts nothing."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from altup_cli.sweep.analyze import analyze_rows, bootstrap_exponents, fit_parabola, fit_power_law
from altup_cli.sweep.plan import plan_sweep
from tests.conftest import tiny_overrides

SIZES = "d16x1,d24x1,d32x2"


def sweep_args(corpus: Path, cache: Path, out: Path) -> list[str]:
    return [
        *[o for o in tiny_overrides(corpus, cache, out) if not o.startswith("model.")],
        "logger=csv",
        "trainer.limit_val_batches=2",
    ]


def test_the_planner_spends_each_budget(corpus_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    from altup_cli.sweep import _corpus_tokens

    budgets = [2e8, 6e8, 2e9]
    points = plan_sweep(
        sweep_args(corpus_dir, cache_dir, tmp_path), None, budgets, ["dense", "altup_k2"],
        SIZES.split(","), 5, _corpus_tokens,
    )  # fmt: skip
    assert len(points) == 3 * 2 * 3
    for p in points:
        step_flops = p.flops_per_token * p.tokens_per_step
        assert abs(p.flops - p.budget) <= step_flops / 2  # within one step (rounded)
        assert f"trainer.max_steps={p.steps}" in p.overrides
        assert f"optim.schedule_steps={p.steps}" in p.overrides
    assert len({p.flops_per_token for p in points}) == 6  # every model has its own F


def test_parabola_and_power_law_fits_recover_known_curves() -> None:
    rng = np.random.default_rng(0)
    n = np.geomspace(1e6, 1e8, 7)
    x = np.log(n)
    true_x_opt = np.log(8e6)
    loss = 0.05 * (x - true_x_opt) ** 2 + 3.0 + rng.normal(0, 1e-3, n.size)
    fit = fit_parabola(n, loss)
    assert fit is not None and fit.inside
    assert fit.n_opt == pytest.approx(8e6, rel=0.05) and fit.l_opt == pytest.approx(3.0, abs=2e-3)
    outside = fit_parabola(n, 0.05 * (x - np.log(5e8)) ** 2 + 3.0)
    assert outside is not None and not outside.inside  # minimum beyond the largest size
    c = np.geomspace(1e18, 1e21, 5)
    e, k = fit_power_law(c, 0.3 * c**0.49 * np.exp(rng.normal(0, 0.01, c.size)))
    assert e == pytest.approx(0.49, abs=0.01) and k == pytest.approx(0.3, rel=0.3)


def synthetic_rows(a: float = 0.5, noise: float = 2e-3, seed: int = 0) -> list[dict]:
    """isoFLOP results whose optimum follows N_opt = 0.1·C^a, with F = 6N."""
    rng = np.random.default_rng(seed)
    rows = []
    for budget in (1e15, 1e16, 1e17, 1e18):
        n_opt = 0.1 * budget**a
        for n in n_opt * np.geomspace(0.2, 5, 5):
            x = np.log(n / n_opt)
            row = {
                "budget": budget,
                "arch": "dense",
                "params": n,
                "active_params": n,
                "flops_per_token": 6 * n,
                "val_loss": 2 + 0.04 * x**2 + rng.normal(0, noise),
            }
            rows.append(row)  # fmt: skip
    return rows


def test_power_law_exponents_and_intervals_are_recovered() -> None:
    fits = analyze_rows(synthetic_rows(), samples=200)["dense"]["params"]
    assert fits["a"] == pytest.approx(0.5, abs=0.02)
    assert fits["b"] == pytest.approx(0.5, abs=0.02)  # D = C / 6N ∝ C^(1-a)
    low, high = fits["ci"]["a"]
    assert low <= fits["a"] <= high and high - low < 0.1
    wide = bootstrap_exponents(synthetic_rows(noise=2e-2), "params", 200)["a"]
    assert wide[1] - wide[0] > high - low  # more noise, wider interval


def _table(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "results.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_a_tiny_sweep_runs_end_to_end_and_resumes_after_interruption(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 budgets × 3 sizes in-process: results table, fits and PNGs. The same sweep killed
    after 2 points and re-run trains only the 4 missing ones and ends with the same table."""
    args = sweep_args(corpus_dir, cache_dir, tmp_path / "out")
    common = ["--budgets", "3e8,6e8", "--sizes", SIZES, "--arch", "dense"]
    common += ["--executor", "inprocess", "--min-steps", "5", "--samples", "50"]
    full = tmp_path / "full"
    result = altup("sweep", "isoflop", *args, *common, "--dir", str(full))
    assert result.code == 0, result.stderr
    rows = _table(full)
    assert len(rows) == 6 and all(float(r["val_loss"]) > 0 for r in rows)
    assert (full / "fits.json").is_file()
    assert sorted(p.name for p in full.glob("*.png")) == [
        "isoflop_dense_active_params.png",
        "isoflop_dense_params.png",
        "scaling_dense.png",
    ]

    from altup_cli.sweep import execute

    trained: list[str] = []
    real = execute.train_point

    def killed_after_two(overrides: list[str], recipe: str | None, run_dir: str) -> dict:
        if len(trained) == 2:
            raise KeyboardInterrupt
        trained.append(Path(run_dir).name)
        return real(overrides, recipe, run_dir)

    part = tmp_path / "part"
    monkeypatch.setattr(execute, "train_point", killed_after_two)
    killed = altup("sweep", "isoflop", *args, *common, "--dir", str(part))
    assert killed.code != 0  # click turns the interrupt into "Aborted!"
    assert len(_table(part)) == 2
    trained.clear()
    monkeypatch.setattr(execute, "train_point", lambda *a: trained.append(a[2]) or real(*a))
    assert altup("sweep", "isoflop", *args, *common, "--dir", str(part)).code == 0
    assert len(trained) == 4
    strip = [{k: v for k, v in r.items() if k not in ("tokens_per_second", "wall_seconds")}
             for r in _table(part)]  # fmt: skip
    expected = [{k: v for k, v in r.items() if k not in ("tokens_per_second", "wall_seconds")}
                for r in rows]  # fmt: skip
    assert strip == expected

    again = altup("sweep", "analyze", str(full), "--samples", "20")
    assert again.code == 0 and "isoFLOP fits" in again.stdout


def test_submitit_local_executor_runs_points(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """The SLURM path (one submitit job per point, submitted as an array) on submitit's
    local executor."""
    args = sweep_args(corpus_dir, cache_dir, tmp_path / "out")
    sweep = tmp_path / "sweep"
    result = altup(
        "sweep", "isoflop", *args, "--budgets", "3e8", "--sizes", "d16x1,d24x1",
        "--arch", "dense", "--executor", "submitit-local", "--min-steps", "5",
        "--dir", str(sweep), "--timeout-min", "5",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert len(_table(sweep)) == 2
    assert list((sweep / "submitit").glob("*/*_result.pkl"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--budgets", "3e8,1e8"], "strictly increasing"),
        (["--budgets", "-1"], "positive"),
        (["--budgets", "3e8", "--sizes", "huge"], "unknown size"),
        (["--budgets", "3e8", "--arch", "rnn"], "unknown arch"),
        (["--budgets", "10"], "too small for one step"),
        (["--budgets", "3e8", "--executor", "cloud"], "--executor"),
    ],
)
def test_bad_sweeps_start_nothing(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path, options: list[str], message: str
) -> None:
    args = sweep_args(corpus_dir, cache_dir, tmp_path / "out")
    defaults = {"--sizes": SIZES, "--arch": "dense"}
    extra = [x for k, v in defaults.items() if k not in options for x in (k, v)]
    sweep = tmp_path / "sweep"
    result = altup("sweep", "isoflop", *args, *options, *extra, "--dir", str(sweep))
    assert result.code == 2 and message in result.stderr, result.stderr
    # Data preparation may print progress first (the planner needs the vocabulary).
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert not sweep.exists()
