"""A comparison's `results.csv`: one row per finished variant × seed run, written
atomically and validated on read by the sweep's table code (`sweep.results`): a row whose
key is not its own variant and seed, or whose run directory is not `runs/<key>`, is
damaged, left out, and its run recorded again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from altup_cli.compare.plan import CompareRun, run_key
from altup_cli.sweep.results import Schema, Table, add_row, read_table

COLUMNS = [
    "key", "variant", "seed", "steps", "tokens", "flops", "flops_per_token", "params",
    "non_embedding", "active_params", "val_loss", "train_loss", "tokens_per_second",
    "seconds_per_step", "wall_seconds", "run_dir",
]  # fmt: skip
TIMING = ("tokens_per_second", "seconds_per_step", "wall_seconds")  # differ run to run
_MAYBE = frozenset({"val_loss", "train_loss", "tokens_per_second", "seconds_per_step"})


def _whole(row: dict[str, Any]) -> bool:
    key = run_key(row["variant"], row["seed"])
    return row["seed"] >= 0 and row["key"] == key and row["run_dir"] == f"runs/{key}"


SCHEMA = Schema(
    what="compare",
    columns=COLUMNS,
    text=frozenset({"key", "variant", "run_dir"}),
    counts=frozenset({"seed", "steps", "tokens", "params", "non_embedding", "active_params"}),
    optional=_MAYBE,
    any_float=_MAYBE,
    whole=_whole,
    order=lambda r: (r["variant"], r["seed"]),
)


def read_results(path: Path) -> Table:
    return read_table(path, SCHEMA)


def add_result(path: Path, row: dict[str, Any]) -> None:
    add_row(path, row, SCHEMA)


def result_row(run: CompareRun, metrics: dict[str, Any]) -> dict[str, Any]:
    """A finished run's row, from its metrics.json."""
    return {
        "key": run.key, "variant": run.variant, "seed": run.seed, "steps": metrics["steps"],
        "tokens": metrics["tokens_seen"], "flops": metrics["training_flops"],
        "flops_per_token": metrics["training_flops_per_token"],
        "params": metrics["parameters"]["total"],
        "non_embedding": metrics["parameters"]["non_embedding"],
        "active_params": metrics.get("active_parameters") or 0,
        "val_loss": metrics["val_loss"], "train_loss": metrics["train_loss"],
        "tokens_per_second": metrics["tokens_per_second"],
        "seconds_per_step": metrics["seconds_per_step"],
        "wall_seconds": metrics["wall_seconds"], "run_dir": run.run_dir,
    }  # fmt: skip
