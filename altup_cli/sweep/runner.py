"""`altup sweep isoflop` and `altup sweep analyze`: plan, run (resumably) and fit isoFLOP
sweeps over budgets × architectures × sizes.

A sweep directory holds `plan.json`, `points/<key>/` (one ordinary run directory per
point), `results.csv` (a row per finished point), `fits.json` and the PNG plots.

A point's key is its budget, arch and size (`3e08_dense_d16x1`): within one directory every
point shares one config, so those three fix its result. A re-run whose shared settings
differ from the recorded ones is refused (see `state`): a researcher who changes the LR
wants a new sweep beside the old one, not a table that silently mixes the two. A re-run
with the same settings skips finished points, continues unfinished ones, and may add
budgets, archs or sizes. One sweep at a time writes to a directory; a sweep with failed
points still records and fits the rest, then exits 1 naming them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from altup_cli.console import print_table, say
from altup_cli.errors import UserError, require
from altup_cli.files import write_json
from altup_cli.sweep.analyze import analyze_rows, plot, summary_rows, undetermined_notes
from altup_cli.sweep.execute import check_executor, run_points
from altup_cli.sweep.plan import SweepPoint, parse_budgets, parse_names, plan_sweep
from altup_cli.sweep.results import Table, add_result, read_results
from altup_cli.sweep.state import (
    check_directory,
    check_same_config,
    merged_plan,
    read_plan,
    shared_config,
    sweep_lock,
)

_CORPORA: dict[str, tuple[int, int]] = {}


def _corpus_tokens(s: Any) -> tuple[int, int]:
    """(vocabulary size, training tokens) of a point's data, prepared once per sweep."""
    from altup_cli.runs.data import prepare_data

    key = repr((s.data, s.tokenizer, s.run.cache_dir))
    if key not in _CORPORA:
        stream = prepare_data(s).stream
        _CORPORA[key] = (stream.vocab_size, int(stream.n_tokens * (1 - s.data.val_fraction)))
    return _CORPORA[key]


class PointsFailed(Exception):
    """Some points of a sweep failed (the others are recorded and analyzed): exit code 1."""


def isoflop(
    overrides: list[str],
    recipe: str | None,
    budgets: str,
    archs: str,
    sizes: str,
    executor: str = "subprocess",
    jobs: int = 1,
    dry_run: bool = False,
    min_steps: int = 20,
    run_flagged: bool = False,
    directory: str | None = None,
    slurm: dict[str, Any] | None = None,
    samples: int = 1000,
) -> Path:
    """Plan the sweep, show it, train the points not finished yet, then analyze. Raises
    PointsFailed (after recording and analyzing the rest) if any point failed."""
    from altup_cli.config import compose_config, validate

    check_executor(executor, jobs)
    _check_samples(samples)
    budget_list = parse_budgets(budgets)
    arch_list, size_list = parse_names(archs, "--arch"), parse_names(sizes, "--sizes")
    composed = compose_config(overrides, recipe)
    base = validate(composed)
    name = base.run.name
    sweep_dir = Path(directory or Path(base.run.output_dir) / "sweeps" / name).expanduser()
    check_directory(sweep_dir)
    group = [f"logger.group={name}"] if base.logger.kind == "wandb" else []
    points = plan_sweep(
        [*overrides, *group], recipe, budget_list, arch_list, size_list, min_steps, _corpus_tokens
    )
    for point in points:
        point.overrides.append(f"run.name={name}_{point.key}")
    config = shared_config(composed)
    results_path = sweep_dir / "results.csv"
    check_same_config(sweep_dir, config)  # before anything is shown or written
    table = read_results(results_path)
    print_plan(points, table.rows, run_flagged)
    if dry_run:
        _say_damage(table, results_path)
        say(f"dry run: nothing started (sweep directory would be {sweep_dir})")
        return sweep_dir
    with sweep_lock(sweep_dir):
        old_plan = check_same_config(sweep_dir, config)  # again, now that no one else writes
        table = read_results(results_path)
        _say_damage(table, results_path)
        plan = {
            "name": name, "recipe": recipe, "overrides": overrides, "config": config,
            "budgets": budget_list, "archs": arch_list, "sizes": size_list,
            "logger": {"kind": base.logger.kind, "project": base.logger.project,
                       "mode": base.logger.mode},
            "points": [p.to_dict() for p in points],
        }  # fmt: skip
        write_json(sweep_dir / "plan.json", merged_plan(old_plan, plan))
        todo = [
            p for p in points
            if p.key not in table.rows and p.steps > 0 and (run_flagged or not p.flags)
        ]  # fmt: skip
        say(f"{len(todo)} points to train ({len(points) - len(todo)} finished or flagged) in "
            f"{sweep_dir}")  # fmt: skip

        def record(point: SweepPoint, metrics: dict[str, Any]) -> None:
            add_result(results_path, result_row(point, metrics, sweep_dir))

        failed = run_points(todo, sweep_dir, recipe, executor, jobs, slurm or {}, record)
        rows = _finished(read_results(results_path))
        if rows or not failed:
            _analyze(sweep_dir, rows, samples)
    if failed:
        raise PointsFailed(
            f"{len(failed)} of {len(todo)} points failed: {', '.join(failed)} (their logs are "
            f"in {sweep_dir / 'points'}; re-run the same command to retry them)"
        )
    return sweep_dir


def _check_samples(samples: int) -> None:
    require(samples >= 1, f"--samples must be >= 1 (bootstrap replicates), got {samples}")


def _say_damage(table: Table, path: Path) -> None:
    note = table.damage_note(path, "left out; the points they held will be recorded again")
    if note:
        say(f"[yellow]{note}[/yellow]")


def _finished(table: Table) -> list[dict[str, Any]]:
    """Rows with a finite validation loss: the ones the fits can use."""
    return [
        r for r in table.rows.values()
        if isinstance(r["val_loss"], float) and math.isfinite(r["val_loss"])
    ]  # fmt: skip


def result_row(point: SweepPoint, metrics: dict[str, Any], sweep_dir: Path) -> dict[str, Any]:
    return {
        "key": point.key, "budget": point.budget, "arch": point.arch, "size": point.size,
        "steps": metrics["steps"], "tokens": metrics["tokens_seen"],
        "flops_per_token": point.flops_per_token,
        "flops": metrics["tokens_seen"] * point.flops_per_token,
        "params": point.params, "non_embedding": point.non_embedding,
        "active_params": point.active_params, "val_loss": metrics["val_loss"],
        "train_loss": metrics["train_loss"], "tokens_per_second": metrics["tokens_per_second"],
        "wall_seconds": metrics["wall_seconds"],
        "run_dir": os.path.relpath(sweep_dir / "points" / point.key, sweep_dir),
    }  # fmt: skip


def print_plan(points: list[SweepPoint], done: dict[str, Any], run_flagged: bool) -> None:
    def status(p: SweepPoint) -> str:
        if p.key in done:
            return "done"
        if p.flags:
            return ("run: " if run_flagged and p.steps > 0 else "skip: ") + "; ".join(p.flags)
        return "to run"

    print_table(
        "altup sweep isoflop — plan (training FLOPs = steps × tokens/step × F)",
        {
            "budget C": lambda p: f"{p.budget:.3g}",
            "arch": lambda p: p.arch,
            "size": lambda p: p.size,
            "params": lambda p: f"{p.params:,}",
            "active": lambda p: f"{p.active_params:,}",
            "F (FLOPs/token)": lambda p: f"{p.flops_per_token:.3g}",
            "steps": lambda p: f"{p.steps:,}",
            "tokens D": lambda p: f"{p.tokens:,}",
            "planned FLOPs": lambda p: f"{p.flops:.4g}",
            "planned / C": lambda p: f"{p.flops / p.budget:.3f}",
            "status": status,
        },
        points,  # type: ignore[arg-type]
    )


def analyze(sweep_dir: Path, samples: int = 1000) -> dict[str, Any]:
    """Fit, plot, summarise and log a sweep's results table."""
    _check_samples(samples)
    path = sweep_dir / "results.csv"
    table = read_results(path)
    note = table.damage_note(path, "skipped")
    if note:
        say(f"[yellow]{note}[/yellow]")
    return _analyze(sweep_dir, _finished(table), samples)


def _analyze(sweep_dir: Path, rows: list[dict[str, Any]], samples: int) -> dict[str, Any]:
    if not rows:
        raise UserError(f"{sweep_dir}: no finished points in results.csv to analyze")
    plan = read_plan(sweep_dir) or {}  # read first: an unreadable plan changes nothing
    fits = analyze_rows(rows, samples)
    write_json(sweep_dir / "fits.json", fits)
    images = plot(rows, fits, sweep_dir)
    table = summary_rows(fits)
    if table:
        print_table(
            "isoFLOP fits — parabola of val loss vs ln N per budget; N_opt ∝ C^a, D_opt ∝ C^b",
            {k: (lambda r, k=k: r[k]) for k in table[0]},
            table,
        )
        for note in undetermined_notes(fits):
            say(f"[yellow]{note}[/yellow]")
    else:
        say("no fit yet: each budget needs at least 3 sizes")
    say(f"fits: {sweep_dir / 'fits.json'}; plots: {', '.join(p.name for p in images)}")
    _log_to_wandb(sweep_dir, plan, rows, table, images)
    return fits


def _log_to_wandb(
    sweep_dir: Path,
    plan: dict[str, Any],
    rows: list[dict[str, Any]],
    table: list[dict[str, str]],
    images: list[Path],
) -> None:
    logger = plan.get("logger") or {}
    if logger.get("kind") != "wandb":
        return
    import wandb

    from altup_cli.config import LoggerSettings
    from altup_cli.training.loggers import wandb_run

    settings = LoggerSettings(kind="wandb", project=logger.get("project"), entity=None,
                              mode=logger.get("mode") or "offline", group=plan["name"])  # fmt: skip
    run = wandb_run(settings, sweep_dir, f"{plan['name']}-analysis", "isoflop-analysis")
    run.log({
        "results": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows]),
        **({"fits": wandb.Table(columns=list(table[0]), data=[list(r.values()) for r in table])}
           if table else {}),
        **{f"plots/{p.stem}": wandb.Image(str(p)) for p in images},
    })  # fmt: skip
    run.finish()

