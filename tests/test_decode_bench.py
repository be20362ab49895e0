"""`altup bench --suite decode`, kept tiny: every variant at both batch sizes gets a row,
ratios are to the baseline, the compiled table's rows come out (the compiler stubbed: a
real compile takes minutes on a CPU), and an option the suite does not use is refused."""

from __future__ import annotations

import pytest
import torch

from altup_cli.bench import decode

VARIANTS = [
    "baseline", "altup_k2", "recycled_k2", "sequence_s2", "dense_2d", "hc4", "hc4_dynamic",
    "mhc4", "gemma3n", "peer_middle",
]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_every_variant_and_batch_gets_latencies_as_ratios(monkeypatch) -> None:
    monkeypatch.setattr(decode, "decoder", lambda model, compile=False: model.decode)
    tables = decode.run_decode_benchmark("nano", 6, 3, [1, 2], 1, "cpu", compile=True)
    rows = tables["latency"]
    assert [(r["variant"], r["batch"]) for r in rows] == [(v, b) for b in (1, 2) for v in VARIANTS]
    for r in rows:
        assert min(r["prefill"], r["cached"], r["uncached"]) > 0
        if r["variant"] == "baseline":
            assert r["cached_ratio"] == r["uncached_ratio"] == r["prefill_ratio"] == 1
    assert {(r["variant"], r["batch"]) for r in tables["compile"]} == {
        (v, b) for v in VARIANTS for b in (1, 2)
    }


def test_the_suite_runs_from_the_command_line_and_refuses_what_it_ignores(altup) -> None:
    args = ["bench", "--suite", "decode", "--models", "nano", "--steps", "2", "--seq-len", "4"]
    out = altup(*args, "--batch-size", "2", "--repeats", "1", "--device", "cpu")
    assert out.code == 0, out.stderr
    assert "Decode latency vs baseline" in out.stdout and "peer_middle" in out.stdout
    refused = altup(*args, "--warmup", "2")
    assert refused.code == 2 and refused.stderr.count("\n") == 1
    assert "--warmup does nothing in the decode suite" in refused.stderr
