"""Growth in real runs: `altup grow` on checkpoints, growth schedules during training, and
resuming after either."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import altup_cli
from altup_cli.config import model_preset
from altup_cli.growth.ops import PRESET_FIELDS
from altup_cli.runs.checkpoint import read_checkpoint
from altup_cli.training.schedules import with_rewarm
from tests.helpers.prose import tiny_overrides
from tests.helpers.wandb_records import history
from tests.test_train import PEER_TINY, _csv_losses, _run_dir

ALL_SIX = [
    "mlp_width=96",
    "heads=3",
    "value_dim=24",
    "key_dim=20",
    "residual_width=48",
    "layers=+1@1",
]


@pytest.mark.parametrize(
    "variant", [[], ["altup=k2"], PEER_TINY], ids=["baseline", "altup_k2", "peer"]
)
def test_grown_checkpoint_resumes_where_the_run_was(
    altup, variant: list[str], corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """Grow a 6-step checkpoint by all six transforms, resume both it and the original for
    one step: the first post-growth loss equals the original's on that batch within 1e-4."""
    base = [*tiny_overrides(corpus_dir, cache_dir, tmp_path / "out"), *variant]
    base += ["logger=csv", "optim.schedule_steps=8"]
    assert altup("train", *base).code == 0
    original = _run_dir(tmp_path / "out")
    before = (original / "checkpoints" / "last.ckpt").read_bytes()

    grown = tmp_path / "grown"
    result = altup("grow", str(original), *ALL_SIX, "-o", str(grown))
    assert result.code == 0, result.stderr
    assert (original / "checkpoints" / "last.ckpt").read_bytes() == before  # source intact
    ckpt = read_checkpoint(grown / "checkpoints" / "last.ckpt")
    assert ckpt["altup"]["model"]["d_model"] == 48 and ckpt["global_step"] == 6
    (event,) = ckpt["altup"]["config"]["growth"]["history"]
    assert event["max_abs_dlogits"] <= 1e-5 and event["ops"] == ALL_SIX

    # The grown model loads through the Python API and computes the same logits.
    small, _ = altup_cli.load(original)
    large, cfg = altup_cli.load(grown)
    assert cfg.n_layers == 3 and cfg.head_dim == 20
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        assert (large(ids) - small(ids)).abs().max() <= 1e-5

    for run in (original, grown):
        result = altup("train", "--resume", str(run), "trainer.max_steps=7")
        assert result.code == 0, result.stderr
    ((step, loss),) = _csv_losses(grown).items()  # the one step trained after growth
    assert loss == pytest.approx(_csv_losses(original)[step], abs=1e-4)


def test_growth_schedule_applies_logs_and_resumes_exactly(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """A schedule grows the model at step 3 and logs the event to W&B; a run stopped at
    step 4 and resumed reproduces the uninterrupted run's losses."""
    schedule = 'growth.schedule=[{step: 3, ops: ["mlp_width=128", "layers=+1@0"]}]'
    base = [*tiny_overrides(corpus_dir, cache_dir, tmp_path / "unused"), schedule]
    base += ["optim.schedule_steps=6", "growth.lr_policy=rewarm", "growth.rewarm_steps=2"]

    full_out = tmp_path / "full"
    args = [*base, "trainer.max_steps=6", f"run.output_dir={full_out}", "logger=wandb"]
    assert altup("train", *args).code == 0
    full = _run_dir(full_out)
    metrics = json.loads((full / "metrics.json").read_text())
    (event,) = metrics["growth"]
    assert event["step"] == 3 and event["max_abs_dlogits"] <= 1e-5
    assert metrics["parameters"]["total"] == event["parameters"]
    _, cfg = altup_cli.load(full)
    assert cfg.d_ff == 128 and cfg.n_layers == 3
    rows = history(next(full.glob("wandb/offline-run-*/run-*.wandb")))
    assert [r["growth/max_abs_dlogits"] for r in rows if "growth/max_abs_dlogits" in r]
    flops = [p["flops"] for p in metrics["validation_curve"]]
    assert flops == sorted(flops) and metrics["training_flops"] == flops[-1]

    part_out = tmp_path / "part"
    args = [*base, "trainer.max_steps=4", f"run.output_dir={part_out}", "logger=csv"]
    assert altup("train", *args).code == 0
    part = _run_dir(part_out)
    result = altup("train", "--resume", str(part), "trainer.max_steps=6")
    assert result.code == 0, result.stderr
    shutil.rmtree(full / "wandb")
    full_csv = tmp_path / "full_csv"
    args = [*base, "trainer.max_steps=6", f"run.output_dir={full_csv}", "logger=csv"]
    assert altup("train", *args).code == 0
    full_losses, resumed = _csv_losses(_run_dir(full_csv)), _csv_losses(part)
    assert list(full_losses) == list(range(6)) and resumed == full_losses  # bit for bit
    # FLOPs counted at the grown model's rate after step 3, on both sides of the resume.
    full_metrics = json.loads((_run_dir(full_csv) / "metrics.json").read_text())
    resumed_metrics = json.loads((part / "metrics.json").read_text())
    assert resumed_metrics["training_flops"] == full_metrics["training_flops"]
    curve = [p for p in resumed_metrics["validation_curve"] if p["step"] != 4]
    assert curve == full_metrics["validation_curve"]


def test_rewarm_ramps_the_lr_after_the_latest_rewarm_event() -> None:
    history = [
        {"step": 10, "lr_policy": "rewarm", "rewarm_steps": 4},
        {"step": 20, "lr_policy": "continue"},
    ]
    assert with_rewarm(0.8, 9, history) == 0.8
    assert with_rewarm(0.8, 10, history) == pytest.approx(0.2)
    assert with_rewarm(0.8, 12, history) == pytest.approx(0.6)
    assert with_rewarm(0.8, 25, history) == 0.8


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path, cache_dir: Path) -> Path:
    from typer.testing import CliRunner

    from altup_cli.cli import app

    out = tmp_path_factory.mktemp("trained")
    args = [*tiny_overrides(corpus_dir, cache_dir, out, steps=2), "logger=none"]
    assert CliRunner().invoke(app, ["train", *args]).exit_code == 0
    return _run_dir(out)


def _tree(*roots: Path) -> dict[str, bytes | None]:
    """Every path under `roots` with its bytes (None for a directory)."""
    return {
        str(p): p.read_bytes() if p.is_file() else None
        for root in roots
        for p in sorted(root.rglob("*"))
    }


def _refused(result: Any, message: str = "") -> None:
    lines = result.stderr.strip().splitlines()
    assert result.code == 2 and message in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["mlp_width=100000000"], "parameters, which need"),
        (["width=3"], "unknown growth transform"),
        (["mlp_width=16"], "cannot shrink"),
        (["key_dim=17"], "even"),
        (["ffn.num_experts=100"], "PEER/PKM"),
        ([], "nothing to grow"),
        (["--to", "model=nope"], "unknown model preset"),
        (["--lr-policy", "sometimes", "mlp_width=128"], "--lr-policy"),
    ],
)
def test_bad_growth_requests_write_nothing(
    altup, trained: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "grown"
    before = _tree(tmp_path, trained)
    result = altup("grow", str(trained), *args, "-o", str(out))
    _refused(result, message)
    assert _tree(tmp_path, trained) == before


def test_inexact_growth_needs_the_flag_and_reports_the_change(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    args = [*tiny_overrides(corpus_dir, cache_dir, tmp_path / "out", steps=2), "logger=none"]
    assert altup("train", *args, *PEER_TINY).code == 0
    run = _run_dir(tmp_path / "out")
    refused = altup("grow", str(run), "ffn.num_experts=100", "-o", str(tmp_path / "a"))
    assert refused.code == 2 and "--allow-inexact" in refused.stderr
    assert not (tmp_path / "a").exists()
    out = tmp_path / "b"
    done = altup("grow", str(run), "ffn.num_experts=100", "--allow-inexact", "-o", str(out))
    assert done.code == 0, done.stderr
    config = read_checkpoint(out / "checkpoints" / "last.ckpt")["altup"]["config"]
    (event,) = config["growth"]["history"]
    assert event["max_abs_dlogits"] > 0


def test_grow_to_a_preset_takes_its_shape_and_keeps_the_function(
    altup, trained: Path, tmp_path: Path
) -> None:
    """`--to model=nano` grows the 2-layer width-32 checkpoint to nano's shape (width 128,
    4 layers of 4 heads of 32, MLP 512) and the grown model computes the same logits."""
    out = tmp_path / "grown"
    result = altup("grow", str(trained), "--to", "model=nano", "-o", str(out))
    assert result.code == 0, result.stderr
    preset = model_preset("nano")
    _, cfg = altup_cli.load(out)
    shape = {f: getattr(cfg, f) for f in PRESET_FIELDS}
    per_head = preset["d_model"] // preset["n_heads"]
    assert shape == {**{f: preset[f] for f in PRESET_FIELDS}, "head_dim": per_head,
                     "v_head_dim": per_head}  # fmt: skip
    assert per_head == 32 and cfg.n_layers == 4
    (event,) = read_checkpoint(out / "checkpoints" / "last.ckpt")["altup"]["config"]["growth"][
        "history"
    ]
    assert event["ops"] == ["residual_width=128", "heads=4", "key_dim=32", "value_dim=32",
                            "mlp_width=512", "layers=4"]  # fmt: skip
    assert event["max_abs_dlogits"] <= 1e-5
    small, _ = altup_cli.load(trained)
    large, _ = altup_cli.load(out)
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (large(ids) - small(ids)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("garbage", "cannot read checkpoint"),
        ("text-file", "cannot read checkpoint"),
        ("foreign", "not an altup checkpoint"),
        ("existing-output", "not empty"),
        ("output-is-file", "not a directory"),
        ("output-parent-is-file", "not a directory"),
        ("bad-run-json", "cannot read"),
    ],
)
def test_bad_checkpoints_and_outputs_are_refused(
    altup, trained: Path, tmp_path: Path, kind: str, message: str
) -> None:
    source, out = trained, tmp_path / "grown"
    if kind == "garbage":
        source = tmp_path / "x.ckpt"
        source.write_bytes(b"\x00not a checkpoint")
    elif kind == "text-file":
        source = tmp_path / "notes.txt"
        source.write_text("step 6: loss 4.2\n")
    elif kind == "foreign":
        source = tmp_path / "x.ckpt"
        torch.save({"state_dict": {"w": torch.zeros(2)}}, source)
    elif kind == "existing-output":
        out.mkdir()
        (out / "keep.txt").write_text("an earlier result")
    elif kind == "output-is-file":
        out.write_text("an earlier result")
    elif kind == "bad-run-json":
        source = shutil.copytree(trained, tmp_path / "run")
        (source / "run.json").write_text('{"status": "done",')
    else:
        (tmp_path / "file").write_text("an earlier result")
        out = tmp_path / "file" / "grown"
    before = _tree(tmp_path, trained)
    result = altup("grow", str(source), "mlp_width=128", "-o", str(out))
    _refused(result, message)
    assert _tree(tmp_path, trained) == before


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("save_export", OSError(28, "No space left on device")),
        ("write_config", OSError(13, "Permission denied")),
        ("write_meta", RuntimeError("killed")),
    ],
)
def test_a_failed_write_leaves_nothing_and_a_retry_succeeds(
    altup,
    trained: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: str,
    error: Exception,
) -> None:
    """A write that fails after the checkpoint is written leaves no output directory (nor
    temporary files) behind, so the same command then succeeds; a disk error is one line."""
    from altup_cli.commands import grow

    def fail(*_: Any, **__: Any) -> None:
        raise error

    monkeypatch.setattr(grow, target, fail)
    out = tmp_path / "runs" / "grown"
    before = _tree(tmp_path, trained)
    args = ("grow", str(trained), "mlp_width=128", "-o", str(out))
    if isinstance(error, OSError):
        _refused(altup(*args), error.strerror)
    else:
        with pytest.raises(RuntimeError, match="killed"):
            altup(*args)
    assert _tree(tmp_path, trained) == before
    monkeypatch.undo()
    result = altup(*args)
    assert result.code == 0, result.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["grown"]
    assert {p.name for p in out.iterdir()} == {"checkpoints", "export", ".hydra", "run.json"}
    assert json.loads((out / "run.json").read_text())["status"] == "grown"
    _, cfg = altup_cli.load(out)
    assert cfg.d_ff == 128


def test_grow_fills_an_existing_empty_directory(altup, trained: Path, tmp_path: Path) -> None:
    """An empty OUT is allowed (nothing to overwrite) and gets the usual directory mode."""
    out = tmp_path / "grown"
    out.mkdir()
    result = altup("grow", str(trained), "mlp_width=128", "-o", str(out))
    assert result.code == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grown"]
    assert (out / "checkpoints" / "last.ckpt").is_file()
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask
