"""Results tables: one CSV row per finished run, written atomically (a killed sweep or
comparison loses at most the run in flight, never the table).

A `Schema` says what a table's columns are and how a row proves it is whole; `SWEEP` is
the isoFLOP sweep's (`altup compare` has its own, built on the same functions). Rows are
checked when read: a row with missing or extra fields, a number that does not parse, or a
key that is not the one its own fields give (a row cut short, or edited by hand) is
damaged. Damaged rows are left out, so their runs count as not done and are recorded
again; a file that is not such a table at all is refused.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from altup_cli.errors import UserError
from altup_cli.files import atomic_path
from altup_cli.sweep.plan import point_key


@dataclass(frozen=True)
class Schema:
    what: str  # "sweep": the file is "an altup sweep results table"
    columns: list[str]
    text: frozenset[str]  # columns kept as strings; every other one is a number
    counts: frozenset[str]  # numbers written as integers
    optional: frozenset[str]  # empty when a run had none
    any_float: frozenset[str]  # nan and inf allowed (analyses skip them)
    whole: Callable[[dict[str, Any]], bool]  # the row agrees with itself (key vs fields)
    order: Callable[[dict[str, Any]], Any]  # sort key of rows in the file


@dataclass
class Table:
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)  # by key
    damaged: list[int] = field(default_factory=list)  # line numbers of damaged rows

    def damage_note(self, path: Path, consequence: str) -> str | None:
        """One line saying which rows were damaged and what happens to them, or None."""
        if not self.damaged:
            return None
        lines = ", ".join(map(str, self.damaged[:5])) + ("…" if len(self.damaged) > 5 else "")
        n = len(self.damaged)
        return f"{path}: {n} damaged row{'s' * (n != 1)} (line {lines}) {consequence}"


def _number(schema: Schema, key: str, value: str) -> Any:
    if not value:
        if key in schema.optional:
            return None
        raise ValueError(f"{key} is empty")
    number = float(value)
    if not math.isfinite(number) and key not in schema.any_float:
        raise ValueError(f"{key} is not finite")
    if key in schema.counts:
        if not number.is_integer():
            raise ValueError(f"{key} is not a whole number")
        return int(number)
    return number


def parse_fields(schema: Schema, fields: list[str]) -> dict[str, Any] | None:
    """A row's values (numbers parsed), or None if it is damaged."""
    if len(fields) != len(schema.columns):
        return None
    try:
        row = {
            k: v if k in schema.text else _number(schema, k, v)
            for k, v in zip(schema.columns, fields, strict=True)
        }
    except ValueError:
        return None
    return row if schema.whole(row) else None


def read_table(path: Path, schema: Schema) -> Table:
    """The table at `path` (empty if there is none yet); UserError if it is not one."""
    if not path.exists():
        return Table()
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror})") from None
    if _fields(lines[0]) != schema.columns:
        raise UserError(
            f"{path}: not an altup {schema.what} results table (its header is not "
            f"{','.join(schema.columns)}); move it aside to start the table afresh"
        )
    table = Table()
    for number, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        fields = _fields(line)
        row = parse_fields(schema, fields) if fields is not None else None
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


def write_table(path: Path, rows: dict[str, dict[str, Any]], schema: Schema) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=schema.columns, extrasaction="ignore")
        writer.writeheader()
        for key in sorted(rows, key=lambda k: schema.order(rows[k])):
            writer.writerow(rows[key])


def add_row(path: Path, row: dict[str, Any], schema: Schema) -> None:
    """Add (or replace) one row; damaged rows already there are dropped."""
    rows = read_table(path, schema).rows
    rows[row["key"]] = row
    write_table(path, rows, schema)


# ── the isoFLOP sweep's table ─────────────────────────────────────────────────────────────

COLUMNS = [
    "key", "budget", "arch", "size", "steps", "tokens", "flops_per_token", "flops", "params",
    "non_embedding", "active_params", "val_loss", "train_loss", "tokens_per_second",
    "wall_seconds", "run_dir",
]  # fmt: skip
NUMERIC = set(COLUMNS) - {"key", "arch", "size", "run_dir"}
COUNTS = {"steps", "tokens", "params", "non_embedding", "active_params"}  # written as integers
OPTIONAL = {"val_loss", "train_loss", "tokens_per_second"}  # empty when a run had none
ANY_FLOAT = {"val_loss", "train_loss", "tokens_per_second"}  # nan allowed; fits skip it


def _whole_point(row: dict[str, Any]) -> bool:
    if row["budget"] <= 0 or row["key"] != point_key(row["budget"], row["arch"], row["size"]):
        return False
    return row["run_dir"] == f"points/{row['key']}"


SWEEP = Schema(
    what="sweep",
    columns=COLUMNS,
    text=frozenset(set(COLUMNS) - NUMERIC),
    counts=frozenset(COUNTS),
    optional=frozenset(OPTIONAL),
    any_float=frozenset(ANY_FLOAT),
    whole=_whole_point,
    order=lambda r: (r["arch"], float(r["budget"]), r["key"]),
)


def parse_row(fields: list[str]) -> dict[str, Any] | None:
    """A sweep row's values (numbers parsed), or None if it is damaged."""
    return parse_fields(SWEEP, fields)


def read_results(path: Path) -> Table:
    """The sweep table at `path` (empty if there is none yet); UserError if it is not one."""
    return read_table(path, SWEEP)


def write_results(path: Path, rows: dict[str, dict[str, Any]]) -> None:
    write_table(path, rows, SWEEP)


def add_result(path: Path, row: dict[str, Any]) -> None:
    """Add (or replace) one point's row; damaged rows already there are dropped."""
    add_row(path, row, SWEEP)
