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
    d, heads, a = cfg.d_model, cfg.n_heads, cfg.altup
    attention = d * heads * (2 * cfg.head_dim + cfg.v_head_dim) + heads * cfg.v_head_dim * d
    counts = {
        "embedding": cfg.vocab_size * d * (a.K if a.mode == "altup" else 1),
        "attention": cfg.n_layers * attention,
        "mlp": cfg.n_layers * 2 * d * cfg.d_ff,
        "norms": (2 * cfg.n_layers + 1) * d,
        "altup": cfg.n_layers * _altup_scalars_per_layer(cfg) + _readout_matrix(cfg),
        "lm_head": 0 if cfg.tie_embeddings else cfg.vocab_size * d,
    }
    counts["total"] = sum(counts.values())
    counts["non_embedding"] = counts["total"] - counts["embedding"] - counts["lm_head"]
    return counts


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

    Sequence-AltUp and stride-and-skip run each layer on ⌈T/k⌉ anchors only, so the layer
    cost per token shrinks by anchors/T and attention spans the anchors.
    """
    d, heads, a = cfg.d_model, cfg.n_heads, cfg.altup
    processed, span = 1.0, seq_len
    if a.mode in ("sequence", "stride_skip"):
        span = -(-seq_len // a.stride)
        processed = span / seq_len
    context = (span + 1) / 2 if causal else span
    projections = (
        2 * d * heads * (2 * cfg.head_dim + cfg.v_head_dim) + 2 * heads * cfg.v_head_dim * d
    )
    scores = 2 * context * heads * (cfg.head_dim + cfg.v_head_dim)  # Q·Kᵀ and P·V
    # Predict + correct as one K × (K+1) product over [x¹ … x^K, ỹ]; feeding the layer the
    # predicted block adds one row of P: K·d more multiply-adds.
    predict = 2 * a.K * (a.K + 1) * d if a.widens else 0
    if a.widens and a.layer_input == "predicted":
        predict += 2 * a.K * d
    flops = {
        "embedding": 0.0,
        "attention": float(cfg.n_layers * (projections + scores) * processed),
        "mlp": float(cfg.n_layers * 4 * d * cfg.d_ff * processed),
        "altup": float(cfg.n_layers * predict + 2 * _readout_matrix(cfg)),
        "lm_head": float(2 * d * cfg.vocab_size),
    }
    flops["total"] = sum(flops.values())
    return flops


def training_flops_per_token(
    cfg: ModelConfig, seq_len: int, causal: bool = False
) -> dict[str, float]:
    """Forward + backward FLOPs per token (3 × forward), per component."""
    return {k: 3 * v for k, v in forward_flops_per_token(cfg, seq_len, causal).items()}
