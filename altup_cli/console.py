"""One rich console for progress and summaries (stderr, so stdout stays parseable)."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

console = Console(stderr=True)


def progress() -> Progress:
    """A progress bar with counts and times, drawn on the shared console."""
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )


def say(message: str) -> None:
    console.print(message, highlight=False)


def print_table(title: str, columns: dict[str, Callable[[dict], str]], rows: list[dict]) -> None:
    """A results table on stdout, one column per (header, formatter of a row)."""
    table = Table(title=title)
    for header in columns:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(*(fmt(row) for fmt in columns.values()))
    Console(width=max(console.width, 150)).print(table)
