"""The LightningModule: next-token cross-entropy, AdamW, warmup + cosine, FLOP accounting."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from altup_cli.models.counting import training_flops_per_token
from altup_cli.models.row_gradients import is_table
from altup_cli.models.transformer import ModelConfig, TransformerLM
from altup_cli.training.optim import build_optimizer, dense_parameters
from altup_cli.training.schedules import warmup_cosine, with_rewarm


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


__all__ = ["LanguageModelModule", "lm_loss", "warmup_cosine", "with_rewarm"]


class LanguageModelModule(L.LightningModule):
    """Trains a `TransformerLM`; `config` is the whole resolved run config (a plain dict)."""

    def __init__(self, config: dict[str, Any], model_config: dict[str, Any]) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.run_config = config
        self.tokens_per_batch = config["data"]["seq_len"] * config["data"]["batch_size"]
        self.flops_seen = 0.0  # training FLOPs so far (all ranks), across growth events
        self.curve: list[dict[str, float]] = []  # (step, tokens, FLOPs, val loss) points
        self.install_model(TransformerLM(ModelConfig.from_dict(model_config)))

    def install_model(self, model: TransformerLM) -> None:
        """Train `model` from now on (at construction, and when growth replaces it)."""
        self.model = model
        self.model_config = model.config
        self.hparams["model_config"] = model.config.to_dict()
        # PEER/PKM tables keep factored gradients that the optimizer averages over ranks
        # itself (`training.optim`), so DDP leaves them alone.
        self._ddp_params_and_buffers_to_ignore = [
            f"model.{name}" for name, p in model.named_parameters() if is_table(p)
        ]
        if self.run_config["run"]["compile"]:
            model.compile()  # in place: parameter names and checkpoints are unchanged
        seq_len = self.run_config["data"]["seq_len"]
        # Read by Lightning's ThroughputMonitor to report FLOP/s and MFU.
        self.flops_per_batch = training_flops_per_token(model.config, seq_len)["total"] * (
            self.tokens_per_batch
        )

    def on_fit_start(self) -> None:
        # DDP broadcasts rank 0's parameters except the ignored tables: do those here.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for param in self.model.parameters():
                if is_table(param):
                    torch.distributed.broadcast(param.data, src=0)

    def on_train_start(self) -> None:
        self.apply_optim_config()

    def apply_optim_config(self) -> None:
        """Set the optimizer's hyperparameters and the schedule's base LRs from the run
        config. A resumed checkpoint restores the ones it was saved with, so without this an
        override such as `optim.lr=…` on `--resume` would be recorded but not applied."""
        optimizer = self.trainer.optimizers[0]
        o, table_lr = self.run_config["optim"], self.model_config.ffn.table_lr
        fresh = build_optimizer(self.model, o, table_lr)
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
            world = self.trainer.world_size * self.run_config["trainer"]["accumulate_grad_batches"]
            point = {"step": step, "tokens": step * self.tokens_per_batch * world}
            self.curve.append({**point, "flops": self.flops_seen, "val_loss": float(val_loss)})

    def configure_optimizers(self) -> dict[str, Any]:
        o = self.run_config["optim"]
        total = o.get("schedule_steps") or self.run_config["trainer"]["max_steps"]
        optimizer = build_optimizer(self.model, o, self.model_config.ffn.table_lr)
        warmup, min_ratio = o["warmup_steps"], o["min_lr_ratio"]
        history = self.run_config.setdefault("growth", {}).setdefault("history", [])
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: with_rewarm(warmup_cosine(step, warmup, total, min_ratio), step, history),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Marks the file as ours: `--resume` refuses checkpoints without it.
        checkpoint["altup"] = {
            "format": 1,
            "config": self.run_config,
            "model": self.model_config.to_dict(),
            "flops_seen": self.flops_seen,
            "curve": self.curve,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("altup", {})
        self.flops_seen = float(meta.get("flops_seen", 0.0))
        self.curve = list(meta.get("curve", []))
