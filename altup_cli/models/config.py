"""A model's configuration, and the two registries its kinds are looked up in.

`ModelConfig` is the single source of a model's shape; `FFNConfig.kind` names its
feed-forward kind and `AltUpConfig.mode` its residual-stream variant, each an entry of a
registry (`FFN_KINDS`: `FFNKind`, `STREAM_VARIANTS`: `StreamVariant`) that the kind's own
module fills when `altup_cli.models` is imported. An entry carries everything the rest of
the code asks about its kind (checks, builder, counts, growth rules, training facts), so
nothing outside it compares kind names; an unregistered name is a one-line ValueError.
The schema checks each field's values; an entry checks what depends on its kind.

Growth reads an entry's `layout`: per tensor (named within the kind's module) and axis,
the `Span` of the config it runs along — d_model (the residual width), d_model_blocks
(blocks of d_model side by side), d_ff, experts (N = r² flat expert rows), sub_keys (√N),
key_features (2·heads query halves of d_key/2 side by side), key_half (d_key/2);
`growth.layouts` knows where each span's old entries sit once it has grown.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import nn

FALLBACK_KIND = "dense"  # the MLP of the layers outside `ffn.layers` (as ffn.kind: everywhere)
LAYER_CHOICES = ("all", "middle")
SCHEDULES = ("alternating", "same")
LAYER_INPUTS = ("original", "predicted")
READOUTS = ("sum", "mean", "first", "concat")
ANCHORS = ("fixed", "rotating")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


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


@dataclass(frozen=True)
class Span:
    """What one axis of a tensor runs along, for growth (the vocabulary above)."""

    dim: str
    zero: bool = False
    built: bool = False


Layout = Mapping[str, Mapping[int, Span]]  # tensor name → axis → span


def writes_stream(spans: Mapping[int, Span]) -> bool:
    """A tensor whose new residual-width entries must be zero writes the residual stream:
    an output projection (zero in an inserted layer; GPT-2's scaled init)."""
    return any(s.dim == "d_model" and s.zero for s in spans.values())


def _accept(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class FFNKind:
    """One feed-forward kind. Per-layer callables take the whole `ModelConfig`; counts and
    FLOPs are per token and broken down by `counting` component (mlp, experts, retrieval)."""

    name: str
    label: str  # as messages name it: "PEER"
    module: type[nn.Module]
    build: Callable[[ModelConfig], nn.Module]
    parameters: Callable[[ModelConfig], Mapping[str, int]]  # one layer's
    active_parameters: Callable[[ModelConfig], int]  # one layer's that a token uses
    flops: Callable[[ModelConfig], Mapping[str, float]]  # one layer's forward, per token
    check: Callable[[FFNConfig], None] = _accept
    init: Callable[[nn.Module], None] | None = None  # after the model's N(0, std) pass
    layout: Layout = field(default_factory=dict)
    growable: tuple[str, ...] = ()  # FFNConfig fields that `ffn.<field>=N` grows
    inexact_growth: Mapping[str, str] = field(default_factory=dict)  # of those: why not exact
    growth_refusals: Mapping[str, str] = field(default_factory=dict)  # fields that cannot grow
    check_growth: Callable[[str, int], None] = _accept  # (field, target size) it cannot take
    logs_expert_usage: bool = False  # has ExpertUsage modules (the usage logger runs)
    # Why a layer of this config cannot decode token by token (None: it can)
    decoding_refusal: Callable[[FFNConfig], str | None] = _accept
    supports_fsdp: bool = True
    sweep: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # arch → overrides
    examples: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # growth bench


@dataclass(frozen=True)
class StreamVariant:
    """One residual-stream variant (`altup.mode`). A widening variant carries the stream as
    (K, B, T, d) between `widen` (embedding output → stream) and `readout` (→ (B, T, d))."""

    name: str
    wrap: Callable[[ModelConfig, nn.Module, int], nn.Module]  # layer i as the variant runs it
    check: Callable[[ModelConfig], None] = _accept
    embed_width: Callable[[AltUpConfig], int] = lambda a: 1  # the embedding is this many d wide
    widen: Callable[[AltUpConfig, torch.Tensor, int], torch.Tensor] | None = None
    readout: Callable[[AltUpConfig, int], nn.Module] | None = None
    parameters: Callable[[ModelConfig], int] = lambda cfg: 0  # its own ("altup")
    flops: Callable[[ModelConfig, int], float] = lambda cfg, T: 0.0  # its own forward, per token
    tokens: Callable[[ModelConfig, int], list[int]] = lambda cfg, T: [T] * cfg.n_layers
    layouts: Mapping[type[nn.Module], Layout] = field(default_factory=dict)  # its modules'
    grow_layers: Callable[[ModelConfig, int, int], AltUpConfig] | None = None  # (cfg, at, n)
    growth_refusals: Mapping[str, str] = field(default_factory=dict)
    sweep: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    examples: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


FFN_KINDS: dict[str, FFNKind] = {}
STREAM_VARIANTS: dict[str, StreamVariant] = {}


def register_ffn_kind(kind: FFNKind) -> FFNKind:
    FFN_KINDS[kind.name] = kind
    return kind


def register_stream_variant(variant: StreamVariant) -> StreamVariant:
    STREAM_VARIANTS[variant.name] = variant
    return variant


def ffn_kind(name: str) -> FFNKind:
    known = ", ".join(FFN_KINDS)
    _check(name in FFN_KINDS, f"ffn.kind must be one of {known}, got {name!r}")
    return FFN_KINDS[name]


def stream_variant(name: str) -> StreamVariant:
    known = ", ".join(STREAM_VARIANTS)
    _check(name in STREAM_VARIANTS, f"altup.mode must be one of {known}, got {name!r}")
    return STREAM_VARIANTS[name]


def layer_kinds(cfg: ModelConfig) -> list[FFNKind]:
    """The kind each layer runs: `ffn.kind` in the layers it takes, the dense MLP elsewhere."""
    taken = set(cfg.ffn.layer_indices(cfg.n_layers))
    kind, fallback = ffn_kind(cfg.ffn.kind), FFN_KINDS[FALLBACK_KIND]
    return [kind if i in taken else fallback for i in range(cfg.n_layers)]


def decoding_refusal(cfg: ModelConfig) -> str | None:
    """Why this model cannot generate with a cache (a layer that is not causal), or None."""
    reasons = (kind.decoding_refusal(cfg.ffn) for kind in layer_kinds(cfg))
    return next((r for r in reasons if r), None)


def ffn_layouts() -> dict[type[nn.Module], Layout]:
    return {kind.module: kind.layout for kind in FFN_KINDS.values()}


def module_layouts() -> dict[type[nn.Module], Layout]:
    """Every registered module's growth layout: the feed-forward kinds' and the variants'."""
    variants = {m: lay for v in STREAM_VARIANTS.values() for m, lay in v.layouts.items()}
    return {**ffn_layouts(), **variants}


def sweep_archs() -> dict[str, list[str]]:
    """The isoFLOP sweep's architectures: each the overrides of its config groups."""
    entries = [*FFN_KINDS.values(), *STREAM_VARIANTS.values()]
    return {arch: list(o) for entry in entries for arch, o in entry.sweep.items()}


def growth_examples() -> dict[str, dict[str, Any]]:
    """Named ModelConfig overrides, one model per kind: the growth benchmark's rows."""
    entries = [*STREAM_VARIANTS.values(), *FFN_KINDS.values()]
    return {name: dict(o) for entry in entries for name, o in entry.examples.items()}


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
        kind = ffn_kind(self.kind)
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

    def __post_init__(self) -> None:
        stream_variant(self.mode)
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
        return stream_variant(self.mode).widen is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
        stream_variant(self.altup.mode).check(self)

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
