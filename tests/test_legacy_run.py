"""A run directory written by the code before the orchestration redesign (commit fce595d,
tests/fixtures/legacy_run) still loads with the same function, resumes and grows."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import altup_cli
from altup_cli.runs.checkpoint import read_checkpoint

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_run"


@pytest.fixture
def legacy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the fixture as the working directory (its config names corpus/ and cache/
    relative to where it was trained)."""
    shutil.copytree(FIXTURE, tmp_path / "legacy")
    monkeypatch.chdir(tmp_path / "legacy")
    return tmp_path / "legacy"


def _logits(path: Path) -> torch.Tensor:
    ids = torch.tensor(json.loads((FIXTURE / "expected_logits.json").read_text())["ids"])
    model, _ = altup_cli.load(path)
    with torch.no_grad():
        return model(ids).double()


@pytest.mark.parametrize("target", ["run", "run/export", "run/checkpoints/last.ckpt"])
def test_legacy_run_loads_with_the_function_it_was_saved_with(target: str) -> None:
    expected = json.loads((FIXTURE / "expected_logits.json").read_text())
    logits = _logits(FIXTURE / target)
    head = torch.tensor(expected["logits_head"], dtype=torch.float64)
    torch.testing.assert_close(logits[0, :, :6], head, rtol=0, atol=1e-5)
    assert logits.sum().item() == pytest.approx(expected["logits_sum"], abs=1e-3)
    assert logits.abs().sum().item() == pytest.approx(expected["logits_abs_sum"], rel=1e-6)


def test_legacy_run_resumes(legacy: Path, altup: Callable[..., object]) -> None:
    result = altup("train", "--resume", "run", "trainer.max_steps=6")
    assert result.code == 0, result.stderr  # type: ignore[attr-defined]
    assert read_checkpoint(legacy / "run/checkpoints/last.ckpt")["global_step"] == 6
    metrics = json.loads((legacy / "run/metrics.json").read_text())
    assert metrics["steps"] == 6
    assert json.loads((legacy / "run/run.json").read_text())["status"] == "completed"


def test_legacy_run_grows_without_changing_its_function(
    legacy: Path, altup: Callable[..., object]
) -> None:
    result = altup("grow", "run", "mlp_width=48", "layers=+1", "-o", "grown")
    assert result.code == 0, result.stderr  # type: ignore[attr-defined]
    _grown, cfg = altup_cli.load(legacy / "grown/checkpoints/last.ckpt")
    assert (cfg.d_ff, cfg.n_layers) == (48, 3)
    torch.testing.assert_close(
        _logits(legacy / "grown/checkpoints/last.ckpt"), _logits(FIXTURE / "run"), atol=1e-5, rtol=0
    )
    result = altup("train", "--resume", "grown", "trainer.max_steps=5")
    assert result.code == 0, result.stderr  # type: ignore[attr-defined]
