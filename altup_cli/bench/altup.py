"""`altup bench --suite altup`: step time and peak memory of the residual-stream variants
as ratios to the baseline, with the analytic FLOPs ratio beside them: AltUp's (issue 3) and
the widened-stream family's (Hyper-Connections ×4 static and dynamic, mHC ×4), whose
stream is n× the activation memory traffic between sub-layers.

Step times are the median of interleaved single steps (the order rotating every step), on
the bare loop of the lightning suite; peak memory is measured one model at a time.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from altup_cli.bench.lightning import BareTrainer, bare_loop, preset_config, random_batches
from altup_cli.bench.measure import interleave, resolve_device, timed
from altup_cli.console import console, print_table
from altup_cli.models import ModelConfig, parameter_counts, training_flops_per_token
from altup_cli.models.config import AltUpConfig

if TYPE_CHECKING:
    from altup_cli.bench import BenchOptions


def altup_variants(preset: str, seq_len: int) -> dict[str, ModelConfig]:
    """The comparison of issue 3: baseline (width d), AltUp K=2, Recycled K=2,
    Sequence-AltUp stride 2, the dense model of width 2d that AltUp avoids; and
    Hyper-Connections ×4 (static, dynamic), mHC ×4 (dynamic, 20 Sinkhorn iterations) and
    Gemma 3n's AltUp (4 streams, coefficient clip 120)."""
    base = preset_config(preset, seq_len=seq_len)
    return {
        "baseline": base,
        "altup_k2": replace(base, altup=AltUpConfig(mode="altup", K=2)),
        "recycled_k2": replace(base, altup=AltUpConfig(mode="recycled", K=2)),
        "sequence_s2": replace(base, altup=AltUpConfig(mode="sequence", stride=2)),
        "dense_2d": replace(
            base,
            d_model=2 * base.d_model,
            d_ff=2 * base.d_ff,
            head_dim=2 * base.head_dim,
            v_head_dim=2 * base.v_head_dim,
        ),
        "hc4": replace(base, altup=AltUpConfig(mode="hc", K=4)),
        "hc4_dynamic": replace(base, altup=AltUpConfig(mode="hc", K=4, dynamic=True)),
        "mhc4": replace(base, altup=AltUpConfig(mode="mhc", K=4, dynamic=True)),
        "gemma3n": replace(base, altup=AltUpConfig(mode="gemma3n", K=4, coef_clip=120.0)),
    }


def interleaved_step_times(
    cfgs: dict[str, ModelConfig],
    batches: list[torch.Tensor],
    warmup: int,
    device: torch.device,
    compile: bool = False,
) -> dict[str, list[float]]:
    """Seconds per step of each model, taking one step of each in turn (the order rotates
    every round), so a slow spell of a shared machine hits every model alike."""
    trainers = {name: BareTrainer(cfg, len(batches), device, compile) for name, cfg in cfgs.items()}

    def step(name: str) -> Any:
        return lambda r: timed(lambda: trainers[name].step(batches[r]), device)[0]

    calls = {name: step(name) for name in cfgs}
    return interleave(calls, len(batches) - warmup, warmup, rotate=True)


def run(options: BenchOptions) -> None:
    o = options
    for preset in o.presets:
        run_altup_benchmark(preset, o.steps, o.warmup, o.batch_size, o.seq_len, o.device, o.compile)


def run_altup_benchmark(
    preset: str,
    steps: int,
    warmup: int,
    batch_size: int,
    seq_len: int,
    device_name: str,
    compile: bool = False,
) -> list[dict[str, Any]]:
    """Step time (median of interleaved steps) and peak memory of each AltUp variant, as
    ratios to the baseline."""
    device = resolve_device(device_name)
    variants = altup_variants(preset, seq_len)
    vocab = variants["baseline"].vocab_size
    batches = random_batches(vocab, batch_size, seq_len, warmup + steps)
    console.print(
        f"[dim]{preset}: {warmup}+{steps} interleaved steps of {len(variants)} models[/dim]"
    )
    times = interleaved_step_times(variants, batches, warmup, device, compile)
    console.print("[dim]peak memory, one model at a time[/dim]")
    peaks = {
        name: bare_loop(cfg, batches[:2], 1, device, compile).peak_bytes
        for name, cfg in variants.items()
    }
    base_time = statistics.median(times["baseline"])
    base_mem = peaks["baseline"]
    base_flops = training_flops_per_token(variants["baseline"], seq_len)["total"]
    rows = []
    for name in variants:
        t, mem = statistics.median(times[name]), peaks[name]
        flops = training_flops_per_token(variants[name], seq_len)["total"]
        counts = parameter_counts(variants[name])
        rows.append(
            {
                "variant": name,
                "parameters": counts["total"],
                "non_embedding": counts["non_embedding"],
                "ms_per_step": t * 1e3,
                "time_ratio": t / base_time,
                "peak_mib": mem / 2**20,
                "memory_ratio": mem / base_mem if base_mem else float("nan"),
                "flops_ratio": flops / base_flops,
            }
        )
    print_table(
        f"AltUp variants vs baseline — {preset}, {device}, batch {batch_size}×{seq_len}"
        + (", compiled" if compile else ""),
        COLUMNS,
        rows,
    )
    return rows


COLUMNS = {
    "variant": lambda r: r["variant"],
    "params": lambda r: f"{r['parameters']:,}",
    "non-emb params": lambda r: f"{r['non_embedding']:,}",
    "ms/step": lambda r: f"{r['ms_per_step']:.1f}",
    "time ratio": lambda r: f"{r['time_ratio']:.3f}",
    "peak MiB": lambda r: f"{r['peak_mib']:.0f}",
    "mem ratio": lambda r: f"{r['memory_ratio']:.2f}",
    "FLOPs ratio": lambda r: f"{r['flops_ratio']:.3f}",
}
