"""`altup compare`'s pieces without training: the paired statistics (against a hand
computation and scipy), the results table (validated on read), the plan (seeds, variant
directories, what a seed varies) and the plots (one line per variant)."""

from __future__ import annotations

import csv
import math
import random
from pathlib import Path

import pytest

from altup_cli.compare.plan import CompareRun, check_seeds, parse_seeds, seed_overrides, slug
from altup_cli.compare.results import COLUMNS, add_result, read_results, result_row
from altup_cli.compare.stats import paired, summarize, t_cdf, t_quantile
from altup_cli.errors import UserError

BASELINE = {0: 4.89, 1: 4.87, 2: 4.88}
VARIANT = {0: 4.82, 1: 4.86, 2: 4.85}


def test_the_paired_interval_is_the_hand_computed_one() -> None:
    """d = (−0.07, −0.01, −0.03): mean −0.11/3, sd √((0.1/3)² + (0.08/3)² + (0.02/3)²)/2),
    half-width t(0.975, 2) · sd / √3 with t(0.975, 2) = 4.302652729911275 (tables: 4.303)."""
    d = paired(VARIANT, BASELINE)
    assert d is not None and d.seeds == [0, 1, 2]
    mean = -0.11 / 3
    sd = math.sqrt(((0.1 / 3) ** 2 + (0.08 / 3) ** 2 + (0.02 / 3) ** 2) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)
    assert d.mean == pytest.approx(mean, abs=1e-12)
    assert d.sd == pytest.approx(sd, abs=1e-12)
    assert (d.low, d.high) == pytest.approx((mean - half, mean + half), abs=1e-9)
    assert d.wins == 3 and d.verdict.startswith("not resolved")  # 3 of 3 seeds, yet no claim


def test_the_paired_interval_equals_scipys() -> None:
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(3)
    for n in (2, 3, 5, 10):
        base = {s: 4 + rng.random() for s in range(n)}
        var = {s: base[s] + rng.gauss(-0.01, 0.02) for s in range(n)}
        d = paired(var, base)
        assert d is not None
        ci = stats.ttest_rel([var[s] for s in range(n)], [base[s] for s in range(n)])
        low, high = ci.confidence_interval(0.95)
        assert (d.low, d.high) == pytest.approx((low, high), abs=1e-9)


def test_pairing_by_seed_resolves_what_an_unpaired_comparison_cannot() -> None:
    """Seeds move both variants by ±0.5 but the variant is 0.02 better at every seed: the
    paired interval excludes 0, where Welch's unpaired one would not."""
    base = {0: 4.0, 1: 4.5, 2: 5.0, 3: 4.2}
    var = {0: 3.981, 1: 4.479, 2: 4.98, 3: 4.181}
    d = paired(var, base)
    assert d is not None and d.high is not None and d.high < 0
    assert d.verdict == "lower (95%)" and d.wins == 4


def test_the_baseline_plus_noise_is_not_a_win() -> None:
    """A variant that is the baseline plus zero-mean noise: the interval covers 0, so no
    win at the 95% level, though it 'wins' some seeds."""
    base = {0: 4.891, 1: 4.873, 2: 4.902, 3: 4.865, 4: 4.88}
    noise = [-0.004, 0.006, -0.003, 0.002, -0.001]
    var = {s: base[s] + e for s, e in zip(base, noise, strict=True)}
    d = paired(var, base)
    assert d is not None and d.low is not None and d.high is not None
    assert d.low < 0 < d.high and d.verdict.startswith("not resolved") and d.wins == 3


def test_the_interval_covers_the_true_difference_95_percent_of_the_time() -> None:
    rng = random.Random(0)
    trials, covered, claimed = 2000, 0, 0
    for _ in range(trials):
        base = {s: rng.gauss(4.9, 0.02) for s in range(3)}
        var = {s: base[s] + rng.gauss(0, 0.01) for s in range(3)}  # true difference 0
        d = paired(var, base)
        assert d is not None and d.low is not None and d.high is not None
        covered += d.low <= 0 <= d.high
        claimed += d.verdict == "lower (95%)"
    assert 0.93 < covered / trials < 0.97  # binomial sd ≈ 0.005
    assert claimed / trials < 0.04  # a one-sided false win: ≈ 2.5%


def test_identical_variants_give_an_interval_of_zero() -> None:
    d = paired(BASELINE, BASELINE)
    assert d is not None and d.low == d.high == d.mean == 0 and d.wins == 0
    assert d.verdict.startswith("not resolved")


def test_one_seed_gives_no_interval_and_diverged_runs_are_left_out() -> None:
    one = paired({7: 4.1}, {7: 4.2})
    assert one is not None and one.low is None and one.verdict == "one seed: no interval"
    baseline, variant, broken = summarize(
        {"off": BASELINE, "k2": VARIANT, "bad": {0: math.nan, 1: 4.8, 2: math.inf}}
    )
    assert baseline.versus_baseline is None and baseline.mean == pytest.approx(4.88)
    assert baseline.sd == pytest.approx(0.01)
    assert variant.versus_baseline is not None and variant.versus_baseline.wins == 3
    assert broken.losses == {1: 4.8} and broken.versus_baseline is not None
    assert broken.versus_baseline.seeds == [1]


def test_the_t_distribution_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in [*range(1, 41), 99, 250]:
        for p in (0.6, 0.9, 0.975, 0.995, 0.025):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-10, abs=1e-10)
        for t in (-4.0, -0.3, 0.0, 1.7, 30.0):
            assert t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-12)


# ── the plan ────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("text", "message"),
    [("0,a", "whole numbers"), ("1.5", "whole numbers"), ("0,1,0", "seed 0 is given twice"),
     ("-1", "seeds must be in"), ("", "whole numbers"), ("4294967296", "seeds must be in")],
)  # fmt: skip
def test_bad_seeds_are_refused(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        parse_seeds(text)


def test_seeds_parse_and_recipe_lists_are_checked() -> None:
    assert parse_seeds("0, 1,2") == [0, 1, 2]
    assert check_seeds([3, 1], "seeds") == [3, 1]
    with pytest.raises(UserError, match="seeds: expected whole numbers"):
        check_seeds([True], "seeds")
    with pytest.raises(UserError, match="at least one"):
        check_seeds([], "seeds")


def test_variant_directories_are_safe_and_distinct() -> None:
    assert slug("altup=k2+altup.K=4") == "altup-k2+altup.K-4"
    labels = ["a=[1,2]", "a=[1_2]", "x=" + "y" * 100, "x=" + "y" * 99 + "z", "../x=1"]
    slugs = [slug(label) for label in labels]
    assert len(set(slugs)) == len(slugs)
    assert all(len(s) <= 72 and "/" not in s and not s.startswith(".") for s in slugs)


def test_what_a_seed_varies() -> None:
    from altup_cli.config import compose_config, validate

    base = validate(compose_config(["run.seed=7"]))
    assert seed_overrides(3, "both", base) == ["run.seed=3", "run.data_seed=null"]
    assert seed_overrides(3, "init", base) == ["run.seed=3", "run.data_seed=7"]
    assert seed_overrides(3, "data", base) == ["run.data_seed=3"]
    fixed = validate(compose_config(["run.seed=7", "run.data_seed=11"]))
    assert seed_overrides(3, "init", fixed) == ["run.seed=3", "run.data_seed=11"]
    for vary, init, data in (("both", 3, None), ("init", 3, 7), ("data", 7, 3)):
        s = validate(compose_config(["run.seed=7", *seed_overrides(3, vary, base)]))
        assert (s.run.seed, s.run.data_seed) == (init, data), vary


# ── results.csv ─────────────────────────────────────────────────────────────────────────


def _metrics(loss: float) -> dict:
    return {
        "steps": 4, "tokens_seen": 512, "training_flops": 1.5e9,
        "training_flops_per_token": 2.9e6, "parameters": {"total": 1000, "non_embedding": 600},
        "active_parameters": 600, "val_loss": loss, "train_loss": 5.0,
        "tokens_per_second": 1234.5, "seconds_per_step": 0.1, "wall_seconds": 2.0,
    }  # fmt: skip


def test_the_results_table_round_trips_and_refuses_damaged_rows(tmp_path: Path) -> None:
    path = tmp_path / "results.csv"
    runs = [CompareRun("altup=off", 0, []), CompareRun("ffn=moe+ffn.topk=1", 1, [])]
    for i, run in enumerate(runs):
        add_result(path, result_row(run, _metrics(4.5 + i)))
    table = read_results(path)
    assert sorted(table.rows) == ["altup-off/0", "ffn-moe+ffn.topk-1/1"] and not table.damaged
    assert table.rows["altup-off/0"]["val_loss"] == 4.5
    assert table.rows["altup-off/0"]["run_dir"] == "runs/altup-off/0"
    good = path.read_text().splitlines()
    row = next(csv.reader([good[1]]))
    for damage in (
        lambda f: f[:5],  # cut short
        lambda f: [f[0], f[1], "1", *f[3:]],  # a seed that is not its key's
        lambda f: [*f[:2], "0.5", *f[3:]],  # a seed that is not whole
        lambda f: [*f[:-1], "runs/elsewhere"],  # a run directory that is not its key's
        lambda f: [*f[:3], "x", *f[4:]],  # steps that do not parse
    ):
        fields = damage(list(row))
        text = "\n".join([good[0], ",".join(f'"{v}"' for v in fields), good[2]]) + "\n"
        path.write_text(text)
        damaged = read_results(path)
        assert damaged.damaged == [2] and list(damaged.rows) == ["ffn-moe+ffn.topk-1/1"]
    path.write_text("key,budget\n")
    with pytest.raises(UserError, match="not an altup compare results table"):
        read_results(path)
    assert len(COLUMNS) == len(set(COLUMNS))


# ── plots ───────────────────────────────────────────────────────────────────────────────


def _curve(offset: float) -> list[dict]:
    return [{"step": s, "tokens": 128 * s, "flops": 1e6 * s, "val_loss": 6 - s / 4 + offset}
            for s in (2, 4, 6)]  # fmt: skip


def test_plots_have_one_line_per_variant_with_a_band_across_seeds(tmp_path: Path) -> None:
    from matplotlib.collections import PolyCollection

    from altup_cli.compare.plots import band, curve_figure, final_figure, save_plots

    curves = {v: [_curve(i * 0.1 + s * 0.01) for s in range(3)] for i, v in enumerate("abc")}
    b = band(curves["b"], "tokens")
    assert b["x"] == [256, 512, 768] and b["mean"] == pytest.approx([5.61, 5.11, 4.61])
    assert b["min"] == pytest.approx([5.6, 5.1, 4.6])
    assert b["max"] == pytest.approx([5.62, 5.12, 4.62])
    for x in ("tokens", "flops"):
        fig = curve_figure(curves, x)
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a", "b", "c"]
        assert len(ax.get_lines()) == 3
        assert sum(isinstance(c, PolyCollection) for c in ax.collections) == 3
    losses = {v: {s: c[s][-1]["val_loss"] for s in range(3)} for v, c in curves.items()}
    fig = final_figure(losses)
    assert sum(len(line.get_xdata()) for line in fig.axes[0].get_lines()) == 9  # a point a run
    paths = save_plots(tmp_path, curves, losses)
    assert [p.name for p in paths] == ["loss_vs_tokens.png", "loss_vs_flops.png", "final_loss.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
