"""The one output directory and report writer of every `altup eval …` command.

`<output_dir>/<kind>/<date>_<time>_<run name>/` (or `--out DIR`, which must not exist)
holds `config.yaml` (the resolved settings), `<kind>.json` (rewritten atomically after each
task, so an interrupted evaluation keeps what finished; strict JSON) and the logger's files.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from altup_cli.errors import UserError
from altup_cli.evaluation.task import TaskResult
from altup_cli.files import write_json

Scores = Callable[[dict[str, Any]], dict[str, Any]]  # task entries -> top-level aggregates


def new_eval_directory(kind: str, out: str | None, output_dir: str, checkpoint: str) -> Path:
    """A fresh directory for one evaluation (never an existing one)."""
    if out is not None:
        path = Path(out).expanduser()
        if path.exists():
            raise UserError(f"--out {out} already exists (choose a new directory)")
        return path
    source = Path(checkpoint).expanduser().resolve()
    name = source.name if source.is_dir() else source.parent.parent.name or source.stem
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    path = Path(output_dir).expanduser() / kind / f"{stamp}_{name}"
    while path.exists():
        path = path.with_name(path.name + "+")
    return path


class EvalReport:
    """Accumulates task entries into `<kind>.json`; `scores` computes the aggregates (e.g.
    the GLUE score) from the entries after every task."""

    def __init__(
        self, kind: str, run_dir: Path, header: dict[str, Any], scores: Scores | None = None
    ) -> None:
        self.kind, self.run_dir, self.scores = kind, run_dir, scores
        self.data: dict[str, Any] = {**header, "argv": sys.argv, "status": "running", "tasks": {}}

    @property
    def path(self) -> Path:
        return self.run_dir / f"{self.kind}.json"

    def start(self, settings: dict[str, Any]) -> None:
        """Create the directory and record the resolved settings (nothing is written before)."""
        from altup_cli.runs.rundir import write_yaml

        self.run_dir.mkdir(parents=True)
        write_yaml(self.run_dir / "config.yaml", settings)

    def add(self, name: str, result: TaskResult, baseline_name: str) -> None:
        self.data["tasks"][name] = result.entry(baseline_name)
        self._write()

    @property
    def failed(self) -> dict[str, str]:
        return {n: e["diverged"] for n, e in self.data["tasks"].items() if "diverged" in e}

    def finish(self) -> dict[str, Any]:
        self.data["status"] = "diverged" if self.failed else "finished"
        self._write()
        return self.data

    def _write(self) -> None:
        if self.scores is not None:
            self.data.update(self.scores(self.data["tasks"]))
        write_json(self.path, self.data)


def log_summary(logger: Any, summary: dict[str, Any], tables: dict[str, Any]) -> None:
    """Final numbers into the W&B run's summary, tables logged once, then the run closed."""
    import wandb

    run = logger.experiment
    for key, value in summary.items():
        run.summary[key] = value
    if tables:
        run.log({key: wandb.Table(columns, rows) for key, (columns, rows) in tables.items()})
    wandb.finish()
