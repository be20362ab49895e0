"""`train(...)`: a plain, testable function from a validated config to a finished run dir.

A run directory holds `.hydra/config.yaml` and `.hydra/overrides.yaml`, `run.json` (git
revision, command, status), `train.log`, `checkpoints/{last,best}.ckpt`, `metrics.json`,
`export/` (safetensors + JSON config + tokenizer) and the logger's files. `metrics.json`
and `export/` appear only when training finished: a failed run says so in `run.json`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import secrets
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from altup_cli.config import Settings, growth_events
from altup_cli.console import console, say
from altup_cli.data.corpora import Corpus, load_embedded, load_hf_dataset, load_text_files
from altup_cli.data.tokenizer import load_tokenizer, tokenizer_from_files, trained_tokenizer
from altup_cli.data.tokens import TokenStream, epochs_covered, tokenize_corpus
from altup_cli.errors import UserError
from altup_cli.export import read_checkpoint, save_export
from altup_cli.models.counting import (
    active_parameters,
    parameter_counts,
    training_flops_per_token,
)
from altup_cli.training.callbacks import (
    AlignLogStepOnResume,
    ExpertUsageLogger,
    LineProgress,
    TrainingStats,
    ValidateAtEnd,
)
from altup_cli.training.datamodule import PackedTextDataModule
from altup_cli.training.growth import GrowthSchedule
from altup_cli.training.lm_module import LanguageModelModule

log = logging.getLogger("altup")
RUN_DIR_ENV = "ALTUP_RUN_DIR"  # set by rank 0 so DDP workers it launches share its run dir


@dataclass
class PreparedData:
    stream: TokenStream
    tokenizer_path: Path
    description: str


def launch_rank() -> int:
    """This process's global rank as set by the launcher (0 outside distributed runs)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def load_corpus(s: Settings) -> Corpus:
    d, cache = s.data, Path(s.run.cache_dir).expanduser()
    if d.source == "embedded":
        return load_embedded(d.name or "", cache)
    if d.source == "text":
        return load_text_files(d.path or "", d.encoding)
    return load_hf_dataset(d.name or "", d.split, d.text_field, d.subset)


@contextmanager
def cache_lock(cache: Path) -> Iterator[None]:
    """Serialise data preparation between processes sharing a cache (torchrun / srun start
    every rank at once): the first prepares, the others then find everything cached."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_data(s: Settings) -> PreparedData:
    """Corpus → tokenizer → token stream, each step cached under run.cache_dir."""
    cache = Path(s.run.cache_dir).expanduser()
    with cache_lock(cache):
        return _prepare_data(s, cache)


def _prepare_data(s: Settings, cache: Path) -> PreparedData:
    corpus = load_corpus(s)
    if not any(doc.strip() for doc in corpus.documents):
        raise UserError("data: the corpus contains no text")
    tok = s.tokenizer
    if tok.kind == "bpe":
        tokenizer_path = trained_tokenizer(
            corpus, tok.vocab_size or 0, tok.min_frequency or 2, cache
        )
    else:
        tokenizer_path = tokenizer_from_files(tok.path or "", cache)
    tokenizer, eos = load_tokenizer(tokenizer_path)
    stream = tokenize_corpus(corpus, tokenizer, tokenizer_path, eos, cache)
    return PreparedData(stream, tokenizer_path, corpus.description)


def git_revision() -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def new_run_dir(s: Settings) -> Path:
    """outputs/<date>/<time>_<name>; under SLURM or torchrun the job id replaces the time,
    so that every node derives the same directory."""
    now = datetime.now()
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    stem = f"{job}_{s.run.name}" if job and job != "none" else f"{now:%H-%M-%S}_{s.run.name}"
    base = Path(s.run.output_dir) / f"{now:%Y-%m-%d}" / stem
    candidate, n = base, 1
    while candidate.exists() and not job:
        candidate, n = base.with_name(f"{base.name}-{n}"), n + 1
    return candidate


def find_resume_checkpoint(resume: str, s: Settings) -> Path | None:
    """`auto`: newest run of the same name with a last.ckpt (None: start fresh); else a
    run directory or a checkpoint file."""
    if resume == "auto":
        found = []
        for ckpt in Path(s.run.output_dir).glob("*/*/checkpoints/last.ckpt"):
            meta = ckpt.parent.parent / "run.json"
            if meta.is_file() and json.loads(meta.read_text()).get("name") == s.run.name:
                found.append(ckpt)
        return max(found, key=lambda p: p.stat().st_mtime) if found else None
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise UserError(f"--resume: {resume} has no checkpoints/last.ckpt")
    return path


def resumed_config(ckpt_path: Path, overrides: list[str], composed: DictConfig) -> DictConfig:
    """The checkpoint's own config with `key.sub=value` overrides on top (e.g. more steps).

    Group selections (`model=tiny`) cannot change a resumed run: each one must give the
    same section as the checkpoint has (so the original command line works with --resume).
    """
    ckpt = read_checkpoint(ckpt_path)
    cfg = OmegaConf.create(ckpt["altup"]["config"])
    OmegaConf.set_struct(cfg, True)
    dotted = [o for o in overrides if "=" in o and "." in o.split("=", 1)[0]]
    try:  # Hydra's own override grammar, so `a=[{step: 4}]` means what it means in a new run
        from hydra.core.override_parser.overrides_parser import OverridesParser

        merged = cfg
        for override in OverridesParser.create().parse_overrides(dotted):
            OmegaConf.update(merged, override.key_or_group.lstrip("+"), override.value())
    except Exception as err:  # hydra's and omegaconf's errors are many; all mean a bad override
        raise UserError(f"--resume override: {str(err).splitlines()[0]}") from None
    grown = bool(merged.get("growth", {}).get("history"))
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if "." in key or key not in merged or (key in ("model", "ffn") and grown):
            continue  # a grown run's model is no longer its preset
        if _without_history(merged[key]) != _without_history(composed.get(key)):
            raise UserError(
                f"--resume: {item} differs from the checkpoint's {key}; "
                "a resumed run keeps its config groups"
            )
    return merged


def _without_history(section: Any) -> Any:
    """A config section as a plain value, minus the growth history a run accumulates."""
    if isinstance(section, DictConfig):
        section = OmegaConf.to_container(section)
    if isinstance(section, dict):
        return {k: v for k, v in section.items() if k != "history"}
    return section


def _write_run_files(
    run_dir: Path, cfg: DictConfig, overrides: list[str], s: Settings, argv: list[str]
) -> None:
    hydra_dir = run_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    (hydra_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (hydra_dir / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(overrides))))
    meta_path = run_dir / "run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.setdefault("name", s.run.name)
    meta.setdefault("created", datetime.now().isoformat(timespec="seconds"))
    meta.setdefault("git_revision", git_revision())
    meta.setdefault("starts", []).append(
        {"time": datetime.now().isoformat(timespec="seconds"), "argv": argv, "overrides": overrides}
    )
    meta.update(
        status="running",
        python=platform.python_version(),
        torch=torch.__version__,
        lightning=L.__version__,
        host=platform.node(),
    )
    meta_path.write_text(json.dumps(meta, indent=2))


def _set_status(run_dir: Path, status: str, **extra: Any) -> None:
    meta_path = run_dir / "run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    meta.update(status=status, **extra)
    meta_path.write_text(json.dumps(meta, indent=2))


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
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()
    if rank != 0:
        return
    from rich.logging import RichHandler

    logger.addHandler(RichHandler(console=console, show_path=False, show_level=False))
    if run_dir is not None:
        file_handler = logging.FileHandler(run_dir / "train.log")
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        logger.addHandler(file_handler)
        lightning_log = logging.getLogger("lightning.pytorch")
        lightning_log.addHandler(file_handler)


def _precision(s: Settings) -> str:
    if s.trainer.precision != "auto":
        return s.trainer.precision
    gpu = s.trainer.accelerator in ("gpu", "cuda") or (
        s.trainer.accelerator == "auto" and torch.cuda.is_available()
    )
    return "bf16-mixed" if gpu else "32-true"


def _logger(s: Settings, run_dir: Path, wandb_id: str | None) -> Any:
    if s.logger.kind == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_SILENT", "true")
        return WandbLogger(
            project=s.logger.project,
            entity=s.logger.entity,
            name=run_dir.name,
            save_dir=str(run_dir),
            mode=s.logger.mode,
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
        ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            filename="best",
            monitor="val/loss",
            mode="min",
            save_top_k=1,
            save_last=True,
            enable_version_counter=False,
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
    """Prepare data, train, export; returns the run directory."""
    rank = launch_rank()
    L.seed_everything(s.run.seed, workers=True, verbose=False)
    data = prepare_data(s)
    model_cfg = s.model_config(data.stream.vocab_size)

    if RUN_DIR_ENV in os.environ:
        run_dir = Path(os.environ[RUN_DIR_ENV])
    elif resume_ckpt is not None and resume_ckpt.parent.name == "checkpoints":
        run_dir = resume_ckpt.parent.parent
    else:
        run_dir = new_run_dir(s)
    os.environ[RUN_DIR_ENV] = str(run_dir)
    if rank == 0:
        _write_run_files(run_dir, cfg, overrides, s, argv or sys.argv)
    _setup_logging(run_dir, rank)
    try:
        metrics = _fit(cfg, s, run_dir, data, model_cfg, resume_ckpt, rank)
    except BaseException as err:
        if rank == 0:
            status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            _set_status(run_dir, status, error=f"{type(err).__name__}: {err}".splitlines()[0])
        raise
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
    if rank == 0:
        _set_status(run_dir, "completed", finished=datetime.now().isoformat(timespec="seconds"))
        print_summary(run_dir, metrics)
    return run_dir


def _fit(
    cfg: DictConfig,
    s: Settings,
    run_dir: Path,
    data: PreparedData,
    model_cfg: Any,
    resume_ckpt: Path | None,
    rank: int,
) -> dict[str, Any]:
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    module = LanguageModelModule(plain_cfg, model_cfg.to_dict())  # type: ignore[arg-type]
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
    stats = TrainingStats(s.data.seq_len * s.data.batch_size)
    meta = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    wandb_id = meta.get("wandb_id") if resume_ckpt else None
    if s.logger.kind == "wandb" and not wandb_id:
        wandb_id = "".join(secrets.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
        if rank == 0:
            _set_status(run_dir, "running", wandb_id=wandb_id)
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
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_ckpt, weights_only=True)
    if trainer.interrupted:
        raise KeyboardInterrupt
    wall = time.perf_counter() - started
    if not trainer.is_global_zero:
        return {}
    val = trainer.callback_metrics.get("val/loss")
    global_batch = s.data.batch_size * trainer.world_size * s.trainer.accumulate_grad_batches
    metrics = {
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
    save_export(module.model, run_dir / "export", data.tokenizer_path, run=run_dir.name)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if s.logger.kind == "wandb":
        import wandb

        wandb.finish()
    return metrics


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
