"""Unit-level reliability properties: each catches a planted bug (named in its docstring)
that the end-to-end tests in test_reliability.py let through or caught only by chance.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from altup_cli.errors import UserError
from altup_cli.runs.checkpoint import read_checkpoint
from altup_cli.training.lm_module import LanguageModelModule
from tests.helpers.prose import tiny_overrides

LAUNCH_VARS = (
    "RANK", "SLURM_PROCID", "LOCAL_RANK", "SLURM_JOB_ID", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID",
)  # fmt: skip


def _settings(output_dir: Path, *overrides: str) -> Any:
    from altup_cli.config import compose_config, validate

    return validate(compose_config([f"run.output_dir={output_dir}", "run.name=same", *overrides]))


def _strict_json(path: Path) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)


# --- run directories -------------------------------------------------------------------


def test_claim_run_dir_refuses_a_taken_job_named_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_launcher: None
) -> None:
    """Catches claim_run_dir sharing the directory (`return run_dir` instead of refusing)
    and open(..., "w"): the CLI test only reaches check_claimable, which refuses first."""
    from altup_cli.runs.rundir import claim_run_dir

    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    settings = _settings(tmp_path)
    first = claim_run_dir(settings)
    assert first.name == "4242_same"
    (first / "run.json").write_text('{"status": "running"}')
    with pytest.raises(UserError, match="already holds a run of this job"):
        claim_run_dir(settings)
    assert (first / "run.json").read_text() == '{"status": "running"}'


def test_claim_run_dir_never_returns_a_directory_another_run_claimed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_launcher: None
) -> None:
    """The race of two same-named runs, made deterministic: this run picked its candidate
    before the other created run.json in it. Catches open(..., "x") -> "w", which the
    timing-based concurrency test catches only when the race happens to occur."""
    import altup_cli.runs.rundir as rundir

    settings = _settings(tmp_path)
    taken = rundir.claim_run_dir(settings)  # the other run
    real, calls = rundir.planned_run_dir, []

    def stale(s: Any, now: Any = None) -> Path:
        calls.append(now)
        return taken if len(calls) == 1 else real(s, now)

    monkeypatch.setattr(rundir, "planned_run_dir", stale)
    mine = rundir.claim_run_dir(settings)
    assert mine != taken and (mine / "run.json").is_file()
    assert (taken / "run.json").read_text() == "{}"


# --- atomic writes ---------------------------------------------------------------------


def test_atomic_writes_rename_from_the_targets_own_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches a temporary file made elsewhere (mkstemp without dir=target.parent): a
    rename across filesystems is a copy that a full disk truncates, or fails."""
    import altup_cli.files as files
    from altup_cli.training.checkpoint_io import AtomicCheckpointIO

    real, renames = os.replace, []

    def replace(src: Any, dst: Any) -> None:
        renames.append((Path(src), Path(dst)))
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    files.write_text(tmp_path / "a" / "x.txt", "hello\n")
    files.write_json(tmp_path / "y.json", {"k": 1})
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, tmp_path / "c" / "last.ckpt")
    targets = [tmp_path / "a" / "x.txt", tmp_path / "y.json", tmp_path / "c" / "last.ckpt"]
    assert [dst for _, dst in renames] == targets
    assert all(src.parent == dst.parent and src != dst for src, dst in renames)
    assert torch.load(tmp_path / "c" / "last.ckpt", weights_only=True) == {"global_step": 3}
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["last.ckpt"]


def test_write_json_turns_non_finite_floats_into_null(tmp_path: Path) -> None:
    """Catches finite_json passing NaN/inf through: no training test ever puts a
    non-finite float into a JSON file, so the divergence test's strict-JSON check is
    vacuous for it."""
    from altup_cli.files import write_json

    path = tmp_path / "m.json"
    write_json(path, {"a": math.nan, "b": [math.inf, 1.5], "c": {"d": -math.inf}, "e": (math.nan,)})
    assert _strict_json(path) == {"a": None, "b": [None, 1.5], "c": {"d": None}, "e": [None]}


# --- divergence ------------------------------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_validation_loss_stops_at_once(value: float) -> None:
    """Catches a dropped validation check (no test reaches it: the integration test's
    training loss goes non-finite first)."""
    from altup_cli.training.callbacks import Diverged, DivergenceGuard

    guard = DivergenceGuard(patience=5)
    trainer = SimpleNamespace(
        global_step=7, checkpoint_callbacks=[], sanity_checking=False,
        callback_metrics={"val/loss": torch.tensor(value)},
    )  # fmt: skip
    with pytest.raises(Diverged) as err:
        guard.on_validation_end(trainer)  # type: ignore[arg-type]
    assert (err.value.step, err.value.what) == (7, "val/loss")
    trainer.callback_metrics = {"val/loss": torch.tensor(2.5)}
    guard.on_validation_end(trainer)  # type: ignore[arg-type]  # finite: goes on
    trainer.sanity_checking, trainer.callback_metrics = True, {"val/loss": torch.tensor(value)}
    guard.on_validation_end(trainer)  # type: ignore[arg-type]  # the sanity check: ignored


def test_divergence_after_a_checkpoint_names_a_finite_last_ckpt(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loss turns NaN from the batch after the step-4 checkpoint. The reliability test
    only checks the last finite checkpoint `if` one is named, so a run that names none (e.g.
    last.ckpt from save_last=True on the monitored callback) passed it."""
    original = LanguageModelModule.training_step

    def nan_from_step_4(self: LanguageModelModule, batch: torch.Tensor, i: int) -> torch.Tensor:
        loss = original(self, batch, i)
        return loss * math.nan if self.trainer.global_step >= 4 else loss

    monkeypatch.setattr(LanguageModelModule, "training_step", nan_from_step_4)
    outputs = tmp_path / "outputs"
    args = [*tiny_overrides(corpus_dir, cache_dir, outputs, steps=10), "logger=csv"]
    result = altup("train", *args, "trainer.val_check_interval=2")
    assert result.code == 3, result.stderr
    (run,) = [p for p in outputs.glob("*/*") if p.is_dir()]
    meta = _strict_json(run / "run.json")
    assert meta["status"] == "diverged" and meta["diverged_at_step"] == 5
    assert meta["last_finite_checkpoint"] == str(run / "checkpoints" / "last.ckpt")
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4
    state = last["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not (run / "metrics.json").exists()


# --- resume ----------------------------------------------------------------------------


def test_resume_refuses_a_new_gradient_accumulation(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """Catches RESUMABLE allowing every `trainer.` key: accumulate_grad_batches changes the
    batch each step sees and the data order, so a resumed run could not match its start."""
    outputs = tmp_path / "outputs"
    assert altup("train", *tiny_overrides(corpus_dir, cache_dir, outputs, steps=2)).code == 0
    (run,) = [p for p in outputs.glob("*/*") if p.is_dir()]
    result = altup(
        "train", "--resume", str(run), "trainer.max_steps=4", "trainer.accumulate_grad_batches=2"
    )
    assert result.code == 2 and "cannot change in a resumed run" in result.stderr
    assert "trainer.accumulate_grad_batches" in result.stderr


# --- config checks, fast -------------------------------------------------------------


@pytest.mark.parametrize("name", ["a/b", "../x", ".hidden", "x" * 101, "", "a b", "a\\b"])
def test_bad_run_names_are_refused_by_validate(tmp_path: Path, name: str) -> None:
    """The CLI table catches a broken name check only after starting a full default
    training run (fullmatch -> match or a leading `.` allowed ran for minutes); this
    fails at once."""
    with pytest.raises(UserError, match=r"run\.name must be"):
        _settings(tmp_path, f"run.name='{name}'")


def test_require_fits_refuses_what_this_machine_cannot_hold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Catches BYTES_PER_TRAINED_PARAMETER = 0 without allocating terabytes (the CLI test
    then fails only because the allocation does, or is OOM-killed on a big machine)."""
    import altup_cli.config.resources as resources
    from altup_cli.models.counting import parameter_counts

    model = _settings(Path("/nonexistent-out"), "model.d_model=32", "model.n_layers=2",
                      "model.n_heads=2", "model.d_ff=64").model_config(300)  # fmt: skip
    need = parameter_counts(model)["total"] * 16  # fp32 weight, grad, two Adam moments
    monkeypatch.setattr(resources, "memory_bytes", lambda: need - 1)
    with pytest.raises(UserError, match="GiB for weights, gradients and Adam state"):
        resources.require_fits(model, "model")
    monkeypatch.setattr(resources, "memory_bytes", lambda: need)
    resources.require_fits(model, "model")


# --- W&B -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["no API key", "no network"])
def test_wandb_mode_names_the_reason_for_going_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    """The CLI test's reason check is vacuous: the fixed warning text always contains both
    "key" and "network", so a wrong reason (e.g. "no W&B API key" with a key set) passed."""
    from altup_cli.console import console
    from altup_cli.training.loggers import wandb_mode

    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a closed loopback port
    if case == "no network":
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    with console.capture() as captured:
        assert wandb_mode("online") == "offline"
        assert wandb_mode("offline") == "offline" and wandb_mode("disabled") == "disabled"
    text = captured.get()
    reason = "no W&B API key" if case == "no API key" else "127.0.0.1 unreachable"
    assert text.count("logging offline") == 1 and reason in text, text
