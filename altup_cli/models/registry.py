"""The two registries a model's kinds are looked up in, and what an entry carries.

`FFNConfig.kind` names a feed-forward kind and `AltUpConfig.mode` a residual-stream variant,
each an entry of a registry (`FFN_KINDS`: `FFNKind`, `STREAM_VARIANTS`: `StreamVariant`)
that the kind's own module fills when `altup_cli.models` is imported. An entry carries
everything the rest of the code asks about its kind (checks, builder, counts, growth rules,
training facts), so nothing outside it compares kind names; an unregistered name is a
one-line ValueError.

Growth reads an entry's `layout`: per tensor (named within the kind's module) and axis,
the `Span` of the config it runs along — d_model (the residual width), d_model_blocks
(blocks of d_model side by side), d_ff, experts (N = r² flat expert rows), sub_keys (√N),
key_features (2·heads query halves of d_key/2 side by side), key_half (d_key/2);
`growth.layouts` knows where each span's old entries sit once it has grown.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from altup_cli.models.config import (
    FALLBACK_KIND,
    FFN_KINDS,
    STREAM_VARIANTS,
    AltUpConfig,
    FFNConfig,
    ModelConfig,
    lookup,
)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


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
    options: frozenset[str] = frozenset()  # of config.FAMILY_OPTIONS, those it reads
    # Named scalars of one wrapped layer (connection means, gains…) that training logs
    statistics: Callable[[nn.Module], Mapping[str, float]] | None = None
    sweep: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    examples: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


def register_ffn_kind(kind: FFNKind) -> FFNKind:
    FFN_KINDS[kind.name] = kind
    return kind


def register_stream_variant(variant: StreamVariant) -> StreamVariant:
    STREAM_VARIANTS[variant.name] = variant
    return variant


def ffn_kind(name: str) -> FFNKind:
    return lookup(FFN_KINDS, name, "ffn.kind")


def stream_variant(name: str) -> StreamVariant:
    return lookup(STREAM_VARIANTS, name, "altup.mode")


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
