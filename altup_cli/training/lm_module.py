"""The LightningModule: next-token cross-entropy, AdamW, warmup + cosine, FLOP accounting."""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from altup_cli.config import Settings
from altup_cli.models.config import ModelConfig
from altup_cli.models.counting import training_flops_per_token
from altup_cli.models.row_gradients import is_table
from altup_cli.models.transformer import TransformerLM
from altup_cli.runs.checkpoint import record_run, recorded_config
from altup_cli.training.optim import build_optimizer, dense_parameters
from altup_cli.training.schedules import lm_multiplier
from altup_cli.training.schedules import warmup_cosine as warmup_cosine  # re-export
from altup_cli.training.schedules import with_rewarm as with_rewarm  # re-export


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class LanguageModelModule(L.LightningModule):
    """Trains a `TransformerLM` as `settings` say.

    `composed` is the run's resolved config as plain data, as composed (recipe keys, values
    as written): the module never reads it, it records it (with the growth applied since)
    in checkpoints and as the loggers' hyperparameters, so a resume starts from it. Without
    one (a benchmark, a test) the settings themselves are recorded."""

    def __init__(
        self,
        settings: Settings,
        model_config: ModelConfig,
        composed: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.settings = copy.deepcopy(settings)  # growth appends to its history
        self.composed = asdict(settings) if composed is None else composed
        hparams = {"config": self.composed, "model_config": model_config.to_dict()}
        self.save_hyperparameters(hparams)
        d = settings.data
        self.tokens_per_batch = d.seq_len * d.batch_size
        self.flops_seen = 0.0  # training FLOPs so far (all ranks), across growth events
        self.curve: list[dict[str, float]] = []  # (step, tokens, FLOPs, val loss) points
        self.install_model(TransformerLM(model_config))

    @property
    def growth_history(self) -> list[dict[str, Any]]:
        """Growth events applied to this run so far (from its config, then this session's)."""
        return self.settings.growth.history

    def install_model(self, model: TransformerLM) -> None:
        """Train `model` from now on (at construction, and when growth replaces it)."""
        self.model = model
        self.model_config = model.config
        # PEER/PKM tables keep factored gradients that the optimizer averages over ranks
        # itself (`training.optim`), so DDP leaves them alone.
        self._ddp_params_and_buffers_to_ignore = [
            f"model.{name}" for name, p in model.named_parameters() if is_table(p)
        ]
        if self.settings.run.compile:
            model.compile()  # in place: parameter names and checkpoints are unchanged
        seq_len = self.settings.data.seq_len
        # Read by Lightning's ThroughputMonitor to report FLOP/s and MFU.
        self.flops_per_batch = training_flops_per_token(model.config, seq_len)["total"] * (
            self.tokens_per_batch
        )

    def grow_to(self, grown: TransformerLM, event: dict[str, Any]) -> None:
        """Continue with the grown model, recording the growth event."""
        self.install_model(grown)
        self.growth_history.append(event)

    def on_fit_start(self) -> None:
        # DDP broadcasts rank 0's parameters except the ignored tables: do those here.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for param in self.model.parameters():
                if is_table(param):
                    torch.distributed.broadcast(param.data, src=0)

    def on_train_start(self) -> None:
        self.apply_optim_config()

    def _optimizer(self) -> Any:
        optim = asdict(self.settings.optim)
        return build_optimizer(self.model, optim, self.model_config.ffn.table_lr)

    def apply_optim_config(self) -> None:
        """Set the optimizer's hyperparameters and the schedule's base LRs from the run
        config. A resumed checkpoint restores the ones it was saved with, so without this an
        override such as `optim.lr=…` on `--resume` would be recorded but not applied."""
        optimizer = self.trainer.optimizers[0]
        fresh = self._optimizer()
        for group, new in zip(optimizer.param_groups, fresh.param_groups, strict=True):
            group.update({k: v for k, v in new.items() if k != "params"})
            group["initial_lr"] = new["lr"]
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
            lrs = [base * fn(scheduler.last_epoch) for base, fn in
                   zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)]  # fmt: skip
            for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr
            scheduler._last_lr = lrs  # what get_last_lr() reports (the LR monitor reads the groups)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = lm_loss(self(batch[:, :-1]), batch[:, 1:])
        self.log("train/loss", loss, prog_bar=True)
        self.flops_seen += self.flops_per_batch * self.trainer.world_size
        aux = self.model.aux_loss()
        if aux is not None:  # MoE load balance, already weighted by ffn.balance_weight
            self.log("train/aux_loss", aux)
            return loss + aux
        return loss

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        # Clip the dense parameters' global norm; the sparse expert tables step lazily.
        if gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(dense_parameters(optimizer), gradient_clip_val)

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        loss = lm_loss(self(batch[:, :-1]), batch[:, 1:])
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        val_loss = self.trainer.callback_metrics.get("val/loss")
        if val_loss is not None:
            self.log("val/ppl", torch.exp(val_loss), sync_dist=True)
            self.log("val/cumulative_flops", self.flops_seen, sync_dist=False)
            step = self.trainer.global_step
            world = self.trainer.world_size * self.settings.trainer.accumulate_grad_batches
            point = {"step": step, "tokens": step * self.tokens_per_batch * world}
            self.curve.append({**point, "flops": self.flops_seen, "val_loss": float(val_loss)})

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.settings.optim
        total = o.schedule_steps or self.settings.trainer.max_steps
        optimizer = self._optimizer()
        warmup, min_ratio, history = o.warmup_steps, o.min_lr_ratio, self.growth_history
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lm_multiplier(step, warmup, total, min_ratio, history)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        config = recorded_config(self.composed, self.model_config, self.growth_history)
        record_run(checkpoint, config, self.model_config, self.flops_seen, self.curve)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("altup", {})
        self.flops_seen = float(meta.get("flops_seen", 0.0))
        self.curve = list(meta.get("curve", []))
