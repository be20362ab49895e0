"""AltUp's properties: K=1 and Recycled-at-init are the baseline, predict/correct match a
loop-based reference of the paper's equations, gradients reach everything, Sequence-AltUp
is causal, and the stored block schedule survives a round trip."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import altup_cli
from altup_cli.models import ModelConfig, TransformerLM, parameter_counts, training_flops_per_token
from altup_cli.models.altup import AltUpConfig, AltUpLayer, SequenceAltUpLayer
from altup_cli.training.optim import param_groups
from tests.flops import count_flops

BASE = dict(vocab_size=301, d_model=32, n_layers=4, n_heads=4, d_ff=64, max_seq_len=40)


def model(mode: str = "off", seed: int = 0, eps: float = 1e-6, **altup) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(**BASE, norm_eps=eps, altup=AltUpConfig(mode=mode, **altup))
    return TransformerLM(cfg).eval()


def load_baseline_weights(target: TransformerLM, baseline: TransformerLM) -> None:
    """Copy a plain model's weights into a wrapped one (blocks.i.X → blocks.i.layer.X)."""
    state = {}
    for key, value in baseline.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks":
            key = ".".join([*parts[:2], "layer", *parts[2:]])
        if key == "lm_head.weight" and target.head_from_embedding:
            continue  # tied: the head reads the embedding table (the same tensor)
        state[key] = value
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(k.endswith(("predictor", "corrector", "active_block")) for k in missing)


def randomise_scalars(m: TransformerLM) -> None:
    g = torch.Generator().manual_seed(7)
    for layer in m.blocks:
        with torch.no_grad():
            layer.predictor.copy_(
                torch.randn(layer.predictor.shape, generator=g) * 0.5 + layer.predictor
            )
            layer.corrector.copy_(torch.randn(layer.corrector.shape, generator=g) * 0.5 + 1)


IDS = torch.randint(0, 301, (2, 23), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("mode", ["altup", "recycled"])
def test_k1_is_the_baseline(mode: str) -> None:
    baseline, altup = model(), model(mode, K=1)
    load_baseline_weights(altup, baseline)
    with torch.no_grad():
        torch.testing.assert_close(altup(IDS), baseline(IDS), rtol=0, atol=1e-5)


@pytest.mark.parametrize(("K", "schedule"), [(2, "alternating"), (3, "alternating"), (4, "same")])
@pytest.mark.parametrize(("readout", "eps"), [("sum", 1e-12), ("mean", 1e-6)])
def test_recycled_at_init_is_the_baseline(K: int, schedule: str, readout: str, eps: float) -> None:
    """Every block equals the baseline's stream, so a sum readout is K × it and the final
    RMSNorm undoes the K — up to its eps, which at init (stream rms ≈ 0.02) is 0.3% of
    rms², hence eps=1e-12 for `sum`; `mean` is exact at any eps."""
    baseline = model(eps=eps)
    recycled = model("recycled", eps=eps, K=K, schedule=schedule, readout=readout)
    load_baseline_weights(recycled, baseline)
    with torch.no_grad():
        torch.testing.assert_close(recycled(IDS), baseline(IDS), rtol=0, atol=1e-6)


def reference_logits(m: TransformerLM, idx: torch.Tensor) -> torch.Tensor:
    """The spec's equations written out with Python loops over blocks."""
    a, d = m.config.altup, m.config.d_model
    e = m.embed(idx)
    x = [e[..., i * d : (i + 1) * d] for i in range(a.K)] if a.mode == "altup" else [e] * a.K
    cos, sin = m.rotary.cos_sin(idx.shape[1], idx.device)
    for ell, layer in enumerate(m.blocks):
        P, g = layer.predictor, layer.corrector
        j = ell % a.K if a.schedule == "alternating" else 0
        x_hat = [sum(P[i, jj] * x[jj] for jj in range(a.K)) for i in range(a.K)]
        y = layer.layer(x[j] if a.layer_input == "original" else x_hat[j], cos, sin)
        x = [x_hat[i] + g[i] * (y - x_hat[j]) for i in range(a.K)]
    if a.readout == "sum":
        h = sum(x)
    elif a.readout == "mean":
        h = sum(x) / a.K
    elif a.readout == "first":
        h = x[0]
    else:
        h = m.readout.proj(torch.cat(x, dim=-1))
    h = m.final_norm(h)
    head = m.embed.weight[:, :d] if m.head_from_embedding else m.lm_head.weight
    return F.linear(h, head)


COMBOS = list(
    itertools.product(
        ["altup", "recycled"],
        [2, 3, 4],
        ["alternating", "same"],
        ["original", "predicted"],
        ["sum", "mean", "first", "concat"],
    )
)


@pytest.mark.parametrize(("mode", "K", "schedule", "layer_input", "readout"), COMBOS)
def test_predict_correct_match_the_equations(mode, K, schedule, layer_input, readout) -> None:
    """Logits and every gradient: the training path runs a hand-written backward."""
    m = model(mode, K=K, schedule=schedule, layer_input=layer_input, readout=readout).double()
    randomise_scalars(m)
    with torch.no_grad():
        torch.testing.assert_close(m(IDS), reference_logits(m, IDS), rtol=0, atol=1e-12)
    grads = []
    for forward in (m, lambda ids: reference_logits(m, ids)):
        m.zero_grad(set_to_none=True)
        logits = forward(IDS)
        (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)).sum().backward()
        grads.append({name: p.grad.clone() for name, p in m.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-12, msg=name)


def test_gradients_reach_every_block_and_scalar() -> None:
    m = model("altup", K=3).train()
    randomise_scalars(m)
    F.cross_entropy(m(IDS).flatten(0, 1), IDS.flatten()).backward()
    rows = m.embed.weight.grad[IDS.unique()]
    for block in range(3):
        assert rows[:, block * 32 : (block + 1) * 32].abs().sum(-1).gt(0).all(), block
    for layer in m.blocks:
        assert layer.predictor.grad.ne(0).all() and layer.corrector.grad.ne(0).all()


def test_scalars_are_fp32_and_out_of_weight_decay() -> None:
    m = model("recycled", K=2)
    decay, no_decay = param_groups(m, 0.1)
    scalars = {id(p) for layer in m.blocks for p in (layer.predictor, layer.corrector)}
    assert scalars <= {id(p) for p in no_decay["params"]}
    assert not scalars & {id(p) for p in decay["params"]}
    assert all(m.blocks[0].predictor.dtype == torch.float32 for _ in [0])


@pytest.mark.parametrize("mode", ["sequence", "stride_skip"])
@pytest.mark.parametrize("stride", [2, 3])
def test_sequence_altup_is_causal(mode: str, stride: int) -> None:
    m = model(mode, stride=stride)
    if mode == "sequence":
        randomise_sequence_scalars(m)
    ids = IDS[:, :22]  # 22 is not a multiple of 3: a partial last stride
    with torch.no_grad():
        base = m(ids)
        for t in (1, 6, 13, 21):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 1) % 301
            out = m(changed)
            assert torch.equal(out[:, :t], base[:, :t]), t
            assert not torch.allclose(out[:, t], base[:, t]), t


def randomise_sequence_scalars(m: TransformerLM) -> None:
    with torch.no_grad():
        for i, layer in enumerate(m.blocks):
            layer.predictor.copy_(torch.tensor([0.9 + 0.05 * i, 0.2]))
            layer.corrector.fill_(0.8)


def test_sequence_altup_matches_a_per_token_reference() -> None:
    m = model("sequence", stride=3)
    randomise_sequence_scalars(m)
    ids = IDS[:, :22]
    with torch.no_grad():
        x = m.embed(ids)
        cos, sin = m.rotary.cos_sin(22, ids.device)
        for layer in m.blocks:
            anchors = list(range(0, 22, 3))
            y_anchor = layer.layer(x[:, anchors], cos[anchors], sin[anchors])  # original positions
            (alpha, beta), gamma = layer.predictor, layer.corrector
            out = torch.empty_like(x)
            for t in range(22):
                a = anchors.index(t // 3 * 3)
                x_a = x[:, anchors[a]]
                innovation = y_anchor[:, a] - (alpha + beta) * x_a
                out[:, t] = alpha * x[:, t] + beta * x_a + gamma * innovation
            x = out
        expected = m.lm_head(m.final_norm(x))
        torch.testing.assert_close(m(ids), expected, rtol=1e-5, atol=1e-5)


def test_stride_and_skip_passes_skipped_tokens_through() -> None:
    m = model("stride_skip", stride=2)
    layer = m.blocks[0]
    x = torch.randn(2, 9, 32)
    cos, sin = m.rotary.cos_sin(9, x.device)
    with torch.no_grad():
        y = layer(x, cos, sin)
    assert torch.equal(y[:, 1::2], x[:, 1::2])
    assert isinstance(layer, SequenceAltUpLayer)


def test_block_schedule_survives_export_and_checkpoint(tmp_path: Path) -> None:
    m = model("altup", K=3)
    assert [int(layer.active_block) for layer in m.blocks] == [0, 1, 2, 0]
    m.blocks[3].set_active_block(2)  # as after growth inserted a layer: not ℓ mod K any more
    altup_cli.save_export(m, tmp_path / "export")
    loaded, cfg = altup_cli.load(tmp_path / "export")
    assert [int(layer.active_block) for layer in loaded.blocks] == [0, 1, 2, 2]
    assert cfg.altup.mode == "altup" and cfg.altup.K == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), m(IDS), rtol=0, atol=0)
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    fresh = model("altup", K=3, seed=1)
    fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert int(fresh.blocks[3].active_block) == 2


FLOP_CASES = [
    dict(mode="altup", K=2),
    dict(mode="altup", K=3, readout="concat"),
    dict(mode="altup", K=2, layer_input="predicted"),
    dict(mode="recycled", K=4, readout="mean"),
    dict(mode="sequence", stride=2),
    dict(mode="sequence", stride=3),
    dict(mode="stride_skip", stride=4),
]


@pytest.mark.parametrize("altup", FLOP_CASES)
@pytest.mark.parametrize("tie", [True, False])
def test_flops_and_parameters_are_counted(altup: dict, tie: bool) -> None:
    cfg = ModelConfig(**{**BASE, "tie_embeddings": tie}, altup=AltUpConfig(**altup))
    m = TransformerLM(cfg)
    assert parameter_counts(cfg)["total"] == m.num_parameters()
    for T in (23, 24):
        ids = torch.randint(0, 301, (2, T))
        counter = count_flops(
            lambda ids=ids: F.cross_entropy(m(ids).flatten(0, 1), ids.flatten()).backward()
        )
        expected = training_flops_per_token(cfg, T)["total"] * 2 * T
        assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)


def test_wide_embedding_costs_parameters_and_recycled_does_not() -> None:
    base = parameter_counts(ModelConfig(**BASE))
    wide = parameter_counts(ModelConfig(**BASE, altup=AltUpConfig(mode="altup", K=2)))
    recycled = parameter_counts(ModelConfig(**BASE, altup=AltUpConfig(mode="recycled", K=2)))
    assert wide["embedding"] == 2 * base["embedding"]
    assert recycled["total"] - base["total"] == BASE["n_layers"] * (4 + 2)
    assert isinstance(model("recycled").blocks[0], AltUpLayer)
