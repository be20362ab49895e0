"""`train(...)`: a plain, testable function from a validated config to a finished run dir.

A run directory holds `.hydra/config.yaml` and `.hydra/overrides.yaml`, `run.json` (git
revision, command, status), `train.log`, `checkpoints/{last,best}.ckpt`, `metrics.json`,
`export/` (safetensors + JSON config + tokenizer) and the logger's files. `metrics.json`
and `export/` appear only when training finished: a failed run says so in `run.json`.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from altup_cli.config import Settings, growth_events, require_devices, require_fits
from altup_cli.console import console, say
from altup_cli.data.tokens import epochs_covered
from altup_cli.errors import first_line
from altup_cli.files import write_json
from altup_cli.models.counting import (
    active_parameters,
    parameter_counts,
    training_flops_per_token,
)
from altup_cli.runs.checkpoint import in_run_dir, run_dir_of, steps_done
from altup_cli.runs.data import PreparedData, prepare_data
from altup_cli.runs.export import save_export
from altup_cli.runs.resume import resumed_config
from altup_cli.runs.rundir import (
    RUN_DIR_ENV,
    check_claimable,
    claim_run_dir,
    launch_rank,
    planned_run_dir,
    read_meta,
    set_status,
    write_run_files,
)
from altup_cli.training.callbacks import (
    AlignLogStepOnResume,
    Diverged,
    DivergenceGuard,
    ExpertUsageLogger,
    LineProgress,
    TrainingStats,
    ValidateAtEnd,
)
from altup_cli.training.checkpoint_io import AtomicCheckpointIO
from altup_cli.training.datamodule import PackedTextDataModule
from altup_cli.training.growth import GrowthSchedule
from altup_cli.training.lm_module import LanguageModelModule

__all__ = [  # with re-exports for callers that do not yet import them from their new homes
    "RUN_DIR_ENV",
    "build_trainer",
    "drop_lightning_tips",
    "prepare_data",
    "print_summary",
    "resumed_config",
    "train",
    "wandb_mode",
]

log = logging.getLogger("altup")


class _DropLightningTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def drop_lightning_tips() -> None:
    rank_zero_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropLightningTips) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(_DropLightningTips())


def _setup_logging(run_dir: Path | None, rank: int) -> None:
    drop_lightning_tips()
    logger = logging.getLogger("altup")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    lightning_log = logging.getLogger("lightning.pytorch")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    for handler in list(lightning_log.handlers):  # an earlier run's train.log in this process
        if isinstance(handler, logging.FileHandler):
            lightning_log.removeHandler(handler)
            handler.close()
    if rank != 0:
        return
    from rich.logging import RichHandler

    logger.addHandler(RichHandler(console=console, show_path=False, show_level=False))
    if run_dir is not None:
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        logger.addHandler(file_handler)
        lightning_log.addHandler(file_handler)


def _precision(s: Settings) -> str:
    if s.trainer.precision != "auto":
        return s.trainer.precision
    gpu = s.trainer.accelerator in ("gpu", "cuda") or (
        s.trainer.accelerator == "auto" and torch.cuda.is_available()
    )
    return "bf16-mixed" if gpu else "32-true"


def wandb_mode(requested: str | None) -> str | None:
    """`online` only when it can work: with an API key and the server reachable in a few
    seconds (W&B itself waits 90 s for a network that is not there); else offline, said."""
    if requested != "online":
        return requested
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    problem = None if _wandb_api_key(url.hostname or "") else "no W&B API key"
    if problem is None:
        import socket

        try:
            port = url.port or (443 if url.scheme == "https" else 80)
            socket.create_connection((url.hostname, port), timeout=5).close()
        except OSError as err:
            problem = f"{url.hostname} unreachable ({first_line(err)})"
    if problem is None:
        return "online"
    say(f"warning: W&B online needs a network and a key: {problem}; logging offline "
        "(upload later with `wandb sync`)")  # fmt: skip
    return "offline"


def _wandb_api_key(host: str) -> str | None:
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    import netrc

    try:
        entry = netrc.netrc().authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry else None


def _logger(s: Settings, run_dir: Path, wandb_id: str | None) -> Any:
    """The one logger factory: W&B (offline unless online can work), CSV or none."""
    if s.logger.kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_SILENT", "true")
        return WandbLogger(
            project=s.logger.project,
            entity=s.logger.entity,
            name=run_dir.name,
            save_dir=str(run_dir),
            mode=wandb_mode(s.logger.mode),
            tags=list(s.logger.tags),
            group=s.logger.group,
            id=wandb_id,
            resume="allow",
        )
    if s.logger.kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name="csv")
    return False


def _quiet_expected_warnings() -> None:
    """Lightning warnings that do not apply here: our loader resumes by global step, and a
    resumed run writes into its own checkpoint directory."""
    for pattern in (
        ".*your dataloader is not resumable.*",
        ".*Checkpoint directory .* exists and is not empty.*",
        ".*isinstance\\(treespec, LeafSpec\\).*",
        ".*The anonymous setting has no effect.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)


def build_trainer(s: Settings, run_dir: Path, stats: TrainingStats, logger: Any) -> L.Trainer:
    from lightning.pytorch.callbacks import (
        LearningRateMonitor,
        ModelCheckpoint,
        RichProgressBar,
        ThroughputMonitor,
    )

    _quiet_expected_warnings()
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
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if s.ffn.kind in ("peer", "pkm"):
        callbacks.append(ExpertUsageLogger(t.log_every_n_steps))
    if s.growth.pending():
        model_cfg = s.model_config(s.model.get("vocab_size") or 257)
        callbacks.append(GrowthSchedule(growth_events(s, model_cfg), s.run.seed))
    interactive = sys.stderr.isatty()
    callbacks.append(RichProgressBar() if interactive else LineProgress(t.log_every_n_steps, stats))
    return L.Trainer(
        default_root_dir=str(run_dir),
        max_steps=t.max_steps,
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=_precision(s),  # type: ignore[arg-type]
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=s.optim.grad_clip or None,
        val_check_interval=t.val_check_interval * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        logger=logger,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        enable_progress_bar=interactive,
        enable_model_summary=False,
        use_distributed_sampler=False,
    )


def train(
    cfg: DictConfig,
    s: Settings,
    overrides: list[str],
    resume_ckpt: Path | None = None,
    argv: list[str] | None = None,
) -> Path:
    """Prepare data, train, export; returns the run directory. Everything that can be
    checked is checked before the run directory is created or touched."""
    rank = launch_rank()
    require_devices(s)
    if resume_ckpt is not None and (done := steps_done(resume_ckpt)) >= s.trainer.max_steps:
        say(
            f"{resume_ckpt}: already trained {done} steps (trainer.max_steps="
            f"{s.trainer.max_steps}); nothing to do, nothing changed. Raise trainer.max_steps "
            "to train on."
        )
        return run_dir_of(resume_ckpt)
    in_its_run = resume_ckpt is not None and in_run_dir(resume_ckpt)
    claims = RUN_DIR_ENV not in os.environ and not in_its_run and rank == 0
    if claims:
        check_claimable(s)
    L.seed_everything(s.run.seed, workers=True, verbose=False)
    data = prepare_data(s)
    model_cfg = s.model_config(data.stream.vocab_size)
    require_fits(model_cfg, "model")
    datamodule = PackedTextDataModule(
        data.stream,
        s.data.seq_len,
        s.data.batch_size,
        s.data.val_fraction,
        s.run.seed,
        s.trainer.max_steps,
        s.trainer.accumulate_grad_batches,
        s.data.num_workers,
    )
    if RUN_DIR_ENV in os.environ:
        run_dir = Path(os.environ[RUN_DIR_ENV])
    elif in_its_run:
        run_dir = run_dir_of(resume_ckpt)  # type: ignore[arg-type]
    elif claims:
        run_dir = claim_run_dir(s)
    else:
        run_dir = planned_run_dir(s)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    if rank == 0:
        write_run_files(run_dir, cfg, overrides, s, argv or sys.argv)
    _setup_logging(run_dir, rank)
    try:
        metrics = _fit(cfg, s, run_dir, data, datamodule, model_cfg, resume_ckpt, rank)
    except Diverged as err:
        if rank == 0:
            set_status(run_dir, "diverged", error=str(err), **err.record())
        raise
    except BaseException as err:
        if rank == 0:
            status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            set_status(run_dir, status, error=f"{type(err).__name__}: {err}".splitlines()[0])
        raise
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    if rank == 0:
        set_status(run_dir, "completed", finished=datetime.now().isoformat(timespec="seconds"))
        print_summary(run_dir, metrics)
    return run_dir


def _fit(
    cfg: DictConfig,
    s: Settings,
    run_dir: Path,
    data: PreparedData,
    datamodule: PackedTextDataModule,
    model_cfg: Any,
    resume_ckpt: Path | None,
    rank: int,
) -> dict[str, Any]:
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    module = LanguageModelModule(plain_cfg, model_cfg.to_dict())  # type: ignore[arg-type]
    stats = TrainingStats(s.data.seq_len * s.data.batch_size)
    wandb_id = read_meta(run_dir).get("wandb_id") if resume_ckpt else None
    if s.logger.kind == "wandb" and not wandb_id:
        wandb_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
        if rank == 0:
            set_status(run_dir, "running", wandb_id=wandb_id)
    trainer = build_trainer(s, run_dir, stats, _logger(s, run_dir, wandb_id))
    if not datamodule.val_indices:
        trainer.limit_val_batches = 0
    counts = parameter_counts(model_cfg)  # at the start (growth may enlarge the model)
    if rank == 0:
        log.info(
            f"run {run_dir}  |  {counts['total']:,} parameters  |  {data.stream.n_tokens:,} tokens "
            f"({data.description})  |  {len(datamodule.train_indices):,} train / "
            f"{len(datamodule.val_indices):,} val sequences"
        )
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_ckpt, weights_only=True)
    finally:
        if s.logger.kind == "wandb":
            import wandb

            wandb.finish(exit_code=0 if trainer.state.status.value == "finished" else 1)
    if trainer.interrupted:
        raise KeyboardInterrupt
    wall = time.perf_counter() - started
    if not trainer.is_global_zero:
        return {}
    metrics = _metrics(s, trainer, module, stats, data, datamodule, wall)
    save_export(module.model, run_dir / "export", data.tokenizer_path, run=run_dir.name)
    write_json(run_dir / "metrics.json", metrics)
    return metrics


def _metrics(
    s: Settings,
    trainer: L.Trainer,
    module: LanguageModelModule,
    stats: TrainingStats,
    data: PreparedData,
    datamodule: PackedTextDataModule,
    wall: float,
) -> dict[str, Any]:
    val = trainer.callback_metrics.get("val/loss")
    global_batch = s.data.batch_size * trainer.world_size * s.trainer.accumulate_grad_batches
    return {
        "steps": trainer.global_step,
        "tokens_seen": trainer.global_step * global_batch * s.data.seq_len,
        "tokens_this_session": stats.tokens,
        "tokens_per_second": stats.tokens_per_second,
        "seconds_per_step": stats.step_seconds
        / max(1, stats.batches)
        * s.trainer.accumulate_grad_batches,
        "train_loss": stats.last_train_loss,
        "val_loss": float(val) if val is not None else None,
        "val_ppl": float(torch.exp(val)) if val is not None else None,
        "unigram_entropy": data.stream.unigram_entropy,
        "epochs": epochs_covered(
            len(datamodule.train_indices),
            s.data.batch_size * s.trainer.accumulate_grad_batches,
            trainer.world_size,
            s.trainer.max_steps,
        ),
        "parameters": parameter_counts(module.model_config),
        "active_parameters": active_parameters(module.model_config),
        "training_flops_per_token": training_flops_per_token(module.model_config, s.data.seq_len)[
            "total"
        ],
        "training_flops": module.flops_seen,
        "validation_curve": module.curve,
        "growth": module.run_config.get("growth", {}).get("history", []),
        "wall_seconds": wall,
        "best_checkpoint": trainer.checkpoint_callback.best_model_path or None,  # type: ignore[union-attr]
    }


def print_summary(run_dir: Path, metrics: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"altup train — {run_dir}", show_header=False)

    def fmt(v: Any) -> str:
        return "—" if v is None else f"{v:,.4f}" if isinstance(v, float) else f"{v:,}"

    rows = [
        ("parameters", metrics["parameters"]["total"]),
        ("tokens seen", metrics["tokens_seen"]),
        ("final train loss", metrics["train_loss"]),
        ("final val loss", metrics["val_loss"]),
        ("val perplexity", metrics["val_ppl"]),
        ("unigram entropy (nats)", metrics["unigram_entropy"]),
        ("tokens/s", metrics["tokens_per_second"]),
        ("wall time (s)", metrics["wall_seconds"]),
    ]
    for key, value in rows:
        table.add_row(key, fmt(value))
    console.print(table)
    say(f"export: {run_dir / 'export'}  (altup_cli.load({str(run_dir)!r}))")
