"""Growth around training: a model and its optimizer's state grown together (used by
`altup grow` on checkpoints and by the growth schedule mid-run), and the Lightning callback
that applies `growth.schedule` events, rebuilds the optimizer keeping the moments of old
parameters, and logs each event."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.core.optimizer import LRSchedulerConfig

from altup_cli.growth import GrowthOp, grow
from altup_cli.models.transformer import TransformerLM
from altup_cli.runs.checkpoint import growth_event
from altup_cli.training.optim import group_names, indexed_state_dict, named_state

log = logging.getLogger("altup")


def grow_with_optimizer(
    model: TransformerLM,
    ops: list[GrowthOp],
    optimizer_state: dict[str, Any] | None,
    weight_decay: float,
    seed: int,
    allow_inexact: bool = False,
) -> tuple[TransformerLM, dict[str, Any] | None]:
    """The grown model and its optimizer state dict (same groups, parameters in the grown
    model's order, moments moved with their parameters)."""
    table_lr = model.config.ffn.table_lr
    named = None
    if optimizer_state is not None:
        named = named_state(optimizer_state, group_names(model, weight_decay, table_lr))
    grown, moved = grow(model, ops, named, seed=seed, allow_inexact=allow_inexact)
    if moved is None or optimizer_state is None:
        return grown, None
    groups = group_names(grown, weight_decay, table_lr)
    return grown, indexed_state_dict(moved, groups, optimizer_state)


@torch.no_grad()
def max_logit_change(old: TransformerLM, new: TransformerLM, tokens: torch.Tensor) -> float:
    """max |Δlogits| between two models on `tokens`, in eval mode (BatchNorm statistics
    fixed, expert usage not recorded), fp32 as the models are."""
    modes = old.training, new.training
    old.eval(), new.eval()
    try:
        return float((new(tokens) - old(tokens)).abs().max())
    finally:
        old.train(modes[0]), new.train(modes[1])


class GrowthSchedule(L.Callback):
    """Applies each (step, ops) event at the start of that step (before its first
    micro-batch), on one device: swaps in the grown model, rebuilds optimizer and LR
    scheduler with the moved state, and logs the event."""

    def __init__(self, events: list[tuple[int, list[GrowthOp]]], seed: int) -> None:
        self.events = events
        self.seed = seed

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        while self.events and trainer.global_step >= self.events[0][0]:
            _, ops = self.events.pop(0)
            self._apply(trainer, pl_module, ops, batch)

    def _apply(
        self, trainer: L.Trainer, module: Any, ops: list[GrowthOp], batch: torch.Tensor
    ) -> None:
        step = trainer.global_step
        old_model: TransformerLM = module.model
        old_optimizer = trainer.optimizers[0]
        s = module.settings
        grown, state = grow_with_optimizer(
            old_model, ops, old_optimizer.state_dict(), s.optim.weight_decay, self.seed + step
        )
        change = max_logit_change(old_model, grown, batch[:2, :-1])
        event = growth_event(
            step,
            ops,
            "schedule",
            s.growth.lr_policy,
            s.growth.rewarm_steps or s.optim.warmup_steps,
            change,
            grown.num_parameters(),
        )
        module.grow_to(grown, event)
        self._rebuild_optimizer(trainer, module, state)
        log.info(
            f"growth at step {step}: {' '.join(event['ops'])}  |  "
            f"{old_model.num_parameters():,} → {grown.num_parameters():,} parameters  |  "
            f"max |Δlogits| {change:.2e}"
        )
        for logger in trainer.loggers:
            logger.log_metrics(
                {
                    "growth/event": len(module.growth_history),
                    "growth/parameters": float(grown.num_parameters()),
                    "growth/max_abs_dlogits": change,
                },
                step=step,
            )

    @staticmethod
    def _rebuild_optimizer(trainer: L.Trainer, module: Any, state: dict[str, Any] | None) -> None:
        configured = module.configure_optimizers()
        optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
        if state is not None:
            optimizer.load_state_dict(state)
        old_scheduler = trainer.lr_scheduler_configs[0].scheduler
        scheduler.load_state_dict(old_scheduler.state_dict())  # its step count and base LRs
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] = base * scheduler.lr_lambdas[0](scheduler.last_epoch)  # the policy now
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        trainer.strategy.optimizers = [optimizer]
        trainer.strategy.lr_scheduler_configs = [LRSchedulerConfig(scheduler, interval="step")]
