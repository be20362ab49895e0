"""The model's shape knobs, its counting, its causal structure, and padding that reaches
nothing in training."""

from __future__ import annotations

import copy
import dataclasses

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
from altup_cli.models.config import AltUpConfig
from tests.helpers.flops import count_flops

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


PEER = dict(kind="peer", num_experts=64, heads=2, topk=4, d_key=8, layers="all")
PAD_KINDS = {
    "dense": {},
    "peer": {"ffn": PEER},
    "peer_no_bn": {"ffn": {**PEER, "query_bn": False}},
    "pkm": {"ffn": dict(kind="pkm", num_experts=49, heads=2, topk=3, d_key=6, layers="all")},
    "moe": {"ffn": dict(kind="moe", num_experts=4, topk=2)},
    "moe_expert_choice": {
        "ffn": dict(kind="moe", num_experts=4, topk=1, routing="expert_choice", capacity=1.5)
    },
    "altup_peer": {"ffn": PEER, "altup": dict(mode="altup", K=2)},
    "recycled_pkm": {
        "ffn": dict(kind="pkm", num_experts=49, heads=2, topk=3, d_key=6, layers="all"),
        "altup": dict(mode="recycled", K=2, readout="concat"),
    },
    "sequence_peer": {"ffn": PEER, "altup": dict(mode="sequence", stride=2)},
    "stride_skip_peer": {"ffn": PEER, "altup": dict(mode="stride_skip", stride=3)},
}
if "anchors" in {f.name for f in dataclasses.fields(AltUpConfig)}:
    # Layer ℓ's anchors at t ≡ ℓ mod k: layer 1's mask must be taken from offset 1.
    PAD_KINDS["rotating_sequence_peer"] = {
        "ffn": PEER,
        "altup": dict(mode="sequence", stride=2, anchors="rotating"),
    }
    PAD_KINDS["rotating_stride_skip_pkm"] = {
        "ffn": dict(kind="pkm", num_experts=49, heads=2, topk=3, d_key=6, layers="all"),
        "altup": dict(mode="stride_skip", stride=3, anchors="rotating"),
    }
LENGTHS = [5, 9, 12, 7]  # 7: a pad anchor at offset 1 where offset 0 sees a real one


def padded(examples: list[torch.Tensor], width: int, garbage: bool) -> torch.Tensor:
    """Right-padded rows: pad id 0, or random tokens where the padding is."""
    fill = torch.randint(1, 64, (len(examples), width)) if garbage else torch.zeros(
        len(examples), width, dtype=torch.long)  # fmt: skip
    for row, x in enumerate(examples):
        fill[row, : len(x)] = x
    return fill


def first_query_inputs(model: torch.nn.Module, examples: list[torch.Tensor]) -> torch.Tensor:
    """The first retrieval layer's query-network outputs (what its BatchNorm normalises)
    at the real tokens, each example run alone and unpadded."""
    from altup_cli.models.product_keys import ProductKeyRetrieval

    alone = copy.deepcopy(model).eval()
    query = next(m for m in alone.modules() if isinstance(m, ProductKeyRetrieval)).query
    seen: list[torch.Tensor] = []
    handle = query.register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    with torch.no_grad():
        for x in examples:
            alone.features(x[None])
    handle.remove()
    return torch.cat(seen)


def fine_tune_steps(module, tokens: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor):
    """Two GLUE training steps (training mode, gradients, lazy Adam): the outputs and
    gradients of the first, the weights and statistics after both."""
    from altup_cli.models.row_gradients import materialize_row_grad
    from altup_cli.training.optim import build_optimizer

    optimizer = build_optimizer(
        module, {"lr": 1e-2, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}
    )
    record: dict[str, torch.Tensor] = {}
    module.train()
    for step in range(2):
        optimizer.zero_grad()
        if step == 0:
            record["logits"] = module(tokens, lengths).detach()
            record["pooled"] = module.pooled(tokens, lengths).detach()
            optimizer.zero_grad()
        module.training_step((tokens, lengths, labels), step).backward()
        if step == 0:
            for name, p in module.named_parameters():
                grad = materialize_row_grad(p)
                grad = grad.to_dense() if grad is not None else p.grad
                record[f"grad {name}"] = torch.zeros_like(p) if grad is None else grad
        optimizer.step()
    for name, value in module.state_dict().items():
        record[name] = value
    for name, m in module.named_modules():
        if hasattr(m, "totals"):  # expert usage
            record[f"{name}.totals"] = m.totals.clone()
    return record


@pytest.mark.parametrize(
    ("kind", "pooling"), [*((k, "last") for k in PAD_KINDS), ("peer", "mean"), ("moe", "mean")]
)
def test_padding_never_reaches_training(kind: str, pooling: str) -> None:
    """GLUE fine-tuning in training mode: more padding (and garbage where it is) changes no
    logit, pooled feature, gradient, step, BatchNorm statistic or expert usage, and the
    query BatchNorm's running statistics are those of the real tokens alone."""
    import warnings

    from altup_cli.glue.tasks import TASKS
    from altup_cli.models.config import FFNConfig
    from altup_cli.training.glue import GlueModule

    torch.manual_seed(11)
    spec = PAD_KINDS[kind]
    cfg = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, d_ff=32,
                      max_seq_len=32, ffn=FFNConfig(**spec.get("ffn", {})),
                      altup=AltUpConfig(**spec.get("altup", {})))  # fmt: skip
    model = TransformerLM(cfg).double()
    examples = [torch.randint(1, 64, (n,)) for n in LENGTHS]
    lengths, labels = torch.tensor(LENGTHS), torch.tensor([0, 1, 1, 0])
    runs = []
    for width, garbage in ((max(LENGTHS), False), (max(LENGTHS) + 9, True)):
        module = GlueModule(copy.deepcopy(model), TASKS["rte"], {"pooling": pooling}, 2)
        torch.manual_seed(12)  # the same head (fp32: GlueModule feeds it fp32)
        module.head.reset_parameters()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*self.log.*")  # no Trainer here
            runs.append(fine_tune_steps(module, padded(examples, width, garbage), lengths, labels))
    narrow, wide = runs
    assert narrow.keys() == wide.keys()
    for name in narrow:
        named = lambda m, name=name: f"{name}: {m}"  # noqa: E731
        torch.testing.assert_close(wide[name], narrow[name], rtol=1e-6, atol=1e-9, msg=named)

    if cfg.ffn.kind in ("peer", "pkm") and cfg.ffn.query_bn:
        module = GlueModule(copy.deepcopy(model), TASKS["rte"], {"pooling": pooling}, 2)
        module.train()
        with torch.no_grad():
            module.pooled(padded(examples, max(LENGTHS) + 3, True), lengths)
        bn = next(m for m in module.modules() if isinstance(m, torch.nn.BatchNorm1d))
        real = first_query_inputs(model, examples)
        assert real.shape[0] == (sum(LENGTHS) if cfg.altup.mode in ("off", "altup", "recycled")
                                 else sum((n + cfg.altup.stride - 1) // cfg.altup.stride
                                          for n in LENGTHS))  # fmt: skip
        momentum = bn.momentum
        torch.testing.assert_close(bn.running_mean, momentum * real.mean(0))
        torch.testing.assert_close(bn.running_var, 1 - momentum + momentum * real.var(0))
