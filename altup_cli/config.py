"""Hydra composition and validation: overrides in, typed settings (or one clear error) out.

Hydra's Compose API builds the config from `conf/` (and `recipes/` for `--recipe`); every
section is then checked against a dataclass so wrong keys, wrong types and impossible
values are caught before anything is created on disk.
"""

from __future__ import annotations

import codecs
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from altup_cli.errors import UserError
from altup_cli.models.altup import AltUpConfig
from altup_cli.models.feedforward import FFNConfig
from altup_cli.models.transformer import ModelConfig

PACKAGE_DIR = Path(__file__).resolve().parent


def _project_dir(name: str) -> Path:
    """`conf/` and `recipes/` live at the repository root (editable install or checkout)
    and are copied into the package for a wheel install."""
    for candidate in (PACKAGE_DIR.parent / name, PACKAGE_DIR / name):
        if candidate.is_dir():
            return candidate
    raise UserError(f"cannot find the {name}/ directory next to {PACKAGE_DIR}")


def conf_dir() -> Path:
    return _project_dir("conf")


def recipes_dir() -> Path:
    return _project_dir("recipes")


def list_recipes() -> list[str]:
    return sorted(p.stem for p in recipes_dir().glob("*.yaml"))


def _one_line(err: BaseException) -> str:
    if not str(err).strip() and err.__cause__ is not None:
        err = err.__cause__
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    text = lines[0] if lines else type(err).__name__
    if "Available options" in str(err):
        idx = next(i for i, ln in enumerate(lines) if ln.startswith("Available options"))
        options = [
            ln for ln in lines[idx + 1 :] if not ln.startswith(("Config search", "provider"))
        ]
        text += f" (available: {', '.join(options)})"
    elif len(lines) > 1 and lines[1].startswith("To append"):
        text += f" (unknown key; {lines[1][0].lower()}{lines[1][1:]})"
    return text


def compose_config(overrides: list[str], recipe: str | None = None) -> DictConfig:
    """Compose conf/config.yaml + recipe + overrides, resolved, or raise UserError."""
    extra: list[str] = []
    if recipe:
        if recipe not in list_recipes():
            known = ", ".join(list_recipes())
            raise UserError(f"unknown recipe {recipe!r} (available: {known})")
        extra = [f"hydra.searchpath=[file://{recipes_dir().parent}]", f"+recipes={recipe}"]
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=[*extra, *overrides])
        OmegaConf.resolve(cfg)
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise UserError(f"config: {_one_line(err)}") from None
    return cfg


@dataclass
class RunSettings:
    name: str
    seed: int
    output_dir: str
    cache_dir: str
    compile: bool
    data_seed: int | None = None  # training order and held-out split; None: seed


@dataclass
class OptimSettings:
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    schedule_steps: int | None
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    grad_clip: float


@dataclass
class DataSettings:
    source: str
    name: str | None
    path: str | None
    split: str
    subset: str | None
    text_field: str
    encoding: str
    seq_len: int
    batch_size: int
    val_fraction: float
    num_workers: int


@dataclass
class TokenizerSettings:
    kind: str
    vocab_size: int | None
    min_frequency: int | None
    path: str | None


@dataclass
class TrainerSettings:
    max_steps: int
    accelerator: str
    devices: int | str
    num_nodes: int
    strategy: str
    precision: str
    accumulate_grad_batches: int
    val_check_interval: int
    limit_val_batches: int
    log_every_n_steps: int
    divergence_patience: int = 0  # non-finite training losses tolerated in a row


@dataclass
class LoggerSettings:
    kind: str
    project: str | None
    entity: str | None
    mode: str | None
    tags: list[str] = field(default_factory=list)
    group: str | None = None


@dataclass
class GrowthSettings:
    schedule: list[Any] = field(default_factory=list)
    lr_policy: str = "continue"
    rewarm_steps: int | None = None
    history: list[Any] = field(default_factory=list)

    def pending(self) -> list[dict[str, Any]]:
        """Schedule events not applied yet (history records the applied ones)."""
        applied = sum(1 for h in self.history if h.get("source") == "schedule")
        return list(self.schedule[applied:])


@dataclass
class Settings:
    run: RunSettings
    optim: OptimSettings
    data: DataSettings
    tokenizer: TokenizerSettings
    trainer: TrainerSettings
    logger: LoggerSettings
    model: dict[str, Any]  # checked into ModelConfig once the vocabulary size is known
    altup: AltUpConfig
    ffn: FFNConfig
    growth: GrowthSettings = field(default_factory=GrowthSettings)

    def model_config(self, vocab_size: int) -> ModelConfig:
        values = {**self.model, "altup": self.altup, "ffn": self.ffn}
        if values.get("vocab_size") is None:
            values["vocab_size"] = -(-vocab_size // 64) * 64
        elif values["vocab_size"] < vocab_size:
            raise UserError(
                f"model.vocab_size={values['vocab_size']} is below the tokenizer's {vocab_size}"
            )
        try:
            return ModelConfig.from_dict(values)
        except (ValueError, TypeError) as err:
            raise UserError(str(err)) from None


BYTES_PER_TRAINED_PARAMETER = 16  # fp32 weight, gradient and Adam's two moments


def memory_bytes() -> int:
    """The most memory a model can be trained in here: host RAM or the largest GPU."""
    import os

    import torch

    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpus = [
        torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())
    ]
    return max([host, *gpus])


def require_fits(cfg: ModelConfig, where: str) -> None:
    """Refuse a model whose weights, gradients and Adam state alone exceed this machine's
    memory, before anything is allocated (a typo like d_model=1000000 asks for terabytes)."""
    from altup_cli.models.counting import parameter_counts

    params = parameter_counts(cfg)["total"]
    need, have = params * BYTES_PER_TRAINED_PARAMETER, memory_bytes()
    if need > have:
        raise UserError(
            f"{where}: the model has {params:,} parameters, which need {need / 2**30:,.1f} GiB "
            f"for weights, gradients and Adam state; this machine has {have / 2**30:,.1f} GiB"
        )


def require_devices(s: Settings) -> None:
    """At launch (not in validate, so a GPU config can be dry-run anywhere): a GPU
    accelerator or FSDP needs a CUDA device on this machine."""
    import torch

    t = s.trainer
    wants_gpu = t.accelerator in ("gpu", "cuda") or "fsdp" in str(t.strategy)
    if wants_gpu and not torch.cuda.is_available():
        what = f"trainer.strategy={t.strategy}" if "fsdp" in str(t.strategy) else (
            f"trainer.accelerator={t.accelerator}"
        )
        raise UserError(
            f"{what} needs a CUDA GPU and this machine has none (Lightning's FSDP does not "
            "run on CPU); use trainer.accelerator=cpu, or trainer=ddp_cpu for several processes"
        )


def check_type(value: Any, annotation: Any, where: str) -> Any:
    """Return `value` if it matches `annotation` (ints pass as floats), else raise UserError."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            try:
                return check_type(value, option, where)
            except UserError:
                continue
        raise UserError(f"{where}: expected {_type_name(annotation)}, got {value!r}")
    if annotation is type(None):
        if value is None:
            return None
    elif origin is list:
        if isinstance(value, list):
            return [check_type(v, typing.get_args(annotation)[0], where) for v in value]
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise UserError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is Any or isinstance(value, annotation):
        return value
    raise UserError(f"{where}: expected {_type_name(annotation)}, got {value!r}")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def _section(cls: type, values: Any, name: str) -> Any:
    if not isinstance(values, dict):
        raise UserError(f"{name}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise UserError(f"{name}: unknown key(s) {', '.join(unknown)}")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if n not in values]
    if missing:
        raise UserError(f"{name}: missing key(s) {', '.join(missing)}")
    try:
        return cls(
            **{n: check_type(values[n], hints[n], f"{name}.{n}") for n in names if n in values}
        )
    except ValueError as err:  # a dataclass's own invariants
        raise UserError(str(err)) from None


def _check_model_types(values: dict[str, Any]) -> None:
    hints = typing.get_type_hints(ModelConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise UserError(f"model: unknown key(s) {', '.join(unknown)}")
    for key, value in values.items():
        annotation = hints[key] | None if key == "vocab_size" else hints[key]
        check_type(value, annotation, f"model.{key}")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def validate(cfg: DictConfig) -> Settings:
    """Typed settings from a composed config; every impossible value is a UserError."""
    try:
        raw = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        raise UserError(
            f"config: {key} is required" if key else f"config: {_one_line(err)}"
        ) from None
    assert isinstance(raw, dict)
    raw.pop("hydra", None)
    raw.pop("recipes", None)
    raw.pop("variants", None)  # a recipe's `altup compare` variants, read by compare
    raw.pop("seeds", None)  # a recipe's `altup compare` seeds, read by compare
    raw.pop("sweep", None)  # a recipe's isoFLOP sweep axes, read by `altup sweep isoflop`
    expected = {
        "run", "optim", "data", "tokenizer", "trainer", "logger", "model", "altup", "ffn", "growth"
    }  # fmt: skip
    unknown = sorted(set(raw) - expected)
    _require(not unknown, f"config: unknown top-level key(s) {', '.join(unknown)}")
    _check_model_types(raw["model"])
    s = Settings(
        run=_section(RunSettings, raw["run"], "run"),
        optim=_section(OptimSettings, raw["optim"], "optim"),
        data=_section(DataSettings, raw["data"], "data"),
        tokenizer=_section(TokenizerSettings, raw["tokenizer"], "tokenizer"),
        trainer=_section(TrainerSettings, raw["trainer"], "trainer"),
        logger=_section(LoggerSettings, raw["logger"], "logger"),
        model=raw["model"],
        altup=_section(AltUpConfig, raw["altup"], "altup"),
        ffn=_section(FFNConfig, raw["ffn"], "ffn"),
        growth=_section(GrowthSettings, raw.get("growth", {}), "growth")
        if raw.get("growth") is not None
        else GrowthSettings(),
    )
    _check_values(s)
    _check_growth(s)
    return s


def model_preset(name: str) -> dict[str, Any]:
    """The values of conf/model/<name>.yaml."""
    path = conf_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in path.parent.glob("*.yaml")))
        raise UserError(f"unknown model preset {name!r} (available: {known})")
    values = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(values, dict)
    return values  # type: ignore[return-value]


def event_ops(event: Any, cfg: ModelConfig, where: str) -> list[Any]:
    """The growth ops of one schedule event ({step, ops: [...]} or {step, to: preset})."""
    from altup_cli.growth import parse_op, preset_ops

    if not isinstance(event, dict) or not isinstance(event.get("step"), int):
        raise UserError(f"{where}: expected {{step: N, ops: [...]}} or {{step: N, to: PRESET}}")
    keys = set(event) - {"step"}
    if keys not in ({"ops"}, {"to"}):
        raise UserError(f"{where}: give exactly one of ops or to (got {', '.join(sorted(keys))})")
    try:
        if "to" in event:
            return preset_ops(cfg, model_preset(str(event["to"])), str(event["to"]))
        ops = event["ops"]
        if isinstance(ops, str) or not isinstance(ops, list) or not ops:
            raise UserError(f"{where}.ops: expected a non-empty list like [mlp_width=1024]")
        return [parse_op(str(op)) for op in ops]
    except ValueError as err:
        raise UserError(f"{where}: {err}") from None


def growth_events(s: Settings, cfg: ModelConfig) -> list[tuple[int, list[Any]]]:
    """The pending schedule as (step, ops), checked by planning every event in order
    against the model it will meet."""
    from altup_cli.growth import plan

    g = s.growth
    events, last = [], -1
    offset = len(g.schedule) - len(g.pending())
    for i, event in enumerate(g.pending(), start=offset):
        where = f"growth.schedule[{i}]"
        ops = event_ops(event, cfg, where)
        step = event["step"]
        _require(step > last, f"{where}: steps must be increasing, got {step} after {last}")
        _require(
            step < s.trainer.max_steps,
            f"{where}: step {step} is not below trainer.max_steps={s.trainer.max_steps} "
            "(it would never apply)",
        )
        try:
            cfg = plan(cfg, ops)[-1][2]
        except ValueError as err:
            raise UserError(f"{where} (step {step}): {err}") from None
        events.append((step, ops))
        last = step
    return events


def _check_growth(s: Settings) -> None:
    g = s.growth
    _require(
        g.lr_policy in ("continue", "rewarm"),
        f"growth.lr_policy must be continue or rewarm, got {g.lr_policy!r}",
    )
    _require(g.rewarm_steps is None or g.rewarm_steps > 0, "growth.rewarm_steps must be positive")
    if not g.pending():
        return
    t = s.trainer
    _require(
        t.strategy in ("auto", "single_device") and t.devices in (1, "auto") and t.num_nodes == 1,
        f"growth.schedule runs on one device (trainer.strategy={t.strategy}, "
        f"devices={t.devices}); on several, grow between runs with `altup grow`",
    )
    growth_events(s, s.model_config(vocab_size=s.model.get("vocab_size") or 257))


RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=,-]{0,99}")


def _lightning_choices() -> tuple[set[str], set[str]]:
    """The strategy and precision names this Lightning accepts (plus our `auto`)."""
    import typing as t

    from lightning.pytorch.strategies import StrategyRegistry
    from lightning.pytorch.trainer.connectors.accelerator_connector import _PRECISION_INPUT

    precisions = {str(v) for lit in t.get_args(_PRECISION_INPUT) for v in t.get_args(lit)}
    return {"auto", *StrategyRegistry.available_strategies()}, {"auto", *precisions}


def _check_paths(s: Settings) -> None:
    _require(
        RUN_NAME.fullmatch(s.run.name) is not None,
        f"run.name must be 1-100 letters, digits and ._+=,- (starting with a letter or "
        f"digit; no path separators), got {s.run.name!r}",
    )
    for key in ("output_dir", "cache_dir"):
        path = Path(getattr(s.run, key)).expanduser()
        blocked = next((p for p in (path, *path.parents) if p.exists()), None)
        _require(
            blocked is None or blocked.is_dir(),
            f"run.{key}={getattr(s.run, key)!r}: {blocked} is a file, not a directory",
        )


def _check_values(s: Settings) -> None:
    t, d, o = s.trainer, s.data, s.optim
    _check_paths(s)
    strategies, precisions = _lightning_choices()
    _require(
        str(t.strategy) in strategies,
        f"trainer.strategy must be one of {', '.join(sorted(strategies))}, got {t.strategy!r}",
    )
    _require(
        str(t.precision) in precisions,
        f"trainer.precision must be one of {', '.join(sorted(precisions))}, got {t.precision!r}",
    )
    _require(t.divergence_patience >= 0, "trainer.divergence_patience must be >= 0")
    try:
        codecs.lookup(d.encoding)
    except LookupError:
        raise UserError(f"data.encoding: unknown encoding {d.encoding!r}") from None
    _require(t.max_steps > 0, f"trainer.max_steps must be positive, got {t.max_steps}")
    _require(t.accumulate_grad_batches > 0, "trainer.accumulate_grad_batches must be positive")
    _require(t.val_check_interval > 0, "trainer.val_check_interval must be positive")
    _require(t.limit_val_batches >= 0, "trainer.limit_val_batches must be >= 0")
    _require(t.log_every_n_steps > 0, "trainer.log_every_n_steps must be positive")
    _require(t.num_nodes > 0, "trainer.num_nodes must be positive")
    _require(
        t.devices == "auto" or (isinstance(t.devices, int) and t.devices > 0),
        f"trainer.devices must be a positive int or 'auto', got {t.devices!r}",
    )
    _require(
        t.accelerator in ("auto", "cpu", "gpu", "cuda", "mps"),
        f"trainer.accelerator must be auto, cpu, gpu, cuda or mps, got {t.accelerator!r}",
    )
    _require(
        d.source in ("embedded", "text", "hf"),
        f"data.source must be embedded, text or hf, got {d.source!r}",
    )
    _require(d.source != "text" or bool(d.path), "data.path is required with data=text")
    _require(d.source != "hf" or bool(d.name), "data.name is required with data=hf")
    _require(
        d.source != "embedded" or bool(d.name), "data.name is required with data.source=embedded"
    )
    _require(
        s.tokenizer.kind != "file" or bool(s.tokenizer.path),
        "tokenizer.path is required with tokenizer=file",
    )
    tok_path = s.tokenizer.path
    if s.tokenizer.kind == "file" and tok_path and tok_path != "gpt2":
        _require(
            Path(tok_path).expanduser().exists(), f"tokenizer.path: {tok_path!r} does not exist"
        )
    _require(d.seq_len > 0, f"data.seq_len must be positive, got {d.seq_len}")
    _require(d.batch_size > 0, f"data.batch_size must be positive, got {d.batch_size}")
    _require(0 <= d.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {d.val_fraction}")
    _require(d.num_workers >= 0, "data.num_workers must be >= 0")
    max_len = s.model.get("max_seq_len")
    _require(
        isinstance(max_len, int) and d.seq_len <= max_len,
        f"data.seq_len={d.seq_len} exceeds model.max_seq_len={max_len}",
    )
    _require(
        s.tokenizer.kind in ("bpe", "file"),
        f"tokenizer.kind must be bpe or file, got {s.tokenizer.kind!r}",
    )
    if s.tokenizer.kind == "bpe":
        _require(
            s.tokenizer.vocab_size is not None and s.tokenizer.vocab_size >= 257,
            f"tokenizer.vocab_size must be at least 257, got {s.tokenizer.vocab_size}",
        )
    _require(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio must be in [0, 1]")
    _require(o.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
    _require(
        o.schedule_steps is None or o.schedule_steps > 0, "optim.schedule_steps must be positive"
    )
    _require(
        o.weight_decay >= 0 and o.grad_clip >= 0,
        "optim.weight_decay and optim.grad_clip must be >= 0",
    )
    _require(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
    _require(
        s.logger.kind in ("wandb", "csv", "none"),
        f"logger.kind must be wandb, csv or none, got {s.logger.kind!r}",
    )
    if s.logger.kind == "wandb":
        _require(
            s.logger.mode in ("offline", "online", "disabled"),
            f"logger.mode must be offline, online or disabled, got {s.logger.mode!r}",
        )
    _require(
        not ("fsdp" in str(t.strategy) and s.ffn.kind in ("peer", "pkm")),
        f"ffn={s.ffn.kind} does not support trainer.strategy={t.strategy} (its expert tables "
        "keep factored gradients that DDP supports and FSDP does not); use trainer=ddp",
    )
    _require(
        not ("fsdp" in str(t.strategy) and t.accelerator == "cpu"),
        f"trainer.strategy={t.strategy} needs CUDA GPUs (Lightning's FSDP does not run on "
        "CPU); for several CPU processes use trainer=ddp_cpu",
    )
    # The model's own invariants (heads dividing the width, even head dim, …) and its size.
    require_fits(s.model_config(vocab_size=s.model.get("vocab_size") or 257), "model")
