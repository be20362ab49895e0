"""End to end: a real (tiny) training run, its run directory, W&B, export and resume."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import altup_cli
from altup_cli.runs.checkpoint import read_checkpoint
from tests.helpers.prose import tiny_overrides
from tests.helpers.wandb_records import history


def _run_dir(outputs: Path) -> Path:
    runs = sorted(p for p in outputs.glob("*/*") if p.is_dir())
    assert len(runs) == 1, runs
    return runs[0]


def _csv_losses(run_dir: Path) -> dict[int, float]:
    """Training loss by step over every session of a run (a resume adds a CSV version)."""
    losses: dict[int, float] = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(path.read_text().splitlines()):
            if row.get("train/loss"):
                assert int(row["step"]) not in losses, "a step was trained twice"
                losses[int(row["step"])] = float(row["train/loss"])
    return losses


def test_train_writes_a_complete_run_directory(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    outputs = tmp_path / "outputs"
    result = altup("train", *tiny_overrides(corpus_dir, cache_dir, outputs), "logger=wandb")
    assert result.code == 0, result.stderr
    run = _run_dir(outputs)

    config = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert config["model"]["d_model"] == 32 and config["trainer"]["max_steps"] == 6
    assert "model.d_model=32" in yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "completed" and meta["name"] == "t"
    assert (run / "train.log").read_text().count("step ") >= 6

    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 6 and metrics["tokens_seen"] == 6 * 4 * 32
    assert metrics["val_loss"] is not None and metrics["tokens_per_second"] > 0

    # Checkpoints load without pickled code and carry the config.
    last = read_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6 and last["altup"]["config"]["run"]["name"] == "t"
    assert all(key.startswith("model.") for key in last["state_dict"])  # no aliased copies
    assert (run / "checkpoints" / "best.ckpt").is_file()

    # The export reproduces the trained model exactly.
    model, model_cfg = altup_cli.load(run)
    from_ckpt, _ = altup_cli.load(run / "checkpoints" / "last.ckpt")
    tokenizer = altup_cli.load_tokenizer(run)
    ids = torch.tensor([tokenizer.encode("The old king speaks of the sea").ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), from_ckpt(ids), rtol=0, atol=0)
    assert model_cfg.vocab_size == 320  # 300 rounded up to a multiple of 64
    weights = load_file(run / "export" / "model.safetensors")
    assert torch.equal(weights["embed.weight"], last["state_dict"]["model.embed.weight"])

    # W&B really logged, offline, into the run directory.
    wandb_file = next(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert meta["wandb_id"] in wandb_file.name
    rows = history(wandb_file)
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 6 and losses[-1] == pytest.approx(metrics["train_loss"], rel=1e-6)
    assert any("val/loss" in r for r in rows)
    assert any("train/device/items_per_sec" in r for r in rows)  # tokens/s


PEER_TINY = ["ffn=peer", "ffn.num_experts=64", "ffn.heads=2", "ffn.topk=4", "ffn.d_key=8"]


@pytest.mark.parametrize("ffn", [[], PEER_TINY], ids=["dense", "peer"])
def test_resume_reproduces_the_uninterrupted_run(
    altup, ffn: list[str], corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """PEER adds query BatchNorm statistics and lazy-Adam table state to what a resume
    must restore."""
    tiny = tiny_overrides(corpus_dir, cache_dir, tmp_path / "unused")
    base = [*tiny, *ffn, "logger=csv", "optim.schedule_steps=8"]

    full_out = tmp_path / "full"
    assert altup("train", *base, "trainer.max_steps=8", f"run.output_dir={full_out}").code == 0
    full = _run_dir(full_out)

    part_out = tmp_path / "part"
    assert altup("train", *base, "trainer.max_steps=4", f"run.output_dir={part_out}").code == 0
    part = _run_dir(part_out)
    assert read_checkpoint(part / "checkpoints" / "last.ckpt")["global_step"] == 4
    result = altup("train", "--resume", str(part), "trainer.max_steps=8")
    assert result.code == 0, result.stderr

    # Identical batches, LR and optimizer state: bit for bit, as the README promises.
    full_losses, resumed_losses = _csv_losses(full), _csv_losses(part)
    assert list(full_losses) == list(range(8)) and resumed_losses == full_losses
    a = load_file(full / "export" / "model.safetensors")
    b = load_file(part / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # The FLOP count and the validation curve carry over the interruption; the curve
    # also has the validation the first session ran as it ended, at step 4.
    full_metrics = json.loads((full / "metrics.json").read_text())
    resumed_metrics = json.loads((part / "metrics.json").read_text())
    flops = full_metrics["training_flops"]
    assert resumed_metrics["training_flops"] == flops > 0
    curve = resumed_metrics["validation_curve"]
    assert [p for p in curve if p["step"] != 4] == full_metrics["validation_curve"]
    assert [p["flops"] for p in curve if p["step"] == 4] == [flops / 2]
    meta = json.loads((part / "run.json").read_text())
    assert meta["status"] == "completed" and len(meta["starts"]) == 2


def test_resume_auto_picks_the_newest_run_of_that_name(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    outputs = tmp_path / "outputs"
    args = [*tiny_overrides(corpus_dir, cache_dir, outputs, steps=3), "logger=none"]
    assert altup("train", *args).code == 0
    run = _run_dir(outputs)
    result = altup("train", "--resume", "auto", *args, "trainer.max_steps=5")
    assert result.code == 0, result.stderr
    assert _run_dir(outputs) == run
    assert json.loads((run / "metrics.json").read_text())["steps"] == 5


@pytest.mark.parametrize("ffn", [[], [*PEER_TINY, "ffn.query_bn=false"]], ids=["dense", "peer"])
def test_ddp_on_two_cpu_processes_equals_one_process_with_twice_the_batch(
    ffn: list[str], corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """DDP averages gradients over ranks, and rank r takes half r of each global batch, so
    2 processes × batch 4 must train the same weights as 1 process × batch 8. PEER's
    tables are averaged by the optimizer from every rank's factored gradient instead
    (query BatchNorm off: its batch statistics are per rank by design)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    common = [*tiny_overrides(corpus_dir, cache_dir, tmp_path, steps=4), "logger=csv", *ffn]

    def run(name: str, *extra: str) -> Path:
        cmd = [sys.executable, "-m", "altup_cli.cli", "train", *common, f"run.name={name}", *extra]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return next(tmp_path.glob(f"*/*_{name}"))

    ddp = run("ddp", "trainer=ddp_cpu")
    single = run("single", "data.batch_size=8")
    metrics = json.loads((ddp / "metrics.json").read_text())
    assert metrics["tokens_seen"] == 4 * 2 * 4 * 32
    # Only the order of float sums differs: clean runs differ by ≤ 1.2e-7 in any weight
    # and ≤ 5e-7 in a validation loss; PEER's all-gathered table gradient summed instead
    # of averaged moves 61 table entries by up to 4e-5.
    a = load_file(ddp / "export" / "model.safetensors")
    b = load_file(single / "export" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(
            a[key], b[key], rtol=1e-6, atol=1e-6, msg=lambda m, k=key: f"{k}: {m}"
        )
    curve = json.loads((single / "metrics.json").read_text())["validation_curve"]
    assert [p["step"] for p in metrics["validation_curve"]] == [p["step"] for p in curve]
    for p, q in zip(metrics["validation_curve"], curve, strict=True):
        assert p["val_loss"] == pytest.approx(q["val_loss"], rel=1e-6, abs=0), p["step"]


INDUCTOR = "ALTUP_TEST_INDUCTOR"  # set to 1 to also compile with inductor (~60 s of CPU)


@pytest.mark.skipif(
    not torch._dynamo.is_dynamo_supported(), reason="torch.compile is unavailable here"
)
@pytest.mark.parametrize(
    "backend",
    [
        "aot_eager",
        pytest.param(
            "inductor",
            marks=pytest.mark.skipif(
                not os.environ.get(INDUCTOR),
                reason=f"inductor's cold C++ compile costs ~60 s of CPU; set {INDUCTOR}=1",
            ),
        ),
    ],
)
def test_compiled_training_equals_eager(
    altup,
    backend: str,
    corpus_dir: Path,
    cache_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """run.compile=true really compiles (dynamo captures graphs), trains the same losses
    as eager mode and saves the same parameter names (no `_orig_mod.` prefix). aot_eager
    traces as inductor does but skips its C++ code generation."""
    from torch._dynamo.utils import counters

    args = [*tiny_overrides(corpus_dir, cache_dir, tmp_path / "x", steps=2), "logger=csv"]
    assert altup("train", *args, f"run.output_dir={tmp_path / 'eager'}").code == 0
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend=backend, **kw)
    )
    counters.clear()
    result = altup("train", *args, "run.compile=true", f"run.output_dir={tmp_path / 'compiled'}")
    assert result.code == 0, result.stderr
    assert counters["stats"]["unique_graphs"] >= 1
    eager, compiled = _run_dir(tmp_path / "eager"), _run_dir(tmp_path / "compiled")
    a, b = _csv_losses(eager), _csv_losses(compiled)
    assert list(a) == [0, 1] and b == pytest.approx(a, rel=1e-5)
    keys = [
        read_checkpoint(r / "checkpoints" / "last.ckpt")["state_dict"] for r in (eager, compiled)
    ]
    assert list(keys[0]) == list(keys[1])


@pytest.mark.parametrize(
    "trainer",
    [
        ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"],
        pytest.param(
            ["trainer=fsdp"],
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
    ids=["cpu", "no-gpu"],
)
def test_fsdp_without_a_gpu_is_refused_in_one_line(
    altup, trainer: list[str], corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """Lightning's FSDP runs on CUDA only (`strategy fsdp requires a GPU accelerator`), so
    on CPU it is refused before a run directory exists (it was a Lightning traceback after
    one: a failed run). Refused before any process launches, so it can run in-process."""
    outputs = tmp_path / "outputs"
    result = altup("train", *tiny_overrides(corpus_dir, cache_dir, outputs), *trainer)
    lines = result.stderr.strip().splitlines()
    assert result.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "fsdp" in lines[0] and "gpu" in lines[0].lower()
    assert not outputs.exists() or not any(outputs.iterdir())


def test_a_crashing_run_is_marked_failed_not_finished(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from altup_cli.training.lm_module import LanguageModelModule

    original = LanguageModelModule.training_step

    def explode(self, batch, batch_idx):  # a bug in the middle of training
        if batch_idx == 2:
            raise RuntimeError("boom")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(LanguageModelModule, "training_step", explode)
    outputs = tmp_path / "outputs"
    with pytest.raises(RuntimeError, match="boom"):
        altup("train", *tiny_overrides(corpus_dir, cache_dir, outputs), "logger=none")
    run = _run_dir(outputs)
    meta = json.loads((run / "run.json").read_text())
    assert meta["status"] == "failed" and "boom" in meta["error"]
    assert not (run / "metrics.json").exists() and not (run / "export").exists()


@pytest.mark.parametrize("variant", ["k2", "recycled_k2", "sequence_s2"])
def test_altup_variants_train_and_export(
    altup, variant: str, corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    outputs = tmp_path / "outputs"
    args = [*tiny_overrides(corpus_dir, cache_dir, outputs, steps=3), "logger=none"]
    result = altup("train", f"altup={variant}", *args)
    assert result.code == 0, result.stderr
    run = _run_dir(outputs)
    model, cfg = altup_cli.load(run)
    from_ckpt, _ = altup_cli.load(run / "checkpoints" / "last.ckpt")
    assert (
        cfg.altup.mode
        == {"k2": "altup", "recycled_k2": "recycled", "sequence_s2": "sequence"}[variant]
    )
    ids = torch.randint(0, 300, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), from_ckpt(ids), rtol=0, atol=0)


@pytest.mark.parametrize("ffn", ["peer", "moe"])
def test_sparse_feedforwards_train_and_log_to_wandb(
    altup, ffn: str, corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    outputs = tmp_path / "outputs"
    small = PEER_TINY[1:] if ffn == "peer" else ["ffn.num_experts=4"]
    args = [*tiny_overrides(corpus_dir, cache_dir, outputs, steps=4), "logger=wandb"]
    result = altup("train", f"ffn={ffn}", *small, "altup=k2", *args)
    assert result.code == 0, result.stderr
    run = _run_dir(outputs)
    _, cfg = altup_cli.load(run)
    assert cfg.ffn.kind == ffn and cfg.altup.K == 2
    rows = history(next(run.glob("wandb/offline-run-*/run-*.wandb")))
    if ffn == "peer":  # the middle layer of 2 is layer 1
        usage = [
            r["experts/blocks.1.layer.ffn/usage"]
            for r in rows
            if "experts/blocks.1.layer.ffn/usage" in r
        ]
        assert len(usage) == 4 and all(0 < u <= 1 for u in usage)
    else:
        aux = [r["train/aux_loss"] for r in rows if "train/aux_loss" in r]
        assert len(aux) == 4 and all(a > 0 for a in aux)
