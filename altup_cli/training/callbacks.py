"""Callbacks: plain progress lines for non-terminals, the run's own token/s accounting, and
the periodic logs of expert usage (PEER/PKM) and of stream connections (HC, mHC)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import nn

from altup_cli.errors import UserError
from altup_cli.models.product_keys import ExpertUsage
from altup_cli.models.stream import StreamLayer

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


class Diverged(UserError):
    """Training produced a non-finite loss: the run stops, marked `diverged`."""

    exit_code = 3

    def __init__(self, step: int, what: str, value: float, last_good: str | None) -> None:
        self.step, self.what, self.value, self.last_good = step, what, value, last_good
        kept = f"; last finite checkpoint: {last_good}" if last_good else "; no checkpoint kept"
        super().__init__(f"training diverged at step {step} ({what} = {value}){kept}")

    def record(self) -> dict[str, Any]:
        return {"diverged_at_step": self.step, "last_finite_checkpoint": self.last_good}


class DivergenceGuard(L.Callback):
    """Stop on a non-finite loss: after `patience` + 1 consecutive non-finite training
    losses, or at once on a non-finite validation loss. It raises rather than asking the
    loop to stop, since a stopping loop validates and checkpoints the broken weights; the
    checkpoints (callbacks that Lightning runs after this one) keep the last finite state."""

    def __init__(self, patience: int = 0) -> None:
        self.patience, self.bad = patience, 0

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *_: Any
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else math.nan
        self.bad = 0 if math.isfinite(value) else self.bad + 1
        if self.bad > self.patience:
            raise Diverged(trainer.global_step, "train/loss", value, _last_saved(trainer))

    def on_validation_end(self, trainer: L.Trainer, *_: Any) -> None:
        val = trainer.callback_metrics.get("val/loss")
        if val is not None and not math.isfinite(float(val)) and not trainer.sanity_checking:
            raise Diverged(trainer.global_step, "val/loss", float(val), _last_saved(trainer))


def _last_saved(trainer: L.Trainer) -> str | None:
    """The unmonitored (last.ckpt) checkpoint callback's latest file, if it saved one."""
    paths = [cb.best_model_path for cb in trainer.checkpoint_callbacks if cb.monitor is None]
    return next((p for p in paths if p), None)


class AlignLogStepOnResume(L.Callback):
    """Training metrics of the batch that takes global step k → k+1 are logged at step k.
    After a resume Lightning's logging step counter can be one off (a checkpoint written by
    the validation that ends a run stores it one behind, a mid-run one is corrected by
    Lightning's own restart logic), so set it from `global_step` at the first batch, after
    every restore and restart adjustment."""

    def __init__(self) -> None:
        self.aligned = False

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        self.aligned = False

    def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if not self.aligned:
            trainer.fit_loop.epoch_loop._batches_that_stepped = trainer.global_step
            self.aligned = True


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


class StreamStatsLogger(L.Callback):
    """Every `every` steps, log each wrapped layer's named scalars as `streams/<layer>/<name>`:
    a residual-stream variant's `statistics` (Hyper-Connections: the means of A_m, A_r and B
    and the mixing's signal gains, what the mHC paper plots for HC against mHC)."""

    def __init__(self, every: int, statistics: Callable[[nn.Module], Mapping[str, float]]) -> None:
        self.every, self.statistics, self.logged_step = every, statistics, -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        step = trainer.global_step
        if step == 0 or step % self.every or step == self.logged_step:
            return
        self.logged_step = step
        metrics = {
            f"streams/{i}/{name}": value
            for i, layer in enumerate(pl_module.model.blocks)
            if isinstance(layer, StreamLayer)
            for name, value in self.statistics(layer).items()
        }
        if metrics:
            pl_module.log_dict(metrics, rank_zero_only=True)
