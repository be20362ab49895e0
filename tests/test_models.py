"""The model's shape knobs, its counting, and its causal structure."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from altup_cli.models import (
    ModelConfig,
    TransformerLM,
    forward_flops_per_token,
    parameter_counts,
    training_flops_per_token,
)
from tests.flops import count_flops

CONFIGS = [
    ModelConfig(vocab_size=300, d_model=48, n_layers=2, n_heads=4, d_ff=96, max_seq_len=32),
    # Decoupled head dims and an untied head: every growth knob set independently.
    ModelConfig(
        vocab_size=257,
        d_model=40,
        n_layers=3,
        n_heads=3,
        head_dim=10,
        v_head_dim=14,
        d_ff=72,
        max_seq_len=32,
        tie_embeddings=False,
    ),
]


_count = count_flops


@pytest.mark.parametrize("cfg", CONFIGS)
def test_parameter_counts_equal_the_module(cfg: ModelConfig) -> None:
    model = TransformerLM(cfg)
    counts = parameter_counts(cfg)
    assert counts["total"] == model.num_parameters()
    assert counts["embedding"] == model.embed.weight.numel()
    assert counts["mlp"] == sum(
        b.ffn.w1.weight.numel() + b.ffn.w2.weight.numel() for b in model.blocks
    )
    assert counts["attention"] == sum(
        sum(p.numel() for p in b.attn.parameters()) for b in model.blocks
    )


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("seq_len", [16, 32])
def test_analytic_flops_equal_flop_counter(cfg: ModelConfig, seq_len: int) -> None:
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    batch = 3
    idx = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    tokens = batch * seq_len

    forward = _count(lambda: model(idx))
    expected = forward_flops_per_token(cfg, seq_len)
    assert forward.get_total_flops() == expected["total"] * tokens
    # Per component, from the counter's per-module table.
    per_module = forward.get_flop_counts()
    attn = sum(
        sum(per_module[f"TransformerLM.blocks.{i}.attn"].values()) for i in range(cfg.n_layers)
    )
    mlp = sum(
        sum(per_module[f"TransformerLM.blocks.{i}.ffn"].values()) for i in range(cfg.n_layers)
    )
    assert attn == expected["attention"] * tokens
    assert mlp == expected["mlp"] * tokens
    assert sum(per_module["TransformerLM.lm_head"].values()) == expected["lm_head"] * tokens

    def step() -> None:
        logits = model(idx)
        F.cross_entropy(logits.flatten(0, 1), idx.flatten()).backward()

    assert (
        _count(step).get_total_flops() == training_flops_per_token(cfg, seq_len)["total"] * tokens
    )


def test_causal_flop_convention_counts_half_the_square() -> None:
    cfg = CONFIGS[0]
    full, causal = forward_flops_per_token(cfg, 32), forward_flops_per_token(cfg, 32, causal=True)
    per_layer_scores = 2 * cfg.n_heads * (cfg.head_dim + cfg.v_head_dim)
    assert full["attention"] - causal["attention"] == cfg.n_layers * per_layer_scores * (32 - 16.5)


def test_logits_are_causal() -> None:
    torch.manual_seed(0)
    cfg = CONFIGS[1]
    model = TransformerLM(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, cfg.vocab_size, (2, 8))
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_rotary_table_is_stored_and_positions_are_relative() -> None:
    cfg = CONFIGS[0]
    model = TransformerLM(cfg)
    assert "rotary.inv_freq" in model.state_dict()
    # RoPE: <R(m)q, R(n)k> depends only on m - n.
    from altup_cli.models.transformer import apply_rotary

    q, k = torch.randn(1, 1, 1, cfg.head_dim), torch.randn(1, 1, 1, cfg.head_dim)
    cos, sin = model.rotary.cos_sin(40, torch.device("cpu"))

    def dot(m: int, n: int) -> torch.Tensor:
        return (apply_rotary(q, cos[m], sin[m]) * apply_rotary(k, cos[n], sin[n])).sum()

    torch.testing.assert_close(dot(7, 3), dot(30, 26))
    assert not torch.allclose(dot(7, 3), dot(7, 4))


def test_tied_embedding_is_one_tensor() -> None:
    model = TransformerLM(CONFIGS[0])
    assert model.lm_head.weight is model.embed.weight


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"d_model": 30, "n_heads": 4}, "does not divide"),
        ({"d_model": 20, "n_heads": 4}, "even"),
        ({"n_layers": 0}, "positive"),
    ],
)
def test_impossible_shapes_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)


def test_too_long_input_is_refused() -> None:
    model = TransformerLM(CONFIGS[0])
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 33, dtype=torch.long))
