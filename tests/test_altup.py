"""AltUp's properties: K=1 and Recycled-at-init are the baseline, predict/correct match a
loop-based reference of the paper's equations, gradients reach everything, Sequence-AltUp
is causal, matches a per-token reference and (with rotating anchors, the conf default)
lets every token reach every later position, the stored block schedule and anchor offsets
survive a round trip, and the scalars and the mixing stay fp32 under bf16 casts and
autocast."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import altup_cli
from altup_cli.config import compose_config
from altup_cli.models import ModelConfig, TransformerLM, parameter_counts, training_flops_per_token
from altup_cli.models.altup import AltUpLayer
from altup_cli.models.config import AltUpConfig
from altup_cli.models.sequence_altup import SequenceAltUpLayer
from altup_cli.training.optim import param_groups
from tests.helpers.flops import count_flops

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


def test_the_no_grad_path_follows_every_change_of_the_scalars() -> None:
    """Without autograd the layer runs its own arithmetic (`AltUpLayer._plain`); after
    each way the scalars or the schedule change — an in-place write, an SGD step, the fused
    AdamW step training uses (which bumps no version counter), load_state_dict,
    set_active_block, a cast — it equals the autograd path."""
    m, other = model("altup", K=3).double(), model("altup", K=3, seed=1).double()
    randomise_scalars(other)

    def check(change: str, atol: float = 1e-12) -> None:
        with torch.no_grad():
            no_grad = m(IDS)
        assert not torch.allclose(no_grad, before[-1]), f"{change} changed nothing"
        torch.testing.assert_close(no_grad, m(IDS).detach(), rtol=0, atol=atol, msg=change)
        before.append(no_grad)

    with torch.no_grad():
        before = [m(IDS)]
    randomise_scalars(m)
    check("in-place copy_")
    optimizer = torch.optim.SGD(m.parameters(), lr=0.5)
    m(IDS).square().mean().backward()
    optimizer.step()
    check("optimizer step")
    fused = torch.optim.AdamW(m.parameters(), lr=0.1, fused=True)
    m(IDS).square().mean().backward()
    fused.step()
    check("fused AdamW step")
    m.load_state_dict(other.state_dict())
    check("load_state_dict")
    for layer in m.blocks:
        layer.set_active_block((layer._active + 1) % 3)
    check("set_active_block")
    m.float()
    with torch.no_grad():
        m.blocks[0].corrector.data = m.blocks[0].corrector.data * 2  # new storage, version 0
    before[-1] = before[-1].float()
    check("cast, then a new tensor as .data", atol=1e-5)


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


def randomise_any_scalars(m: TransformerLM) -> None:
    if m.config.altup.widens:
        randomise_scalars(m)
    else:
        randomise_sequence_scalars(m)


def scalars_of(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in m.named_parameters() if n.endswith(("predictor", "corrector"))}


CASTS = {
    "to": lambda m: m.to(torch.bfloat16),
    "to_device": lambda m: m.to("cpu", torch.float16),
    "bfloat16": lambda m: m.bfloat16(),
    "half": lambda m: m.half(),
}


@pytest.mark.parametrize("cast", CASTS)
@pytest.mark.parametrize(("mode", "altup"), [("altup", {"K": 3}), ("sequence", {"stride": 2})])
def test_casting_the_model_leaves_the_scalars_fp32(cast: str, mode: str, altup: dict) -> None:
    """`trainer.precision=bf16-true` casts the whole module; AltUp's scalars stay fp32
    (bf16's 2⁻⁷ spacing at 1 would swallow their updates), unrounded."""
    m = model(mode, **altup)
    randomise_any_scalars(m)
    before = {n: p.detach().clone() for n, p in scalars_of(m).items()}
    m(IDS).float().sum().backward()  # grads move with their parameters
    CASTS[cast](m)
    assert m.embed.weight.dtype in (torch.bfloat16, torch.float16)
    for name, p in scalars_of(m).items():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        assert torch.equal(p.detach(), before[name]), name
    assert m(IDS).dtype == m.embed.weight.dtype  # and the model runs in its dtype
    m.double()  # exactness tests widen everything, scalars included
    assert all(p.dtype == torch.float64 for p in scalars_of(m).values())


class Constant(nn.Module):
    """A stand-in layer with a known output ỹ, small next to the stream."""

    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = nn.Parameter(value)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return self.value[:, : x.shape[1]].to(x.dtype)


class Residual(Constant):
    """ỹ = input + a small known delta, as a block's residual makes it: the layer's input
    (x̂^{j*} with `predicted`) reaches the innovation at the stream's scale."""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x, cos, sin)


def large_stream(*shape: int) -> torch.Tensor:
    """Blocks near ±200 whose differences carry the information: mixing them with scalars
    near ±1 cancels the 200s, so any bf16 rounding of the scalars or the product (2⁻⁸ of
    200 ≈ 0.8) dwarfs the small result's own bf16 spacing."""
    g = torch.Generator().manual_seed(5)
    sign = torch.tensor([1.0, -1.0] * (shape[0] // 2) + [1.0] * (shape[0] % 2))
    return sign.view(-1, *[1] * (len(shape) - 1)) * 200 + torch.randn(shape, generator=g)


def altup_mixing_reference(layer: AltUpLayer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Predict and correct in fp64 from the spec's equations."""
    P, g, j = layer.predictor.double(), layer.corrector.double(), layer._active
    x, y = x.double(), y.double()
    x_hat = torch.einsum("ij,j...->i...", P, x)
    return x_hat + g.view(-1, 1, 1, 1) * (y - x_hat[j])


SMALL = torch.randn(2, 7, 8, generator=torch.Generator().manual_seed(6))


def cancelling_altup_layer(inner: nn.Module, layer_input: str = "original") -> AltUpLayer:
    layer = AltUpLayer(inner, K=2, active_block=0, layer_input=layer_input)
    with torch.no_grad():
        layer.predictor.copy_(torch.tensor([[1.003, 1.0], [1.0, 0.997]]))
        layer.corrector.copy_(torch.tensor([0.3, 0.7]))
    return layer


@pytest.mark.parametrize("grad", [True, False])  # the fused training path and the plain one
def test_altup_mixing_is_fp32_in_a_bf16_model(grad: bool) -> None:
    layer = cancelling_altup_layer(Constant(SMALL)).bfloat16()
    x = large_stream(2, 2, 7, 8).bfloat16().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = layer(x, torch.empty(0), torch.empty(0))
    assert out.dtype == torch.bfloat16
    expected = altup_mixing_reference(layer, x, layer.layer.value.bfloat16())
    # one bf16 rounding of the fp32 result (2⁻⁹ relative), plus fp32 rounding of the 200s
    torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=1e-4)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("layer_input", ["original", "predicted"])
def test_altup_mixing_is_fp32_under_bf16_autocast(grad: bool, layer_input: str) -> None:
    """An fp32 model under autocast: the stream stays fp32, and so must the K×(K+1)
    product and the predicted layer input, which autocast would otherwise run in bf16."""
    layer = cancelling_altup_layer(Residual(SMALL), layer_input)
    x = large_stream(2, 2, 7, 8).requires_grad_(grad)
    with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, torch.empty(0), torch.empty(0))
    assert out.dtype == torch.float32
    x64 = x.double()
    layer_in = x64[0] if layer_input == "original" else layer.predictor[0].double() @ x64.flatten(1)
    y = layer_in.view(x.shape[1:]) + SMALL.double()
    expected = altup_mixing_reference(layer, x, y)
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("offset", [None, 1])
def test_sequence_mixing_is_fp32_in_a_bf16_model(grad: bool, offset: int | None) -> None:
    k, T = 3, 10
    small = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(6))
    layer = SequenceAltUpLayer(Constant(small), k, skip_only=False, offset=offset)
    with torch.no_grad():
        layer.predictor.copy_(torch.tensor([1.003, -1.0]))  # α + β = 0.003: the 200s cancel
        layer.corrector.fill_(0.7)
    layer.bfloat16()
    x = large_stream(1, 2, T, 8)[0].bfloat16().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = layer(x, torch.zeros(T, 4), torch.zeros(T, 4))
    assert out.dtype == torch.bfloat16
    (alpha, beta), gamma = layer.predictor.double(), layer.corrector.double()
    x64, o, expected = x.double(), offset or 0, x.double().clone()
    for t in range(o, T):
        a = (t - o) // k  # the anchor's index among layer's anchors o, o+k, …
        x_a, y_a = x64[:, o + a * k], small[:, a].bfloat16().double()
        expected[:, t] = alpha * x64[:, t] + beta * x_a + gamma * (y_a - (alpha + beta) * x_a)
    torch.testing.assert_close(out.double(), expected, rtol=2**-8, atol=1e-4)


@pytest.mark.parametrize(
    ("mode", "altup"),
    [
        ("altup", {"K": 2}),
        ("recycled", {"K": 3, "layer_input": "predicted"}),
        ("sequence", {"stride": 2, "anchors": "rotating"}),
    ],
)
def test_bf16_autocast_model_matches_fp32(mode: str, altup: dict) -> None:
    m = model(mode, **altup)
    randomise_any_scalars(m)
    with torch.no_grad():
        exact = m(IDS)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(IDS)
    assert all(p.dtype == torch.float32 for p in scalars_of(m).values())
    torch.testing.assert_close(low.float(), exact, rtol=0, atol=0.02 * exact.abs().max().item())


SEQUENCE_CASES = list(itertools.product(["sequence", "stride_skip"], ["fixed", "rotating"], [2, 3]))


def randomise_sequence_scalars(m: TransformerLM) -> None:
    with torch.no_grad():
        for i, layer in enumerate(m.blocks):
            layer.predictor.copy_(torch.tensor([0.9 + 0.05 * i, 0.2]))
            layer.corrector.fill_(0.8)


def sequence_model(mode: str, anchors: str, stride: int) -> TransformerLM:
    """4 layers ≥ stride: with rotating anchors every residue class is an anchor somewhere."""
    m = model(mode, stride=stride, anchors=anchors)
    if mode == "sequence":
        randomise_sequence_scalars(m)
    return m


@pytest.mark.parametrize(("mode", "anchors", "stride"), SEQUENCE_CASES)
def test_sequence_altup_is_causal(mode: str, anchors: str, stride: int) -> None:
    m = sequence_model(mode, anchors, stride)
    ids = IDS[:, :22]  # 22 is not a multiple of 3: a partial last stride
    with torch.no_grad():
        base = m(ids)
        for t in (1, 6, 13, 21):
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 1) % 301
            out = m(changed)
            assert torch.equal(out[:, :t], base[:, :t]), t
            assert not torch.allclose(out[:, t], base[:, t]), t


def reach(m: TransformerLM, ids: torch.Tensor) -> list[set[int]]:
    """For each position j, the positions whose logits move when token j changes."""
    with torch.no_grad():
        base = m(ids)
        moved = []
        for j in range(ids.shape[1]):
            changed = ids.clone()
            changed[:, j] = (changed[:, j] + 1) % 301
            delta = (m(changed) - base).abs().amax(dim=(0, 2))
            moved.append({t for t in range(ids.shape[1]) if delta[t] > 0})
    return moved


def expected_reach(mode: str, anchors: str, k: int, j: int, T: int) -> set[int]:
    """Sequence-AltUp with rotating anchors sees the whole causal context. With fixed
    anchors a non-anchor token reaches no other position. Stride-and-skip mixes only the
    tokens of a layer's anchor class, so a token reaches only later tokens of its class."""
    if anchors == "fixed" and j % k:
        return {j}
    if mode == "sequence":
        return set(range(j, T))
    return {t for t in range(j, T) if t % k == j % k}


@pytest.mark.parametrize(("mode", "anchors", "stride"), SEQUENCE_CASES)
def test_which_earlier_tokens_each_position_sees(mode: str, anchors: str, stride: int) -> None:
    m, T = sequence_model(mode, anchors, stride), 22
    for j, moved in enumerate(reach(m, IDS[:, :T])):
        assert moved == expected_reach(mode, anchors, stride, j, T), j


@pytest.mark.parametrize("stride", [2, 3])
def test_default_sequence_altup_sees_every_earlier_token(stride: int) -> None:
    """The conf files' default (rotating anchors), at identity init as a new run starts."""
    cfg = compose_config(["altup=sequence_s2", f"altup.stride={stride}"])
    torch.manual_seed(0)
    altup = OmegaConf.to_container(cfg.altup)
    m = TransformerLM(ModelConfig.from_dict({**BASE, "altup": altup})).eval()
    assert m.config.altup.anchors == "rotating"
    for j, moved in enumerate(reach(m, IDS[:, :22])):
        assert moved == set(range(j, 22)), j


@pytest.mark.parametrize("group", ["off", "k2", "recycled_k2", "sequence_s2", "stride_skip_s2"])
def test_new_runs_default_to_rotating_anchors(group: str) -> None:
    assert compose_config([f"altup={group}"]).altup.anchors == "rotating"


def sequence_reference(m: TransformerLM, ids: torch.Tensor) -> torch.Tensor:
    """Sequence-AltUp / stride-and-skip token by token: layer ℓ's anchors are the tokens
    t ≡ o (mod k), o = ℓ mod k (rotating) or 0 (fixed), at their original positions; a
    token takes the last anchor at or before it; one before the first anchor passes through."""
    a, T = m.config.altup, ids.shape[1]
    x = m.embed(ids)
    cos, sin = m.rotary.cos_sin(T, ids.device)
    for ell, layer in enumerate(m.blocks):
        o = ell % a.stride if a.anchors == "rotating" else 0
        anchors = list(range(o, T, a.stride))
        if not anchors:
            continue
        y_anchor = layer.layer(x[:, anchors], cos[anchors], sin[anchors])
        out = x.clone()
        for t in range(o, T):
            i = max(i for i, s in enumerate(anchors) if s <= t)
            x_a = x[:, anchors[i]]
            if a.mode == "stride_skip":
                out[:, t] = y_anchor[:, i] if anchors[i] == t else x[:, t]
                continue
            (alpha, beta), gamma = layer.predictor, layer.corrector
            innovation = y_anchor[:, i] - (alpha + beta) * x_a
            out[:, t] = alpha * x[:, t] + beta * x_a + gamma * innovation
        x = out
    return m.lm_head(m.final_norm(x))


@pytest.mark.parametrize(("mode", "anchors", "stride"), SEQUENCE_CASES)
@pytest.mark.parametrize("T", [22, 2])
def test_sequence_altup_matches_a_per_token_reference(mode, anchors, stride, T) -> None:
    """T=2 at stride 3: layer 2's anchors (t ≡ 2) all lie past the end."""
    m = sequence_model(mode, anchors, stride)
    ids = IDS[:, :T]
    with torch.no_grad():
        torch.testing.assert_close(m(ids), sequence_reference(m, ids), rtol=1e-5, atol=1e-5)


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


def test_anchor_offsets_survive_export_and_checkpoint(tmp_path: Path) -> None:
    m = model("sequence", stride=3, anchors="rotating")
    randomise_sequence_scalars(m)
    assert [int(layer.anchor_offset) for layer in m.blocks] == [0, 1, 2, 0]
    m.blocks[3].set_anchor_offset(2)  # as after growth inserted a layer: not ℓ mod k any more
    ids = IDS[:, :22]
    altup_cli.save_export(m, tmp_path / "export")
    loaded, cfg = altup_cli.load(tmp_path / "export")
    assert [int(layer.anchor_offset) for layer in loaded.blocks] == [0, 1, 2, 2]
    assert cfg.altup.anchors == "rotating"
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), m(ids), rtol=0, atol=0)
        torch.save(m.state_dict(), tmp_path / "sd.pt")
        fresh = model("sequence", stride=3, anchors="rotating", seed=1)
        fresh.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
        torch.testing.assert_close(fresh(ids), m(ids), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["sequence", "stride_skip"])
def test_a_config_without_anchors_loads_as_fixed(tmp_path: Path, mode: str) -> None:
    """Exports and checkpoints from before `altup.anchors` keep their fixed anchors (and
    their state dict: no per-layer offsets)."""
    fixed = model(mode, stride=2, anchors="fixed")
    assert not any("anchor_offset" in key for key in fixed.state_dict())
    altup_cli.save_export(fixed, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["model"]["altup"]["anchors"]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded, cfg = altup_cli.load(tmp_path)
    assert cfg.altup.anchors == "fixed"
    assert ModelConfig.from_dict({**BASE, "altup": {"mode": mode}}).altup.anchors == "fixed"
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), fixed(IDS), rtol=0, atol=0)
    assert reach(loaded, IDS[:, :6])[1] == {1}  # the old behaviour: a non-anchor is unseen


def test_anchors_must_be_fixed_or_rotating() -> None:
    with pytest.raises(ValueError, match=r"altup\.anchors must be fixed or rotating"):
        AltUpConfig(mode="sequence", anchors="shifted")


FLOP_CASES = [
    dict(mode="altup", K=2),
    dict(mode="altup", K=3, readout="concat"),
    dict(mode="altup", K=2, layer_input="predicted"),
    dict(mode="recycled", K=4, readout="mean"),
    dict(mode="sequence", stride=2),
    dict(mode="sequence", stride=3),
    dict(mode="stride_skip", stride=4),
    dict(mode="sequence", stride=2, anchors="rotating"),
    dict(mode="sequence", stride=3, anchors="rotating"),
    dict(mode="stride_skip", stride=4, anchors="rotating"),
]


@pytest.mark.parametrize(
    ("altup", "T"), [(altup, T) for altup in FLOP_CASES for T in (23, 24, 2)]
)
@pytest.mark.parametrize("tie", [True, False])
def test_flops_and_parameters_are_counted(altup: dict, T: int, tie: bool) -> None:
    cfg = ModelConfig(**{**BASE, "tie_embeddings": tie}, altup=AltUpConfig(**altup))
    m = TransformerLM(cfg)
    assert parameter_counts(cfg)["total"] == m.num_parameters()
    ids = torch.randint(0, 301, (2, T))
    counter = count_flops(lambda: F.cross_entropy(m(ids).flatten(0, 1), ids.flatten()).backward())
    expected = training_flops_per_token(cfg, T)["total"] * 2 * T
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)


def test_wide_embedding_costs_parameters_and_recycled_does_not() -> None:
    base = parameter_counts(ModelConfig(**BASE))
    wide = parameter_counts(ModelConfig(**BASE, altup=AltUpConfig(mode="altup", K=2)))
    recycled = parameter_counts(ModelConfig(**BASE, altup=AltUpConfig(mode="recycled", K=2)))
    assert wide["embedding"] == 2 * base["embedding"]
    assert recycled["total"] - base["total"] == BASE["n_layers"] * (4 + 2)
    assert isinstance(model("recycled").blocks[0], AltUpLayer)
