"""The typed settings a composed config becomes, and the type checks that build them: a
section is a dataclass, and a value must match its field's annotation."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from altup_cli.data import MIN_VOCAB_SIZE
from altup_cli.errors import UserError
from altup_cli.models.config import AltUpConfig, FFNConfig, ModelConfig


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
class TrainingEvalSettings:
    """Evaluation during training (`trainer.eval`): every `every` steps, at a validation
    (and at the end), perplexity on `ppl` corpora (as `altup eval ppl --data` names them)
    and the lm-evaluation-harness `tasks` on `limit` examples each."""

    every: int = 0  # steps between evaluations, a multiple of val_check_interval; 0: off
    ppl: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    limit: int | None = 100  # examples per lm task (None: all)
    num_fewshot: int | None = None
    max_tokens: int | None = 20000  # scored tokens per ppl corpus (None: all)
    stride: int | None = None  # ppl windows' stride (None: the context)
    batch_size: int = 8

    def __post_init__(self) -> None:
        from altup_cli.data.corpora import EMBEDDED_CORPORA

        for name, ok in (("every", self.every >= 0), ("batch_size", self.batch_size >= 1),
                         ("limit", self.limit is None or self.limit >= 1),
                         ("max_tokens", self.max_tokens is None or self.max_tokens >= 1),
                         ("stride", self.stride is None or self.stride >= 1)):  # fmt: skip
            if not ok:
                raise ValueError(f"trainer.eval.{name}: got {getattr(self, name)!r}")
        for corpus in self.ppl:
            if corpus not in EMBEDDED_CORPORA and not corpus.startswith(("text:", "hf:")):
                raise ValueError(
                    f"trainer.eval.ppl: {corpus!r} is not {', '.join(EMBEDDED_CORPORA)}, "
                    "text:PATH or hf:NAME"
                )
        if self.every and not (self.ppl or self.tasks):
            raise ValueError("trainer.eval.every is set but trainer.eval.ppl and .tasks are empty")


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
    eval: TrainingEvalSettings = field(default_factory=TrainingEvalSettings)

    def __post_init__(self) -> None:
        every = self.eval.every
        if every and self.val_check_interval > 0 and every % self.val_check_interval:
            raise ValueError(
                f"trainer.eval.every={every} must be a multiple of trainer.val_check_interval="
                f"{self.val_check_interval} (it runs at a validation)"
            )
        if every and "fsdp" in str(self.strategy):
            raise ValueError("trainer.eval runs on rank 0 alone: not with a sharded (FSDP) model")


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

    def model_config(self, vocab_size: int | None = None) -> ModelConfig:
        """The model for a tokenizer of `vocab_size` tokens (rounded up to a multiple of 64
        unless model.vocab_size is set). Without one, before the tokenizer exists:
        model.vocab_size, else the smallest vocabulary."""
        values = {**self.model, "altup": self.altup, "ffn": self.ffn}
        if vocab_size is None:
            vocab_size = values.get("vocab_size") or MIN_VOCAB_SIZE
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
    elif dataclasses.is_dataclass(annotation) and isinstance(annotation, type):
        if isinstance(value, dict):  # a nested section
            return read_section(annotation, value, where)
        if isinstance(value, annotation):
            return value
    elif annotation is Any or isinstance(value, annotation):
        return value
    raise UserError(f"{where}: expected {_type_name(annotation)}, got {value!r}")


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def read_section(cls: type, values: Any, name: str) -> Any:
    """The dataclass `cls` from the mapping `values` of config section `name`: no unknown
    or missing keys, every value of its field's type, the dataclass's own invariants."""
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


def check_model_types(values: dict[str, Any]) -> None:
    """The model section's keys and types (its values are checked by ModelConfig later)."""
    hints = typing.get_type_hints(ModelConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise UserError(f"model: unknown key(s) {', '.join(unknown)}")
    for key, value in values.items():
        annotation = hints[key] | None if key == "vocab_size" else hints[key]
        check_type(value, annotation, f"model.{key}")
