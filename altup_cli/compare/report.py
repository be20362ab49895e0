"""The comparison's report: the paired statistics as tables (several seeds, or one), sizes
and FLOPs, validation curves against cumulative FLOPs, comparison.json, plots and the W&B
run. Reads only what the runner recorded (results.csv rows and each run's metrics.json).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from altup_cli.compare.plan import Comparison, fixed_seeds
from altup_cli.compare.stats import CONVENTION, Summary, summarize
from altup_cli.config import Settings
from altup_cli.console import print_table, say
from altup_cli.files import write_json
from altup_cli.sweep.results import Table

SPEED_NOTE = (
    "ms/step and tok/s are from separate runs — not a comparison (other load, other "
    "moments); measure speed with `altup bench --suite altup`, which interleaves the models "
    "in one process"
)


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
