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

import math

from altup_cli.models.altup import anchor_count, anchor_offset
from altup_cli.models.transformer import ModelConfig


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Trainable parameters per component; `total` counts a tied embedding once."""
    d, heads, a = cfg.d_model, cfg.n_heads, cfg.altup
    attention = d * heads * (2 * cfg.head_dim + cfg.v_head_dim) + heads * cfg.v_head_dim * d
    counts = {
        "embedding": cfg.vocab_size * d * (a.K if a.mode == "altup" else 1),
        "attention": cfg.n_layers * attention,
        "mlp": len(_dense_layers(cfg)) * 2 * d * cfg.d_ff,
        "experts": len(cfg.ffn.layer_indices(cfg.n_layers)) * _sparse_ffn_parameters(cfg),
        "norms": (2 * cfg.n_layers + 1) * d,
        "altup": cfg.n_layers * _altup_scalars_per_layer(cfg) + _readout_matrix(cfg),
        "lm_head": 0 if cfg.tie_embeddings else cfg.vocab_size * d,
    }
    counts["total"] = sum(counts.values())
    counts["non_embedding"] = counts["total"] - counts["embedding"] - counts["lm_head"]
    return counts


def _dense_layers(cfg: ModelConfig) -> list[int]:
    sparse = set(cfg.ffn.layer_indices(cfg.n_layers))
    return [i for i in range(cfg.n_layers) if i not in sparse]


def _router_parameters(cfg: ModelConfig) -> int:
    """Query network, query BatchNorm and sub-key tables of product-key retrieval."""
    f, d = cfg.ffn, cfg.d_model
    query = d * f.heads * f.d_key + (2 * f.heads * f.d_key if f.query_bn else 0)
    tables = 1 if f.shared_keys else f.heads
    return query + tables * math.isqrt(f.num_experts) * f.d_key


def _sparse_ffn_parameters(cfg: ModelConfig) -> int:
    f, d = cfg.ffn, cfg.d_model
    if f.kind == "peer":
        return _router_parameters(cfg) + 2 * f.num_experts * d
    if f.kind == "pkm":
        return _router_parameters(cfg) + f.num_experts * d
    if f.kind == "moe":
        return d * f.num_experts + f.num_experts * 2 * d * cfg.d_ff
    return 0


def active_parameters(cfg: ModelConfig) -> int:
    """Non-embedding parameters a token uses: the retrieved experts/values (PEER, PKM) or
    its k experts (MoE) instead of the whole sparse layer."""
    f, d = cfg.ffn, cfg.d_model
    counts = parameter_counts(cfg)
    per_layer = {
        "peer": lambda: _router_parameters(cfg) + f.heads * f.topk * 2 * d,
        "pkm": lambda: _router_parameters(cfg) + f.heads * f.topk * d,
        "moe": lambda: d * f.num_experts + f.topk * 2 * d * cfg.d_ff,
        "dense": lambda: 0,
    }[f.kind]()
    sparse_layers = len(f.layer_indices(cfg.n_layers))
    return counts["non_embedding"] - counts["experts"] + sparse_layers * per_layer


def _altup_scalars_per_layer(cfg: ModelConfig) -> int:
    mode, K = cfg.altup.mode, cfg.altup.K
    if cfg.altup.widens:
        return K * K + K  # predictor P and corrector g
    return 3 if mode == "sequence" else 0  # (α, β) and γ


def _readout_matrix(cfg: ModelConfig) -> int:
    a = cfg.altup
    return a.K * cfg.d_model * cfg.d_model if a.widens and a.readout == "concat" else 0


def forward_flops_per_token(
    cfg: ModelConfig, seq_len: int, causal: bool = False
) -> dict[str, float]:
    """Forward FLOPs per token for sequences of length `seq_len`, per component.

    Sequence-AltUp and stride-and-skip run layer ℓ on its n_ℓ anchors only (⌈T/k⌉; with
    rotating anchors ⌈(T − ℓ mod k)/k⌉), so its cost per token shrinks by n_ℓ/T and its
    attention spans the anchors.
    """
    d, heads, a = cfg.d_model, cfg.n_heads, cfg.altup
    layers = range(cfg.n_layers)
    spans = [seq_len] * cfg.n_layers  # the tokens each layer runs on
    if a.mode in ("sequence", "stride_skip"):
        spans = [anchor_count(seq_len, a.stride, anchor_offset(a, i) or 0) for i in layers]
    processed = [n / seq_len for n in spans]
    projections = (
        2 * d * heads * (2 * cfg.head_dim + cfg.v_head_dim) + 2 * heads * cfg.v_head_dim * d
    )

    def attention(n: int) -> float:
        context = (n + 1) / 2 if causal else n
        return projections + 2 * context * heads * (cfg.head_dim + cfg.v_head_dim)  # QKᵀ, PV

    # Predict + correct as one K × (K+1) product over [x¹ … x^K, ỹ]; feeding the layer the
    # predicted block adds one row of P: K·d more multiply-adds.
    predict = 2 * a.K * (a.K + 1) * d if a.widens else 0
    if a.widens and a.layer_input == "predicted":
        predict += 2 * a.K * d
    experts, retrieval = _sparse_ffn_flops(cfg)
    sparse = cfg.ffn.layer_indices(cfg.n_layers)
    flops = {
        "embedding": 0.0,
        "attention": float(sum(attention(spans[i]) * processed[i] for i in layers)),
        "mlp": float(sum(4 * d * cfg.d_ff * processed[i] for i in _dense_layers(cfg))),
        "experts": float(sum(experts * processed[i] for i in sparse)),
        "retrieval": float(sum(retrieval * processed[i] for i in sparse)),
        "altup": float(cfg.n_layers * predict + 2 * _readout_matrix(cfg)),
        "lm_head": float(2 * d * cfg.vocab_size),
    }
    flops["total"] = sum(flops.values())
    return flops


def _sparse_ffn_flops(cfg: ModelConfig) -> tuple[float, float]:
    """Forward FLOPs per token of one sparse FFN layer: (matrix-product-like, candidate sums)."""
    f, d = cfg.ffn, cfg.d_model
    if f.kind in ("peer", "pkm"):
        router = 2 * d * f.heads * f.d_key + 2 * f.heads * math.isqrt(f.num_experts) * f.d_key
        per_row = 4 * d if f.kind == "peer" else 2 * d  # PEER: u·x and g·σ·v; PKM: g·v
        return float(router + f.heads * f.topk * per_row), float(f.heads * f.topk**2)
    if f.kind == "moe":
        # Expert choice: each expert takes C = min(n, ⌈capacity·k·n/E⌉) of the n tokens, so a
        # token meets E·C/n experts on average: capacity·k, at most E (exact when
        # capacity·k·n/E is a whole number or capacity·k ≥ E).
        experts_per_token = (
            min(f.num_experts, f.topk * f.capacity) if f.routing == "expert_choice" else f.topk
        )
        return 2.0 * d * f.num_experts + experts_per_token * 4 * d * cfg.d_ff, 0.0
    return 0.0, 0.0


def training_flops_per_token(
    cfg: ModelConfig, seq_len: int, causal: bool = False
) -> dict[str, float]:
    """Forward + backward FLOPs per token (3 × forward), per component."""
    return {k: 3 * v for k, v in forward_flops_per_token(cfg, seq_len, causal).items()}
