"""Callbacks: plain progress lines for non-terminals, and the run's own token/s accounting."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch

from altup_cli.models.product_keys import ExpertUsage

log = logging.getLogger("altup")


class TrainingStats(L.Callback):
    """Tokens seen and tokens/s over training steps only (validation time excluded)."""

    def __init__(self, tokens_per_micro_batch: int) -> None:
        self.tokens_per_micro_batch = tokens_per_micro_batch
        self.tokens = 0
        self.batches = 0
        self.step_seconds = 0.0
        self.last_train_loss: float | None = None
        self._t0 = 0.0

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *_: Any
    ) -> None:
        self.step_seconds += time.perf_counter() - self._t0
        self.tokens += self.tokens_per_micro_batch * trainer.world_size
        self.batches += 1
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.last_train_loss = float(loss.detach())

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.step_seconds if self.step_seconds else 0.0


class LineProgress(L.Callback):
    """One log line every `every` steps, for logs that are not a terminal (CI, SLURM)."""

    def __init__(self, every: int, stats: TrainingStats) -> None:
        self.every, self.stats = every, stats

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and step % self.every == 0 and step > 0:
            metrics = trainer.callback_metrics
            loss = metrics.get("train/loss")
            lr = trainer.optimizers[0].param_groups[0]["lr"]
            text = f"step {step}/{trainer.max_steps}"
            if loss is not None:
                text += f"  loss {float(loss):.4f}"
            text += f"  lr {lr:.2e}  {self.stats.tokens_per_second:,.0f} tok/s"
            log.info(text)

    def on_validation_end(self, trainer: L.Trainer, *_: Any) -> None:
        val = trainer.callback_metrics.get("val/loss")
        if trainer.is_global_zero and val is not None and not trainer.sanity_checking:
            log.info(f"step {trainer.global_step}: val/loss {float(val):.4f}")


class ValidateAtEnd(L.Callback):
    """Validate (and so checkpoint) after the final step even when `val_check_interval`
    does not divide `max_steps`: asking the loop to stop makes Lightning validate first."""

    def on_train_batch_end(self, trainer: L.Trainer, *_: Any) -> None:
        if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
            trainer.should_stop = True


class AlignLogStepOnResume(L.Callback):
    """A checkpoint written by mid-epoch validation stores the logging step counter one
    behind `global_step` (Lightning bumps it after validation), so resumed metrics would
    be logged one step early. Realign it with the optimizer step count."""

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step


class ExpertUsageLogger(L.Callback):
    """Every `every` steps, log each PEER/PKM layer's expert usage and unevenness (PEER
    Table 2) over the batches since the last log, summed over ranks, then reset."""

    def __init__(self, every: int) -> None:
        self.every, self.logged_step = every, -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every or step == self.logged_step:
            return
        self.logged_step = step
        model = pl_module.model
        for usage in model.modules():
            if isinstance(usage, ExpertUsage) and trainer.world_size > 1:
                usage.totals.copy_(trainer.strategy.reduce(usage.totals, reduce_op="sum"))
        metrics = {
            f"experts/{layer}/{name}": value
            for layer, stats in model.expert_usage().items()
            for name, value in stats.items()
        }
        if metrics:
            pl_module.log_dict(metrics, rank_zero_only=True)
        model.reset_expert_usage()
