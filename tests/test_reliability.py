"""Training runs under faults: nothing lost, nothing mislabelled.

Each test reproduces a way a run could lose or misreport a result (a stale last.ckpt, a
resumed finished run, two runs in one directory, an override that was recorded but not
applied, a checkpoint write that fails, a diverging loss, a late logging step) and checks
the property that must hold instead.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import math
import multiprocessing
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from altup_cli.runs.checkpoint import read_checkpoint
from altup_cli.training.lm_module import LanguageModelModule
from altup_cli.training.schedules import warmup_cosine
from tests.helpers.prose import tiny_overrides


def _runs(outputs: Path) -> list[Path]:
    return sorted(p for p in outputs.glob("*/*") if p.is_dir())


def _tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root: content hash and modification time."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _strict_json(path: Path) -> Any:
    def refuse(name: str) -> None:
        raise ValueError(f"{path} holds {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _logged(run_dir: Path, key: str) -> dict[int, float]:
    """Values of one metric by logged step over every session of a run (CSV logger)."""
    values: dict[int, float] = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(path.read_text().splitlines()):
            if row.get(key):
                values[int(row["step"])] = float(row[key])
    return values


@pytest.fixture
def tiny(corpus_dir: Path, cache_dir: Path, tmp_path: Path) -> list[str]:
    return [*tiny_overrides(corpus_dir, cache_dir, tmp_path / "outputs"), "logger=csv"]


def test_last_checkpoint_is_the_newest_state_when_validation_worsens(
    altup, tiny: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lightning's save_last saves only alongside a top-k save: with a validation loss
    that rises after step 2, last.ckpt stayed at step 2 while the run went on to 6."""

    def rising(self: LanguageModelModule, batch: torch.Tensor, batch_idx: int) -> None:
        self.log("val/loss", float(self.trainer.global_step), prog_bar=True)

    monkeypatch.setattr(LanguageModelModule, "validation_step", rising)
    result = altup("train", *tiny, "trainer.max_steps=6", "trainer.val_check_interval=2")
    assert result.code == 0, result.stderr
    ckpts = _runs(tmp_path / "outputs")[0] / "checkpoints"
    assert read_checkpoint(ckpts / "best.ckpt")["global_step"] == 2
    assert read_checkpoint(ckpts / "last.ckpt")["global_step"] == 6


def test_resuming_a_finished_run_changes_nothing(altup, tiny: list[str], tmp_path: Path) -> None:
    assert altup("train", *tiny, "trainer.max_steps=4").code == 0
    run = _runs(tmp_path / "outputs")[0]
    before = _tree(tmp_path)
    for args in (
        ["--resume", str(run)],
        ["--resume", "auto", *tiny, "trainer.max_steps=4"],
        ["--resume", str(run), "trainer.max_steps=3"],
    ):
        result = altup("train", *args)
        assert result.code == 0, result.stderr
        assert "nothing to do" in result.stderr
        assert _tree(tmp_path) == before, args
    metrics = _strict_json(run / "metrics.json")
    assert metrics["train_loss"] is not None and metrics["val_loss"] is not None


def test_same_named_runs_in_one_job_never_share_a_directory(
    altup, tiny: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "SLURM_STEP_ID", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert altup("train", *tiny, "trainer.max_steps=2").code == 0
    (first,) = _runs(tmp_path / "outputs")
    assert first.name == "4242_t"
    before = _tree(tmp_path)

    again = altup("train", *tiny, "trainer.max_steps=2")  # same job, same step, same name
    assert again.code == 2 and "already holds a run of this job" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert _tree(tmp_path) == before

    monkeypatch.setenv("SLURM_STEP_ID", "1")  # a second `srun` step of the job
    assert altup("train", *tiny, "trainer.max_steps=2").code == 0
    assert [p.name for p in _runs(tmp_path / "outputs")] == ["4242.1_t", "4242_t"]
    assert {k: v for k, v in _tree(tmp_path).items() if "4242_t" in k} == before


def _claim(args: tuple[str, str]) -> str:
    from altup_cli.config import compose_config, validate
    from altup_cli.runs.rundir import claim_run_dir

    output_dir, start = args
    settings = validate(compose_config([f"run.output_dir={output_dir}", "run.name=same"]))
    while time.time() < float(start):  # all processes claim in the same instant
        pass
    return str(claim_run_dir(settings))


def test_concurrent_same_named_runs_get_distinct_directories(tmp_path: Path) -> None:
    start = str(time.time() + 3)
    with multiprocessing.get_context("fork").Pool(4) as pool:
        dirs = pool.map(_claim, [(str(tmp_path), start)] * 4)
    assert len(set(dirs)) == 4, dirs


def test_resume_applies_optimizer_overrides(altup, tiny: list[str], tmp_path: Path) -> None:
    """The checkpoint restores the LR and param-group settings it was saved with; an
    override on --resume must replace them, not only be written into the config."""
    common = [*tiny, "optim.schedule_steps=8", "optim.warmup_steps=2"]
    assert altup("train", *common, "trainer.max_steps=4", "optim.lr=1e-3").code == 0
    run = _runs(tmp_path / "outputs")[0]
    result = altup(
        "train", "--resume", str(run), "trainer.max_steps=6", "optim.lr=4e-3",
        "optim.weight_decay=0.5", "optim.beta2=0.9",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6
    assert last["lr_schedulers"][0]["base_lrs"] == [4e-3, 4e-3]
    groups = last["optimizer_states"][0]["param_groups"]
    assert groups[0]["weight_decay"] == 0.5 and groups[1]["weight_decay"] == 0.0
    assert all(g["betas"] == (0.9, 0.9) or g["betas"] == [0.9, 0.9] for g in groups)
    lrs = _logged(run, "lr-AdamWLazyTables/pg1")
    for step in (4, 5):  # the new base LR on the same cosine schedule
        assert lrs[step] == pytest.approx(4e-3 * warmup_cosine(step, 2, 8, 0.1), rel=1e-6)
    assert lrs[3] == pytest.approx(1e-3 * warmup_cosine(3, 2, 8, 0.1), rel=1e-6)


@pytest.mark.parametrize(
    "override", ["data.seq_len=16", "model.d_model=64", "run.seed=7", "tokenizer.vocab_size=400"]
)
def test_resume_refuses_overrides_it_cannot_apply(
    altup, tiny: list[str], tmp_path: Path, override: str
) -> None:
    assert altup("train", *tiny, "trainer.max_steps=2").code == 0
    run = _runs(tmp_path / "outputs")[0]
    before = _tree(tmp_path)
    result = altup("train", "--resume", str(run), "trainer.max_steps=4", override)
    assert result.code == 2 and "cannot change in a resumed run" in result.stderr
    assert override.split("=")[0] in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _tree(tmp_path) == before


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint_intact(
    altup, tiny: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk in the middle of the third checkpoint write (step 4)."""
    import altup_cli.runs.checkpoint as checkpoint

    real_save, calls = torch.save, []

    def disk_full(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(f)
        if len(calls) < 3:
            return real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        altup("train", *tiny, "trainer.max_steps=6", "trainer.val_check_interval=2")
    run = _runs(tmp_path / "outputs")[0]
    for name in ("best.ckpt", "last.ckpt"):
        assert read_checkpoint(run / "checkpoints" / name)["global_step"] == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert _strict_json(run / "run.json")["status"] == "failed"


def test_divergence_stops_the_run_and_keeps_the_last_finite_checkpoint(
    altup, tiny: list[str], tmp_path: Path
) -> None:
    result = altup(
        "train", *tiny, "trainer.max_steps=40", "trainer.val_check_interval=2",
        "optim.lr=1e4", "optim.warmup_steps=0", "optim.grad_clip=0",
    )  # fmt: skip
    assert result.code == 3, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: training diverged at step"), result.stderr
    run = _runs(tmp_path / "outputs")[0]
    meta = _strict_json(run / "run.json")
    assert meta["status"] == "diverged" and meta["diverged_at_step"] < 40
    assert not (run / "metrics.json").exists() and not (run / "export").exists()
    for path in run.rglob("*.json"):
        _strict_json(path)  # never a NaN in JSON
    if meta["last_finite_checkpoint"]:
        state = read_checkpoint(meta["last_finite_checkpoint"])["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
        assert Path(meta["last_finite_checkpoint"]).name == "last.ckpt"


@pytest.mark.parametrize(("patience", "stops_at"), [(0, 2), (1, 5), (2, None)])
def test_divergence_patience_counts_consecutive_non_finite_losses(
    patience: int, stops_at: int | None
) -> None:
    from types import SimpleNamespace

    from altup_cli.training.callbacks import Diverged, DivergenceGuard

    guard = DivergenceGuard(patience)
    trainer = SimpleNamespace(global_step=0, checkpoint_callbacks=[])
    losses = [1.0, math.nan, 2.0, math.inf, math.nan, 1.0]
    stopped = None
    for step, loss in enumerate(losses, start=1):
        trainer.global_step = step
        try:
            guard.on_train_batch_end(trainer, None, torch.tensor(loss))  # type: ignore[arg-type]
        except Diverged as err:
            stopped = err.step
            break
    assert stopped == stops_at


@pytest.mark.parametrize("case", ["mid-run checkpoint", "finished-run checkpoint"])
def test_a_resumed_run_logs_at_the_uninterrupted_runs_steps(
    altup, tiny: list[str], tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    full_args = [*tiny, "optim.schedule_steps=8", "trainer.max_steps=8"]
    assert altup("train", *full_args, f"run.output_dir={tmp_path / 'full'}").code == 0
    part_args = [*full_args, f"run.output_dir={tmp_path / 'part'}"]
    if case == "mid-run checkpoint":  # killed after the step-3 validation checkpoint
        original = LanguageModelModule.training_step

        def killed(self: LanguageModelModule, batch: torch.Tensor, i: int) -> torch.Tensor:
            if self.trainer.global_step == 4:
                raise RuntimeError("killed")
            return original(self, batch, i)

        monkeypatch.setattr(LanguageModelModule, "training_step", killed)
        with pytest.raises(RuntimeError):
            altup("train", *part_args)
        monkeypatch.setattr(LanguageModelModule, "training_step", original)
    else:
        assert altup("train", *part_args, "trainer.max_steps=4").code == 0
    part = _runs(tmp_path / "part")[0]
    assert altup("train", "--resume", str(part), "trainer.max_steps=8").code == 0
    full = _runs(tmp_path / "full")[0]
    for key in ("train/loss", "val/loss", "lr-AdamWLazyTables/pg1"):
        a, b = _logged(full, key), _logged(part, key)
        for step, value in a.items():
            assert b.get(step) == pytest.approx(value, rel=1e-6), (key, step)


def test_run_files_have_the_usual_permissions(altup, tiny: list[str], tmp_path: Path) -> None:
    assert altup("train", *tiny, "trainer.max_steps=2").code == 0
    run = _runs(tmp_path / "outputs")[0]
    umask = os.umask(0)
    os.umask(umask)
    ours = [*run.glob("export/*"), *run.glob("checkpoints/*"), *run.glob("*.json")]
    assert len(ours) >= 7
    for path in ours:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_kill_9_at_a_random_step_then_resume_equals_the_uninterrupted_run(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """SIGKILL a training process after its n-th checkpoint (n seeded-random), resume it,
    and compare every logged loss with a run that was never interrupted."""
    args = [
        *tiny_overrides(corpus_dir, cache_dir, tmp_path / "x", steps=10),
        "logger=csv", "trainer.val_check_interval=2",
    ]  # fmt: skip
    assert altup("train", *args, f"run.output_dir={tmp_path / 'full'}").code == 0
    wanted = random.Random(13).choice([2, 4, 6])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = f"run.output_dir={tmp_path / 'k'}"
    cmd = [sys.executable, "-m", "altup_cli.cli", "train", *args, out]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            last = list((tmp_path / "k").glob("*/*/checkpoints/last.ckpt"))
            if last and _step_of(last[0]) >= wanted:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed = _runs(tmp_path / "k")[0]
    assert _strict_json(killed / "run.json")["status"] == "running"
    assert not (killed / "metrics.json").exists()
    assert altup("train", "--resume", "auto", *args, f"run.output_dir={tmp_path / 'k'}").code == 0
    full = _runs(tmp_path / "full")[0]
    a, b = _logged(full, "train/loss"), _logged(killed, "train/loss")
    assert sorted(a) == sorted(b) == list(range(10))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-6), step


def _step_of(ckpt: Path) -> int:
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
    except Exception:  # being replaced right now: atomic, so this is only a race with rename
        return -1


@pytest.mark.parametrize("case", ["no API key", "no network"])
def test_wandb_online_without_a_key_or_network_logs_offline_and_says_so(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:  # fmt: skip
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    if case == "no network":
        monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # a closed loopback port
    outputs = tmp_path / "outputs"
    args = tiny_overrides(corpus_dir, cache_dir, outputs, steps=2)
    started = time.monotonic()
    result = altup("train", *args, "logger=wandb", "logger.mode=online")
    assert result.code == 0, result.stderr
    assert "logging offline" in result.stderr and case.split()[-1].lower() in result.stderr.lower()
    assert list(_runs(outputs)[0].glob("wandb/offline-run-*"))
    assert time.monotonic() - started < 120  # W&B alone would wait 90 s for the network
