"""The benchmark compares like with like: both loops train identically (no timing here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from altup_cli.benchmark import bare_loop, lightning_loop, preset_config, run_benchmark
from altup_cli.errors import UserError


def test_lightning_and_bare_loops_produce_identical_losses() -> None:
    import torch

    cfg = preset_config("nano", vocab_size=512, seq_len=16)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (2, 17), generator=g) for _ in range(4)]
    bare = bare_loop(cfg, batches, warmup=1, device=torch.device("cpu"))
    lit = lightning_loop(cfg, batches, warmup=1, device=torch.device("cpu"))
    assert bare.losses == lit.losses and len(bare.losses) == 4
    assert bare.losses[-1] < bare.losses[0]  # it really trains


def test_benchmark_table_rows() -> None:
    rows = run_benchmark(
        ["nano"], steps=2, warmup=1, repeats=1, batch_size=2, seq_len=16, device_name="cpu"
    )
    assert rows[0]["preset"] == "nano" and rows[0]["max_loss_gap"] < 1e-4
    assert rows[0]["time_ratio"] > 0


def test_unknown_preset() -> None:
    with pytest.raises(UserError, match="unknown model preset"):
        preset_config("gigantic")


def test_altup_suite_rows_compare_like_with_like() -> None:
    from altup_cli.benchmark import run_altup_benchmark
    from altup_cli.models import parameter_counts

    rows = {
        r["variant"]: r
        for r in run_altup_benchmark(
            "nano", steps=1, warmup=1, batch_size=2, seq_len=16, device_name="cpu"
        )
    }
    assert list(rows) == ["baseline", "altup_k2", "recycled_k2", "sequence_s2", "dense_2d"]
    assert rows["baseline"]["time_ratio"] == 1.0
    base = parameter_counts(preset_config("nano"))
    n_layers = preset_config("nano").n_layers
    assert rows["recycled_k2"]["parameters"] == base["total"] + n_layers * 6
    assert rows["altup_k2"]["non_embedding"] == base["non_embedding"] + n_layers * 6
    assert rows["dense_2d"]["flops_ratio"] > 2.5 and rows["sequence_s2"]["flops_ratio"] < 1


def test_peer_suite_rows_compare_like_with_like() -> None:
    """The PEER suite at a toy size: one row per (d, N, layer), dense layers once per d,
    the naive oracle only up to its limit, ratios taken against the right rows, and one
    full-step row per (kind, N) beside the two dense models."""
    from altup_cli.benchmark_ffn import run_peer_benchmark

    rows = run_peer_benchmark([64], [16, 32], 64, 1, 16, 2, 16)
    layer_rows = [r for r in rows if "kind" in r]
    assert [(r["experts"], r["kind"]) for r in layer_rows] == [
        (256, "peer"), (None, "dense_4d"), (None, "dense_hk"), (256, "naive"), (1024, "peer")
    ]  # fmt: skip
    naive = next(r for r in layer_rows if r["kind"] == "naive")
    assert naive["vs_naive"] == 1.0 and layer_rows[1]["vs_dense_4d"] == 1.0
    assert layer_rows[-1]["vs_naive"] is None  # 32² is above naive_max: no oracle run
    assert all(r["peak_gib"] > 0 and r["tokens_per_s"] > 0 for r in layer_rows)
    steps = {(r["model"], r["experts"]): r for r in rows if "model" in r}
    assert list(steps) == [
        ("dense", None), ("dense_hk", None), ("peer", 256), ("naive", 256), ("peer", 1024)
    ]  # fmt: skip
    assert steps[("dense", None)]["ratio"] == 1.0 and steps[("naive", 256)]["vs_naive"] == 1.0
    assert steps[("peer", 1024)]["vs_naive"] is None
    peer = steps[("peer", 1024)]
    assert peer["tps"] == pytest.approx(32 / (peer["ms"] / 1e3)) and peer["step_peak_gib"] > 0


SMALL = ["--models", "nano", "--steps", "1", "--warmup", "1", "--repeats", "1"]
SMALL += ["--batch-size", "2", "--seq-len", "16", "--d-models", "32", "--experts", "16"]
SMALL += ["--tokens", "16", "--naive-max", "16"]


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps"),
        (["--steps", "-3"], "--steps"),
        (["--warmup", "-1"], "--warmup"),
        (["--repeats", "0"], "--repeats"),
        (["--batch-size", "0"], "--batch-size"),
        (["--seq-len", "-5"], "--seq-len"),
        (["--suite", "altup", "--steps", "0"], "--steps"),
        (["--suite", "altup", "--batch-size", "-1"], "--batch-size"),
        (["--suite", "peer", "--tokens", "0"], "--tokens"),
        (["--suite", "peer", "--repeats", "0"], "--repeats"),
        (["--suite", "peer", "--naive-max", "-1"], "--naive-max"),
        (["--suite", "peer", "--experts", "0,16"], "--experts"),
        (["--suite", "peer", "--experts", "16,4"], "k = 16"),
        (["--device", "tpu"], "--device"),
        (["--device", "cuda:x"], "--device"),
        (["--models", " , "], "--models"),
        (["--models", "nano,gigantic"], "unknown model preset"),
        (["--suite", "quick"], "--suite"),
    ],
)
def test_bad_bench_options_are_one_line(
    altup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    """Bad options are refused before anything runs: exit 2, one `error:` line, no table,
    no file written."""
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    result = altup("bench", *SMALL, *args)
    assert result.code == 2 and message in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == "" and _tree(tmp_path) == before


def test_bench_on_cuda_without_a_gpu_is_one_line(
    altup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for suite in ("lightning", "altup"):
        result = altup("bench", *SMALL, "--suite", suite, "--device", "cuda")
        assert result.code == 2 and "no CUDA GPU" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert not any(tmp_path.iterdir())
