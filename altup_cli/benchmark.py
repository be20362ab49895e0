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

from altup_cli.config import conf_dir
from altup_cli.console import console, print_table
from altup_cli.errors import UserError
from altup_cli.models.counting import parameter_counts
from altup_cli.models.transformer import ModelConfig, TransformerLM
from altup_cli.training.lm_module import (
    LanguageModelModule,
    lm_loss,
    warmup_cosine,
)
from altup_cli.training.optim import build_optimizer, dense_parameters

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


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU; `cuda` needs a GPU."""
    if name not in DEVICES:
        raise UserError(f"--device must be {', '.join(DEVICES)}, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is available here (use auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def check_options(
    suite: str, presets: list[str], counts: dict[str, int], warmup: int, device: str
) -> None:
    """Refuse bad `altup bench` options before anything runs: `counts` (option → value)
    must be positive, `--warmup` at least 0, the device one there is, and the presets
    of the lightning and altup suites known."""
    for option, value in counts.items():
        if value < 1:
            raise UserError(f"{option} must be a positive integer, got {value}")
    if warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {warmup}")
    resolve_device(device)
    if suite in ("lightning", "altup"):
        if not presets:
            raise UserError("--models must name at least one model preset")
        for preset in presets:
            preset_config(preset)


SUITES = ("lightning", "altup", "peer", "growth")
_TIMING = {"--steps", "--warmup", "--batch-size", "--seq-len", "--device"}
# The options each suite uses; any other given on the command line is refused.
SUITE_OPTIONS = {
    "lightning": _TIMING | {"--models", "--repeats"},
    "altup": _TIMING | {"--models", "--compile"},
    "peer": {"--repeats", "--batch-size", "--seq-len", "--device"}
    | {"--d-models", "--experts", "--tokens", "--naive-max"},
    "growth": set(),
}


def given_options(ctx: Any) -> set[str]:
    """The options of a click/typer context that were given (on the command line or by
    environment), not left at their defaults. Sources are compared by name: typer may
    bring its own copy of click's `ParameterSource`."""
    defaults = (None, "DEFAULT", "DEFAULT_MAP")
    return {
        p.opts[0]
        for p in ctx.command.params
        if p.name and getattr(ctx.get_parameter_source(p.name), "name", None) not in defaults
    }


def check_suite_options(suite: str, given: set[str], device: str) -> None:
    """Refuse, in one line, an option the suite would ignore, and a `--device` naming a
    GPU for the peer suite (its layers and memory probes run on the CPU, `auto` too)."""
    if suite not in SUITE_OPTIONS:
        raise UserError(f"--suite must be {', '.join(SUITES)}, got {suite!r}")
    unused = sorted(given - SUITE_OPTIONS[suite] - {"--suite"})
    if unused:
        uses = ", ".join(sorted(SUITE_OPTIONS[suite])) or "no options"
        raise UserError(f"{unused[0]} does nothing in the {suite} suite (it uses {uses})")
    if suite == "peer" and "--device" in given and resolve_device(device).type != "cpu":
        raise UserError(f"--device {device}: the peer suite runs on the CPU only")


def _random_batches(vocab_size: int, batch_size: int, seq_len: int, n: int) -> list[torch.Tensor]:
    """The same `n` batches of token ids for every model timed in one run."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g) for _ in range(n)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class BareTrainer:
    """The reference training step: forward, backward, clip, AdamW step, schedule step."""

    def __init__(
        self, cfg: ModelConfig, total_steps: int, device: torch.device, compile: bool = False
    ) -> None:
        torch.manual_seed(0)
        self.model = TransformerLM(cfg).to(device)
        if compile:
            self.model.compile()
        o = OPTIM
        self.optimizer = build_optimizer(self.model, o, cfg.ffn.table_lr)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: warmup_cosine(s, o["warmup_steps"], total_steps, o["min_lr_ratio"]),
        )
        self.device = device
        self.autocast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"
        )

    def step(self, batch: torch.Tensor) -> float:
        batch = batch.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)  # before the forward, as Lightning does
        with self.autocast:
            loss = lm_loss(self.model(batch[:, :-1]), batch[:, 1:])
            aux = self.model.aux_loss()
        (loss if aux is None else loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(dense_parameters(self.optimizer), OPTIM["grad_clip"])
        self.optimizer.step()
        self.schedule.step()
        return loss.item()


def bare_loop(
    cfg: ModelConfig,
    batches: list[torch.Tensor],
    warmup: int,
    device: torch.device,
    compile: bool = False,
) -> Measurement:
    """Time the reference step over `batches` after `warmup` steps; peak memory from
    before the model is built."""
    memory = _PeakMemory(device)
    memory.start()
    trainer = BareTrainer(cfg, len(batches), device, compile)
    losses, start = [], 0.0
    for step, batch in enumerate(batches):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        losses.append(trainer.step(batch))
    _sync(device)
    elapsed = time.perf_counter() - start
    return Measurement(elapsed / (len(batches) - warmup), memory.peak(), losses)


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
    names, times = list(cfgs), {name: [] for name in cfgs}
    for step, batch in enumerate(batches):
        for name in names[step % len(names) :] + names[: step % len(names)]:
            _sync(device)
            start = time.perf_counter()
            trainers[name].step(batch)
            _sync(device)
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


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

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*no `val_dataloader`.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    device = resolve_device(device_name)
    rows = []
    for preset in presets:
        cfg = preset_config(preset, seq_len=seq_len)
        batches = _random_batches(cfg.vocab_size, batch_size, seq_len, warmup + steps)
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
    print_table(
        f"Lightning step vs bare PyTorch loop — {device}, batch {batch_size}×{seq_len}",
        {
            "preset": lambda r: r["preset"],
            "params": lambda r: f"{r['parameters']:,}",
            "bare ms/step": lambda r: f"{r['bare_ms']:.1f}",
            "Lightning ms/step": lambda r: f"{r['lightning_ms']:.1f}",
            "time ratio": lambda r: f"{r['time_ratio']:.3f}",
            "bare peak MiB": lambda r: f"{r['bare_peak_mib']:.0f}",
            "Lightning peak MiB": lambda r: f"{r['lightning_peak_mib']:.0f}",
            "mem ratio": lambda r: f"{r['memory_ratio']:.2f}",
            "tok/s": lambda r: f"{r['tokens_per_s']:,.0f}",
            "max |Δloss|": lambda r: f"{r['max_loss_gap']:.1e}",
        },
        rows,
    )
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
    batch_size: int,
    seq_len: int,
    device_name: str,
    compile: bool = False,
) -> list[dict[str, Any]]:
    """Step time (median of interleaved steps) and peak memory of each AltUp variant, as
    ratios to the baseline."""
    from altup_cli.models.counting import training_flops_per_token

    device = resolve_device(device_name)
    variants = altup_variants(preset, seq_len)
    vocab = variants["baseline"].vocab_size
    batches = _random_batches(vocab, batch_size, seq_len, warmup + steps)
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
        {
            "variant": lambda r: r["variant"],
            "params": lambda r: f"{r['parameters']:,}",
            "non-emb params": lambda r: f"{r['non_embedding']:,}",
            "ms/step": lambda r: f"{r['ms_per_step']:.1f}",
            "time ratio": lambda r: f"{r['time_ratio']:.3f}",
            "peak MiB": lambda r: f"{r['peak_mib']:.0f}",
            "mem ratio": lambda r: f"{r['memory_ratio']:.2f}",
            "FLOPs ratio": lambda r: f"{r['flops_ratio']:.3f}",
        },
        rows,
    )
    return rows
