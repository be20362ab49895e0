"""Parameter counts and analytic FLOPs per token, broken down by component.

Convention: a multiply-add is 2 FLOPs; only matrix products are counted (norms, rotary,
softmax and the embedding lookup are free), exactly what `torch.utils.flop_counter`
counts. Attention scores are counted over the full T×T square, as FlopCounterMode does for
`scaled_dot_product_attention` even when it is causal; `causal=True` counts the average
causal context (T+1)/2 instead. Training = forward + backward = 3 × forward, since every
matrix product has two backward products (grad of input and of weight).

Sparse feed-forward layers (PEER, PKM, MoE) count what a token actually computes: the
query network, the 2·√N sub-key scores per head, the experts or values it retrieves (a
gathered dot product or weighted row sum is 2 FLOPs per element, like a matrix product),
the MoE router and its k experts (expert choice: capacity·k on average, at most E).
Product-key retrieval also adds h·k² candidate sums (counted, 1 FLOP each, under
`retrieval`; tests count them as they run), which FlopCounterMode does not see, nor top-k,
softmax or BatchNorm (free here as everywhere). Training counts them 3× by the same
convention (their backward is two sums over k² gradients per head).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from altup_cli.models import laurel
from altup_cli.models.config import ModelConfig
from altup_cli.models.registry import FFNKind, layer_kinds, stream_variant


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Trainable parameters per component; `total` counts a tied embedding once."""
    d, heads, variant = cfg.d_model, cfg.n_heads, stream_variant(cfg.altup.mode)
    attention = d * heads * (2 * cfg.head_dim + cfg.v_head_dim) + heads * cfg.v_head_dim * d
    ffn = _per_layer(cfg, lambda kind: kind.parameters(cfg), {"mlp": 0, "experts": 0})
    counts = {
        "embedding": cfg.vocab_size * d * variant.embed_width(cfg.altup),
        "attention": cfg.n_layers * attention + laurel.parameters(cfg),  # LAuReL: its branch
        **ffn,
        "norms": (2 * cfg.n_layers + 1) * d,
        "altup": variant.parameters(cfg),
        "lm_head": 0 if cfg.tie_embeddings else cfg.vocab_size * d,
    }
    counts["total"] = sum(counts.values())
    counts["non_embedding"] = counts["total"] - counts["embedding"] - counts["lm_head"]
    return counts


def _per_layer(
    cfg: ModelConfig,
    count: Callable[[FFNKind], Mapping[str, float]],
    start: dict,
    weights: list[float] | None = None,
) -> dict:
    """Each layer's feed-forward count (times its weight), summed per component."""
    totals, cached = dict(start), {}
    for i, kind in enumerate(layer_kinds(cfg)):
        if kind.name not in cached:
            cached[kind.name] = count(kind)
        for component, value in cached[kind.name].items():
            share = value if weights is None else value * weights[i]
            totals[component] = totals.get(component, 0) + share
    return totals


def active_parameters(cfg: ModelConfig) -> int:
    """Non-embedding parameters a token uses: the retrieved experts/values (PEER, PKM) or
    its k experts (MoE) instead of the whole sparse layer."""
    unused = sum(
        sum(kind.parameters(cfg).values()) - kind.active_parameters(cfg)
        for kind in layer_kinds(cfg)
    )
    return parameter_counts(cfg)["non_embedding"] - unused


def forward_flops_per_token(
    cfg: ModelConfig, seq_len: int, causal: bool = False
) -> dict[str, float]:
    """Forward FLOPs per token for sequences of length `seq_len`, per component.

    A layer that runs on n of the T tokens (Sequence-AltUp and stride-and-skip run a
    sequence layer on its anchors) costs n/T per token, and its attention spans the n.
    """
    d, heads, variant = cfg.d_model, cfg.n_heads, stream_variant(cfg.altup.mode)
    spans = variant.tokens(cfg, seq_len)  # the tokens each layer runs on
    processed = [n / seq_len for n in spans]
    projections = (
        2 * d * heads * (2 * cfg.head_dim + cfg.v_head_dim) + 2 * heads * cfg.v_head_dim * d
    )

    def attention(n: int) -> float:
        context = (n + 1) / 2 if causal else n
        return projections + 2 * context * heads * (cfg.head_dim + cfg.v_head_dim)  # QKᵀ, PV

    start = {"mlp": 0.0, "experts": 0.0, "retrieval": 0.0}
    ffn = _per_layer(cfg, lambda kind: kind.flops(cfg), start, processed)
    flops = {
        "embedding": 0.0,
        "attention": float(sum(attention(n) * p for n, p in zip(spans, processed, strict=True)))
        + laurel.flops(cfg, processed),  # LAuReL sits in the attention branch
        **{k: float(v) for k, v in ffn.items()},
        "altup": variant.flops(cfg, seq_len),
        "lm_head": float(2 * d * cfg.vocab_size),
    }
    flops["total"] = sum(flops.values())
    return flops


def training_flops_per_token(
    cfg: ModelConfig, seq_len: int, causal: bool = False
) -> dict[str, float]:
    """Forward + backward FLOPs per token (3 × forward), per component."""
    return {k: 3 * v for k, v in forward_flops_per_token(cfg, seq_len, causal).items()}
