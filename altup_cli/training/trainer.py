"""The one Lightning Trainer factory, and the callbacks of a language-model run.

`make_trainer` holds what every Trainer here shares (language-model training and GLUE
fine-tuning): "auto" precision, Lightning's expected warnings and tips kept quiet, atomic
checkpoint IO, no model summary, and a rich progress bar on a terminal (else an optional
line-per-N-steps callback). `build_trainer` adds what a language-model run needs.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from altup_cli.config import Settings, growth_events
from altup_cli.models.config import ModelConfig
from altup_cli.models.registry import ffn_kind, stream_variant
from altup_cli.training.callbacks import (
    AlignLogStepOnResume,
    DivergenceGuard,
    ExpertUsageLogger,
    LineProgress,
    StreamStatsLogger,
    TrainingStats,
    ValidateAtEnd,
)
from altup_cli.training.checkpoint_io import AtomicCheckpointIO
from altup_cli.training.growth import GrowthSchedule


def resolve_precision(precision: str, accelerator: str) -> str:
    """`auto`: bf16 mixed precision on a GPU, fp32 elsewhere; any other value as given."""
    if precision != "auto":
        return precision
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if gpu else "32-true"


def interactive() -> bool:
    """Whether progress goes to a terminal (a rich bar) or to a log (plain lines)."""
    return sys.stderr.isatty()


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def drop_lightning_tips() -> None:
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTips) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(_DropLightningTips())


def quiet_expected_warnings() -> None:
    """Lightning warnings that do not apply here: our loader resumes by global step, and a
    resumed run writes into its own checkpoint directory."""
    for pattern in (
        ".*your dataloader is not resumable.*",
        ".*Checkpoint directory .* exists and is not empty.*",
        ".*isinstance\\(treespec, LeafSpec\\).*",
        ".*The anonymous setting has no effect.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def make_trainer(
    accelerator: str,
    precision: str = "auto",
    *,
    callbacks: Sequence[L.Callback] = (),
    line_progress: L.Callback | None = None,
    logger: Any = False,
    **options: Any,
) -> L.Trainer:
    """A Trainer with the shared setup; `options` are the Trainer's own arguments.
    `line_progress` reports progress when stderr is not a terminal."""
    quiet_expected_warnings()
    drop_lightning_tips()
    shown = interactive()
    progress = _rich_progress() if shown else line_progress
    return L.Trainer(
        accelerator=accelerator,
        precision=resolve_precision(precision, accelerator),  # type: ignore[arg-type]
        logger=logger,
        callbacks=[*callbacks, *([progress] if progress is not None else [])],
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=shown,
        enable_model_summary=False,
        **options,
    )


def _rich_progress() -> L.Callback:
    from lightning.pytorch.callbacks import RichProgressBar

    return RichProgressBar()


def lm_callbacks(
    s: Settings, run_dir: Path, stats: TrainingStats, model_cfg: ModelConfig, logged: bool
) -> list[L.Callback]:
    """A language-model run's callbacks, progress excepted."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ThroughputMonitor

    t = s.trainer
    callbacks: list[L.Callback] = [
        stats,
        ValidateAtEnd(),
        AlignLogStepOnResume(),
        DivergenceGuard(t.divergence_patience),
        # best.ckpt follows val/loss; last.ckpt is a second, unmonitored callback so that it
        # is rewritten at every validation (Lightning's save_last only saves with a top-k save).
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best",
            monitor="val/loss",
            mode="min",
            save_top_k=1,
            enable_version_counter=False,
        ),
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints", filename="last", enable_version_counter=False
        ),
        ThroughputMonitor(
            batch_size_fn=lambda batch: batch.shape[0],
            length_fn=lambda batch: batch.shape[0] * (batch.shape[1] - 1),
            window_size=max(2, min(100, t.max_steps // 2)),  # rates appear once it is full
        ),
    ]
    if logged:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if ffn_kind(s.ffn.kind).logs_expert_usage:
        callbacks.append(ExpertUsageLogger(t.log_every_n_steps))
    statistics = stream_variant(model_cfg.altup.mode).statistics
    if statistics is not None:
        callbacks.append(StreamStatsLogger(t.log_every_n_steps, statistics))
    if s.growth.pending():
        callbacks.append(GrowthSchedule(growth_events(s, model_cfg), s.run.seed))
    return callbacks


def build_trainer(
    s: Settings,
    run_dir: Path,
    stats: TrainingStats,
    model_cfg: ModelConfig,
    logger: Any,
    extra: Sequence[L.Callback] = (),
) -> L.Trainer:
    """The Trainer of a language-model run; `extra`: the caller's callbacks (in-training
    evaluation), after the run's own."""
    t = s.trainer
    return make_trainer(
        t.accelerator,
        t.precision,
        callbacks=[*lm_callbacks(s, run_dir, stats, model_cfg, bool(logger)), *extra],
        line_progress=LineProgress(t.log_every_n_steps, stats),
        logger=logger,
        default_root_dir=str(run_dir),
        max_steps=t.max_steps,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=s.optim.grad_clip or None,
        val_check_interval=t.val_check_interval * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        use_distributed_sampler=False,
    )
