"""The benchmarks compare like with like. No wall-clock timing is asserted: where a time
ratio is checked, the benchmark's clock is swapped for one that ticks in executed FLOPs
(`tests.flops.flop_clock`), so every ratio is a work ratio known independently — a row
paired with the wrong one, or a model whose work is not what it is said to be, shows."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from altup_cli.bench import measure, peer_layers, peer_step
from altup_cli.bench import peer as peer_suite
from altup_cli.bench.lightning import bare_loop, lightning_loop, preset_config, run_benchmark
from altup_cli.bench.peer_layers import HEADS, TOPK
from altup_cli.errors import UserError
from altup_cli.models import TransformerLM, training_flops_per_token
from tests.helpers.flops import OUTER_PRODUCTS_AS_MULTIPLY_ADDS, count_flops, flop_clock

HAS_REFERENCE = peer_layers.reference_available()
needs_reference = pytest.mark.skipif(not HAS_REFERENCE, reason="PEER-pytorch not installed")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Nothing here is timed by the wall clock, and on a busy machine one thread runs these
    tiny models many times faster than two that wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lightning_and_bare_loops_produce_identical_losses() -> None:
    cfg = preset_config("nano", vocab_size=512, seq_len=16)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 512, (2, 17), generator=g) for _ in range(4)]
    bare = bare_loop(cfg, batches, warmup=1, device=torch.device("cpu"))
    lit = lightning_loop(cfg, batches, warmup=1, device=torch.device("cpu"))
    assert bare.losses == lit.losses and len(bare.losses) == 4
    assert bare.losses[-1] < bare.losses[0]  # it really trains


def test_lightning_suite_times_equal_work_equally() -> None:
    """Lightning's step does the bare loop's matrix products and no others (work ratio 1),
    on a model of the preset's parameter count."""
    with flop_clock(measure):
        (row,) = run_benchmark(
            ["nano"], steps=2, warmup=1, repeats=1, batch_size=2, seq_len=16, device_name="cpu"
        )
    assert row["time_ratio"] == 1.0 and row["max_loss_gap"] < 1e-4
    assert row["parameters"] == TransformerLM(preset_config("nano")).num_parameters()


def test_unknown_preset() -> None:
    with pytest.raises(UserError, match="unknown model preset"):
        preset_config("gigantic")


def test_altup_suite_time_ratios_are_the_flop_ratios_it_prints() -> None:
    """Under a FLOP clock each variant's step-time ratio to the baseline is its executed
    work ratio: it equals the analytic FLOPs ratio in the same row (so rows are paired
    with the baseline, and dense 2d really does > 2.5× the work)."""
    from altup_cli.bench.altup import altup_variants, run_altup_benchmark
    from altup_cli.models.mhc import sinkhorn_flops_per_token

    with flop_clock(measure, OUTER_PRODUCTS_AS_MULTIPLY_ADDS):
        rows = run_altup_benchmark(
            "nano", steps=1, warmup=1, batch_size=2, seq_len=16, device_name="cpu"
        )
    variants = altup_variants("nano", 16)
    assert [r["variant"] for r in rows] == list(variants)
    base = training_flops_per_token(variants["baseline"], 16)["total"]
    for row in rows:
        # mHC's Sinkhorn normalisations are counted (as retrieval's sums are), not clocked
        unseen = 3 * sinkhorn_flops_per_token(variants[row["variant"]]) / base
        expected = row["flops_ratio"] - unseen
        assert row["time_ratio"] == pytest.approx(expected, rel=1e-9), row["variant"]
        model = TransformerLM(variants[row["variant"]])
        assert row["parameters"] == model.num_parameters()
    by_name = {r["variant"]: r for r in rows}
    assert by_name["dense_2d"]["time_ratio"] > 2.5 and by_name["sequence_s2"]["time_ratio"] < 1


def _fake_peak(module: str, probe: str, kind: str, d: int, n: int, *_: int) -> float:
    """A stand-in RSS that differs by layer and grows with N, so a peak paired with
    another N's or another layer's shows in the ratio."""
    scale = {"peer": 1, "reference": 4, "naive": 3, "dense_4d": 0.5, "dense_hk": 0.25}
    return scale.get(kind, 2) * (1 + n) * (10 if probe == "_step_probe" else 1)


def _layer_flops(kind: str, d: int, n: int, tokens: int) -> int:
    module = peer_layers.layer(kind, d, n)
    x = torch.randn(tokens, d).requires_grad_()
    grad = torch.randn(tokens, d)
    return count_flops(lambda: peer_layers.layer_step(kind, module, x, grad)).get_total_flops()


def _step_flops(kind: str, d: int, n: int, batch: int, seq: int) -> int:
    step = peer_step.step_model(kind, d, n)
    ids = peer_step._step_ids(batch, seq)
    return count_flops(lambda: peer_step._train_step(step, ids)).get_total_flops()


@pytest.mark.parametrize("reference", [pytest.param(True, marks=needs_reference), False])
def test_peer_suite_rows_compare_the_right_pairs(
    reference: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """At a toy size under a FLOP clock: one row per (d, N, layer), dense layers once per
    d, the naive oracle only up to its limit, the reference only where installed (else
    one line says so); each ratio is the work (or stand-in RSS) ratio of the right pair,
    counted independently; the dense h·k layer does half the dense 4d layer's work."""
    monkeypatch.setattr(peer_suite, "reference_available", lambda: reference)
    monkeypatch.setattr(measure, "fresh_process_peak_gib", _fake_peak)
    d, tokens, batch, seq = 64, 32, 2, 16
    with flop_clock(measure):
        rows = peer_suite.run_peer_benchmark([d], [16, 32], tokens, 1, 16, batch, seq)
    said = [ln for ln in capsys.readouterr().err.splitlines() if "not installed" in ln]
    assert len(said) == (0 if reference else 1)
    layers = {(r["kind"], r["experts"]): r for r in rows if "kind" in r}
    ref = [("reference", 256), ("reference", 1024)] if reference else []
    expected = [("peer", 256), *ref[:1], ("naive", 256), ("dense_4d", None)]
    assert list(layers) == [*expected, ("dense_hk", None), ("peer", 1024), *ref[1:]]
    assert layers[("dense_hk", None)]["time_vs_dense_4d"] == HEADS * TOPK / (4 * d) == 0.5
    for n in (256, 1024):
        peer = layers[("peer", n)]
        work = _layer_flops("peer", d, n, tokens)
        assert peer["time_vs_dense_4d"] == work / _layer_flops("dense_4d", d, n, tokens)
        naive = _layer_flops("naive", d, n, tokens) / work if n == 256 else None
        assert peer["speedup_vs_naive"] == naive
        if reference:
            assert peer["speedup_vs_reference"] == _layer_flops("reference", d, n, tokens) / work
            assert peer["rss_vs_reference"] == 0.25
        else:
            assert peer["speedup_vs_reference"] is None is peer["rss_vs_reference"]
    steps = {(r["model"], r["experts"]): r for r in rows if "model" in r}
    kinds = ["peer", "reference"] if reference else ["peer"]
    assert list(steps) == [("dense", None), ("dense_hk", None)] + [
        (k, n) for n in (256, 1024) for k in kinds
    ]
    dense = training_flops_per_token(peer_step.model_config(d, None), seq)["total"]
    narrower = 3 * 4 * d * (4 * d - HEADS * TOPK)  # layer 2's MLP: width h·k, not 4d
    assert steps[("dense_hk", None)]["ratio"] == pytest.approx((dense - narrower) / dense)
    for n in (256, 1024):
        peer = training_flops_per_token(peer_step.model_config(d, n), seq)
        work = (peer["total"] - peer["retrieval"]) / dense  # candidate sums are not seen
        assert steps[("peer", n)]["ratio"] == pytest.approx(work, rel=1e-12)
        if reference:
            ref_work = _step_flops("reference", d, n, batch, seq) / (dense * batch * seq)
            assert steps[("reference", n)]["ratio"] == pytest.approx(ref_work, rel=1e-12)
            assert steps[("peer", n)]["speedup_vs_reference"] == pytest.approx(ref_work / work)
        assert steps[("peer", n)]["step_peak_gib"] == _fake_peak(
            peer_step.__name__, "_step_probe", "peer", d, n
        )
    assert all(r["tokens_per_step"] == batch * seq for r in steps.values())


@needs_reference
def test_the_timed_reference_model_takes_our_first_steps() -> None:
    """The full-step reference (a copy of our weights, fused AdamW over its dense table
    gradients, our groups) and our PEER model (lazy Adam) give the same first two losses
    and the same weights after one step (dense Adam's moments of a row not retrieved stay
    zero, so it does not move): the step benchmark times the same training."""
    from altup_cli.bench.peer_step import MIDDLE, _step_ids, _train_step, step_model

    ours, ref = step_model("peer", 64, 64**2), step_model("reference", 64, 64**2)
    layer, copied = ours.model.blocks[MIDDLE].ffn, ref.model.blocks[MIDDLE].ffn
    pairs = [
        (layer.up, copied.weight_down_embed.weight),
        (layer.down, copied.weight_up_embed.weight),
    ]
    initial = [table.detach().clone() for table, _ in pairs]
    ids = _step_ids(2, 16)
    first = [_train_step(m, ids)[1] for m in (ours, ref)]
    for (table, embed), before in zip(pairs, initial, strict=True):
        still = (table == before).all(-1)  # rows no token retrieved
        assert 0 < int(still.sum()) < len(still) and torch.equal(embed[still], before[still])
        # An Adam step is ~lr = 1e-3 a weight, less where |g| is near ε, which rounding of g
        # can move; a tenth of lr tells a different step from rounding.
        torch.testing.assert_close(embed, table, rtol=0, atol=1e-4)
    theirs = dict(ref.model.named_parameters())
    for name, param in ours.model.named_parameters():
        if f"blocks.{MIDDLE}.ffn" not in name:
            torch.testing.assert_close(theirs[name], param, rtol=0, atol=1e-4)
    second = [_train_step(m, ids)[1] for m in (ours, ref)]
    assert first == pytest.approx(first[:1] * 2, rel=1e-6)
    assert second == pytest.approx(second[:1] * 2, rel=1e-6) and second[0] < first[0]


def test_the_memory_probes_report_a_peak(capsys: pytest.CaptureFixture[str]) -> None:
    """The probes run (the reference's in-process here: they build it from scratch, never
    beside our tables) and a fresh process reports its peak."""
    import json

    kind = "reference" if HAS_REFERENCE else "peer"
    peer_layers._rss_probe(kind, 32, 256, 16)
    peer_step._step_probe(kind, 64, 256, 2, 16)
    peaks = [json.loads(line)["peak_gib"] for line in capsys.readouterr().out.splitlines()]
    peaks.append(peer_layers.peak_rss_gib("dense_hk", 32, 256, 16))
    assert len(peaks) == 3 and all(0 < v < math.inf for v in peaks)


def test_peer_suite_takes_batch_and_sequence_from_the_options(
    altup, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    monkeypatch.setattr(peer_suite, "run_peer_benchmark", lambda *a: calls.append(a))
    assert altup("bench", "--suite", "peer", "--batch-size", "3", "--seq-len", "8").code == 0
    assert altup("bench", "--suite", "peer").code == 0
    assert [c[-2:] for c in calls] == [(3, 8), (4, 256)]


SHAPE = ["--batch-size", "2", "--seq-len", "16"]
SMALL = {
    "lightning": ["--models", "nano", "--steps", "1", "--warmup", "1", "--repeats", "1", *SHAPE],
    "altup": ["--models", "nano", "--steps", "1", "--warmup", "1", *SHAPE],
    "peer": ["--repeats", "1", *SHAPE, "--d-models", "32", "--experts", "16", "--tokens", "16"],
    "growth": [],
}


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize(
    ("suite", "args", "message"),
    [
        ("lightning", ["--steps", "0"], "--steps"),
        ("lightning", ["--steps", "-3"], "--steps"),
        ("lightning", ["--warmup", "-1"], "--warmup"),
        ("lightning", ["--repeats", "0"], "--repeats"),
        ("lightning", ["--batch-size", "0"], "--batch-size"),
        ("lightning", ["--seq-len", "-5"], "--seq-len"),
        ("altup", ["--steps", "0"], "--steps"),
        ("altup", ["--batch-size", "-1"], "--batch-size"),
        ("peer", ["--tokens", "0"], "--tokens"),
        ("peer", ["--repeats", "0"], "--repeats"),
        ("peer", ["--naive-max", "-1"], "--naive-max"),
        ("peer", ["--experts", "0,16"], "--experts"),
        ("peer", ["--experts", "16,4"], "k = 16"),
        ("lightning", ["--device", "tpu"], "--device"),
        ("lightning", ["--device", "cuda:x"], "--device"),
        ("lightning", ["--models", " , "], "--models"),
        ("lightning", ["--models", "nano,gigantic"], "unknown model preset"),
        ("quick", [], "--suite"),
        # options a suite would ignore
        ("peer", ["--steps", "3"], "--steps does nothing in the peer suite"),
        ("peer", ["--warmup", "2"], "--warmup does nothing in the peer suite"),
        ("peer", ["--compile"], "--compile does nothing in the peer suite"),
        ("peer", ["--models", "mini"], "--models does nothing in the peer suite"),
        ("lightning", ["--compile"], "--compile does nothing in the lightning suite"),
        ("lightning", ["--tokens", "64"], "--tokens does nothing in the lightning suite"),
        ("altup", ["--repeats", "2"], "--repeats does nothing in the altup suite"),
        ("altup", ["--experts", "16"], "--experts does nothing in the altup suite"),
        ("growth", ["--steps", "3"], "--steps does nothing in the growth suite"),
        ("growth", ["--device", "cpu"], "--device does nothing in the growth suite"),
    ],
)
def test_bad_bench_options_are_one_line(
    altup,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    suite: str,
    args: list[str],
    message: str,
) -> None:
    """Bad options, and options the suite would ignore, are refused before anything runs:
    exit 2, one `error:` line, no table, no file written."""
    monkeypatch.chdir(tmp_path)
    before = _tree(tmp_path)
    result = altup("bench", "--suite", suite, *SMALL.get(suite, []), *args)
    assert result.code == 2 and message in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.stdout == "" and _tree(tmp_path) == before


def test_bench_on_cuda_without_a_gpu_is_one_line(
    altup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for suite in ("lightning", "altup", "peer"):
        result = altup("bench", "--suite", suite, *SMALL[suite], "--device", "cuda")
        assert result.code == 2 and "no CUDA GPU" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert not any(tmp_path.iterdir())


def test_the_peer_suite_refuses_a_gpu_in_one_line(
    altup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a machine with a GPU, `--device cuda` (or `auto`) would not move the peer suite
    off the CPU: refused rather than ignored."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for device in ("cuda", "auto"):
        result = altup("bench", "--suite", "peer", *SMALL["peer"], "--device", device)
        assert result.code == 2 and "CPU only" in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""


def test_interleaving_changes_the_order_every_round() -> None:
    """Every suite's schedule of variants: warm-up rounds dropped, the first kept round in
    the given order, then reversed every other round, or rotated by one with `rotate`."""
    order: list[tuple[int, str]] = []
    calls = {k: (lambda r, k=k: order.append((r, k)) or (r, k)) for k in "abc"}
    kept = measure.interleave(calls, rounds=2, warmup=1)
    assert "".join(f"{r}{k}" for r, k in order) == "0c0b0a" + "1a1b1c" + "2c2b2a"
    assert kept == {k: [(1, k), (2, k)] for k in "abc"}
    order.clear()
    measure.interleave(calls, rounds=3, rotate=True)
    assert "".join(k for _, k in order) == "abc" + "bca" + "cab"


def test_the_peer_suite_imports_torch_alone() -> None:
    """Its fresh measuring processes import the suite: no Lightning, Hydra, OmegaConf, W&B
    or Typer counts in their peak RSS."""
    import subprocess
    import sys

    heavy = {"lightning", "hydra", "omegaconf", "wandb", "typer"}
    code = (
        "import sys, altup_cli.bench.peer; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {heavy!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_run_suite_takes_the_peer_batch_from_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one entry point: options checked, then the suite run with them (the peer
    suite's full step takes 4 sequences unless --batch-size is given)."""
    from altup_cli.bench import BenchOptions, run_suite

    calls = []
    monkeypatch.setattr(peer_suite, "run_peer_benchmark", lambda *a: calls.append(a))
    options = BenchOptions(
        models="tiny,mini", steps=20, warmup=5, repeats=3, batch_size=16, seq_len=8,
        device="cpu", compile=False, d_models="32", experts="16,32", tokens=64, naive_max=16,
    )  # fmt: skip
    run_suite("peer", options)
    run_suite("peer", replace(options, given=frozenset({"--batch-size"})))
    assert calls == [([32], [16, 32], 64, 3, 16, 4, 8), ([32], [16, 32], 64, 3, 16, 16, 8)]
    with pytest.raises(UserError, match="--steps does nothing in the peer suite"):
        run_suite("peer", replace(options, given=frozenset({"--steps"})))
