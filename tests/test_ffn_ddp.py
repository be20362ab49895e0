"""PEER/PKM bookkeeping across processes and micro-batches: the expert usage logged under
2-process CPU DDP, and the weights trained with gradient accumulation, equal one process
over the same global batch."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.prose import tiny_overrides
from tests.test_train import PEER_TINY, _run_dir

# Query BatchNorm off: its batch statistics are per rank (per micro-batch) by design.
PKM_TINY = ["ffn=pkm", "ffn.num_experts=64", "ffn.heads=2", "ffn.topk=4", "ffn.d_key=8"]
FFNS = {"peer": [*PEER_TINY, "ffn.query_bn=false"], "pkm": [*PKM_TINY, "ffn.query_bn=false"]}


def logged_usage(run: Path) -> dict[tuple[int, str], float]:
    """Every experts/* figure of the run's CSV log, by (step, name)."""
    out: dict[tuple[int, str], float] = {}
    for path in run.glob("csv/version_*/metrics.csv"):
        for row in csv.DictReader(path.read_text().splitlines()):
            for name, value in row.items():
                if name.startswith("experts/") and value:
                    out[int(row["step"]), name] = float(value)
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = (
        load_file(a / "export" / "model.safetensors"),
        load_file(b / "export" / "model.safetensors"),
    )
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-5, msg=key)


def test_expert_usage_under_ddp_equals_one_process_over_the_global_batch(
    corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """Usage is summed over ranks at each log. A registered buffer would be overwritten by
    DDP's broadcast of rank 0's buffers before every forward, so with two batches per log
    the figures were rank 0's first batch twice plus both ranks' second."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    common = [
        *tiny_overrides(corpus_dir, cache_dir, tmp_path, steps=4),
        *("logger=csv", "trainer.log_every_n_steps=2", "trainer.val_check_interval=4"),
        *FFNS["peer"],
    ]

    def run(name: str, *extra: str) -> Path:
        cmd = [sys.executable, "-m", "altup_cli.cli", "train", *common, f"run.name={name}", *extra]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return next(tmp_path.glob(f"*/*_{name}"))

    ddp, single = run("ddp", "trainer=ddp_cpu"), run("single", "data.batch_size=8")
    assert_same_weights(ddp, single)  # the same routing, so the same usage is expected
    expected, got = logged_usage(single), logged_usage(ddp)
    assert {step for step, _ in expected} == {1, 3}, expected  # steps 2, 4 (logged at k-1)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.parametrize("ffn", list(FFNS))
def test_gradient_accumulation_equals_one_batch_of_twice_the_size(
    altup, ffn: str, corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """Two micro-batches of 4 accumulate the same step as one batch of 8: the factored
    table gradients of both backward passes (token offsets into both passes' vectors)
    and the dense gradients, each averaged like the loss."""
    tiny = tiny_overrides(corpus_dir, cache_dir, tmp_path / "unused", steps=4)
    base = [*tiny, *FFNS[ffn], "logger=none", "trainer.val_check_interval=4"]
    runs = []
    for name, extra in (("acc", ["trainer.accumulate_grad_batches=2"]),
                        ("big", ["data.batch_size=8"])):  # fmt: skip
        out = tmp_path / name
        result = altup("train", *base, *extra, f"run.output_dir={out}")
        assert result.code == 0, result.stderr
        runs.append(_run_dir(out))
    assert_same_weights(*runs)
