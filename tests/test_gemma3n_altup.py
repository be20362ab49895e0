"""Gemma 3n's AltUp (`altup.mode=gemma3n`): the layer equals transformers'
`Gemma3nTextAltUp` with its weights copied (predict, correct and the scaled corrected
output, outputs and gradients, fp64, training with the clip binding and eval), widen and
readout equal Gemma3nTextModel's lines; n = 1 is the baseline and stream 0 at init is the
baseline's residual stream; causal; gradients reach every parameter; the KV cache is exact;
growth is exact where offered and refused with the option named elsewhere; FLOPs and
parameters equal FlopCounterMode and the model; bad input is one line, exit 2."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from altup_cli.bench.growth import randomize_
from altup_cli.config import compose_config
from altup_cli.growth import grow, parse_op
from altup_cli.models import AltUpConfig, ModelConfig, TransformerLM
from altup_cli.models.counting import parameter_counts, training_flops_per_token
from altup_cli.models.gemma3n_altup import Gemma3nAltUpLayer, Gemma3nReadout, statistics
from altup_cli.models.registry import STREAM_VARIANTS, sweep_archs
from altup_cli.models.transformer import Block
from tests.helpers.flops import count_flops
from tests.test_generate import cache_error, incremental, token_ids

D, N, CLIP, EPS = 32, 4, 0.5, 1e-6
BASE = dict(vocab_size=97, d_model=D, n_layers=3, n_heads=2, d_ff=64, max_seq_len=32)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(seed: int = 0, **altup) -> ModelConfig:
    torch.manual_seed(seed)
    return ModelConfig(**BASE, norm_eps=EPS, altup=AltUpConfig(mode="gemma3n", **altup))


def randomised(cfg: ModelConfig, seed: int = 0) -> TransformerLM:
    """Every parameter off its initial value (W_p, W_c and s are zero at init)."""
    with warnings.catch_warnings():  # randomize_ takes the std of 1-element tensors (n = 1)
        warnings.simplefilter("ignore", UserWarning)
        model = randomize_(TransformerLM(cfg), torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p in model.parameters():
            p.nan_to_num_(0.7)
    return model.double().eval()


# --- Equivalence with transformers' Gemma3nTextAltUp -----------------------------------
#
# What had to be matched: hidden size a power of two (the reference's router_input_scale
# 1/d is an fp32 buffer, exact only then); our W_r / router norm gain / W_p / W_c / s are
# its modality_router.weight / router_norm.weight / prediction_coefs.weight /
# correction_coefs.weight / correct_output_scale; the layer is any (B, T, d) map (here a
# toy one) — ours calls it on predictions[0] exactly where Gemma3nTextDecoderLayer runs
# attention and the MLP. Gemma3nRMSNorm and the router compute in fp32 via `.float()`
# whatever the input's dtype; for an fp64 comparison `.float()` keeps fp64 while the
# reference runs (its code otherwise as is); unpatched, it agrees to fp32 rounding. The
# scaled corrected output: Gemma3nTextDecoderLayer feeds scale_corrected_output(y₀) to its
# per-layer-input branch and adds the result to streams 1..n−1; with no per-layer inputs
# that branch is the identity, so the reference adds scale_corrected_output(y₀) itself.
# The clip: training mode, the weights drawn past it (both clip W_p in place, both read
# W_c clipped); eval with the weights inside it (the reference leaves W_c unclipped in
# eval, ours does not).


@contextlib.contextmanager
def fp64_reference(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    original = torch.Tensor.float

    def keep_fp64(self: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "float", keep_fp64)
        yield


def hf_config(clip: float | None):
    """Its config takes no null clip: ours without one is the reference's at 10⁹ (a no-op)."""
    from transformers.models.gemma3n.configuration_gemma3n import Gemma3nTextConfig

    return Gemma3nTextConfig(
        hidden_size=D, altup_num_inputs=N, altup_active_idx=0,
        altup_coef_clip=1e9 if clip is None else clip,
        altup_correct_scale=True, laurel_rank=8, rms_norm_eps=EPS, num_hidden_layers=1,
        vocab_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=2,
        head_dim=16,
    )  # fmt: skip


class Toy(nn.Module):
    """A stand-in layer: x + tanh(x·W)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D, dtype=torch.float64) / D**0.5)

    def forward(self, x: torch.Tensor, *_: object) -> torch.Tensor:
        return x + torch.tanh(x @ self.weight)


PAIRS = {  # ours → the reference's
    "router": "modality_router.weight",
    "router_norm.weight": "router_norm.weight",
    "prediction_coefs": "prediction_coefs.weight",
    "correction_coefs": "correction_coefs.weight",
    "correct_output_scale": "correct_output_scale",
}


def pair(clip: float | None, scale: float) -> tuple[Gemma3nAltUpLayer, nn.Module]:
    """Our layer (wrapping a Toy) and the reference, the same random weights in both."""
    from transformers.models.gemma3n.modeling_gemma3n import Gemma3nTextAltUp

    torch.manual_seed(1)
    ref = Gemma3nTextAltUp(hf_config(clip)).double()
    cfg = ModelConfig(d_model=D, n_heads=2, norm_eps=EPS, altup=AltUpConfig(
        mode="gemma3n", K=N, coef_clip=clip))  # fmt: skip
    ours = Gemma3nAltUpLayer(Toy(), cfg, widens=False).double()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for mine, theirs in PAIRS.items():
            weight = ours.get_parameter(mine)
            value = torch.randn(weight.shape, generator=g, dtype=torch.float64) * scale
            value = value + 1 if mine == "router_norm.weight" else value
            weight.copy_(value)
            ref.get_parameter(theirs).copy_(value)
    return ours, ref


def reference_layer(ref: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Gemma3nTextDecoderLayer's AltUp steps around `layer`, per-layer branch the identity."""
    predictions = ref.predict(x)
    corrected = ref.correct(predictions, layer(predictions[0]))
    first = ref.scale_corrected_output(corrected[0].clone())
    corrected[1:] += first
    return corrected


def grads(out: torch.Tensor, named: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    found = torch.autograd.grad((out * weights).sum(), list(named.values()))
    return dict(zip(named, found, strict=True))


def stream(seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 2, 5, D, generator=g, dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize(
    ("training", "clip", "scale"),
    [(True, CLIP, 1.0), (True, None, 1.0), (False, None, 1.0), (False, CLIP, 0.1)],
    ids=["train clip binding", "train no clip", "eval no clip", "eval clip inside"],
)
def test_the_layer_equals_gemma3n_text_altup(monkeypatch, training, clip, scale) -> None:
    ours, ref = pair(clip, scale)
    ours.train(training), ref.train(training)
    x = stream()
    with fp64_reference(monkeypatch):
        expected = reference_layer(ref, ours.layer, x)
        theirs = {"x": x, "toy": ours.layer.weight, **dict(ref.named_parameters())}
        expected_grads = grads(expected, theirs)
    got = ours(x, None, None)
    assert (got - expected).abs().max() <= 1e-10
    mine = {"x": x, "toy": ours.layer.weight, **dict(ours.named_parameters())}
    got_grads = grads(got, mine)
    for name, ref_name in {"x": "x", "toy": "toy", **PAIRS}.items():
        diff = (got_grads[name] - expected_grads[ref_name]).abs().max()
        assert diff <= 1e-10, (name, float(diff))
    if clip is not None and training:  # both clipped W_p in place, and it did bind
        assert ours.prediction_coefs.abs().max() == CLIP
        assert torch.equal(ours.prediction_coefs, ref.prediction_coefs.weight)


def test_predict_and_correct_equal_the_reference_step_by_step(monkeypatch) -> None:
    ours, ref = pair(CLIP, 1.0)
    ours.train(), ref.train()
    x = stream()
    with fp64_reference(monkeypatch):
        predictions = ref.predict(x)
        out = ours.layer(predictions[0])
        corrected = ref.correct(predictions, out)
        scaled = ref.scale_corrected_output(corrected[0])
    P, G = ours.coefficient_maps()
    mine, _ = ours.predict(x, P)
    assert (mine - predictions).abs().max() <= 1e-10
    y, _ = ours.correct(predictions, out, G)
    assert (y[0] - corrected[0]).abs().max() <= 1e-10
    assert (y[1:] - corrected[1:] - scaled).abs().max() <= 1e-10
    assert (ours.correct_output_scale * corrected[0] - scaled).abs().max() <= 1e-10


def test_unpatched_reference_agrees_to_fp32_rounding() -> None:
    ours, ref = pair(None, 1.0)
    x = stream()
    with torch.no_grad():
        assert (ours(x, None, None) - reference_layer(ref, ours.layer, x)).abs().max() < 1e-5


def test_widen_and_readout_equal_gemma3n_text_model() -> None:
    """Gemma3nTextModel.forward's stacking of the altup_projections and its read-out through
    the altup_unembed_projections, restated with its weights; ours reads (out, in) weights."""
    g = torch.Generator().manual_seed(4)
    layer = Gemma3nAltUpLayer(Toy(), ModelConfig(d_model=D, n_heads=2, altup=AltUpConfig(
        mode="gemma3n", K=N)), widens=True).double()  # fmt: skip
    readout = Gemma3nReadout(N, D).double()
    projections = [nn.Linear(D, D, bias=False).double() for _ in range(N - 1)]
    unembed = [nn.Linear(D, D, bias=False).double() for _ in range(N - 1)]
    with torch.no_grad():
        for i in range(N - 1):
            projections[i].weight.copy_(layer.stream_projections[i])
            unembed[i].weight.copy_(readout.unembed_projections[i])
    h0 = torch.randn(2, 5, D, generator=g, dtype=torch.float64)
    target = torch.mean(h0**2, dim=-1, keepdim=True) ** 0.5
    streams = [h0]
    for proj in projections:
        p = proj(h0)
        streams.append(p * target / torch.sqrt(torch.mean(p**2, -1, keepdim=True).clamp(min=1e-5)))
    expected = torch.stack(streams)
    assert (layer.widen(h0) - expected).abs().max() <= 1e-12
    h = torch.randn(N, 2, 5, D, generator=g, dtype=torch.float64)
    target = torch.mean(h[0] ** 2, dim=-1, keepdim=True) ** 0.5
    outs = [h[0]]
    for i, proj in enumerate(unembed, start=1):
        p = proj(h[i])
        outs.append(p * target / torch.sqrt(torch.mean(p**2, -1, keepdim=True).clamp(min=1e-5)))
    assert (readout(h) - torch.stack(outs).mean(0)).abs().max() <= 1e-12


# --- The model ----------------------------------------------------------------------------


def copy_baseline(target: TransformerLM, baseline: TransformerLM) -> None:
    """A plain model's weights into a wrapped one (blocks.i.X → blocks.i.layer.X)."""
    state = {}
    for key, value in baseline.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks":
            key = ".".join([*parts[:2], "layer", *parts[2:]])
        state[key] = value
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert not unexpected and not any(".layer." in k for k in missing)


IDS = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(3))


def baseline_and(cfg: ModelConfig) -> tuple[TransformerLM, TransformerLM]:
    torch.manual_seed(0)
    baseline = TransformerLM(ModelConfig(**BASE, norm_eps=EPS)).double().eval()
    with torch.no_grad():  # off init, so the blocks do something
        for p in baseline.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = TransformerLM(cfg).double().eval()
    copy_baseline(model, baseline)
    return baseline, model


def test_one_stream_is_the_baseline() -> None:
    """n = 1 at init (W_p = W_c = 0): x̂ = x, y = x + (ỹ − x), the readout is stream 0."""
    baseline, model = baseline_and(config(K=1))
    with torch.no_grad():
        assert (model(IDS) - baseline(IDS)).abs().max() <= 1e-12


def test_stream_zero_at_init_is_the_baseline_stream() -> None:
    baseline, model = baseline_and(config(K=N, coef_clip=120.0))
    with torch.no_grad():
        h = model.run_blocks(model.stream(IDS))
        expected = baseline.run_blocks(baseline.stream(IDS))
    assert (h[0] - expected).abs().max() <= 1e-12


def test_causal() -> None:
    model = randomised(config(K=N, coef_clip=CLIP))
    changed = IDS.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 97
    with torch.no_grad():
        a, b = model(IDS), model(changed)
    assert (a[:, :7] - b[:, :7]).abs().max() == 0
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-6


def test_gradients_reach_every_parameter() -> None:
    model = randomised(config(K=N, coef_clip=CLIP)).train()
    F.cross_entropy(model(IDS).flatten(0, 1), IDS.flatten()).backward()
    for name, p in model.named_parameters():
        if name == "embed.weight":
            assert p.grad[IDS.unique()].ne(0).any(-1).all(), name
        else:
            assert p.grad is not None and p.grad.ne(0).any(), name


def test_own_parameters_stay_fp32_and_out_of_weight_decay() -> None:
    from altup_cli.training.optim import param_groups

    model = TransformerLM(config(K=N)).to(torch.bfloat16)
    layer = model.blocks[0]
    own = [layer.router, layer.prediction_coefs, layer.correction_coefs,
           layer.correct_output_scale]  # fmt: skip
    assert all(p.dtype == torch.float32 for p in [*own, layer.stream_projections])
    decay, no_decay = param_groups(model, 0.1)
    assert {id(p) for p in own} <= {id(p) for p in no_decay["params"]}
    projections = {id(layer.stream_projections), id(model.readout.unembed_projections)}
    assert projections <= {id(p) for p in decay["params"]}
    assert model(IDS).dtype == torch.bfloat16


def test_statistics_are_per_layer_named_scalars() -> None:
    model = TransformerLM(config(K=N)).train()
    assert statistics(model.blocks[1]) == {
        "prediction_coefs_abs": 0.0, "correction_coefs_abs": 0.0, "correct_output_scale": 0.0,
    }  # fmt: skip
    model(IDS)
    stats = STREAM_VARIANTS["gemma3n"].statistics(model.blocks[1])
    assert stats["prediction_abs"] == 0.0 and stats["correction_gain"] == 1.0


# --- KV cache --------------------------------------------------------------------------

DECODE = {
    "n=4 clip": dict(K=N, coef_clip=CLIP),
    "n=1": dict(K=1),
    "n=2 laurel": dict(K=2, laurel_rank=4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", list(DECODE))
def test_cached_logits_equal_the_full_forward(kind: str, dtype: torch.dtype) -> None:
    model = randomised(config(**DECODE[kind])).to(dtype)
    ids = token_ids(length=11)
    tolerance = {torch.float32: 1e-5, torch.float64: 1e-10}[dtype]
    assert cache_error(model, ids) <= tolerance
    assert cache_error(model, ids, static=True) <= tolerance


@pytest.mark.parametrize("kind", list(DECODE))
def test_left_padded_rows_decode_as_each_row_alone(kind: str) -> None:
    """As tests/test_generate.py checks the other kinds: rows padded by 0, 4 and 7 slots."""
    model, ids, pads = randomised(config(**DECODE[kind])), token_ids(3, 11), [0, 4, 7]
    padded = ids.clone()
    for row, pad in enumerate(pads):
        padded[row] = torch.cat([torch.zeros(pad, dtype=torch.long), ids[row, : 11 - pad]])
    for static in (False, True):
        for prefill in (1, 5, 11):
            logits = incremental(model, padded, prefill, pads, static)
            for row, pad in enumerate(pads):
                with torch.no_grad():
                    alone = model(ids[row : row + 1, : 11 - pad])[0]
                assert float((logits[row, pad:] - alone).abs().max()) <= 1e-10


def test_a_grown_model_decodes_exactly() -> None:
    model = randomised(config(K=N, coef_clip=CLIP))
    model = grow(model, [parse_op(o) for o in ["layers=+1@2", "residual_width=40"]])[0]
    randomize_(model, torch.Generator().manual_seed(5))
    assert cache_error(model.double().eval(), token_ids(length=11)) <= 1e-10


# --- Growth --------------------------------------------------------------------------------

OPS = ["mlp_width=96", "heads=3", "value_dim=24", "key_dim=24", "residual_width=48",
       "layers=+2@1", "layers=+1"]  # fmt: skip


@pytest.mark.parametrize("op", [*OPS, " ".join(OPS)])
def test_growth_is_exact(op: str) -> None:
    model = randomised(config(K=N, coef_clip=CLIP, laurel_rank=4))
    with torch.no_grad():
        before = model(IDS)
        grown = grow(model, [parse_op(o) for o in op.split()], seed=1)[0]
        assert (grown(IDS) - before).abs().max() <= 1e-10


def test_growth_refusals_name_the_option() -> None:
    model = TransformerLM(config(K=2))
    with pytest.raises(ValueError, match=r"altup\.mode=gemma3n widens the stream in layer 0"):
        grow(model, [parse_op("layers=+1@0")])
    assert "new projections" in STREAM_VARIANTS["gemma3n"].growth_refusals["K"]


# --- Counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("T", [2, 13])
@pytest.mark.parametrize("tie", [True, False])
def test_flops_and_parameters_are_counted(K: int, T: int, tie: bool) -> None:
    cfg = ModelConfig(**{**BASE, "tie_embeddings": tie},
                      altup=AltUpConfig(mode="gemma3n", K=K, coef_clip=CLIP))  # fmt: skip
    model = TransformerLM(cfg).train()
    assert parameter_counts(cfg)["total"] == model.num_parameters()
    ids = torch.randint(0, 97, (2, T))
    counter = count_flops(
        lambda: F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
    )
    expected = training_flops_per_token(cfg, T)["total"] * 2 * T
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)


# --- Configuration and the command line ---------------------------------------------------


def test_conf_group_and_sweep_arch() -> None:
    altup = dict(compose_config(["altup=gemma3n"])["altup"])
    assert altup["mode"] == "gemma3n" and altup["K"] == 4 and altup["coef_clip"] == 120.0
    assert sweep_archs()["gemma3n"] == ["ffn=dense", "altup=gemma3n"]
    layers = TransformerLM(ModelConfig(**BASE, altup=AltUpConfig(**altup))).blocks
    assert all(isinstance(b, Gemma3nAltUpLayer) and isinstance(b.layer, Block) for b in layers)


BAD = [
    (["altup=k2", "altup.coef_clip=1.0"], "altup.coef_clip does not apply to altup.mode=altup"),
    (["altup=gemma3n", "altup.coef_clip=0"], "altup.coef_clip must be positive or null"),
    (["altup=gemma3n", "altup.coef_clip=-2"], "altup.coef_clip must be positive or null"),
    (["altup=gemma3n", "altup.K=0"], "altup.K must be >= 1"),
    (["altup=gemma3n", "altup.dynamic=true"], "altup.dynamic does not apply to altup.mode=gemma3n"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_bad_input_is_one_line_and_exit_2(
    altup, overrides: list[str], message: str, tmp_path: Path, cache_dir: Path
) -> None:
    result = altup("train", *overrides, f"run.output_dir={tmp_path}", f"run.cache_dir={cache_dir}")
    assert result.code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert not any(tmp_path.iterdir())
