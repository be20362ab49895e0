"""`altup bench --suite lightning`: training-step time and peak memory, Lightning vs a bare
PyTorch loop.

Both paths train the same model from the same initial weights on the same batches with the
same optimizer, schedule and clipping; the bare loop is the reference. Measurements
alternate between the two (A B, B A, …) and the median is reported, since a shared machine
drifts. Peak memory covers the whole footprint of training (parameters, gradients,
optimizer state, activations) from before the model is built (`measure.PeakMemory`).
The bare loop here is also the one the altup suite times.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from altup_cli.bench.measure import PeakMemory, clock, interleave, resolve_device
from altup_cli.console import console, print_table
from altup_cli.models import ModelConfig, TransformerLM, parameter_counts
from altup_cli.training.lm_module import LanguageModelModule, lm_loss
from altup_cli.training.optim import build_optimizer, dense_parameters
from altup_cli.training.schedules import warmup_cosine

if TYPE_CHECKING:
    from altup_cli.bench import BenchOptions
    from altup_cli.config import Settings

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
    """The model of conf/model/<name>.yaml at this vocabulary, long enough for `seq_len`."""
    from altup_cli.config import model_preset

    values = model_preset(name)
    values.update(vocab_size=vocab_size, max_seq_len=max(seq_len, values["max_seq_len"]))
    return ModelConfig.from_dict(values)


def random_batches(vocab_size: int, batch_size: int, seq_len: int, n: int) -> list[torch.Tensor]:
    """The same `n` batches of token ids for every model timed in one run."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab_size, (batch_size, seq_len + 1), generator=g) for _ in range(n)]


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
    memory = PeakMemory(device)
    memory.start()
    trainer = BareTrainer(cfg, len(batches), device, compile)
    losses, start = [], 0.0
    for step, batch in enumerate(batches):
        if step == warmup:
            start = clock(device)
        losses.append(trainer.step(batch))
    elapsed = clock(device) - start
    return Measurement(elapsed / (len(batches) - warmup), memory.peak(), losses)


def bench_settings(batch_size: int, seq_len: int, steps: int) -> Settings:
    """The default run's settings with the bare loop's optimizer (`OPTIM`) and this shape:
    what `LanguageModelModule` reads of a run."""
    from altup_cli.config import compose_config, validate

    overrides = [f"optim.{k}={'null' if v is None else v}" for k, v in OPTIM.items()]
    overrides += [f"data.seq_len={seq_len}", f"data.batch_size={batch_size}"]
    overrides += [f"trainer.max_steps={steps}", "run.compile=false"]
    return validate(compose_config(overrides))


def lightning_loop(
    cfg: ModelConfig, batches: list[torch.Tensor], warmup: int, device: torch.device
) -> Measurement:
    """The same training through `LanguageModelModule` and `lightning.Trainer` (its
    settings composed before the memory baseline)."""
    import lightning as L
    from torch.utils.data import DataLoader

    settings = bench_settings(batches[0].shape[0], batches[0].shape[1] - 1, len(batches))
    memory = PeakMemory(device)
    memory.start()
    times: dict[str, float] = {}
    losses: list[float] = []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
            if trainer.global_step == warmup:
                times["start"] = clock(device)

        def on_train_batch_end(
            self, trainer: L.Trainer, module: Any, outputs: Any, *_: Any
        ) -> None:
            losses.append(float(outputs["loss"]))
            if trainer.global_step == len(batches):
                times["end"] = clock(device)

    torch.manual_seed(0)
    module = LanguageModelModule(settings, cfg)
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


def run(options: BenchOptions) -> None:
    o = options
    run_benchmark(o.presets, o.steps, o.warmup, o.repeats, o.batch_size, o.seq_len, o.device)


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
        batches = random_batches(cfg.vocab_size, batch_size, seq_len, warmup + steps)
        console.print(
            f"[dim]{preset}: {repeats} × (bare, lightning) × {warmup}+{steps} steps[/dim]"
        )
        loops = {"bare": bare_loop, "lightning": lightning_loop}
        args = (cfg, batches, warmup, device)
        calls = {n: (lambda _r, f=f, a=args: f(*a)) for n, f in loops.items()}
        rows.append(_row(preset, cfg, interleave(calls, repeats), batch_size * seq_len))
    print_table(
        f"Lightning step vs bare PyTorch loop — {device}, batch {batch_size}×{seq_len}",
        COLUMNS,
        rows,
    )
    return rows


def _row(
    preset: str, cfg: ModelConfig, results: dict[str, list[Measurement]], tokens: int
) -> dict[str, Any]:
    """One table row: medians of the repetitions, Lightning relative to the bare loop."""
    bare = statistics.median(m.seconds_per_step for m in results["bare"])
    lit = statistics.median(m.seconds_per_step for m in results["lightning"])
    bare_mem = statistics.median(m.peak_bytes for m in results["bare"])
    lit_mem = statistics.median(m.peak_bytes for m in results["lightning"])
    # Same math, but CPU BLAS kernels may round differently with buffer alignment.
    loss_gap = max(
        abs(a - b)
        for a, b in zip(results["bare"][0].losses, results["lightning"][0].losses, strict=True)
    )
    return {
        "preset": preset,
        "parameters": parameter_counts(cfg)["total"],
        "bare_ms": bare * 1e3,
        "lightning_ms": lit * 1e3,
        "time_ratio": lit / bare,
        "bare_peak_mib": bare_mem / 2**20,
        "lightning_peak_mib": lit_mem / 2**20,
        "memory_ratio": lit_mem / bare_mem if bare_mem else float("nan"),
        "tokens_per_s": tokens / lit,
        "max_loss_gap": loss_gap,
    }


COLUMNS = {
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
}
