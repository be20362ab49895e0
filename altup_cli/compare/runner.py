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

from pathlib import Path
from typing import Any

from altup_cli.compare.plan import (
    CompareRun,
    Comparison,
    chosen_seeds,
    fixed_seeds,
    plan_runs,
    recipe_variants,
)
from altup_cli.compare.report import report
from altup_cli.compare.results import add_result, read_results, result_row
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
KIND = "comparison"


class RunsFailed(Exception):
    """Some runs failed (the others are recorded and reported): exit code 1."""


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
