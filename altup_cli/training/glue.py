"""Fine-tuning a pretrained altup model on one GLUE task with Lightning: a linear head on a
pooled representation (the last real token, which has seen the whole causal input, or the
mean), cross-entropy (or MSE for STS-B), AdamW with lazy steps for PEER/PKM tables, linear
warmup and decay; dev predictions scored with the task's metrics every epoch."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from altup_cli.console import say
from altup_cli.glue.metrics import METRICS
from altup_cli.glue.tasks import Split, Task
from altup_cli.models.transformer import TransformerLM
from altup_cli.training.optim import build_optimizer, dense_parameters
from altup_cli.training.schedules import warmup_linear_decay


class Diverged(Exception):
    """Fine-tuning produced a non-finite loss or dev metric: the task stops there."""

    def __init__(self, what: str, step: int):
        super().__init__(f"{what} at step {step:,}")
        self.step = step


def encode(split: Split, tokenizer: Any, sep: int, max_len: int) -> list[list[int]]:
    """Each example as `text₁ SEP [text₂ SEP]`, the longest text truncated first."""
    out = []
    for texts in split.texts:
        parts = [tokenizer.encode(t).ids for t in texts]
        budget = max_len - len(parts)
        while sum(len(p) for p in parts) > budget:
            longest = max(range(len(parts)), key=lambda i: len(parts[i]))
            parts[longest] = parts[longest][:-1]
        out.append([i for p in parts for i in (*p, sep)])
    return out


def loader(
    ids: list[list[int]], labels: Sequence[Any], batch: int, shuffle: bool, seed: int, pad: int
) -> DataLoader:
    regression = bool(labels) and isinstance(labels[0], float)

    def collate(items: list[tuple[list[int], Any]]) -> tuple[torch.Tensor, ...]:
        width = max(len(x) for x, _ in items)
        tokens = torch.full((len(items), width), pad, dtype=torch.long)
        for row, (x, _) in enumerate(items):
            tokens[row, : len(x)] = torch.tensor(x)
        lengths = torch.tensor([len(x) for x, _ in items])
        dtype = torch.float32 if regression else torch.long
        return tokens, lengths, torch.tensor([y for _, y in items], dtype=dtype)

    generator = torch.Generator().manual_seed(seed)
    data = list(zip(ids, labels, strict=True))
    return DataLoader(data, batch, shuffle=shuffle, collate_fn=collate, generator=generator)


class GlueModule(L.LightningModule):
    def __init__(self, model: TransformerLM, task: Task, settings: dict[str, Any], steps: int):
        super().__init__()
        self.model, self.task, self.settings, self.steps = model, task, settings, steps
        outputs = 1 if task.regression else len(task.labels or ())
        self.head = nn.Linear(model.config.d_model, outputs)
        nn.init.normal_(self.head.weight, std=model.config.init_std)
        nn.init.zeros_(self.head.bias)
        self.predictions: dict[int, list[torch.Tensor]] = {}
        self.golds: dict[int, list[torch.Tensor]] = {}
        self.dev_names: list[str] = []
        self.history: list[dict[str, Any]] = []

    def pooled(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        # The mask keeps padding out of batch statistics (query BatchNorm, MoE routing).
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths[:, None]
        h = self.model.features(tokens, mask)
        if self.settings["pooling"] == "mean":
            return (h * mask[..., None]).sum(1) / lengths[:, None]
        return h[torch.arange(len(h), device=h.device), lengths - 1]

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out = self.head(self.pooled(tokens, lengths).float())
        return out[:, 0] if self.task.regression else out

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        tokens, lengths, labels = batch
        out = self(tokens, lengths)
        loss = F.mse_loss(out, labels) if self.task.regression else F.cross_entropy(out, labels)
        self.log(f"glue/{self.task.name}/train_loss", loss, prog_bar=True)
        aux = self.model.aux_loss()
        total = loss if aux is None else loss + aux  # MoE balance, already weighted
        if not torch.isfinite(total.detach()):
            raise Diverged(f"loss {float(total.detach())}", self.global_step + 1)
        return total

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """A line every tenth of the run when the log is not a terminal (CI, SLURM)."""
        step, every = self.global_step, max(1, self.steps // 10)
        if self.settings.get("line_progress") and step % every == 0 and step < self.steps:
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            say(f"{self.task.name} step {step:,}/{self.steps:,}  loss {loss:.4f}")

    def validation_step(
        self, batch: tuple[torch.Tensor, ...], batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        tokens, lengths, labels = batch
        out = self(tokens, lengths)
        pred = out if self.task.regression else out.argmax(-1)
        self.predictions.setdefault(dataloader_idx, []).append(pred.detach().cpu())
        self.golds.setdefault(dataloader_idx, []).append(labels.cpu())

    def on_validation_epoch_end(self) -> None:
        scores: dict[str, Any] = {"epoch": self.current_epoch}
        for i, name in enumerate(self.dev_names):
            pred = torch.cat(self.predictions.get(i, [])).double().numpy()
            gold = torch.cat(self.golds.get(i, [])).double().numpy()
            for metric in self.task.metrics:
                value = METRICS[metric](pred, gold)
                if not math.isfinite(value):  # non-finite predictions
                    raise Diverged(f"{name} {metric} {value}", self.global_step)
                scores[f"{name}/{metric}"] = value
                self.log(f"glue/{self.task.name}/{name}/{metric}", value)
        metric_values = [v for k, v in scores.items() if k != "epoch"]
        scores["score"] = sum(metric_values) / len(metric_values)
        self.log(f"glue/{self.task.name}/score", scores["score"])
        self.history.append(scores)
        self.predictions, self.golds = {}, {}
        shown = "  ".join(f"{k} {v:.4f}" for k, v in scores.items() if k != "epoch")
        say(f"{self.task.name} epoch {self.current_epoch + 1}/{self.settings['epochs']}: {shown}")

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:  # fmt: skip
        if gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(dense_parameters(optimizer), gradient_clip_val)

    def configure_optimizers(self) -> dict[str, Any]:
        s = self.settings
        optim = {"lr": s["lr"], "weight_decay": s["weight_decay"], "beta1": 0.9,
                 "beta2": 0.999, "eps": 1e-8}  # fmt: skip
        optimizer = build_optimizer(self, optim)
        warmup, total = max(1, int(s["warmup_ratio"] * self.steps)), self.steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_linear_decay(step, warmup, total)
        )
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}
