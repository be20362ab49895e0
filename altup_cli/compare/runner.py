"""`altup compare`: train variants × seeds on the same data and tokens, resumably, and report
the paired statistics, tables and plots.

The comparison directory (`<output_dir>/compares/<run.name>`, or `--dir`) holds
`plan.json` (the shared config), `runs/<variant>/<seed>/` (ordinary run directories),
`results.csv` (a row per finished run), `comparison.json` (the statistics) and the PNG
plots. Runs go through the sweep's executors (`sweep.execute`), so a re-run trains only
the runs without a row and resumes unfinished ones from their checkpoints; a re-run whose
shared settings differ is refused, as for a sweep (`sweep.state`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from altup_cli.compare.plan import (
    CompareRun,
    chosen_seeds,
    plan_runs,
    recipe_variants,
)
from altup_cli.compare.results import add_result, read_results, result_row
from altup_cli.compare.stats import CONVENTION, Summary, summarize
from altup_cli.config import Settings, compose_config, validate
from altup_cli.console import print_table, say
from altup_cli.files import write_json
from altup_cli.sweep.execute import Job, check_executor, run_jobs
from altup_cli.sweep.results import Table
from altup_cli.sweep.state import check_directory, check_same_config, shared_config, sweep_lock

# Settings that may differ between re-runs of one comparison: where things go, logging,
# the seeds (each run sets its own; the fixed one is recorded as compare.*), and the
# recipe's variant and seed lists (more of either may be added).
UNCOMPARED = (
    "run.name", "run.output_dir", "run.cache_dir", "logger.", "trainer.log_every_n_steps",
    "data.num_workers", "run.seed", "run.data_seed", "variants", "seeds",
)  # fmt: skip
SPEED_NOTE = (
    "ms/step and tok/s are from separate runs — not a comparison (other load, other "
    "moments); measure speed with `altup bench --suite altup`, which interleaves the models "
    "in one process"
)
KIND = "comparison"


class RunsFailed(Exception):
    """Some runs failed (the others are recorded and reported): exit code 1."""


@dataclass
class Comparison:
    """A planned comparison: its runs, directory and the settings a re-run must keep."""

    base: Settings  # the shared config, validated
    recipe: str | None
    overrides: list[str]
    vary: str
    runs: list[CompareRun]
    directory: Path
    config: dict[str, Any]  # what plan.json records and a re-run must match

    @property
    def results(self) -> Path:
        return self.directory / "results.csv"


def compare(
    overrides: list[str],
    recipe: str | None,
    variants: list[str] | None = None,
    seeds: str | None = None,
    vary: str = "both",
    executor: str = "inprocess",
    jobs: int = 1,
    directory: str | None = None,
    dry_run: bool = False,
    slurm: dict[str, Any] | None = None,
) -> Path:
    """Plan, train what is missing, report; returns the comparison directory. Raises
    RunsFailed (after recording and reporting the rest) if any run failed."""
    check_executor(executor, jobs)
    plan = plan_comparison(overrides, recipe, variants, seeds, vary, directory)
    check_same_config(plan.directory, plan.config, KIND)  # before anything is shown or written
    print_plan(plan.runs, read_results(plan.results), plan.directory)
    if dry_run:
        say(f"dry run: nothing started (comparison directory would be {plan.directory})")
        return plan.directory
    with sweep_lock(plan.directory, KIND):
        todo, failed = train_missing(plan, executor, jobs, slurm or {})
        table = read_results(plan.results)
        if any(r.key in table.rows for r in plan.runs):
            report(plan, table)
    if failed:
        raise RunsFailed(
            f"{len(failed)} of {todo} runs failed: {', '.join(failed)} (their logs are in "
            f"{plan.directory / 'runs'}; re-run the same command to retry them)"
        )
    return plan.directory


def plan_comparison(
    overrides: list[str],
    recipe: str | None,
    variants: list[str] | None,
    seeds: str | None,
    vary: str,
    directory: str | None,
) -> Comparison:
    """Every run composed and validated, and where the comparison lives; writes nothing."""
    composed = compose_config(overrides, recipe)
    base = validate(composed)
    seed_list = chosen_seeds(seeds, composed, base)
    group = [f"logger.group={base.run.name}"] if base.logger.kind == "wandb" else []
    variant_list = variants or recipe_variants(overrides, recipe)
    runs = plan_runs([*overrides, *group], recipe, variant_list, seed_list, vary, base)
    where = Path(directory or Path(base.run.output_dir) / "compares" / base.run.name)
    check_directory(where.expanduser())
    config = {**shared_config(composed, UNCOMPARED), **fixed_seeds(vary, base)}
    return Comparison(base, recipe, overrides, vary, runs, where.expanduser(), config)


def train_missing(
    plan: Comparison, executor: str, jobs: int, slurm: dict[str, Any]
) -> tuple[int, list[str]]:
    """Train (or resume) every run without a row, recording each as it finishes; returns
    how many were to train and the keys of those that failed. Holds the lock."""
    old = check_same_config(plan.directory, plan.config, KIND) or {}
    table = read_results(plan.results)
    note = table.damage_note(plan.results, "left out; their runs will be recorded again")
    if note:
        say(f"[yellow]{note}[/yellow]")
    write_json(plan.directory / "plan.json", _plan_json(old, plan))
    todo = {r.key: r for r in plan.runs if r.key not in table.rows}
    say(f"{len(todo)} runs to train ({len(plan.runs) - len(todo)} finished) in {plan.directory}")
    jobs_todo = [
        Job(r.key, r.overrides, plan.directory / r.run_dir, f"{r.variant}, seed {r.seed}",
            "altup compare")
        for r in todo.values()
    ]  # fmt: skip

    def record(job: Job, metrics: dict[str, Any]) -> None:
        add_result(plan.results, result_row(todo[job.key], metrics))

    if todo and executor != "inprocess":
        _prepare_data(plan.base)
    failed = run_jobs(
        jobs_todo, plan.recipe, executor, jobs, slurm, plan.directory, record, noun="run"
    )
    return len(todo), failed


def _prepare_data(base: Settings) -> None:
    """Download, tokenize and cache the corpus once here, so parallel runs do not each
    prepare it (a variant with other data prepares its own)."""
    from altup_cli.runs.data import prepare_data

    prepare_data(base)


def fixed_seeds(vary: str, base: Settings) -> dict[str, Any]:
    """What the seeds do, and the seed that stays fixed: part of the shared config."""
    data = base.run.data_seed if base.run.data_seed is not None else base.run.seed
    return {
        "compare.vary": vary,
        "compare.init_seed": base.run.seed if vary == "data" else None,
        "compare.data_seed": data if vary == "init" else None,
    }


def _plan_json(old: dict[str, Any], plan: Comparison) -> dict[str, Any]:
    """plan.json: this invocation's settings, keeping the variants and seeds of earlier ones."""

    def union(key: str, new: list[Any]) -> list[Any]:
        before = old.get(key) if isinstance(old.get(key), list) else []
        return list(dict.fromkeys([*before, *new]))

    logger = plan.base.logger
    return {
        "name": plan.base.run.name, "recipe": plan.recipe, "overrides": plan.overrides,
        "config": plan.config, "variants": union("variants", [r.variant for r in plan.runs]),
        "seeds": union("seeds", [r.seed for r in plan.runs]),
        "logger": {"kind": logger.kind, "project": logger.project, "mode": logger.mode},
    }  # fmt: skip


def print_plan(runs: list[CompareRun], table: Table, compare_dir: Path) -> None:
    def status(r: CompareRun) -> str:
        if r.key in table.rows:
            return "done"
        if (compare_dir / r.run_dir / "checkpoints" / "last.ckpt").is_file():
            return "resume from its checkpoint"
        return "to run"

    def seed_of(r: CompareRun, key: str) -> str:
        value = next((o.split("=", 1)[1] for o in r.overrides[::-1] if o.startswith(key)), "")
        return "= run.seed" if value == "null" else value or "config's"

    print_table(
        "altup compare — plan",
        {
            "variant": lambda r: r.variant,
            "seed": lambda r: str(r.seed),
            "run.seed (init)": lambda r: seed_of(r, "run.seed="),
            "run.data_seed (data)": lambda r: seed_of(r, "run.data_seed="),
            "run directory": lambda r: r.run_dir,
            "status": status,
        },
        runs,  # type: ignore[arg-type]
    )


# ── the report ──────────────────────────────────────────────────────────────────────────


def report(plan: Comparison, table: Table) -> dict[str, Any]:
    """Statistics, tables, plots, comparison.json and (with logger=wandb) a W&B run."""
    from altup_cli.compare.plots import save_plots

    where = plan.directory
    order = list(dict.fromkeys(r.variant for r in plan.runs))
    rows = [table.rows[r.key] for r in plan.runs if r.key in table.rows]
    losses: dict[str, dict[int, float]] = {v: {} for v in order}
    for row in rows:
        if row["val_loss"] is not None:
            losses[row["variant"]][row["seed"]] = row["val_loss"]
    summaries = summarize(losses)
    first = {v: next(r for r in rows if r["variant"] == v) for v in order
             if any(r["variant"] == v for r in rows)}  # fmt: skip
    shown = summary_rows(summaries, first)
    seeds = sorted({r.seed for r in plan.runs})
    print_report(plan, summaries, shown, first, seeds)
    curves = {v: [_curve(where, r) for r in rows if r["variant"] == v] for v in order}
    if any(_grew(where, r) for r in rows):
        print_curves(curves)
    images = save_plots(where, curves, losses)
    saved = {
        "convention": CONVENTION, "vary": plan.vary, "seeds": seeds, "baseline": order[0],
        "variants": [_summary_json(s) for s in summaries], "runs": rows,
        "plots": [p.name for p in images],
    }  # fmt: skip
    write_json(where / "comparison.json", saved)
    say(f"[dim]{SPEED_NOTE}[/dim]")
    say(f"results: {plan.results}, {where / 'comparison.json'}; "
        f"plots: {', '.join(str(p) for p in images)}")  # fmt: skip
    if plan.base.logger.kind == "wandb":
        merged = [{**r, **_static(first.get(r["variant"]))} for r in shown]
        _log_to_wandb(where, plan.base, rows, merged, images)
    return saved


def print_report(
    plan: Comparison,
    summaries: list[Summary],
    shown: list[dict[str, str]],
    first: dict[str, dict[str, Any]],
    seeds: list[int],
) -> None:
    """Several seeds: the paired table, the losses per seed, sizes and times. One seed:
    today's single table, labelled as having no interval."""
    if len(seeds) == 1:
        print_one_seed(summaries, first)
        return
    text = _vary_text(plan.vary, plan.base)
    title = f"altup compare — {len(seeds)} seeds, {text}; Δ vs {summaries[0].variant}"
    print_table(title, {k: (lambda r, k=k: r[k]) for k in shown[0]}, shown)
    print_seed_table(summaries, seeds)
    print_static(summaries, first)
    say(f"statistics: {CONVENTION}")


def _vary_text(vary: str, base: Settings) -> str:
    fixed = fixed_seeds(vary, base)
    if vary == "init":
        return f"seeds vary model init (data seed fixed at {fixed['compare.data_seed']})"
    if vary == "data":
        return f"seeds vary data order (init seed fixed at {fixed['compare.init_seed']})"
    return "seeds vary model init and data order"


def _loss(x: float | None) -> str:
    return "—" if x is None else f"{x:.4f}"


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.4f}"


def _static(row: dict[str, Any] | None) -> dict[str, str]:
    """What one run of a variant says about all its seeds (sizes, FLOPs, tokens) and its
    timings, which are not comparable between runs."""
    if row is None:
        return {}
    speed = (f"{row['seconds_per_step'] * 1e3:.0f}" if row["seconds_per_step"] is not None
             else "—")  # fmt: skip
    rate = (f"{row['tokens_per_second']:,.0f}" if row["tokens_per_second"] is not None
            else "—")  # fmt: skip
    return {
        "params": f"{row['params']:,}",
        "non-emb params": f"{row['non_embedding']:,}",
        "active params": f"{row['active_params']:,}",
        "train FLOPs/token": f"{row['flops_per_token'] / 1e6:.2f}M",
        "tokens seen": f"{row['tokens']:,}",
        "ms/step (separate runs)": speed,
        "tok/s (separate runs)": rate,
    }


def summary_rows(summaries: list[Summary], first: dict[str, dict[str, Any]]) -> list[dict]:
    """The multi-seed table: mean ± sd, paired Δ with its interval, wins, verdict."""
    out = []
    for i, s in enumerate(summaries):
        d = s.versus_baseline
        interval = "—" if d is None or d.low is None else f"[{d.low:+.4f}, {d.high:+.4f}]"
        out.append({
            "variant": s.variant, "seeds": str(len(s.losses)),
            "val loss mean": _loss(s.mean), "sd": _loss(s.sd),
            "Δ mean (paired)": "baseline" if i == 0 else _signed(d.mean if d else None),
            "95% interval": interval,
            "wins": f"{d.wins}/{len(d.seeds)}" if d else "—",
            "verdict": d.verdict if d else "—",
        })  # fmt: skip
    return out


def print_static(summaries: list[Summary], first: dict[str, dict[str, Any]]) -> None:
    """Sizes, FLOPs and tokens (equal across a variant's seeds) and one run's timings."""
    rows = [{"variant": s.variant, **_static(first.get(s.variant))} for s in summaries]
    columns = max((list(r) for r in rows), key=len)
    print_table(
        "sizes, FLOPs and tokens of each variant; its first run's times",
        {k: (lambda r, k=k: r.get(k, "—")) for k in columns},
        rows,
    )


def print_one_seed(summaries: list[Summary], first: dict[str, dict[str, Any]]) -> None:
    """One seed: today's table, labelled as such."""
    rows = []
    for s in summaries:
        loss = s.mean
        ppl = f"{math.exp(loss):.2f}" if loss is not None and loss < 700 else "—"
        rows.append({"variant": s.variant, "val loss": _loss(loss), "val ppl": ppl,
                     **_static(first.get(s.variant))})  # fmt: skip
    print_table(
        "altup compare — same data, tokens and seed (one seed: no interval)",
        {k: (lambda r, k=k: r[k]) for k in rows[0]},
        rows,
    )


def print_seed_table(summaries: list[Summary], seeds: list[int]) -> None:
    columns: dict[str, Any] = {"variant": lambda s: s.variant}
    for seed in seeds:
        columns[f"seed {seed}"] = lambda s, seed=seed: _loss(s.losses.get(seed))
    print_table("final validation loss per seed", columns, summaries)  # type: ignore[arg-type]


def _summary_json(s: Summary) -> dict[str, Any]:
    d = s.versus_baseline
    return {
        "variant": s.variant, "losses": {str(k): v for k, v in s.losses.items()},
        "mean": s.mean, "sd": s.sd,
        "versus_baseline": None if d is None else {
            "seeds": d.seeds, "differences": d.differences, "mean": d.mean, "sd": d.sd,
            "low": d.low, "high": d.high, "wins": d.wins, "verdict": d.verdict,
        },
    }  # fmt: skip


def _metrics(compare_dir: Path, row: dict[str, Any]) -> dict[str, Any]:
    try:
        metrics = json.loads((compare_dir / row["run_dir"] / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return metrics if isinstance(metrics, dict) else {}


def _curve(compare_dir: Path, row: dict[str, Any]) -> list[dict[str, float]]:
    curve = _metrics(compare_dir, row).get("validation_curve")
    return curve if isinstance(curve, list) else []


def _grew(compare_dir: Path, row: dict[str, Any]) -> bool:
    return bool(_metrics(compare_dir, row).get("growth"))


def print_curves(curves: dict[str, list[list[dict[str, float]]]]) -> None:
    """Validation loss against cumulative training FLOPs (mean over seeds), one column
    pair per variant (growth changes a run's FLOPs per token, so tokens alone do not
    compare them)."""
    from altup_cli.compare.plots import band

    by_step = {}
    for variant, runs in curves.items():
        b = band(runs, "flops")
        by_step[variant] = {s: (x, m) for s, x, m in zip(b["step"], b["x"], b["mean"], strict=True)}
    steps = sorted({s for c in by_step.values() for s in c})
    columns: dict[str, Any] = {"step": lambda s: str(s)}
    for variant, points in by_step.items():
        columns[f"{variant}: FLOPs"] = lambda s, c=points: f"{c[s][0]:.3e}" if s in c else "—"
        columns[f"{variant}: val loss"] = lambda s, c=points: f"{c[s][1]:.4f}" if s in c else "—"
    print_table("validation loss vs cumulative training FLOPs (mean over seeds)", columns,
                steps)  # type: ignore[arg-type]  # fmt: skip


def _log_to_wandb(
    compare_dir: Path,
    base: Settings,
    rows: list[dict[str, Any]],
    shown: list[dict[str, str]],
    images: list[Path],
) -> None:
    """One W&B run in the comparison's group: the results, the table and the plots."""
    import wandb

    from altup_cli.training.loggers import wandb_run

    name = base.run.name
    settings = dataclasses.replace(base.logger, group=name)
    run = wandb_run(settings, compare_dir, f"{name}-comparison", "comparison")
    run.log({
        "results": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows]),
        "summary": wandb.Table(columns=list(shown[0]), data=[list(r.values()) for r in shown]),
        **{f"plots/{p.stem}": wandb.Image(str(p)) for p in images},
    })  # fmt: skip
    run.finish()
