"""Validation: a composed config in, typed Settings out, or one clear UserError before
anything is created on disk (wrong keys, wrong types, impossible values and paths)."""

from __future__ import annotations

import codecs
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from altup_cli.config.compose import hydra_error_line
from altup_cli.config.growth import check_growth
from altup_cli.config.resources import require_fits
from altup_cli.config.schema import (
    MIN_VOCAB_SIZE,
    DataSettings,
    GrowthSettings,
    LoggerSettings,
    OptimSettings,
    RunSettings,
    Settings,
    TokenizerSettings,
    TrainerSettings,
    check_model_types,
    read_section,
)
from altup_cli.errors import UserError, check_choice, require
from altup_cli.models.config import AltUpConfig, FFNConfig
from altup_cli.models.registry import ffn_kind

RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=,-]{0,99}")
SECTIONS = ("run", "optim", "data", "tokenizer", "trainer", "logger", "model", "altup", "ffn",
            "growth")  # fmt: skip
# Top-level keys of a recipe that are not training settings.
NOT_SETTINGS = (
    "hydra",
    "recipes",
    "variants",  # a recipe's `altup compare` variants, read by compare
    "seeds",  # a recipe's `altup compare` seeds, read by compare
    "sweep",  # a recipe's isoFLOP sweep axes, read by `altup sweep isoflop`
)
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps")
DATA_SOURCES = ("embedded", "text", "hf")
TOKENIZER_KINDS = ("bpe", "file")
LOGGER_KINDS = ("wandb", "csv", "none")
WANDB_MODES = ("offline", "online", "disabled")


def validate(cfg: DictConfig) -> Settings:
    """Typed settings from a composed config; every impossible value is a UserError."""
    try:
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise UserError(
            f"config: {key} is required" if key else f"config: {hydra_error_line(err)}"
        ) from None
    assert isinstance(raw, dict)
    for key in NOT_SETTINGS:
        raw.pop(key, None)
    unknown = sorted(set(raw) - set(SECTIONS))
    require(not unknown, f"config: unknown top-level key(s) {', '.join(unknown)}")
    check_model_types(raw["model"])
    s = Settings(
        run=read_section(RunSettings, raw["run"], "run"),
        optim=read_section(OptimSettings, raw["optim"], "optim"),
        data=read_section(DataSettings, raw["data"], "data"),
        tokenizer=read_section(TokenizerSettings, raw["tokenizer"], "tokenizer"),
        trainer=read_section(TrainerSettings, raw["trainer"], "trainer"),
        logger=read_section(LoggerSettings, raw["logger"], "logger"),
        model=raw["model"],
        altup=read_section(AltUpConfig, raw["altup"], "altup"),
        ffn=read_section(FFNConfig, raw["ffn"], "ffn"),
        growth=read_section(GrowthSettings, raw.get("growth", {}), "growth")
        if raw.get("growth") is not None
        else GrowthSettings(),
    )
    _check_values(s)
    check_growth(s)
    return s


def _lightning_choices() -> tuple[list[str], list[str]]:
    """The strategy and precision names this Lightning accepts (plus our `auto`), sorted."""
    import typing as t

    from lightning.pytorch.strategies import StrategyRegistry
    from lightning.pytorch.trainer.connectors.accelerator_connector import _PRECISION_INPUT

    precisions = {str(v) for lit in t.get_args(_PRECISION_INPUT) for v in t.get_args(lit)}
    strategies = {"auto", *StrategyRegistry.available_strategies()}
    return sorted(strategies), sorted({"auto", *precisions})


def _check_paths(s: Settings) -> None:
    require(
        RUN_NAME.fullmatch(s.run.name) is not None,
        f"run.name must be 1-100 letters, digits and ._+=,- (starting with a letter or "
        f"digit; no path separators), got {s.run.name!r}",
    )
    for key in ("output_dir", "cache_dir"):
        path = Path(getattr(s.run, key)).expanduser()
        blocked = next((p for p in (path, *path.parents) if p.exists()), None)
        require(
            blocked is None or blocked.is_dir(),
            f"run.{key}={getattr(s.run, key)!r}: {blocked} is a file, not a directory",
        )


def _check_values(s: Settings) -> None:
    _check_paths(s)
    _check_trainer(s)
    _check_data(s)
    _check_tokenizer(s)
    _check_optim(s)
    check_choice(s.logger.kind, LOGGER_KINDS, "logger.kind")
    if s.logger.kind == "wandb":
        check_choice(s.logger.mode, WANDB_MODES, "logger.mode")
    t = s.trainer
    require(
        not ("fsdp" in str(t.strategy) and not ffn_kind(s.ffn.kind).supports_fsdp),
        f"ffn={s.ffn.kind} does not support trainer.strategy={t.strategy} (its expert tables "
        "keep factored gradients that DDP supports and FSDP does not); use trainer=ddp",
    )
    require(
        not ("fsdp" in str(t.strategy) and t.accelerator == "cpu"),
        f"trainer.strategy={t.strategy} needs CUDA GPUs (Lightning's FSDP does not run on "
        "CPU); for several CPU processes use trainer=ddp_cpu",
    )
    # The model's own invariants (heads dividing the width, even head dim, …) and its size
    # here; a GPU config's size is checked at launch, against the GPUs there (so a GPU-scale
    # recipe dry-runs anywhere, as require_devices lets it)
    model = s.model_config()
    if not (t.accelerator in ("gpu", "cuda") or "fsdp" in str(t.strategy)):
        require_fits(model, "model")


def _check_trainer(s: Settings) -> None:
    t = s.trainer
    strategies, precisions = _lightning_choices()
    check_choice(t.strategy, strategies, "trainer.strategy", one_of=True)
    check_choice(t.precision, precisions, "trainer.precision", one_of=True)
    require(t.divergence_patience >= 0, "trainer.divergence_patience must be >= 0")
    require(t.max_steps > 0, f"trainer.max_steps must be positive, got {t.max_steps}")
    require(t.accumulate_grad_batches > 0, "trainer.accumulate_grad_batches must be positive")
    require(t.val_check_interval > 0, "trainer.val_check_interval must be positive")
    require(t.limit_val_batches >= 0, "trainer.limit_val_batches must be >= 0")
    require(t.log_every_n_steps > 0, "trainer.log_every_n_steps must be positive")
    require(t.num_nodes > 0, "trainer.num_nodes must be positive")
    require(
        t.devices == "auto" or (isinstance(t.devices, int) and t.devices > 0),
        f"trainer.devices must be a positive int or 'auto', got {t.devices!r}",
    )
    check_choice(t.accelerator, ACCELERATORS, "trainer.accelerator")


def _check_data(s: Settings) -> None:
    d = s.data
    try:
        codecs.lookup(d.encoding)
    except LookupError:
        raise UserError(f"data.encoding: unknown encoding {d.encoding!r}") from None
    check_choice(d.source, DATA_SOURCES, "data.source")
    require(d.source != "text" or bool(d.path), "data.path is required with data=text")
    require(d.source != "hf" or bool(d.name), "data.name is required with data=hf")
    require(
        d.source != "embedded" or bool(d.name), "data.name is required with data.source=embedded"
    )
    require(d.seq_len > 0, f"data.seq_len must be positive, got {d.seq_len}")
    require(d.batch_size > 0, f"data.batch_size must be positive, got {d.batch_size}")
    require(0 <= d.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    require(d.num_workers >= 0, "data.num_workers must be >= 0")
    max_len = s.model.get("max_seq_len")
    require(
        isinstance(max_len, int) and d.seq_len <= max_len,
        f"data.seq_len={d.seq_len} exceeds model.max_seq_len={max_len}",
    )


def _check_tokenizer(s: Settings) -> None:
    tok = s.tokenizer
    require(tok.kind != "file" or bool(tok.path), "tokenizer.path is required with tokenizer=file")
    if tok.kind == "file" and tok.path and tok.path != "gpt2":
        exists = Path(tok.path).expanduser().exists()
        require(exists, f"tokenizer.path: {tok.path!r} does not exist")
    check_choice(tok.kind, TOKENIZER_KINDS, "tokenizer.kind")
    if tok.kind == "bpe":
        require(
            tok.vocab_size is not None and tok.vocab_size >= MIN_VOCAB_SIZE,
            f"tokenizer.vocab_size must be at least {MIN_VOCAB_SIZE}, got {tok.vocab_size}",
        )


def _check_optim(s: Settings) -> None:
    o = s.optim
    require(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")
    require(o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    require(
        o.schedule_steps is None or o.schedule_steps > 0, "optim.schedule_steps must be positive"
    )
    require(
        o.weight_decay >= 0 and o.grad_clip >= 0,
        "optim.weight_decay and optim.grad_clip must be >= 0",
    )
    require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
