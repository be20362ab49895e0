"""A model's configuration: `ModelConfig`, the single source of a model's shape, with its
`FFNConfig` and `AltUpConfig`. The schema checks each field's values; the kind's registry
entry (`models.registry`) checks what depends on its kind.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

FALLBACK_KIND = "dense"  # the MLP of the layers outside `ffn.layers` (as ffn.kind: everywhere)
# The registries' tables, filled by each kind's module (entries: `registry.FFNKind` and
# `registry.StreamVariant`, whose types need this module: hence they are kept here untyped)
FFN_KINDS: dict[str, Any] = {}
STREAM_VARIANTS: dict[str, Any] = {}
LAYER_CHOICES = ("all", "middle")
SCHEDULES = ("alternating", "same")
LAYER_INPUTS = ("original", "predicted")
READOUTS = ("sum", "mean", "first", "concat")
ANCHORS = ("fixed", "rotating")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def lookup(table: Mapping[str, Any], name: str, key: str) -> Any:
    """A registry entry by name; an unregistered one is a one-line ValueError."""
    _check(name in table, f"{key} must be one of {', '.join(table)}, got {name!r}")
    return table[name]


def layer_choice(spec: str | Sequence[int], key: str) -> str | list[int]:
    """`all`, `middle` or a list of layer indices (checked against a depth by `select_layers`)."""
    if isinstance(spec, str):
        _check(
            spec in LAYER_CHOICES,
            f"{key} must be all, middle or a list of layer indices, got {spec!r}",
        )
        return spec
    return list(spec)


def select_layers(spec: str | list[int], n_layers: int, key: str) -> list[int]:
    """The layer indices a `layer_choice` picks in a model of `n_layers` layers."""
    if spec == "all":
        return list(range(n_layers))
    if spec == "middle":
        return [n_layers // 2]
    bad = [i for i in spec if not 0 <= i < n_layers]
    _check(not bad, f"{key}: {bad} out of range for {n_layers} layers")
    _check(len(set(spec)) == len(spec), f"{key} has repeated indices")
    return sorted(spec)


@dataclass
class FFNConfig:
    """`num_experts`/`topk` mean N experts (values for PKM) retrieved k per head by PEER
    and PKM, and E experts with top-k routing for MoE."""

    kind: str = FALLBACK_KIND
    layers: str | list[int] = "all"  # which layers' MLP it replaces: all, middle, or indices
    num_experts: int = 65536
    heads: int = 8
    topk: int = 16
    d_key: int = 256
    query_bn: bool = True
    shared_keys: bool = True  # PEER shares one pair of sub-key tables across heads
    activation: str = "gelu"
    routing: str = "token_choice"
    capacity: float = 1.0
    balance_weight: float = 0.01
    table_lr: float | None = None  # lazy-Adam LR of expert/value tables (None: optim.lr)

    def __post_init__(self) -> None:
        kind = lookup(FFN_KINDS, self.kind, "ffn.kind")
        self.layers = layer_choice(self.layers, "ffn.layers")
        _check(self.heads >= 1, f"ffn.heads must be >= 1, got {self.heads}")
        _check(self.topk >= 1, f"ffn.topk must be >= 1, got {self.topk}")
        _check(self.num_experts >= 1, f"ffn.num_experts must be >= 1, got {self.num_experts}")
        kind.check(self)  # the layer's own checks, so a bad config fails before any build
        _check(self.balance_weight >= 0, "ffn.balance_weight must be >= 0")
        _check(self.table_lr is None or self.table_lr > 0, "ffn.table_lr must be positive")

    def layer_indices(self, n_layers: int) -> list[int]:
        """The layers whose MLP this kind replaces (none for dense)."""
        if self.kind == FALLBACK_KIND:
            return []
        return select_layers(self.layers, n_layers, "ffn.layers")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AltUpConfig:
    """`off`: the plain model. `altup`: a V×(K·d) embedding. `recycled`: the width-d
    embedding replicated K times. `sequence` / `stride_skip`: anchors every `stride` tokens,
    at t ≡ 0 (`fixed`: what configs from before `anchors` existed mean) or t ≡ ℓ mod k, in
    the layers `sequence_layers` picks (the others run on every token)."""

    mode: str = "off"
    K: int = 2
    schedule: str = "alternating"
    layer_input: str = "original"
    readout: str = "sum"
    stride: int = 2
    anchors: str = "fixed"
    sequence_layers: str | list[int] = "all"
    # Options of the widened-stream family; a variant names those it reads (`options`)
    dynamic: bool = False  # Hyper-Connections: input-dependent connections
    sinkhorn_iters: int = 20  # mHC: Sinkhorn–Knopp iterations
    coef_clip: float | None = None  # Gemma 3n AltUp: clip of the router's coefficients
    laurel_rank: int = 0  # LAuReL's low-rank residual (any variant); 0: off

    def __post_init__(self) -> None:
        variant = lookup(STREAM_VARIANTS, self.mode, "altup.mode")
        for name in FAMILY_OPTIONS:
            _check(
                getattr(self, name) == _DEFAULTS[name] or name in variant.options,
                f"altup.{name} does not apply to altup.mode={self.mode}",
            )
        _check(
            self.sinkhorn_iters >= 1,
            f"altup.sinkhorn_iters must be >= 1, got {self.sinkhorn_iters}",
        )
        _check(
            self.coef_clip is None or self.coef_clip > 0,
            f"altup.coef_clip must be positive or null, got {self.coef_clip}",
        )
        _check(self.laurel_rank >= 0, f"altup.laurel_rank must be >= 0, got {self.laurel_rank}")
        _check(self.K >= 1, f"altup.K must be >= 1, got {self.K}")
        _check(self.stride >= 1, f"altup.stride must be >= 1, got {self.stride}")
        _check(
            self.schedule in SCHEDULES,
            f"altup.schedule must be alternating or same, got {self.schedule!r}",
        )
        _check(
            self.layer_input in LAYER_INPUTS,
            f"altup.layer_input must be original or predicted, got {self.layer_input!r}",
        )
        _check(
            self.readout in READOUTS,
            f"altup.readout must be one of {', '.join(READOUTS)}, got {self.readout!r}",
        )
        _check(
            self.anchors in ANCHORS,
            f"altup.anchors must be fixed or rotating, got {self.anchors!r}",
        )
        self.sequence_layers = layer_choice(self.sequence_layers, "altup.sequence_layers")

    @property
    def widens(self) -> bool:
        """Whether the stream carries a block axis (K, B, T, d): (Recycled-)AltUp."""
        return lookup(STREAM_VARIANTS, self.mode, "altup.mode").widen is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


FAMILY_OPTIONS = ("dynamic", "sinkhorn_iters", "coef_clip")  # refused by variants not naming them
_DEFAULTS = {f.name: f.default for f in fields(AltUpConfig)}


@dataclass
class ModelConfig:
    """The single source of a model's shape. `None` head dims default to d_model // n_heads."""

    vocab_size: int = 8192
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    head_dim: int | None = None  # query/key dim per head
    v_head_dim: int | None = None  # value dim per head
    d_ff: int = 512
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    tie_embeddings: bool = True
    ffn: FFNConfig = field(default_factory=FFNConfig)
    init_std: float = 0.02
    altup: AltUpConfig = field(default_factory=AltUpConfig)

    def __post_init__(self) -> None:
        if isinstance(self.altup, dict):
            self.altup = AltUpConfig(**self.altup)
        if isinstance(self.ffn, str):  # checkpoints from before the ffn group
            self.ffn = FFNConfig(kind=self.ffn)
        elif isinstance(self.ffn, dict):
            self.ffn = FFNConfig(**self.ffn)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if (self.head_dim is None or self.v_head_dim is None) and self.d_model % self.n_heads:
            raise ValueError(
                f"model.n_heads={self.n_heads} does not divide model.d_model={self.d_model} "
                "(set model.head_dim and model.v_head_dim explicitly to decouple them)"
            )
        if self.head_dim is None:
            self.head_dim = self.d_model // self.n_heads
        if self.v_head_dim is None:
            self.v_head_dim = self.d_model // self.n_heads
        if self.head_dim % 2:
            raise ValueError(
                f"model.head_dim must be even for rotary embeddings, got {self.head_dim}"
            )
        if self.norm_eps <= 0 or self.init_std <= 0 or self.rope_theta <= 0:
            raise ValueError("model.norm_eps, model.init_std and model.rope_theta must be positive")
        self.ffn.layer_indices(self.n_layers)  # indices in range
        lookup(STREAM_VARIANTS, self.altup.mode, "altup.mode").check(self)

    @property
    def output_std(self) -> float:
        """The GPT-2 scale of residual-branch output projections."""
        return self.init_std / math.sqrt(2 * self.n_layers)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        _check_keys(values, {f.name for f in fields(cls)}, "model config")
        altup = values.get("altup")
        if isinstance(altup, dict):
            _check_keys(altup, {f.name for f in fields(AltUpConfig)}, "altup")
            values = {**values, "altup": AltUpConfig(**altup)}
        ffn = values.get("ffn")
        if isinstance(ffn, dict):
            _check_keys(ffn, {f.name for f in fields(FFNConfig)}, "ffn")
        return cls(**values)


def _check_keys(values: Mapping[str, Any], known: set[str], what: str) -> None:
    unknown = sorted(set(values) - known)
    _check(not unknown, f"unknown {what} key(s): {', '.join(unknown)}")
