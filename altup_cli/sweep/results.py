"""The sweep's results table: one CSV row per finished point, written atomically (a killed
sweep loses at most the point in flight, never the table)."""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

COLUMNS = [
    "key", "budget", "arch", "size", "steps", "tokens", "flops_per_token", "flops", "params",
    "non_embedding", "active_params", "val_loss", "train_loss", "tokens_per_second",
    "wall_seconds", "run_dir",
]  # fmt: skip
NUMERIC = set(COLUMNS) - {"key", "arch", "size", "run_dir"}
COUNTS = {"steps", "tokens", "params", "non_embedding", "active_params"}  # written as integers


def _parse(key: str, value: str) -> Any:
    if key not in NUMERIC or not value:
        return value
    return int(float(value)) if key in COUNTS else float(value)


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """Rows by point key (numbers parsed), or {} if there is no table yet."""
    if not path.is_file():
        return {}
    rows = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            rows[row["key"]] = {k: _parse(k, v) for k, v in row.items()}
    return rows


def write_results(path: Path, rows: dict[str, dict[str, Any]]) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for key in sorted(rows, key=lambda k: (rows[k]["arch"], float(rows[k]["budget"]), k)):
            writer.writerow(rows[key])
    os.replace(tmp, path)


def add_result(path: Path, row: dict[str, Any]) -> None:
    rows = read_results(path)
    rows[row["key"]] = row
    write_results(path, rows)
