"""isoFLOP sweeps: the planner spends each budget, the fits recover known curves, a tiny
real sweep runs end to end, an interrupted sweep resumes to the same table, submitit's
local executor runs points, and bad input starts nothing."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest

from altup_cli.errors import UserError
from altup_cli.sweep.analyze import (
    analyze_rows,
    bootstrap_exponents,
    fit_parabola,
    fit_power_law,
    summary_rows,
    undetermined_notes,
)
from altup_cli.sweep.plan import plan_sweep
from tests.helpers.prose import tiny_overrides

SIZES = "d16x1,d24x1,d32x2"


def sweep_args(corpus: Path, cache: Path, out: Path) -> list[str]:
    return [
        *[o for o in tiny_overrides(corpus, cache, out) if not o.startswith("model.")],
        "logger=csv",
        "trainer.limit_val_batches=2",
    ]


def test_the_planner_spends_each_budget(corpus_dir: Path, cache_dir: Path, tmp_path: Path) -> None:
    from altup_cli.sweep.runner import _corpus_tokens

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


def _plan(corpus: Path, cache: Path, out: Path, *extra: str) -> list:
    """A 2e10-FLOP dense plan of two sizes on a stand-in corpus (no data prepared)."""
    args = [*sweep_args(corpus, cache, out), *extra]
    return plan_sweep(args, None, [2e10], ["dense"], ["d16x1", "d32x2"], 5,
                      lambda s: (300, 10**9))  # fmt: skip


def test_the_planner_counts_every_process_of_a_run(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step of a W-process run trains W × batch × seq × accumulate tokens, so at equal
    budget it takes 1/W of the steps; `devices=auto` counts what Lightning would use."""
    from lightning.pytorch.accelerators import cuda

    one = _plan(corpus_dir, cache_dir, tmp_path)
    two = _plan(corpus_dir, cache_dir, tmp_path, "trainer=ddp_cpu")  # 2 CPU processes
    with pytest.raises(UserError, match="devices=auto"):  # no GPU here: unknown, not 1
        _plan(corpus_dir, cache_dir, tmp_path, "trainer=ddp", "trainer.num_nodes=2")
    monkeypatch.setattr(cuda, "num_cuda_devices", lambda: 4)  # what Lightning would see
    four = _plan(corpus_dir, cache_dir, tmp_path, "trainer=ddp")  # gpu, devices auto
    eight = _plan(corpus_dir, cache_dir, tmp_path, "trainer=ddp", "trainer.num_nodes=2")
    auto_cpu = _plan(corpus_dir, cache_dir, tmp_path, "trainer.accelerator=cpu",
                     "trainer.devices=auto")  # fmt: skip
    for world, plan in ((2, two), (4, four), (8, eight), (1, auto_cpu)):
        for p, q in zip(one, plan, strict=True):
            assert q.tokens_per_step == world * p.tokens_per_step
            assert abs(q.steps - p.steps / world) <= 1  # the same budget, rounded to steps
            assert abs(q.flops - q.budget) <= q.flops_per_token * q.tokens_per_step / 2


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


def isoflop_draw(
    sizes: tuple[int, ...], rng: np.random.Generator, a: float = 0.6, noise: float = 5e-3
) -> list[dict]:
    """One synthetic sweep, `sizes[i]` sizes at the i-th budget (1e15 … 1e18): loss =
    2 + 0.04·ln²(N / N_opt) + N(0, noise²) with N_opt = 0.1·C^a and F = 6N (so
    D_opt ∝ C^(1-a)); the sizes are spread ×16 around a centre within ±0.3 in ln N of
    each budget's N_opt."""
    rows = []
    for budget, count in zip(np.geomspace(1e15, 1e18, len(sizes)), sizes, strict=True):
        n_opt = 0.1 * budget**a
        centre = n_opt * np.exp(rng.uniform(-0.3, 0.3))
        for n in centre * np.geomspace(1 / 4, 4, count):
            loss = 2 + 0.04 * np.log(n / n_opt) ** 2 + rng.normal(0, noise)
            rows.append({"budget": float(budget), "arch": "dense", "params": n,
                         "active_params": n, "flops_per_token": 6 * n,
                         "val_loss": loss})  # fmt: skip
    return rows


@pytest.mark.parametrize("sizes", [(4, 4, 4, 4), (4, 4), (5, 5, 5), (3, 5, 3, 4)])
def test_bootstrap_intervals_cover_the_true_exponents(sizes: tuple[int, ...]) -> None:
    """Over 100 synthetic sweeps (`sizes` per budget) the 95% intervals of a and b have
    width and contain the true exponents (0.6, 0.4) at about their nominal rate: not much
    less (too narrow), nor every time (too wide to say much). Budgets of 3 sizes have no
    residuals of their own but are in every replicate."""
    rng = np.random.default_rng(len(sizes) * 10 + sizes[0])
    hits = {"a": 0, "b": 0}
    for _ in range(100):
        entry = analyze_rows(isoflop_draw(sizes, rng), samples=300)["dense"]["params"]
        for name, true in (("a", 0.6), ("b", 0.4)):
            low, high = entry["ci"][name]
            assert high > low
            hits[name] += low <= true <= high
    assert all(85 <= h <= 99 for h in hits.values()), hits


@pytest.mark.parametrize(
    ("sizes", "noise", "why"),
    [
        ((3, 3), 0.0, "fit the losses exactly"),  # one shared curvature fits all 6
        ((4, 4, 4), 0.0, "fit the losses exactly"),
        ((5, 5), 0.3, "no minimum"),  # noise swamps the curvature
    ],
)
def test_intervals_the_data_cannot_bound_are_undetermined(
    sizes: tuple[int, ...], noise: float, why: str
) -> None:
    """Not a zero-width [a, a] (or an arbitrary one): undetermined, with the reason, in
    fits.json and the summary."""
    fits = analyze_rows(isoflop_draw(sizes, np.random.default_rng(0), noise=noise), 200)
    entry = fits["dense"]["params"]
    assert entry["ci"]["a"] is None and entry["ci"]["b"] is None and why in entry["ci"]["why"]
    assert all(r["a [95% CI]"].endswith("[undetermined]") for r in summary_rows(fits))
    assert any(why in note for note in undetermined_notes(fits))


def test_a_minimum_outside_the_sizes_is_left_out_of_the_power_law() -> None:
    """The dearest budget's sizes all lie below its N_opt: its minimum is flagged, and the
    power laws and intervals are those of the other budgets (its residuals still tell
    the noise)."""
    rows = isoflop_draw((5, 5, 5, 5), np.random.default_rng(1))
    last = max(r["budget"] for r in rows)
    kept = [r for r in rows if r["budget"] != last]
    n_opt = 0.1 * last**0.6
    beyond = [
        {**kept[0], "budget": last, "params": n, "active_params": n, "flops_per_token": 6 * n,
         "val_loss": 2 + 0.04 * np.log(n / n_opt) ** 2}
        for n in n_opt * np.geomspace(1 / 60, 1 / 4, 5)
    ]  # fmt: skip
    entry = analyze_rows([*kept, *beyond], samples=200)["dense"]["params"]
    assert [o["inside"] for o in entry["optima"]] == [True, True, True, False]
    assert entry["fit_budgets"] == sorted({r["budget"] for r in kept})
    alone = analyze_rows(kept, samples=200)["dense"]["params"]
    assert (entry["a"], entry["b"]) == (alone["a"], alone["b"])
    assert entry["ci"]["a"] is not None and entry["ci"]["residual_dof"] == 4 * (5 - 3)
    flags = {r["C"]: r["flag"] for r in summary_rows({"dense": {"params": entry}})}
    assert flags[f"{last:.3g}"] == "outside sizes, not in fit"
    only_one = analyze_rows([*kept[:5], *beyond], samples=200)  # 1 inside minimum of 2
    assert "a" not in only_one["dense"]["params"]
    assert "no power law: 1 of 2 budgets" in undetermined_notes(only_one)[0]


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
    said = " ".join((again.stdout + again.stderr).split())
    assert "no power law" in said or "undetermined: each budget has 3 sizes" in said
    fits = (full / "fits.json").read_bytes()
    refused = altup("sweep", "analyze", str(full), "--samples", "0")
    assert refused.code == 2 and "--samples" in _errors(refused.stderr)[0]
    assert (full / "fits.json").read_bytes() == fits


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


def test_local_executor_runs_points_in_parallel_processes(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """`--executor local --jobs 2`: both points train in their own processes, are recorded,
    and give the table the in-process executor gives (timings aside)."""
    args = sweep_args(corpus_dir, cache_dir, tmp_path / "out")
    options = ["--budgets", "1e8", "--sizes", "d16x1,d24x1", "--arch", "dense",
               "--min-steps", "5", "--samples", "20"]  # fmt: skip
    tables = {}
    for executor in (["local", "--jobs", "2"], ["inprocess"]):
        sweep = tmp_path / executor[0]
        result = altup("sweep", "isoflop", *args, *options, "--executor", *executor,
                       "--dir", str(sweep))  # fmt: skip
        assert result.code == 0, result.stderr
        timing = ("tokens_per_second", "wall_seconds")
        tables[executor[0]] = [{k: v for k, v in r.items() if k not in timing}
                               for r in sorted(_table(sweep), key=lambda r: r["key"])]  # fmt: skip
    assert [r["size"] for r in tables["local"]] == ["d16x1", "d24x1"]
    assert sorted((tmp_path / "local" / "points").glob("*.log"))  # each point's own process
    assert tables["local"] == tables["inprocess"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--budgets", "3e8,1e8"], "strictly increasing"),
        (["--budgets", "-1"], "positive"),
        (["--budgets", "2e11,inf"], "finite"),
        (["--budgets", "2e11,nan"], "finite"),
        (["--budgets", "3e8", "--sizes", "huge"], "unknown size"),
        (["--budgets", "3e8", "--arch", "rnn"], "unknown arch"),
        (["--budgets", "10"], "too small for one step"),
        (["--budgets", "3e8", "--executor", "cloud"], "--executor"),
        (["--budgets", "3e8", "--samples", "0"], "--samples"),
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


# ── reliability: the results table, re-runs, keys, locking, children ──────────────────────

ONE_BUDGET = ["--budgets", "3e8", "--sizes", SIZES, "--arch", "dense", "--min-steps", "5"]
FAST = ["--executor", "inprocess", "--samples", "20"]


def fake_metrics(overrides: list[str], run_dir: str) -> dict:
    """What a finished point reports, without training: a loss that depends on the point."""
    steps = next(int(o.split("=")[1]) for o in overrides if o.startswith("trainer.max_steps="))
    width = sum(int(c) for c in Path(run_dir).name if c.isdigit())
    return {"steps": steps, "tokens_seen": steps * 128, "val_loss": 3 + (width % 7) / 10,
            "train_loss": 3.0, "tokens_per_second": 1.0, "wall_seconds": 1.0}  # fmt: skip


@pytest.fixture
def fake_training(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Points "train" instantly; the list records each trained point's key."""
    from altup_cli.sweep import execute

    trained: list[str] = []

    def train_point(overrides: list[str], recipe: str | None, run_dir: str) -> dict:
        trained.append(Path(run_dir).name)
        return fake_metrics(overrides, run_dir)

    monkeypatch.setattr(execute, "train_point", train_point)
    return trained


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under `root` with its contents (None for directories)."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("damage", ["truncated last row", "row cut inside its key"])
def test_a_damaged_results_table_is_detected_and_its_points_rerun(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path, fake_training: list[str],
    damage: str,
) -> None:  # fmt: skip
    args = sweep_args(corpus_dir, cache_dir, tmp_path / "out")
    sweep = tmp_path / "sweep"
    assert altup("sweep", "isoflop", *args, *ONE_BUDGET, *FAST, "--dir", str(sweep)).code == 0
    good = (sweep / "results.csv").read_text()
    lines = good.splitlines(keepends=True)
    if damage == "truncated last row":
        cut = [*lines[:-1], lines[-1][: len(lines[-1]) // 2]]  # its last columns are gone
        victims = [lines[-1].split(",")[0]]
    else:
        cut = [lines[0], lines[1][:4] + "\n", *lines[2:]]  # the key's first characters only
        victims = [lines[1].split(",")[0]]
    (sweep / "results.csv").write_text("".join(cut))
    fake_training.clear()
    again = altup("sweep", "isoflop", *args, *ONE_BUDGET, *FAST, "--dir", str(sweep))
    assert again.code == 0, again.stderr
    assert fake_training == victims  # only the damaged point is re-run
    assert sum("damaged row" in line for line in again.stderr.splitlines()) == 1, again.stderr
    timing = ("tokens_per_second", "wall_seconds")
    strip = [{k: v for k, v in r.items() if k not in timing} for r in _table(sweep)]
    (tmp_path / "good.csv").write_text(good)
    with (tmp_path / "good.csv").open() as handle:
        expected = [{k: v for k, v in r.items() if k not in timing} for r in csv.DictReader(handle)]
    assert strip == expected


def test_a_sweep_with_failed_points_exits_1_naming_them(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from altup_cli.sweep import execute

    def train_point(overrides: list[str], recipe: str | None, run_dir: str) -> dict:
        if Path(run_dir).name.endswith("d24x1"):
            raise RuntimeError("out of memory")
        return fake_metrics(overrides, run_dir)

    monkeypatch.setattr(execute, "train_point", train_point)
    args = sweep_args(corpus_dir, cache_dir, tmp_path / "out")
    sweep = tmp_path / "sweep"
    result = altup("sweep", "isoflop", *args, *ONE_BUDGET, *FAST, "--dir", str(sweep))
    assert result.code == 1, result.stderr
    errors = _errors(result.stderr)
    assert len(errors) == 1 and "3e08_dense_d24x1" in errors[0] and "1 of 3" in errors[0]
    assert "Traceback" not in result.stderr
    assert sorted(r["size"] for r in _table(sweep)) == ["d16x1", "d32x2"]


def test_a_rerun_with_other_shared_overrides_is_refused_and_changes_nothing(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path, fake_training: list[str]
) -> None:
    """Points are keyed by (budget, arch, size) within one shared config: a re-run with a
    different one names the differing keys and touches nothing; one that only adds a
    budget (or changes where outputs go) extends the sweep and keeps every earlier point."""
    args = sweep_args(corpus_dir, cache_dir, tmp_path / "out")
    sweep = tmp_path / "sweep"
    assert altup("sweep", "isoflop", *args, *ONE_BUDGET, *FAST, "--dir", str(sweep)).code == 0
    before = tree(sweep)
    fake_training.clear()
    other = altup("sweep", "isoflop", *args, "optim.lr=1e-2", *ONE_BUDGET, *FAST,
                  "--dir", str(sweep))  # fmt: skip
    assert other.code == 2 and "Traceback" not in other.stderr
    errors = _errors(other.stderr)
    assert len(errors) == 1 and "optim.lr" in errors[0], other.stderr
    assert tree(sweep) == before and fake_training == []

    moved = [a for a in args if not a.startswith("run.output_dir=")]
    moved.append(f"run.output_dir={tmp_path / 'elsewhere'}")
    more = ["--budgets", "3e8,6e8", *ONE_BUDGET[2:]]
    extended = altup("sweep", "isoflop", *moved, *more, *FAST, "--dir", str(sweep))
    assert extended.code == 0, extended.stderr
    assert sorted(fake_training) == sorted(f"6e08_dense_{s}" for s in SIZES.split(","))
    assert len(_table(sweep)) == 6
    fake_training.clear()
    fewer = altup("sweep", "isoflop", *args, *ONE_BUDGET, *FAST, "--dir", str(sweep))
    assert fewer.code == 0 and fake_training == [] and len(_table(sweep)) == 6
    import json

    planned = {p["key"] for p in json.loads((sweep / "plan.json").read_text())["points"]}
    assert planned == {r["key"] for r in _table(sweep)}  # the plan keeps every point


def test_budgets_that_agree_to_three_digits_keep_both_results(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path, fake_training: list[str]
) -> None:
    from altup_cli.sweep.plan import point_key

    assert point_key(3e8, "dense", "d16x1") == "3e08_dense_d16x1"  # old sweeps still resume
    args = sweep_args(corpus_dir, cache_dir, tmp_path / "out")
    sweep = tmp_path / "sweep"
    options = ["--budgets", "3e8,3.0001e8", "--sizes", "d16x1", "--arch", "dense"]
    result = altup("sweep", "isoflop", *args, *options, "--min-steps", "5", *FAST,
                   "--dir", str(sweep))  # fmt: skip
    assert result.code == 0, result.stderr
    rows = _table(sweep)
    assert sorted(float(r["budget"]) for r in rows) == [3e8, 3.0001e8]
    assert len({r["key"] for r in rows}) == 2 and len(set(fake_training)) == 2


def test_a_second_sweep_on_the_same_directory_refuses(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While one sweep trains, the same sweep started again on its directory refuses with
    one line and writes nothing; the first trains every point exactly once."""
    import sys

    from altup_cli import cli
    from altup_cli.sweep import execute

    args = sweep_args(corpus_dir, cache_dir, tmp_path / "out")
    sweep = tmp_path / "sweep"
    argv = ["altup", "sweep", "isoflop", *args, *ONE_BUDGET, *FAST, "--dir", str(sweep)]
    trained: list[str] = []
    second: dict = {}

    def train_point(overrides: list[str], recipe: str | None, run_dir: str) -> dict:
        trained.append(Path(run_dir).name)
        if not second:
            second["before"] = tree(sweep)
            monkeypatch.setattr(sys, "argv", argv)
            try:
                cli.main()
                second["code"] = 0
            except SystemExit as exit_:
                second["code"] = exit_.code
            second["after"] = tree(sweep)
        return fake_metrics(overrides, run_dir)

    monkeypatch.setattr(execute, "train_point", train_point)
    result = altup(*argv[1:])
    assert result.code == 0, result.stderr
    assert second["code"] == 2 and second["before"] == second["after"]
    errors = _errors(result.stderr)
    assert len(errors) == 1 and "another sweep" in errors[0], result.stderr
    assert sorted(trained) == sorted(f"3e08_dense_{s}" for s in SIZES.split(","))
    assert len(_table(sweep)) == 3


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:  # a zombie (dead, not yet reaped by whoever adopted it) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait(condition, seconds: float) -> bool:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return condition()


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")
def test_killing_a_sweep_kills_the_point_it_is_training(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL the sweep (subprocess executor) while a point trains: the child training
    that point dies too instead of training on as an orphan."""
    import signal
    import subprocess
    import sys

    args = sweep_args(corpus_dir, cache_dir, tmp_path / "out")
    sweep = tmp_path / "sweep"
    options = ["--budgets", "1e12", "--sizes", "d16x1", "--arch", "dense", "--run-flagged"]
    code = "import sys; from altup_cli import cli; sys.argv[0] = 'altup'; cli.main()"
    with (tmp_path / "parent.log").open("w") as log:
        parent = subprocess.Popen(
            [sys.executable, "-c", code, "sweep", "isoflop", *args, *options,
             "--executor", "subprocess", "--dir", str(sweep)],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    child = None
    try:
        started = _wait(lambda: bool(_children(parent.pid)), 120)
        assert started, (tmp_path / "parent.log").read_text()
        child = _children(parent.pid)[0]
        assert _wait(lambda: bool(list(sweep.glob("points/*/run.json"))), 120)  # training
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        assert _wait(lambda: not _alive(child), 10), f"child {child} outlived its sweep"
    finally:
        if parent.poll() is None:
            parent.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("--dir is a file", "not a directory"),
        ("binary results.csv", "not an altup sweep results table"),
        ("garbled plan.json", "not a readable sweep plan"),
    ],
)
def test_an_unusable_sweep_directory_is_refused_and_left_as_it_was(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path, damage: str, message: str
) -> None:
    args = sweep_args(corpus_dir, cache_dir, tmp_path / "out")
    target = tmp_path / "sweep"
    if damage == "--dir is a file":
        target.write_text("hello")
    else:
        target.mkdir()
        name = "results.csv" if "results" in damage else "plan.json"
        (target / name).write_bytes(b"\xff\xfe\x00{[garbage\n" * 3)
    before = tree(tmp_path)
    result = altup("sweep", "isoflop", *args, *ONE_BUDGET, *FAST, "--dir", str(target))
    assert result.code == 2 and "Traceback" not in result.stderr
    errors = _errors(result.stderr)
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "content",
    [
        bytes(range(256)) * 4,
        b"\x00\x01garbage\n\xff\xfe",
        "key,budget\n3e08,3e8\n".encode("utf-16"),
    ],
)
def test_analyze_refuses_an_unreadable_results_table(altup, tmp_path: Path, content: bytes) -> None:
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "results.csv").write_bytes(content)
    before = tree(tmp_path)
    result = altup("sweep", "analyze", str(sweep))
    assert result.code == 2 and "Traceback" not in result.stderr, result.stderr
    assert len(_errors(result.stderr)) == 1 and "results.csv" in _errors(result.stderr)[0]
    assert tree(tmp_path) == before
