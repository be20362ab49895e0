"""The sweep's results table: one CSV row per finished point, written atomically (a killed
sweep loses at most the point in flight, never the table).

Rows are checked when read: a row with missing or extra fields, a number that does not
parse, or a key that is not the one its own budget, arch and size give (a row cut short,
or edited by hand) is damaged. Damaged rows are left out, so their points count as not
done and are recorded again; a file that is not such a table at all is refused.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from altup_cli.errors import UserError
from altup_cli.files import atomic_path
from altup_cli.sweep.plan import point_key

COLUMNS = [
    "key", "budget", "arch", "size", "steps", "tokens", "flops_per_token", "flops", "params",
    "non_embedding", "active_params", "val_loss", "train_loss", "tokens_per_second",
    "wall_seconds", "run_dir",
]  # fmt: skip
NUMERIC = set(COLUMNS) - {"key", "arch", "size", "run_dir"}
COUNTS = {"steps", "tokens", "params", "non_embedding", "active_params"}  # written as integers
OPTIONAL = {"val_loss", "train_loss", "tokens_per_second"}  # empty when a run had none
ANY_FLOAT = {"val_loss", "train_loss", "tokens_per_second"}  # nan allowed; fits skip it


@dataclass
class Table:
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # by point key
    damaged: list[int] = field(default_factory=list)  # line numbers of damaged rows

    def damage_note(self, path: Path, consequence: str) -> str | None:
        """One line saying which rows were damaged and what happens to them, or None."""
        if not self.damaged:
            return None
        lines = ", ".join(map(str, self.damaged[:5])) + ("…" if len(self.damaged) > 5 else "")
        n = len(self.damaged)
        return f"{path}: {n} damaged row{'s' * (n != 1)} (line {lines}) {consequence}"


def _number(key: str, value: str) -> Any:
    if not value:
        if key in OPTIONAL:
            return None
        raise ValueError(f"{key} is empty")
    number = float(value)
    if not math.isfinite(number) and key not in ANY_FLOAT:
        raise ValueError(f"{key} is not finite")
    if key in COUNTS:
        if not number.is_integer():
            raise ValueError(f"{key} is not a whole number")
        return int(number)
    return number


def parse_row(fields: list[str]) -> dict[str, Any] | None:
    """A row's values (numbers parsed), or None if it is damaged."""
    if len(fields) != len(COLUMNS):
        return None
    try:
        row = {
            k: (_number(k, v) if k in NUMERIC else v) for k, v in zip(COLUMNS, fields, strict=True)
        }
    except ValueError:
        return None
    if row["budget"] <= 0 or row["key"] != point_key(row["budget"], row["arch"], row["size"]):
        return None
    return row if row["run_dir"] == f"points/{row['key']}" else None


def read_results(path: Path) -> Table:
    """The table at `path` (empty if there is none yet); UserError if it is not one."""
    if not path.exists():
        return Table()
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror})") from None
    if _fields(lines[0]) != COLUMNS:
        raise UserError(
            f"{path}: not an altup sweep results table (its header is not {','.join(COLUMNS)}); "
            "move it aside to start the table afresh"
        )
    table = Table()
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = _fields(line)
        row = parse_row(fields) if fields is not None else None
        if row is None:
            table.damaged.append(number)
        else:
            table.rows[row["key"]] = row
    return table


def _fields(line: bytes) -> list[str] | None:
    """One CSV line's fields, or None if it is not UTF-8 text."""
    try:
        text = line.decode("utf-8").rstrip("\r")
    except UnicodeDecodeError:
        return None
    if "\0" in text:
        return None
    return next(csv.reader([text]), [])


def write_results(path: Path, rows: dict[str, dict[str, Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for key in sorted(rows, key=lambda k: (rows[k]["arch"], float(rows[k]["budget"]), k)):
            writer.writerow(rows[key])


def add_result(path: Path, row: dict[str, Any]) -> None:
    """Add (or replace) one point's row; damaged rows already there are dropped."""
    rows = read_results(path).rows
    rows[row["key"]] = row
    write_results(path, rows)
