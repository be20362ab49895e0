"""`altup bench`: training-step time and peak memory, Lightning vs a bare PyTorch loop.

Both paths train the same model from the same initial weights on the same batches with the
same optimizer, schedule and clipping; the bare loop is the reference. Measurements
alternate between the two (A B, B A, …) and the median is reported, since a shared machine
drifts. Peak memory covers the whole footprint of training (parameters, gradients,
optimizer state, activations) from before the model is built: on CUDA the allocator's
peak; on CPU the peak resident set size above the level after freed heap memory is handed
back (`malloc_trim`), with Linux `/proc/self/clear_refs` resetting the peak.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from rich.console import Console

from altup_cli.config import conf_dir
from altup_cli.console import console
from altup_cli.models.counting import parameter_counts
from altup_cli.models.transformer import ModelConfig, TransformerLM
from altup_cli.training.lm_module import (
    LanguageModelModule,
    adamw,
    lm_loss,
    warmup_cosine,
)

OPTIM = {
    "lr": 1e-3,
    "min_lr_ratio": 0.1,
    "warmup_steps": 2,
    "schedule_steps": None,
    "weight_decay": 0.1,
    "beta1": 0.9,
    "beta2": 0.95,
    "eps": 1e-8,
    "grad_clip": 1.0,
}


@dataclass
class Measurement:
    seconds_per_step: float
    peak_bytes: int
    losses: list[float]


def preset_config(name: str, vocab_size: int = 8192, seq_len: int = 256) -> ModelConfig:
    path = conf_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        from altup_cli.errors import UserError

        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise UserError(f"unknown model preset {name!r} (known: {known})")
    values: dict[str, Any] = OmegaConf.to_container(OmegaConf.load(path))  # type: ignore[assignment]
    values.update(vocab_size=vocab_size, max_seq_len=max(seq_len, values["max_seq_len"]))
    return ModelConfig.from_dict(values)


class _PeakMemory:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _malloc_trim()
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = _proc_status("VmRSS")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        return max(0, _proc_status("VmHWM") - self.base)


def _malloc_trim() -> None:
    """Return freed heap pages to the OS so RSS counts live memory (glibc only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _proc_status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bare_loop(
    cfg: ModelConfig,
    batches: list[torch.Tensor],
    warmup: int,
    device: torch.device,
    compile: bool = False,
) -> Measurement:
    """The reference: forward, backward, clip, AdamW step, schedule step; nothing else."""
    memory = _PeakMemory(device)
    memory.start()
    torch.manual_seed(0)
    model = TransformerLM(cfg).to(device)
    if compile:
        model.compile()
    o, total = OPTIM, len(batches)
    optimizer = adamw(model, o)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, o["warmup_steps"], total, o["min_lr_ratio"])
    )
    losses, start = [], 0.0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for step, batch in enumerate(batches):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        batch = batch.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)  # before the forward, as Lightning does
        with autocast:
            loss = lm_loss(model(batch[:, :-1]), batch[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"])
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    _sync(device)
    elapsed = time.perf_counter() - start
    return Measurement(elapsed / (len(batches) - warmup), memory.peak(), losses)


def lightning_loop(
    cfg: ModelConfig, batches: list[torch.Tensor], warmup: int, device: torch.device
) -> Measurement:
    """The same training through `LanguageModelModule` and `lightning.Trainer`."""
    import lightning as L
    from torch.utils.data import DataLoader

    memory = _PeakMemory(device)
    memory.start()
    times: dict[str, float] = {}
    losses: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
            if trainer.global_step == warmup:
                _sync(device)
                times["start"] = time.perf_counter()

        def on_train_batch_end(
            self, trainer: L.Trainer, module: Any, outputs: Any, *_: Any
        ) -> None:
            losses.append(float(outputs["loss"]))
            if trainer.global_step == len(batches):
                _sync(device)
                times["end"] = time.perf_counter()

    run_config = {
        "run": {"compile": False},
        "data": {"seq_len": batches[0].shape[1] - 1, "batch_size": batches[0].shape[0]},
        "optim": OPTIM,
        "trainer": {"max_steps": len(batches)},
    }
    torch.manual_seed(0)
    module = LanguageModelModule(run_config, cfg.to_dict())
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
        max_steps=len(batches),
        gradient_clip_val=OPTIM["grad_clip"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[Clock()],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    seconds = (times["end"] - times["start"]) / (len(batches) - warmup)
    return Measurement(seconds, memory.peak(), losses)


def _alternate(
    loops: dict[str, Callable[..., Measurement]], repeats: int, *args: Any
) -> dict[str, list[Measurement]]:
    """Run each loop `repeats` times, alternating the order (A B, B A, …)."""
    results: dict[str, list[Measurement]] = {name: [] for name in loops}
    names = list(loops)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].append(loops[name](*args))
    return results


def run_benchmark(
    presets: list[str],
    steps: int,
    warmup: int,
    repeats: int,
    batch_size: int,
    seq_len: int,
    device_name: str,
) -> list[dict[str, Any]]:
    import logging
    import warnings

    from rich.table import Table

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    rows = []
    for preset in presets:
        cfg = preset_config(preset, seq_len=seq_len)
        g = torch.Generator().manual_seed(1)
        batches = [
            torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=g)
            for _ in range(warmup + steps)
        ]
        console.print(
            f"[dim]{preset}: {repeats} × (bare, lightning) × {warmup}+{steps} steps[/dim]"
        )
        loops = {"bare": bare_loop, "lightning": lightning_loop}
        results = _alternate(loops, repeats, cfg, batches, warmup, device)
        bare = statistics.median(m.seconds_per_step for m in results["bare"])
        lit = statistics.median(m.seconds_per_step for m in results["lightning"])
        bare_mem = statistics.median(m.peak_bytes for m in results["bare"])
        lit_mem = statistics.median(m.peak_bytes for m in results["lightning"])
        # Same math, but CPU BLAS kernels may round differently with buffer alignment.
        loss_gap = max(
            abs(a - b)
            for a, b in zip(results["bare"][0].losses, results["lightning"][0].losses, strict=True)
        )
        rows.append(
            {
                "preset": preset,
                "parameters": parameter_counts(cfg)["total"],
                "bare_ms": bare * 1e3,
                "lightning_ms": lit * 1e3,
                "time_ratio": lit / bare,
                "bare_peak_mib": bare_mem / 2**20,
                "lightning_peak_mib": lit_mem / 2**20,
                "memory_ratio": lit_mem / bare_mem if bare_mem else float("nan"),
                "tokens_per_s": batch_size * seq_len / lit,
                "max_loss_gap": loss_gap,
            }
        )
    title = f"Lightning step vs bare PyTorch loop — {device}, batch {batch_size}×{seq_len}"
    table = Table(title=title)
    for col in (
        "preset",
        "params",
        "bare ms/step",
        "Lightning ms/step",
        "time ratio",
        "bare peak MiB",
        "Lightning peak MiB",
        "mem ratio",
        "tok/s",
        "max |Δloss|",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["preset"],
            f"{r['parameters']:,}",
            f"{r['bare_ms']:.1f}",
            f"{r['lightning_ms']:.1f}",
            f"{r['time_ratio']:.3f}",
            f"{r['bare_peak_mib']:.0f}",
            f"{r['lightning_peak_mib']:.0f}",
            f"{r['memory_ratio']:.2f}",
            f"{r['tokens_per_s']:,.0f}",
            f"{r['max_loss_gap']:.1e}",
        )
    Console(width=max(console.width, 150)).print(table)
    return rows


def altup_variants(preset: str, seq_len: int) -> dict[str, ModelConfig]:
    """The comparison of issue 3: baseline (width d), AltUp K=2, Recycled K=2,
    Sequence-AltUp stride 2, and the dense model of width 2d that AltUp avoids."""
    from dataclasses import replace

    from altup_cli.models.altup import AltUpConfig

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
    }


def run_altup_benchmark(
    preset: str,
    steps: int,
    warmup: int,
    repeats: int,
    batch_size: int,
    seq_len: int,
    device_name: str,
    compile: bool = False,
) -> list[dict[str, Any]]:
    """Step time and peak memory of each AltUp variant as ratios to the baseline."""
    from rich.table import Table

    from altup_cli.models.counting import training_flops_per_token

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if device_name == "auto" else device_name
    )
    variants = altup_variants(preset, seq_len)
    g = torch.Generator().manual_seed(1)
    vocab = variants["baseline"].vocab_size
    batches = [
        torch.randint(0, vocab, (batch_size, seq_len + 1), generator=g)
        for _ in range(warmup + steps)
    ]
    names = list(variants)
    results: dict[str, list[Measurement]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate who goes first
        for name in order:
            console.print(f"[dim]repeat {r + 1}/{repeats}: {name}[/dim]")
            results[name].append(bare_loop(variants[name], batches, warmup, device, compile))
    base_time = statistics.median(m.seconds_per_step for m in results["baseline"])
    base_mem = statistics.median(m.peak_bytes for m in results["baseline"])
    base_flops = training_flops_per_token(variants["baseline"], seq_len)["total"]
    rows = []
    for name in names:
        t = statistics.median(m.seconds_per_step for m in results[name])
        mem = statistics.median(m.peak_bytes for m in results[name])
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
    title = f"AltUp variants vs baseline — {preset}, {device}, batch {batch_size}×{seq_len}" + (
        ", compiled" if compile else ""
    )
    table = Table(title=title)
    for col in (
        "variant",
        "params",
        "non-emb params",
        "ms/step",
        "time ratio",
        "peak MiB",
        "mem ratio",
        "FLOPs ratio",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["variant"],
            f"{r['parameters']:,}",
            f"{r['non_embedding']:,}",
            f"{r['ms_per_step']:.1f}",
            f"{r['time_ratio']:.3f}",
            f"{r['peak_mib']:.0f}",
            f"{r['memory_ratio']:.2f}",
            f"{r['flops_ratio']:.3f}",
        )
    Console(width=max(console.width, 150)).print(table)
    return rows
