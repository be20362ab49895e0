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
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from altup_cli.config import Settings, require_devices, require_fits
from altup_cli.console import console, say
from altup_cli.data.tokens import epochs_covered
from altup_cli.files import write_json
from altup_cli.models.config import ModelConfig
from altup_cli.models.counting import (
    active_parameters,
    parameter_counts,
    training_flops_per_token,
)
from altup_cli.runs.checkpoint import in_run_dir, run_dir_of, steps_done
from altup_cli.runs.data import PreparedData, prepare_data
from altup_cli.runs.export import save_export
from altup_cli.runs.request import RunRequest
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
from altup_cli.training.callbacks import Diverged, TrainingStats
from altup_cli.training.datamodule import PackedTextDataModule
from altup_cli.training.lm_module import LanguageModelModule
from altup_cli.training.loggers import make_logger
from altup_cli.training.trainer import build_trainer, drop_lightning_tips

log = logging.getLogger("altup")


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


def train(
    request: RunRequest,
    argv: list[str] | None = None,
    run_dir: Path | None = None,
    callbacks: Sequence[L.Callback] = (),
) -> Path:
    """Prepare data, train, export; returns the run directory (`run_dir` when the caller
    chose it, as a sweep does for its points). Everything that can be checked is checked
    before the run directory is created or touched. `callbacks` join the run's own (the
    commands pass in-training evaluation's)."""
    cfg, s, overrides, resume_ckpt = (
        request.cfg, request.settings, request.overrides, request.checkpoint,
    )  # fmt: skip
    if run_dir is not None:
        os.environ[RUN_DIR_ENV] = str(run_dir)
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
        s.run.seed if s.run.data_seed is None else s.run.data_seed,  # order and split
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
        metrics = _fit(cfg, s, run_dir, data, datamodule, model_cfg, resume_ckpt, rank, callbacks)
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


def _wandb_id(s: Settings, run_dir: Path, resumed: bool, rank: int) -> str | None:
    """The W&B run to log to: a resumed run's own, else a new id (recorded in run.json)."""
    wandb_id = read_meta(run_dir).get("wandb_id") if resumed else None
    if s.logger.kind == "wandb" and not wandb_id:
        wandb_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
        if rank == 0:
            set_status(run_dir, "running", wandb_id=wandb_id)
    return wandb_id


def _fit(
    cfg: DictConfig,
    s: Settings,
    run_dir: Path,
    data: PreparedData,
    datamodule: PackedTextDataModule,
    model_cfg: ModelConfig,
    resume_ckpt: Path | None,
    rank: int,
    callbacks: Sequence[L.Callback],
) -> dict[str, Any]:
    composed = OmegaConf.to_container(cfg, resolve=True)
    module = LanguageModelModule(s, model_cfg, composed)  # type: ignore[arg-type]
    stats = TrainingStats(s.data.seq_len * s.data.batch_size)
    wandb_id = _wandb_id(s, run_dir, resume_ckpt is not None, rank)
    logger = make_logger(s.logger, run_dir, run_dir.name, wandb_id=wandb_id)
    trainer = build_trainer(s, run_dir, stats, model_cfg, logger, callbacks)
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
    final = module.model_config
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
        "parameters": parameter_counts(final),
        "active_parameters": active_parameters(final),
        "training_flops_per_token": training_flops_per_token(final, s.data.seq_len)["total"],
        "training_flops": module.flops_seen,
        "validation_curve": module.curve,
        "growth": module.growth_history,
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
