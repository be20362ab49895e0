"""Parameter counts and analytic FLOPs per token, broken down by component.

Convention: a multiply-add is 2 FLOPs; only matrix products are counted (norms, rotary,
softmax and the embedding lookup are free), exactly what `torch.utils.flop_counter`
counts. Attention scores are counted over the full T×T square, as FlopCounterMode does for
`scaled_dot_product_attention` even when it is causal; `causal=True` counts the average
causal context (T+1)/2 instead. Training = forward + backward = 3 × forward, since every
matrix product has two backward products (grad of input and of weight).
"""

from __future__ import annotations

from altup_cli.models.transformer import ModelConfig


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Trainable parameters per component; `total` counts a tied embedding once."""
    d, heads = cfg.d_model, cfg.n_heads
    attention = d * heads * (2 * cfg.head_dim + cfg.v_head_dim) + heads * cfg.v_head_dim * d
    counts = {
        "embedding": cfg.vocab_size * d,
        "attention": cfg.n_layers * attention,
        "mlp": cfg.n_layers * 2 * d * cfg.d_ff,
        "norms": (2 * cfg.n_layers + 1) * d,
        "lm_head": 0 if cfg.tie_embeddings else cfg.vocab_size * d,
    }
    counts["total"] = sum(counts.values())
    counts["non_embedding"] = counts["total"] - counts["embedding"] - counts["lm_head"]
    return counts


def forward_flops_per_token(
    cfg: ModelConfig, seq_len: int, causal: bool = False
) -> dict[str, float]:
    """Forward FLOPs per token for sequences of length `seq_len`, per component."""
    d, heads = cfg.d_model, cfg.n_heads
    context = (seq_len + 1) / 2 if causal else seq_len
    projections = (
        2 * d * heads * (2 * cfg.head_dim + cfg.v_head_dim) + 2 * heads * cfg.v_head_dim * d
    )
    scores = 2 * context * heads * (cfg.head_dim + cfg.v_head_dim)  # Q·Kᵀ and P·V
    flops = {
        "embedding": 0.0,
        "attention": float(cfg.n_layers * (projections + scores)),
        "mlp": float(cfg.n_layers * 4 * d * cfg.d_ff),
        "lm_head": float(2 * d * cfg.vocab_size),
    }
    flops["total"] = sum(flops.values())
    return flops


def training_flops_per_token(
    cfg: ModelConfig, seq_len: int, causal: bool = False
) -> dict[str, float]:
    """Forward + backward FLOPs per token (3 × forward), per component."""
    return {k: 3 * v for k, v in forward_flops_per_token(cfg, seq_len, causal).items()}
