"""`altup sweep isoflop` and `altup sweep analyze`: plan, run (resumably) and fit isoFLOP
sweeps over budgets × architectures × sizes.

A sweep directory holds `plan.json`, `points/<key>/` (one ordinary run directory per
point), `results.csv` (a row per finished point), `fits.json` and the PNG plots.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from altup_cli.console import print_table, say
from altup_cli.errors import UserError
from altup_cli.sweep.analyze import analyze_rows, plot, save, summary_rows
from altup_cli.sweep.execute import EXECUTORS, run_points
from altup_cli.sweep.plan import SweepPoint, parse_budgets, parse_names, plan_sweep
from altup_cli.sweep.results import add_result, read_results

_CORPORA: dict[str, tuple[int, int]] = {}


def _corpus_tokens(s: Any) -> tuple[int, int]:
    """(vocabulary size, training tokens) of a point's data, prepared once per sweep."""
    from altup_cli.training.run import prepare_data

    key = repr((s.data, s.tokenizer, s.run.cache_dir))
    if key not in _CORPORA:
        stream = prepare_data(s).stream
        _CORPORA[key] = (stream.vocab_size, int(stream.n_tokens * (1 - s.data.val_fraction)))
    return _CORPORA[key]


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
    """Plan the sweep, show it, train the points not finished yet, then analyze."""
    from altup_cli.config import compose_config, validate

    if executor not in EXECUTORS:
        raise UserError(f"--executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if jobs < 1:
        raise UserError(f"--jobs must be >= 1, got {jobs}")
    budget_list = parse_budgets(budgets)
    arch_list, size_list = parse_names(archs, "--arch"), parse_names(sizes, "--sizes")
    base = validate(compose_config(overrides, recipe))
    name = base.run.name
    sweep_dir = Path(directory or Path(base.run.output_dir) / "sweeps" / name).expanduser()
    group = [f"logger.group={name}"] if base.logger.kind == "wandb" else []
    points = plan_sweep(
        [*overrides, *group], recipe, budget_list, arch_list, size_list, min_steps, _corpus_tokens
    )
    for point in points:
        point.overrides.append(f"run.name={name}_{point.key}")
    results_path = sweep_dir / "results.csv"
    done = read_results(results_path)
    print_plan(points, done, run_flagged)
    if dry_run:
        say(f"dry run: nothing started (sweep directory would be {sweep_dir})")
        return sweep_dir
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / "plan.json").write_text(
        json.dumps(
            {
                "name": name,
                "recipe": recipe,
                "overrides": overrides,
                "budgets": budget_list,
                "archs": arch_list,
                "sizes": size_list,
                "logger": {"kind": base.logger.kind, "project": base.logger.project,
                           "mode": base.logger.mode},
                "points": [p.to_dict() for p in points],
            },
            indent=2,
        )
    )  # fmt: skip
    todo = [p for p in points if p.key not in done and p.steps > 0 and (run_flagged or not p.flags)]
    skipped = len(points) - len(todo)
    say(f"{len(todo)} points to train ({skipped} finished or flagged) in {sweep_dir}")

    def record(point: SweepPoint, metrics: dict[str, Any]) -> None:
        add_result(results_path, result_row(point, metrics, sweep_dir))

    failed = run_points(todo, sweep_dir, recipe, executor, jobs, slurm or {}, record)
    if failed:
        say(f"[red]{len(failed)} point(s) failed:[/red] {', '.join(failed)} (re-run to retry)")
    analyze(sweep_dir, samples)
    return sweep_dir


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
    rows = [r for r in read_results(sweep_dir / "results.csv").values() if r.get("val_loss")]
    if not rows:
        raise UserError(f"{sweep_dir}: no finished points in results.csv to analyze")
    fits = analyze_rows(rows, samples)
    save(fits, sweep_dir / "fits.json")
    images = plot(rows, fits, sweep_dir)
    table = summary_rows(fits)
    if table:
        print_table(
            "isoFLOP fits — parabola of val loss vs ln N per budget; N_opt ∝ C^a, D_opt ∝ C^b",
            {k: (lambda r, k=k: r[k]) for k in table[0]},
            table,
        )
    else:
        say("no fit yet: each budget needs at least 3 sizes")
    say(f"fits: {sweep_dir / 'fits.json'}; plots: {', '.join(p.name for p in images)}")
    _log_to_wandb(sweep_dir, rows, table, images)
    return fits


def _log_to_wandb(
    sweep_dir: Path, rows: list[dict[str, Any]], table: list[dict[str, str]], images: list[Path]
) -> None:
    plan_file = sweep_dir / "plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    logger = plan.get("logger", {})
    if logger.get("kind") != "wandb":
        return
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        project=logger.get("project"), group=plan["name"], job_type="isoflop-analysis",
        name=f"{plan['name']}-analysis", dir=str(sweep_dir), mode=logger.get("mode") or "offline",
        reinit="create_new",
    )  # fmt: skip
    run.log({
        "results": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows]),
        **({"fits": wandb.Table(columns=list(table[0]), data=[list(r.values()) for r in table])}
           if table else {}),
        **{f"plots/{p.stem}": wandb.Image(str(p)) for p in images},
    })  # fmt: skip
    run.finish()
