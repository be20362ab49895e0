"""`altup bench --suite peer`: our PEER layer against the public reference implementation
(PEER-pytorch, `pip install 'altup[bench]'`), its naive oracle and dense FFNs, in one run.

The layers and the matched settings are in `peer_layers`; the reference holds a copy of
our weights. Layer: forward + backward on `tokens` tokens for each d_model and N, the
median of interleaved repetitions (each kind in turn, the order reversing, so drift hits
all alike); PEER's step includes turning its factored table gradients into rows, as its
optimizer does. Peak RSS is that of a fresh process running the layer alone (the whole
process). Full step (`peer_step`): a 4-layer model with the layer in its middle, each
expert model in its own block interleaved with the two dense models. Every ratio is
between rows measured in this run; nothing is compared with another machine's figures.
CPU only; its modules import torch and the models alone (no Lightning, Hydra or W&B).
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

import torch

from altup_cli.bench import int_list, measure
from altup_cli.bench.peer_layers import (
    D_KEY,
    HEADS,
    TOPK,
    layer_modules,
    layer_step,
    peak_rss_gib,
    reference_available,
)
from altup_cli.bench.peer_step import (
    DENSE_STEP,
    MIDDLE,
    Block,
    step_peak_gib,
    training_step_times,
)
from altup_cli.errors import UserError

if TYPE_CHECKING:
    from altup_cli.bench import BenchOptions

# The spec's targets, as ratios to the reference (here: measured beside it, at d = 512).
TARGET_SPEEDUP = {256**2: 3.0, 1024**2: 5.0}
TARGET_RSS = 0.5


def check_experts(roots: list[int]) -> None:
    """PEER retrieves k keys from each of its two √N-row sub-key tables: √N ≥ k."""
    if min(roots) < TOPK:
        raise UserError(f"--experts: every √N must be at least k = {TOPK}, got {min(roots)}")


def layer_times(
    kinds: list[str], d_model: int, num_experts: int, tokens: int, repeats: int
) -> dict[str, float]:
    """Median seconds per forward + backward of each kind, interleaved."""
    modules = layer_modules(kinds, d_model, num_experts)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, d_model, generator=g).requires_grad_()
    grad = torch.randn(tokens, d_model, generator=g)

    def step(kind: str) -> Any:
        return lambda _r: measure.timed(lambda: layer_step(kind, modules[kind], x, grad))[0]

    times = measure.interleave({k: step(k) for k in kinds}, repeats, warmup=1)
    return {k: statistics.median(v) for k, v in times.items()}


def layer_kinds(num_experts: int, naive_max: int, reference: bool) -> list[str]:
    return (
        ["peer"]
        + (["reference"] if reference else [])
        + (["naive"] if num_experts <= naive_max else [])
        + ["dense_4d", "dense_hk"]
    )


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def layer_row(
    kind: str, d_model: int, num_experts: int, tokens: int,
    times: dict[str, float], peaks: dict[str, float],
) -> dict[str, Any]:  # fmt: skip
    """One table row from the times and peaks of one (d, N): speed-ups over the reference
    and the naive oracle for our PEER rows, time relative to the dense 4d layer."""
    t, ours = times[kind], kind == "peer"
    return {
        "d_model": d_model,
        "experts": None if kind.startswith("dense") else num_experts,
        "kind": kind,
        "tokens_per_s": tokens / t,
        "peak_gib": peaks[kind],
        "time_vs_dense_4d": t / times["dense_4d"],
        "speedup_vs_reference": _ratio(times.get("reference"), t) if ours else None,
        "rss_vs_reference": _ratio(peaks[kind], peaks.get("reference")) if ours else None,
        "speedup_vs_naive": _ratio(times.get("naive"), t) if ours else None,
    }


def layer_rows(
    d_models: list[int], experts: list[int], tokens: int, repeats: int, naive_max: int,
    reference: bool,
) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for d in d_models:
        for n in experts:
            kinds = layer_kinds(n, naive_max, reference)
            times = layer_times(kinds, d, n, tokens, repeats)
            shown = [k for k in kinds if not k.startswith("dense") or n == experts[0]]
            peaks = {k: peak_rss_gib(k, d, n, tokens) for k in shown}  # dense: once per d
            rows += [layer_row(k, d, n, tokens, times, peaks) for k in shown]
    return rows


def step_table(
    blocks: dict[tuple[str, int | None], Block], tokens_per_step: int
) -> list[dict[str, Any]]:
    """Rows: the dense models over all blocks, then each expert model with its time
    relative to the dense model of its own block (drift between blocks cancels), and our
    PEER's speed-up over the reference as the ratio of those relative times."""
    median = statistics.median
    pooled = {k: [t for b in blocks.values() for t in b[k]] for k in DENSE_STEP}
    dense = median(pooled["dense"])
    rows = [_step_row(k, None, median(v), dense, tokens_per_step) for k, v in pooled.items()]
    for (kind, n), block in blocks.items():
        rows.append(
            _step_row(kind, n, median(block[kind]), median(block["dense"]), tokens_per_step)
        )
    relative = {(r["model"], r["experts"]): r["ratio"] for r in rows}
    for row in rows:
        if row["model"] == "peer":
            reference = relative.get(("reference", row["experts"]))
            row["speedup_vs_reference"] = _ratio(reference, row["ratio"])
    return rows


def _step_row(
    kind: str, n: int | None, seconds: float, dense: float, tokens: int
) -> dict[str, Any]:
    return {
        "model": kind, "experts": n, "ms": seconds * 1e3, "tps": tokens / seconds,
        "ratio": seconds / dense, "speedup_vs_reference": None, "tokens_per_step": tokens,
    }  # fmt: skip


def step_rows(
    d_model: int, experts: list[int], batch: int, seq_len: int, repeats: int, reference: bool
) -> list[dict[str, Any]]:
    blocks = training_step_times(d_model, experts, batch, seq_len, repeats, reference)
    rows = step_table(blocks, batch * seq_len)
    for row in rows:
        row["d_model"] = d_model
        row["step_peak_gib"] = step_peak_gib(
            row["model"], d_model, row["experts"] or 0, batch, seq_len
        )
    return rows


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def _target(row: dict[str, Any]) -> str:
    """The spec's targets (speed-up, RSS ratio to the reference) at d = 512, against the
    reference measured in this run."""
    n, speed, rss = row["experts"], row["speedup_vs_reference"], row["rss_vs_reference"]
    if row["kind"] != "peer" or row["d_model"] != 512 or n not in TARGET_SPEEDUP or not speed:
        return ""
    met = speed >= TARGET_SPEEDUP[n] and rss <= TARGET_RSS
    return f"≥{TARGET_SPEEDUP[n]:.0f}×, ≤{TARGET_RSS}×: {'met' if met else 'MISSED'}"


LAYER_COLUMNS = {
    "d": lambda r: str(r["d_model"]),
    "N": lambda r: f"{r['experts']:,}" if r["experts"] else "-",
    "layer": lambda r: r["kind"],
    "tok/s": lambda r: f"{r['tokens_per_s']:,.0f}",
    "× reference": lambda r: _fmt(r["speedup_vs_reference"]),
    "RSS / reference": lambda r: _fmt(r["rss_vs_reference"]),
    "× naive": lambda r: _fmt(r["speedup_vs_naive"]),
    "time / dense 4d": lambda r: f"{r['time_vs_dense_4d']:.2f}",
    "peak RSS GiB": lambda r: f"{r['peak_gib']:.2f}",
    "spec target (this run)": _target,
}
STEP_COLUMNS = {
    f"FFN in layer {MIDDLE}": lambda r: r["model"],
    "N": lambda r: f"{r['experts']:,}" if r["experts"] else "-",
    "ms/step": lambda r: f"{r['ms']:.0f}",
    "tok/s": lambda r: f"{r['tps']:,.0f}",
    "× reference": lambda r: _fmt(r["speedup_vs_reference"]),
    "time / dense 4d": lambda r: f"{r['ratio']:.2f}",
    "peak RSS GiB": lambda r: f"{r['step_peak_gib']:.2f}",
}


def run(options: BenchOptions) -> None:
    """The peer suite from the `altup bench` options: its full step takes 4 sequences
    unless `--batch-size` is given."""
    widths = int_list(options.d_models, "--d-models")
    roots = int_list(options.experts, "--experts")
    check_experts(roots)
    batch = options.batch_size if "--batch-size" in options.given else 4
    o = options
    run_peer_benchmark(widths, roots, o.tokens, o.repeats, o.naive_max, batch, o.seq_len)


def run_peer_benchmark(
    d_models: list[int],
    roots: list[int],
    tokens: int,
    repeats: int,
    naive_max_root: int,
    train_batch: int,
    train_seq: int,
) -> list[dict[str, Any]]:
    from altup_cli.console import console, print_table

    experts, reference = [r * r for r in roots], reference_available()
    if not reference:
        message = "PEER-pytorch is not installed (pip install 'altup[bench]'): no reference rows"
        console.print(message, markup=False, highlight=False, soft_wrap=True)
    console.print(
        f"[dim]PEER layer fwd+bwd on the CPU: h={HEADS} k={TOPK} d_key={D_KEY} per-head keys, "
        f"no query BN, {tokens} tokens, {torch.get_num_threads()} threads, median of "
        f"{repeats} interleaved[/dim]"
    )
    rows = layer_rows(d_models, experts, tokens, repeats, naive_max_root**2, reference)
    print_table("PEER layer, forward + backward (every ratio from this run)", LAYER_COLUMNS, rows)
    for d in d_models:
        srows = step_rows(d, experts, train_batch, train_seq, repeats, reference)
        print_table(
            f"Full training step (fwd, bwd, clip, optimizer), 4 layers, d={d}, layer "
            f"{MIDDLE}'s FFN varied, batch {train_batch}×{train_seq}",
            STEP_COLUMNS,
            srows,
        )
        rows += srows
    return rows
