"""Where the old entries of a laid-out tensor go when its model grows.

Each feed-forward kind and stream variant declares, per tensor and axis, the `Span` of the
config it runs along (`models.registry`: its entry's layout); `SPANS` says which
config field moves each span and where an axis of old length n keeps its old entries, so
one function places every registered kind's tensors for mlp_width, residual_width and the
kinds' own `ffn.<field>` ops, and tells which of a layer's tensors write the stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping

import torch

from altup_cli.growth.remap import Axis, Placement, blocked, prefix
from altup_cli.models.config import ModelConfig
from altup_cli.models.registry import FFN_KINDS, Span, module_layouts, writes_stream
from altup_cli.models.transformer import TransformerLM


def blocks_of(old: ModelConfig, new: ModelConfig, n: int) -> torch.Tensor:
    return blocked(n // old.d_model, old.d_model, new.d_model)


def _key_features(old: ModelConfig, new: ModelConfig, n: int) -> torch.Tensor:
    half, new_half = old.ffn.d_key // 2, new.ffn.d_key // 2
    return blocked(n // half, half, new_half)


def _expert_rows(old: ModelConfig, new: ModelConfig, n: int) -> torch.Tensor:
    """Flat expert index i·r + j moves to i·r̂ + j."""
    r, new_r = math.isqrt(old.ffn.num_experts), math.isqrt(new.ffn.num_experts)
    return blocked(r, r, new_r)


def _appended(old: ModelConfig, new: ModelConfig, n: int) -> torch.Tensor:
    return prefix(n)


# span → (the field whose growth moves it, where an axis of old length n keeps its entries)
SPANS: dict[str, tuple[str, Callable[[ModelConfig, ModelConfig, int], torch.Tensor]]] = {
    "d_model": ("d_model", _appended),
    "d_model_blocks": ("d_model", blocks_of),
    "d_ff": ("d_ff", _appended),
    "key_features": ("ffn.d_key", _key_features),
    "key_half": ("ffn.d_key", _appended),
    "sub_keys": ("ffn.num_experts", _appended),
    "experts": ("ffn.num_experts", _expert_rows),
}


def output_side() -> tuple[str, ...]:
    """Block tensors an inserted layer must zero to be the identity: W_O and every kind's
    tensors that write the stream (W2, MoE's w2, PEER's down, PKM's values)."""
    kinds = FFN_KINDS.values()
    writers = (f"ffn.{n}" for k in kinds for n, s in k.layout.items() if writes_stream(s))
    return ("attn.wo.weight", *dict.fromkeys(writers))


def laid_out(model: TransformerLM) -> Iterator[tuple[str, torch.Tensor, Mapping[int, Span]]]:
    """(name, tensor, spans) of every tensor a registered kind or variant lays out."""
    layouts = module_layouts()
    for p, module in model.named_modules():
        layout = layouts.get(type(module), {})
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        for name, spans in layout.items():
            if name in tensors:
                yield (f"{p}.{name}" if p else name), tensors[name], spans


def span_placements(model: TransformerLM, field: str, new_cfg: ModelConfig) -> dict[str, Placement]:
    """Where the old entries of every laid-out tensor go when `field` grows."""
    placements: dict[str, Placement] = {}
    for name, tensor, spans in laid_out(model):
        moved = {a: s for a, s in spans.items() if SPANS[s.dim][0] == field}
        if moved:
            axes = {
                a: Axis(SPANS[s.dim][1](model.config, new_cfg, tensor.shape[a]), zero=s.zero)
                for a, s in moved.items()
            }
            fill = "built" if any(s.built for s in moved.values()) else "random"
            placements[name] = Placement(name, axes, fill=fill)
    return placements
