"""`altup bench --suite peer`: our PEER layer against the public reference implementation
(PEER-pytorch, `pip install 'altup[bench]'`), its naive oracle and dense FFNs, in one run.

Settings are the reference's, matched by `reference_peer` (and tested equal to it, output
and gradients, in tests/test_peer_reference.py): h = 8 heads, k = 16 experts per head,
per-head sub-key tables, no query BatchNorm, softmax over each head's k scores, GELU. Our
d_key = 256 is a head's whole query; the reference's `dim_key` is one half of it (128).
The reference holds a copy of our weights.

Layer: forward + backward on `tokens` tokens for each d_model and N, the median of
interleaved repetitions (each kind in turn, the order reversing, so drift hits all alike);
PEER's step includes turning its factored table gradients into rows, as its optimizer
does. Peak RSS is that of a fresh process running the layer alone (the whole process).
Full step: forward, backward, clip and optimizer step of a 4-layer model with the layer in
its middle — ours with AdamW + lazy Adam on its tables, the reference with fused AdamW over
its dense table gradients (same groups: tables undecayed and unclipped, so both take the
same first steps, tested) — each expert model in its own block interleaved with the two
dense models. Every ratio is between rows measured in this run; nothing is compared with
another machine's figures. CPU only; importable with torch alone (no Hydra/W&B).
"""

from __future__ import annotations

import gc
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from altup_cli.errors import UserError
from altup_cli.models.feedforward import MLP, FFNConfig
from altup_cli.models.peer import PEER
from altup_cli.models.row_gradients import flat_terms, row_chunks
from altup_cli.models.transformer import ModelConfig, TransformerLM
from altup_cli.training.optim import ROW_CHUNK, build_optimizer, dense_parameters, no_weight_decay

HEADS, TOPK, D_KEY = 8, 16, 256
MATCHED = {"query_bn": False, "shared_keys": False}  # the reference's retrieval
# The spec's targets, as ratios to the reference (here: measured beside it, at d = 512).
TARGET_SPEEDUP = {256**2: 3.0, 1024**2: 5.0}
TARGET_RSS = 0.5
OPTIM = {"lr": 1e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}
MIDDLE = 2  # the layer PEER (or its stand-in) occupies in the 4-layer step model
DENSE_STEP = ("dense", "dense_hk")


def check_experts(roots: list[int]) -> None:
    """PEER retrieves k keys from each of its two √N-row sub-key tables: √N ≥ k."""
    if min(roots) < TOPK:
        raise UserError(f"--experts: every √N must be at least k = {TOPK}, got {min(roots)}")


def reference_available() -> bool:
    return importlib.util.find_spec("PEER_pytorch") is not None


def reference_query_weight(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Our query rows, ordered (head, half, feature), in the reference's (half, head,
    feature) order."""
    rows, d_in = weight.shape
    return weight.reshape(heads, 2, -1, d_in).transpose(0, 1).reshape(rows, d_in)


def _reference_module(d_model: int, num_experts: int, heads: int, topk: int, d_key: int) -> Any:
    from PEER_pytorch import PEER as ReferencePEER

    return ReferencePEER(
        d_model, heads=heads, num_experts=num_experts, num_experts_per_head=topk,
        dim_key=d_key // 2, non_competing_scores=False,  # softmax over the top k
    )  # fmt: skip


def reference_peer(ours: PEER) -> nn.Module:
    """The reference layer at our settings holding a copy of our weights (its
    `weight_down_embed` multiplies the input: our `up`)."""
    r = ours.retrieval
    if r.query_bn is not None or r.sub_keys.shape[0] != r.heads or ours.activation != "gelu":
        raise ValueError("the reference has per-head keys, no query BN and GELU only")
    ref = _reference_module(r.query.in_features, ours.up.shape[0], r.heads, r.topk, r.d_key)
    ref = ref.to(ours.up.dtype)
    with torch.no_grad():
        ref.to_queries[0].weight.copy_(reference_query_weight(r.query.weight, r.heads))
        ref.keys.copy_(r.sub_keys.permute(0, 2, 1, 3))
        ref.weight_down_embed.weight.copy_(ours.up)
        ref.weight_up_embed.weight.copy_(ours.down)
    return ref.train(ours.training)


def our_peer(d_model: int, num_experts: int) -> PEER:
    torch.manual_seed(0)
    return PEER(d_model, num_experts, HEADS, TOPK, D_KEY, **MATCHED).train()


def layer(kind: str, d_model: int, num_experts: int) -> nn.Module:
    """A fresh layer of `kind` (the reference with its own initial weights)."""
    if kind in ("peer", "naive"):
        return our_peer(d_model, num_experts)
    torch.manual_seed(0)
    if kind == "reference":
        return _reference_module(d_model, num_experts, HEADS, TOPK, D_KEY).train()
    return MLP(d_model, 4 * d_model if kind == "dense_4d" else HEADS * TOPK)


def _forward(kind: str, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if kind == "naive":
        return module.forward_naive  # type: ignore[return-value]
    if kind == "reference":  # it takes (batch, seq, d)
        return lambda x: module(x[None])[0]
    return module


def layer_step(kind: str, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """Forward and backward; for PEER also every gradient row of both tables, computed
    chunk by chunk as the optimizer does (and dropped), so it does the work the others'
    dense table gradients do."""
    module.zero_grad(set_to_none=True)
    _forward(kind, module)(x).backward(grad)
    if kind == "peer":
        for table in (module.up, module.down):
            for _rows in row_chunks(*flat_terms(table), ROW_CHUNK):
                pass


def layer_modules(kinds: list[str], d_model: int, num_experts: int) -> dict[str, nn.Module]:
    """The timed layers: naive is our PEER run through its oracle; the reference holds
    a copy of our PEER's weights."""
    ours = our_peer(d_model, num_experts)
    modules = {k: layer(k, d_model, num_experts) for k in kinds if k.startswith("dense")}
    if "peer" in kinds or "naive" in kinds:
        modules |= {k: ours for k in ("peer", "naive") if k in kinds}
    if "reference" in kinds:
        modules["reference"] = reference_peer(ours)
    return modules


def layer_times(
    kinds: list[str], d_model: int, num_experts: int, tokens: int, repeats: int
) -> dict[str, float]:
    """Median seconds per forward + backward of each kind, interleaved."""
    modules = layer_modules(kinds, d_model, num_experts)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, d_model, generator=g).requires_grad_()
    grad = torch.randn(tokens, d_model, generator=g)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for rep in range(repeats + 1):
        for kind in kinds if rep % 2 else kinds[::-1]:
            start = time.perf_counter()
            layer_step(kind, modules[kind], x, grad)
            if rep:  # the first round warms up
                times[kind].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _fresh_process_peak(probe: str, *args: Any) -> float:
    """Peak RSS (GiB) of a fresh Python process running `probe(*args)` from this module."""
    code = f"from altup_cli.benchmark_ffn import {probe}; {probe}{args!r}"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_gib"]


def peak_rss_gib(kind: str, d_model: int, num_experts: int, tokens: int) -> float:
    """Peak RSS of a fresh process that builds the layer alone and runs two steps."""
    return _fresh_process_peak("_rss_probe", kind, d_model, num_experts, tokens)


def _rss_probe(kind: str, d_model: int, num_experts: int, tokens: int) -> None:
    module = layer(kind, d_model, num_experts)
    x = torch.randn(tokens, d_model).requires_grad_()
    grad = torch.randn(tokens, d_model)
    for _ in range(2):
        layer_step(kind, module, x, grad)
    print(json.dumps({"peak_gib": _vm_hwm() / 2**30}))


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


def model_config(d_model: int, num_experts: int | None) -> ModelConfig:
    ffn = (
        FFNConfig(
            kind="peer", num_experts=num_experts, heads=HEADS, topk=TOPK, d_key=D_KEY,
            layers="middle", **MATCHED,
        )
        if num_experts
        else FFNConfig()
    )  # fmt: skip
    return ModelConfig(
        vocab_size=8192, d_model=d_model, n_layers=4, n_heads=d_model // 64,
        d_ff=4 * d_model, max_seq_len=256, ffn=ffn,
    )  # fmt: skip


@dataclass
class StepModel:
    model: TransformerLM
    optimizer: torch.optim.Optimizer
    clipped: list[torch.Tensor]  # the parameters whose gradient norm is clipped


def step_model(kind: str, d_model: int, num_experts: int, copy: bool = True) -> StepModel:
    """The 4-layer model of the full-step benchmark and its optimizer. Layer `MIDDLE`'s
    FFN is: `dense` a 4d MLP, `dense_hk` an MLP of width h·k (PEER's active neurons),
    `peer` our PEER with AdamW + lazy Adam on its tables, `reference` the reference layer
    (a copy of our PEER's weights if `copy`, else its own) with fused AdamW."""
    torch.manual_seed(0)
    peer = kind == "peer" or (kind == "reference" and copy)
    model = TransformerLM(model_config(d_model, num_experts if peer else None)).train()
    if kind == "dense_hk":
        model.blocks[MIDDLE].ffn = MLP(d_model, HEADS * TOPK)
    if kind == "reference":
        ffn = model.blocks[MIDDLE].ffn
        model.blocks[MIDDLE].ffn = (
            reference_peer(ffn) if copy else layer("reference", d_model, num_experts)
        )
        return _reference_optimizer(model)
    optimizer = build_optimizer(model, OPTIM, OPTIM["lr"])
    return StepModel(model, optimizer, dense_parameters(optimizer))


def _reference_optimizer(model: TransformerLM) -> StepModel:
    """Fused AdamW with our groups: decayed, undecayed, and the tables undecayed (and
    unclipped, as ours are)."""
    ffn = model.blocks[MIDDLE].ffn
    tables = [ffn.weight_down_embed.weight, ffn.weight_up_embed.weight]
    others = [p for p in model.parameters() if all(p is not t for t in tables)]
    o = OPTIM
    groups = [
        {"params": [p for p in others if not no_weight_decay(p)]},
        {"params": [p for p in others if no_weight_decay(p)], "weight_decay": 0.0},
        {"params": tables, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        groups, lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
        weight_decay=o["weight_decay"], fused=True,
    )  # fmt: skip
    return StepModel(model, optimizer, others)


def _step_ids(batch: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, 8192, (batch, seq_len + 1), generator=torch.Generator().manual_seed(2))


def _train_step(step: StepModel, ids: torch.Tensor) -> tuple[float, float]:
    """(seconds, loss) of one forward, backward, clip and optimizer step."""
    start = time.perf_counter()
    step.optimizer.zero_grad(set_to_none=True)
    logits = step.model(ids[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(step.clipped, 1.0)
    step.optimizer.step()
    return time.perf_counter() - start, loss.item()


Block = dict[str, list[float]]


def _timed_block(runs: dict[str, StepModel], ids: torch.Tensor, repeats: int) -> Block:
    """Seconds per step of each model, interleaved (the order reversing each round)."""
    times: Block = {k: [] for k in runs}
    for rep in range(repeats + 1):
        for key in runs if rep % 2 else list(runs)[::-1]:
            seconds, _ = _train_step(runs[key], ids)
            if rep:  # the first round warms up
                times[key].append(seconds)
    return times


def training_step_times(
    d_model: int, experts: list[int], batch: int, seq_len: int, repeats: int, reference: bool
) -> dict[tuple[str, int | None], Block]:
    """Per expert model (kind, N): its block of interleaved step times beside the two
    dense models (alive throughout); one expert model in memory at a time (at N = 1024²,
    d = 512 ours holds 12 GiB, the reference 16)."""
    ids = _step_ids(batch, seq_len)
    dense = {k: step_model(k, d_model, 0) for k in DENSE_STEP}
    blocks = {}
    for n in experts:
        for kind in ("peer", "reference") if reference else ("peer",):
            runs = dense | {kind: step_model(kind, d_model, n)}
            blocks[(kind, n)] = _timed_block(runs, ids, repeats)
            del runs
            gc.collect()
    return blocks


def step_peak_gib(kind: str, d_model: int, num_experts: int, batch: int, seq_len: int) -> float:
    """Peak RSS of a fresh process that builds the step model and takes two steps."""
    return _fresh_process_peak("_step_probe", kind, d_model, num_experts, batch, seq_len)


def _step_probe(kind: str, d_model: int, num_experts: int, batch: int, seq_len: int) -> None:
    step = step_model(kind, d_model, num_experts, copy=False)  # the reference alone
    ids = _step_ids(batch, seq_len)
    for _ in range(2):
        _train_step(step, ids)
    print(json.dumps({"peak_gib": _vm_hwm() / 2**30}))


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


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
