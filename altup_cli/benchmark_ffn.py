"""`altup bench --suite peer`: the PEER layer against its naive oracle and dense FFNs.

Forward + backward of one layer on `tokens` tokens (h = 8, k = 16, d_key = 256 as in the
spec's reference measurements), for each d_model and N: tokens/s as the median of
interleaved repetitions (ours, naive, dense 4d, dense h·k in turn, so drift hits all
alike), and peak RSS of a fresh process running that layer alone — the whole process, as
the spec's reference figures are. Then a full training step (forward, backward, clip,
optimizer) of a small model with PEER in its middle layer against the dense model.
Importable with torch alone (no Hydra/W&B), so it runs on a bare GPU machine.
"""

from __future__ import annotations

import gc
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from altup_cli.errors import UserError
from altup_cli.models.feedforward import MLP, FFNConfig
from altup_cli.models.peer import PEER
from altup_cli.models.row_gradients import flat_terms, row_chunks
from altup_cli.models.transformer import ModelConfig, TransformerLM
from altup_cli.training.optim import ROW_CHUNK, build_optimizer, dense_parameters

HEADS, TOPK, D_KEY = 8, 16, 256
# The common open-source implementation on a 2-core CPU, d = 512 (spec): N → (tok/s, GiB).
REFERENCE = {128**2: (938, 1.2), 256**2: (823, 1.4), 512**2: (592, 2.9), 1024**2: (182, 8.9)}
TARGET_SPEEDUP = {256**2: 3.0, 1024**2: 5.0}
OPTIM = {"lr": 1e-3, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}


def check_experts(roots: list[int]) -> None:
    """PEER retrieves k keys from each of its two √N-row sub-key tables: √N ≥ k."""
    if min(roots) < TOPK:
        raise UserError(f"--experts: every √N must be at least k = {TOPK}, got {min(roots)}")


def layer(kind: str, d_model: int, num_experts: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind in ("peer", "naive"):
        return PEER(d_model, num_experts, HEADS, TOPK, D_KEY).train()
    width = 4 * d_model if kind == "dense_4d" else HEADS * TOPK
    return MLP(d_model, width)


def _forward(kind: str, module: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return module.forward_naive if kind == "naive" else module  # type: ignore[return-value]


def layer_step(kind: str, module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """Forward and backward; for PEER also every gradient row of both tables, computed
    chunk by chunk as the optimizer does (and dropped), so the work compared with the
    naive layer's dense table gradients is the same."""
    module.zero_grad(set_to_none=True)
    _forward(kind, module)(x).backward(grad)
    if kind == "peer":
        for table in (module.up, module.down):
            for _rows in row_chunks(*flat_terms(table), ROW_CHUNK):
                pass


def layer_times(
    kinds: list[str], d_model: int, num_experts: int, tokens: int, repeats: int
) -> dict[str, float]:
    """Median seconds per forward + backward of each kind, interleaved."""
    modules = {k: layer(k, d_model, num_experts) for k in kinds if k != "naive"}
    if "naive" in kinds:
        modules["naive"] = modules.get("peer") or layer("naive", d_model, num_experts)
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
    """Peak RSS of a fresh process that builds the layer and runs two steps (PEER's
    factored table gradients are turned into rows as in `layer_step`)."""
    return _fresh_process_peak("_rss_probe", kind, d_model, num_experts, tokens)


def _rss_probe(kind: str, d_model: int, num_experts: int, tokens: int) -> None:
    module = layer(kind, d_model, num_experts)
    x = torch.randn(tokens, d_model).requires_grad_()
    grad = torch.randn(tokens, d_model)
    for _ in range(2):
        layer_step(kind, module, x, grad)
    print(json.dumps({"peak_gib": _vm_hwm() / 2**30}))


def layer_rows(
    d_models: list[int], experts: list[int], tokens: int, repeats: int, naive_max: int
) -> list[dict[str, Any]]:
    rows = []
    for d in d_models:
        for n in experts:
            kinds = ["peer", "dense_4d", "dense_hk"] + (["naive"] if n <= naive_max else [])
            times = layer_times(kinds, d, n, tokens, repeats)
            for kind in kinds:
                if kind.startswith("dense") and n != experts[0]:
                    continue  # dense layers do not depend on N: one row per d
                rows.append(
                    {
                        "d_model": d,
                        "experts": n if not kind.startswith("dense") else None,
                        "kind": kind,
                        "tokens_per_s": tokens / times[kind],
                        "peak_gib": peak_rss_gib(kind, d, n, tokens),
                        "vs_dense_4d": times["dense_4d"] / times[kind],
                        "vs_naive": times["naive"] / times[kind] if "naive" in times else None,
                    }
                )
    return rows


def model_config(d_model: int, num_experts: int | None) -> ModelConfig:
    ffn = (
        FFNConfig(
            kind="peer",
            num_experts=num_experts,
            heads=HEADS,
            topk=TOPK,
            d_key=D_KEY,
            layers="middle",
        )
        if num_experts
        else FFNConfig()
    )
    layers = 4
    return ModelConfig(
        vocab_size=8192, d_model=d_model, n_layers=layers, n_heads=d_model // 64,
        d_ff=4 * d_model, max_seq_len=256, ffn=ffn,
    )  # fmt: skip


MIDDLE = 2  # the layer PEER (or its stand-in) occupies in the 4-layer step model


def step_model(kind: str, d_model: int, num_experts: int) -> tuple[TransformerLM, Any]:
    """The 4-layer model of the full-step benchmark and its optimizer. Layer `MIDDLE`'s
    FFN is: `dense` a 4d MLP, `dense_hk` an MLP of width h·k (PEER's active neurons),
    `peer` PEER with AdamW + lazy Adam on its tables, `naive` the same PEER run through
    the materialising oracle with plain AdamW over whole tables (what the common
    implementation pays: dense O(N·d) gradients and moments every step)."""
    torch.manual_seed(0)
    peer = kind in ("peer", "naive")
    model = TransformerLM(model_config(d_model, num_experts if peer else None)).train()
    if kind == "dense_hk":
        model.blocks[MIDDLE].ffn = MLP(d_model, HEADS * TOPK)
    if kind == "naive":
        layer_ = model.blocks[MIDDLE].ffn
        layer_.forward = layer_.forward_naive  # type: ignore[method-assign]
        o = OPTIM
        return model, torch.optim.AdamW(
            model.parameters(), lr=o["lr"], betas=(o["beta1"], o["beta2"]), eps=o["eps"],
            weight_decay=o["weight_decay"], fused=True,
        )  # fmt: skip
    return model, build_optimizer(model, OPTIM, 1e-3)


def _step_ids(batch: int, seq_len: int) -> torch.Tensor:
    return torch.randint(0, 8192, (batch, seq_len + 1), generator=torch.Generator().manual_seed(2))


def training_step_times(
    d_model: int, experts: list[int], batch: int, seq_len: int, repeats: int, naive_max: int
) -> dict[tuple[str, int | None], float]:
    """Median seconds per full training step (forward, backward, clip, optimizer step) of
    each kind, interleaved with the two dense models (alive throughout); one expert model
    in memory at a time (at N = 1024², d = 512 PEER holds 12 GiB, the naive one 16)."""
    ids = _step_ids(batch, seq_len)
    dense = {k: step_model(k, d_model, 0) for k in ("dense", "dense_hk")}
    times: dict[tuple[str, int | None], list[float]] = {(k, None): [] for k in dense}
    for n in experts:
        for kind in ("peer", "naive") if n <= naive_max else ("peer",):
            runs = {(k, None): m for k, m in dense.items()} | {
                (kind, n): step_model(kind, d_model, n)
            }
            times[(kind, n)] = []
            for rep in range(repeats + 1):
                for key in runs if rep % 2 else list(runs)[::-1]:
                    seconds = _train_step(*runs[key], ids)
                    if rep:  # the first round warms up
                        times[key].append(seconds)
            del runs
            gc.collect()  # the naive model's forward override is a reference cycle
    return {k: statistics.median(v) for k, v in times.items()}


def step_peak_gib(kind: str, d_model: int, num_experts: int, batch: int, seq_len: int) -> float:
    """Peak RSS of a fresh process that builds the step model and takes two steps."""
    return _fresh_process_peak("_step_probe", kind, d_model, num_experts, batch, seq_len)


def _step_probe(kind: str, d_model: int, num_experts: int, batch: int, seq_len: int) -> None:
    model, opt = step_model(kind, d_model, num_experts)
    ids = _step_ids(batch, seq_len)
    for _ in range(2):
        _train_step(model, opt, ids)
    print(json.dumps({"peak_gib": _vm_hwm() / 2**30}))


def _vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _train_step(model: TransformerLM, opt: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    clipped = dense_parameters(opt) if hasattr(opt, "_lazy_adam") else list(model.parameters())
    torch.nn.utils.clip_grad_norm_(clipped, 1.0)
    opt.step()
    return time.perf_counter() - start


def step_rows(
    d_model: int, experts: list[int], batch: int, seq_len: int, repeats: int, naive_max: int
) -> list[dict[str, Any]]:
    times = training_step_times(d_model, experts, batch, seq_len, repeats, naive_max)
    dense = times[("dense", None)]
    rows = []
    for (kind, n), seconds in times.items():
        naive = times.get(("naive", n))
        rows.append(
            {
                "d_model": d_model, "model": kind, "experts": n, "ms": seconds * 1e3,
                "tps": batch * seq_len / seconds, "ratio": seconds / dense,
                "vs_naive": naive / seconds if naive else None,
                "step_peak_gib": step_peak_gib(kind, d_model, n or 0, batch, seq_len),
            }
        )  # fmt: skip
    return rows


def _target(row: dict[str, Any]) -> str:
    """Speed and memory against the reference figure at d = 512 (where the spec sets one)."""
    n = row["experts"]
    if row["kind"] != "peer" or row["d_model"] != 512 or n not in REFERENCE:
        return ""
    ref_tps, ref_gib = REFERENCE[n]
    speed, memory = row["tokens_per_s"] / ref_tps, row["peak_gib"] / ref_gib
    text = f"{speed:.1f}× ref tok/s, {memory:.2f}× ref RSS"
    if n in TARGET_SPEEDUP:
        met = speed >= TARGET_SPEEDUP[n] and memory <= 0.5
        text += f" (target ≥{TARGET_SPEEDUP[n]:.0f}×, ≤0.5×: {'met' if met else 'MISSED'})"
    return text


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

    experts = [r * r for r in roots]
    console.print(
        f"[dim]PEER layer fwd+bwd: h={HEADS} k={TOPK} d_key={D_KEY}, {tokens} tokens, "
        f"{torch.get_num_threads()} threads, median of {repeats} interleaved[/dim]"
    )
    rows = layer_rows(d_models, experts, tokens, repeats, naive_max_root**2)
    print_table(
        "PEER layer, forward + backward (ratios from one run)",
        {
            "d": lambda r: str(r["d_model"]),
            "N": lambda r: f"{r['experts']:,}" if r["experts"] else "-",
            "layer": lambda r: r["kind"],
            "tok/s": lambda r: f"{r['tokens_per_s']:,.0f}",
            "× naive": lambda r: f"{r['vs_naive']:.2f}" if r["vs_naive"] else "-",
            "time / dense 4d": lambda r: f"{1 / r['vs_dense_4d']:.2f}",
            "peak RSS GiB": lambda r: f"{r['peak_gib']:.2f}",
            "vs reference (spec)": _target,
        },
        rows,
    )
    for d in d_models:
        srows = step_rows(d, experts, train_batch, train_seq, repeats, naive_max_root**2)
        print_table(
            f"Full training step (fwd, bwd, clip, optimizer), 4 layers, d={d}, layer {MIDDLE}'s "
            f"FFN varied, batch {train_batch}×{train_seq}",
            {
                "FFN in layer 2": lambda r: r["model"],
                "N": lambda r: f"{r['experts']:,}" if r["experts"] else "-",
                "ms/step": lambda r: f"{r['ms']:.0f}",
                "tok/s": lambda r: f"{r['tps']:,.0f}",
                "× naive": lambda r: f"{r['vs_naive']:.2f}" if r["vs_naive"] else "-",
                "time / dense 4d": lambda r: f"{r['ratio']:.2f}",
                "peak RSS GiB": lambda r: f"{r['step_peak_gib']:.2f}",
            },
            srows,
        )
        rows += srows
    return rows
