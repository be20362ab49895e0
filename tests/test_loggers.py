"""The one logger factory: the kind picks the logger, W&B goes offline when online cannot
work, and a summary run outside Lightning (sweeps, comparisons) logs where it is told."""

from __future__ import annotations

from pathlib import Path

import pytest

from altup_cli.config import LoggerSettings
from altup_cli.training.loggers import make_logger, wandb_run
from tests.helpers.wandb_records import history


def _settings(kind: str, mode: str | None = "offline") -> LoggerSettings:
    return LoggerSettings(kind=kind, project="p", entity=None, mode=mode, group="g")


def test_the_kind_picks_the_logger(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    assert make_logger(_settings("none"), tmp_path, "r") is False
    csv = make_logger(_settings("csv"), tmp_path, "r")
    assert isinstance(csv, CSVLogger) and Path(csv.log_dir).parent == tmp_path / "csv"
    wandb = make_logger(_settings("wandb"), tmp_path, "r", wandb_id="abc123", job_type="eval")
    assert isinstance(wandb, WandbLogger)
    assert wandb._wandb_init["id"] == "abc123" and wandb._wandb_init["job_type"] == "eval"
    assert wandb._wandb_init["mode"] == "offline" and wandb._wandb_init["group"] == "g"


def test_online_without_a_key_logs_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    logger = make_logger(_settings("wandb", "online"), tmp_path, "r")
    assert logger is not False and logger._wandb_init["mode"] == "offline"  # type: ignore[union-attr]


def test_a_summary_run_logs_offline_under_its_directory(tmp_path: Path) -> None:
    run = wandb_run(_settings("wandb"), tmp_path, "sweep-analysis", "isoflop-analysis")
    run.log({"answer": 42.0})
    run.finish()
    (record,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    assert {"answer": 42.0}.items() <= history(record)[0].items()
