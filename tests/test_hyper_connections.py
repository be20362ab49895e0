"""Hyper-Connections (static, dynamic) and mHC: the degenerate n = 1 settings and HC at
init are the pre-norm baseline, mHC's mixing is doubly stochastic, gradients reach every
connection parameter, every variant is causal and decodes with the KV cache (grown ones
too) as the full forward computes, growth is exact where offered and refused in one line
where not, parameters and FLOPs equal the module's and the FLOP counter's (Sinkhorn's
normalisations counted as they run), the connection scalars stay fp32, the statistics
training logs, and bad input is one line with exit 2. (Equality with the public package:
tests/test_hc_reference.py.)"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from altup_cli.bench.growth import randomize_
from altup_cli.growth import grow, parse_op
from altup_cli.models import AltUpConfig, ModelConfig, TransformerLM, parameter_counts
from altup_cli.models import mhc as mhc_module
from altup_cli.models.counting import forward_flops_per_token, training_flops_per_token
from altup_cli.models.hyper_connections import Connection, connection_statistics
from altup_cli.models.mhc import (
    ManifoldConnection,
    sinkhorn,
    sinkhorn_flops,
    sinkhorn_flops_per_token,
)
from altup_cli.models.registry import stream_variant
from altup_cli.training.optim import param_groups
from tests.helpers.flops import OUTER_PRODUCTS_AS_MULTIPLY_ADDS, count_flops
from tests.helpers.prose import tiny_overrides
from tests.test_generate import cache_error, one_thread, token_ids  # noqa: F401 (autouse)

BASE = dict(vocab_size=97, d_model=16, n_layers=3, n_heads=2, d_ff=32, max_seq_len=32)
VARIANTS = {
    "hc": {"mode": "hc", "K": 3},
    "hc dynamic": {"mode": "hc", "K": 3, "dynamic": True},
    "mhc": {"mode": "mhc", "K": 3, "sinkhorn_iters": 5},
    "mhc dynamic": {"mode": "mhc", "K": 4, "dynamic": True},
}
IDS = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(3))


def build(altup: dict, seed: int = 0, eps: float = 1e-6, **extra) -> TransformerLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**BASE, **extra}, norm_eps=eps, altup=AltUpConfig(**altup))
    return TransformerLM(cfg).eval()


def randomised(altup: dict, dtype: torch.dtype = torch.float64, **extra) -> TransformerLM:
    model = build(altup, **extra).to(dtype)
    return randomize_(model, torch.Generator().manual_seed(1))


def connections(model: TransformerLM) -> list[Connection]:
    return [m for m in model.modules() if isinstance(m, Connection)]


def baseline_and(altup: dict, eps: float) -> tuple[TransformerLM, TransformerLM]:
    """A randomised fp64 baseline, and the variant with its weights and connections at init."""
    baseline = randomised({"mode": "off"}, eps=eps)
    variant = build(altup, eps=eps).double()
    load_baseline_weights_of_hc(variant, baseline)
    return baseline, variant


def load_baseline_weights_of_hc(target: TransformerLM, baseline: TransformerLM) -> None:
    state = {}
    for key, value in baseline.state_dict().items():
        parts = key.split(".")
        if parts[0] == "blocks":
            key = ".".join([*parts[:2], "layer", *parts[2:]])
        state[key] = value
    missing, unexpected = target.load_state_dict(state, strict=False)
    assert not unexpected and all("_hc." in k for k in missing), missing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dynamic", [False, True])
def test_one_stream_at_init_is_the_baseline_exactly(dynamic: bool, dtype: torch.dtype) -> None:
    """HC's degenerate setting: n = 1 with the connections at init (A_m = A_r = B = 1,
    dynamic parts zero): x + 1·T(1·x), bitwise the baseline, for any Block weights."""
    baseline, hc = baseline_and({"mode": "hc", "K": 1, "dynamic": dynamic}, 1e-6)
    baseline, hc = baseline.to(dtype), hc.to(dtype)
    with torch.no_grad():
        assert torch.equal(hc(IDS), baseline(IDS))


@pytest.mark.parametrize("dynamic", [False, True])
def test_mhc_one_stream_with_zero_logits_is_the_baseline(dynamic: bool) -> None:
    """mHC's degenerate setting: n = 1, read and write logits 0 (A_m = σ(0) = ½,
    B = 2σ(0) = 1, A_r = Sinkhorn of 1×1 = 1): x + T(x/2), and the Block's pre-norm
    removes the ½ (a power of two: exact while eps is below the rounding of mean x²)."""
    baseline, m = baseline_and({"mode": "mhc", "K": 1, "dynamic": dynamic}, 1e-30)
    for conn in connections(m):
        with torch.no_grad():
            conn.width.zero_()
            conn.depth.zero_()
    with torch.no_grad():
        torch.testing.assert_close(m(IDS), baseline(IDS), rtol=0, atol=1e-14)


@pytest.mark.parametrize("readout", ["sum", "mean"])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4])
def test_hc_at_init_is_the_pre_norm_baseline(n: int, dynamic: bool, readout: str) -> None:
    """A_m = e_{k mod n}, A_r = I, B = 1: every stream is the baseline's stream, so a sum
    read-out is n times it and the final RMSNorm removes the n (up to its eps, so 1e-30)."""
    altup = {"mode": "hc", "K": n, "dynamic": dynamic, "readout": readout}
    baseline, hc = baseline_and(altup, 1e-30)
    with torch.no_grad():
        streams = hc.run_blocks(hc.stream(IDS))
        plain = baseline.run_blocks(baseline.stream(IDS))
        for s in range(n):
            torch.testing.assert_close(streams[s], plain, rtol=0, atol=1e-15)
        torch.testing.assert_close(hc(IDS), baseline(IDS), rtol=0, atol=1e-12)


def test_hc_at_init_reads_alternating_streams() -> None:
    m = build({"mode": "hc", "K": 3})
    reads = [int(c.width[:, 0].argmax()) for c in connections(m)]
    assert reads == [0, 1, 2, 0, 1, 2]  # sub-layer k reads stream k mod n
    for c in connections(m):
        assert torch.equal(c.width[:, 1:], torch.eye(3)) and torch.equal(c.depth, torch.ones(3))


@pytest.mark.parametrize("iters", [1, 5, 20, 60])
def test_mhc_mixing_is_doubly_stochastic(iters: int) -> None:
    """The last normalisation (over targets) is exact; the other converges with the
    iterations. Reads and writes are non-negative; the signal gain is 1."""
    m = randomised({"mode": "mhc", "K": 4, "dynamic": True, "sinkhorn_iters": iters})
    h = m.stream(IDS).detach()
    column_error = {1: 0.5, 5: 1e-2, 20: 1e-5, 60: 1e-12}[iters]
    for conn in connections(m):
        with torch.no_grad():
            pairs = (conn.connections(), conn.connections(h))
        for alpha, beta in pairs:
            mix = alpha[..., 1:]
            assert mix.min() >= 0 and alpha[..., 0].min() >= 0 and beta.min() >= 0
            assert beta.max() <= 2 and alpha[..., 0].max() <= 1
            assert float((mix.sum(-1) - 1).abs().max()) <= 1e-12
            assert float((mix.sum(-2) - 1).abs().max()) <= column_error
    if iters == 60:
        for name, value in connection_statistics(m.blocks[0]).items():
            if "gain" in name:
                assert value == pytest.approx(1, abs=1e-12), name


def test_sinkhorn_matches_a_loop_over_the_paper_steps() -> None:
    logits = torch.randn(3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = logits.exp()
    for _ in range(9):
        for i in range(4):  # columns: Σ over sources = 1
            expected[:, :, i] = expected[:, :, i] / expected[:, :, i].sum(-1, keepdim=True)
        for i in range(4):  # rows: Σ over targets = 1
            expected[:, i] = expected[:, i] / expected[:, i].sum(-1, keepdim=True)
    torch.testing.assert_close(sinkhorn(logits, 9), expected, rtol=0, atol=1e-15)


def at_init_rule(conn: Connection, name: str, p: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(entries whose gradient is exactly 0 at init, entries it need not reach at init).
    At init, as in the package: the dynamic scales' and the norm gain's gradients are 0
    (their factor, the projection, is 0); in mHC, A_r's logits' and their projection
    columns' nearly so (every stream equal: a doubly stochastic mix of them is each of
    them, up to Sinkhorn's unconverged column sums)."""
    zero = torch.full(p.shape, name.endswith("_scale") or name == "norm.weight")
    free = zero.clone()
    if isinstance(conn, ManifoldConnection) and name in ("width", "width_fn"):
        free[:, 1:] = True
    return zero, free


@pytest.mark.parametrize("at_init", [True, False])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gradients_reach_every_connection_parameter(variant: str, at_init: bool) -> None:
    """Every entry of every connection parameter gets a gradient once the streams and the
    projections have moved; at init all but those `at_init_rule` names. mHC's first
    connection always reads equal streams (copies of the embedding), so its A_r and their
    projection columns never get one (nor in the package); HC's A_r does."""
    altup = VARIANTS[variant]
    m = (build(altup).double() if at_init else randomised(altup)).train()
    F.cross_entropy(m(IDS).flatten(0, 1), IDS.flatten()).backward()
    for i, conn in enumerate(connections(m)):
        for name, p in conn.named_parameters():
            assert p.grad is not None, (i, name)
            none = torch.zeros(p.shape, dtype=torch.bool)
            zero, free = at_init_rule(conn, name, p) if at_init else (none, none.clone())
            if i == 0 and isinstance(conn, ManifoldConnection) and name in ("width", "width_fn"):
                free[:, 1:] = True
            assert p.grad[~free].ne(0).all(), (i, name)
            assert p.grad[zero].eq(0).all(), (i, name)


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_compiled_and_no_grad_paths_agree(variant: str) -> None:
    """The connections run three ways: autograd Functions with hand-written backwards
    (training), plain differentiable ops (torch.compile's training graph, aot_eager here),
    and plain no-grad ops (evaluation, decoding). Same logits and, for the first two, the
    same gradients (fp64)."""
    m = randomised(VARIANTS[variant]).train()

    def grads(model: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        m.zero_grad()
        logits = model(IDS)
        F.cross_entropy(logits.flatten(0, 1), IDS.flatten()).backward()
        return logits.detach(), [p.grad.clone() for p in m.parameters()]

    logits, eager = grads(m)
    compiled_logits, compiled = grads(torch.compile(m, backend="aot_eager"))
    with torch.no_grad():
        plain = m(IDS)
    torch.testing.assert_close(compiled_logits, logits, rtol=0, atol=1e-12)
    torch.testing.assert_close(plain, logits, rtol=0, atol=1e-12)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal(variant: str) -> None:
    m = randomised(VARIANTS[variant])
    with torch.no_grad():
        base = m(IDS)
        for t in (0, 5, 12):
            changed = IDS.clone()
            changed[:, t] = (changed[:, t] + 1) % 97
            out = m(changed)
            assert torch.equal(out[:, :t], base[:, :t]), t
            assert not torch.allclose(out[:, t], base[:, t]), t


GROWN_DECODE = {
    "hc dynamic": ["layers=+1@1", "residual_width=24", "heads=3", "key_dim=12"],
    "mhc dynamic": ["residual_width=24", "value_dim=12", "mlp_width=40"],
}


DECODE = [(v, torch.float64) for v in [*VARIANTS, *(f"grown {v}" for v in GROWN_DECODE)]]
DECODE += [("hc", torch.float32), ("mhc dynamic", torch.float32)]


@pytest.mark.parametrize(("variant", "dtype"), DECODE)
def test_cached_decoding_equals_the_full_forward(variant: str, dtype: torch.dtype) -> None:
    """A prefill and then one token at a time (tests/test_generate's check): the stream's
    connections are per token, attention reads the cache."""
    name = variant.removeprefix("grown ")
    model = randomised(VARIANTS[name])
    if variant.startswith("grown"):
        model = grow(model, [parse_op(op) for op in GROWN_DECODE[name]])[0]
        randomize_(model, torch.Generator().manual_seed(2))
    model = model.to(dtype)
    ids = token_ids()
    assert cache_error(model, ids) <= {torch.float32: 1e-5, torch.float64: 1e-10}[dtype]


SIX = ["mlp_width=+8", "heads=+1", "value_dim=+4", "key_dim=+4", "residual_width=+8"]
LAYERS = ["layers=+2@1", "layers=+1"]


def max_change(model: TransformerLM, ops: list[str]) -> float:
    grown, _ = grow(model, [parse_op(op) for op in ops], seed=2)
    with torch.no_grad():
        return float((grown(IDS) - model(IDS)).abs().max())


@pytest.mark.parametrize("readout", ["sum", "concat"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_growth_is_exact_where_offered(variant: str, readout: str) -> None:
    """Every core transform (one at a time with the sum read-out) and all composed: HC
    inserts layers as identity connections (A_r = I, B = 1, dynamic parts zero) and pads
    each stream's width; the concat read-out's K·d → d matrix is padded block by block."""
    altup = {**VARIANTS[variant], "readout": readout}
    model = randomised(altup, tie_embeddings=readout != "concat")
    ops = SIX + (LAYERS if altup["mode"] == "hc" else [])
    changes = {op: max_change(model, [op]) for op in ops} if readout == "sum" else {}
    changes["all"] = max_change(model, ops)
    assert max(changes.values()) <= 1e-10, changes


@pytest.mark.parametrize(
    ("variant", "op", "message"),
    [
        ("mhc", "layers=+1", "layers cannot grow function-preservingly with altup.mode=mhc"),
        ("mhc dynamic", "layers=+1@0", "never the identity"),
        ("mhc", "altup.sinkhorn_iters=30", "altup.sinkhorn_iters cannot grow"),
        ("hc", "altup.K=4", "hc/mhc: a new stream would start as a copy of the embedding"),
    ],
)
def test_growth_refuses_what_is_not_exact(variant: str, op: str, message: str) -> None:
    model = build(VARIANTS[variant])
    with pytest.raises(ValueError, match=message) as err:
        grow(model, [parse_op(op)])
    assert "\n" not in str(err.value)


class SinkhornCount(TorchDispatchMode):
    """The additions and divisions Sinkhorn's normalisations execute, as they run."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.sum.dim_IntList:
            SinkhornCount.count += args[0].numel() - out.numel()
        elif func is torch.ops.aten.div.Tensor:
            SinkhornCount.count += out.numel()
        return out


@pytest.fixture
def counted_sinkhorn(monkeypatch: pytest.MonkeyPatch) -> type[SinkhornCount]:
    def counting(logits: torch.Tensor, iters: int) -> torch.Tensor:
        with SinkhornCount():
            return original(logits, iters)

    original = mhc_module.sinkhorn
    SinkhornCount.count = 0
    monkeypatch.setattr(mhc_module, "sinkhorn", counting)
    return SinkhornCount


FLOP_CASES = [
    *VARIANTS.values(),
    {"mode": "hc", "K": 1},
    {"mode": "hc", "K": 2, "dynamic": True, "readout": "concat"},
    {"mode": "mhc", "K": 2, "readout": "mean", "sinkhorn_iters": 3},
]


@pytest.mark.parametrize(
    ("altup", "T"), [(a, 13) for a in FLOP_CASES] + [(a, 2) for a in FLOP_CASES[2:4]], ids=str
)
def test_parameters_and_flops_are_counted(counted_sinkhorn, altup: dict, T: int) -> None:
    """Forward: FlopCounterMode's count plus the Sinkhorn normalisations counted as they
    run equals the analytic total (a static A_r's Sinkhorn runs once a forward, whatever
    the tokens: free per token). Training: 3 × the forward (Sinkhorn's 3× a convention, as
    product-key retrieval's sums are)."""
    tie = altup.get("readout") != "concat"
    cfg = ModelConfig(**BASE, tie_embeddings=tie, altup=AltUpConfig(**altup))
    m = TransformerLM(cfg)
    assert parameter_counts(cfg)["total"] == m.num_parameters()
    ids = IDS[:, :T]
    a = cfg.altup
    sinkhorn_total = sinkhorn_flops_per_token(cfg) * ids.numel()
    with torch.no_grad():
        counter = count_flops(lambda: m(ids), OUTER_PRODUCTS_AS_MULTIPLY_ADDS)
    counted_forward = counted_sinkhorn.count
    expected = forward_flops_per_token(cfg, T)["total"] * ids.numel()
    if a.mode == "mhc" and not a.dynamic:
        counted_forward = 0  # once a forward on the parameters
        assert counted_sinkhorn.count == 2 * cfg.n_layers * sinkhorn_flops(a.K, a.sinkhorn_iters)
    assert counted_forward == sinkhorn_total
    assert counter.get_total_flops() + counted_forward == pytest.approx(expected, rel=1e-12)
    loss = lambda: F.cross_entropy(m(ids).flatten(0, 1), ids.flatten())  # noqa: E731
    counter = count_flops(lambda: loss().backward(), OUTER_PRODUCTS_AS_MULTIPLY_ADDS)
    training = training_flops_per_token(cfg, T)["total"] * ids.numel()
    assert counter.get_total_flops() == pytest.approx(training - 3 * sinkhorn_total, rel=1e-12)


def test_flop_formulas() -> None:
    """Per layer and token, two connections: static 2·(2n(n+1)d + 2nd); dynamic adds the
    projections 2nd(n+2) each; mHC dynamic adds Sinkhorn, 2·iters·(n(n−1) + n²) each."""
    n, d, L, iters = 4, 16, 3, 20

    def flops(**altup) -> float:
        return stream_variant(altup["mode"]).flops(
            ModelConfig(**BASE, altup=AltUpConfig(K=n, **altup)), 13
        )

    static = 2 * L * (2 * n * (n + 1) * d + 2 * n * d)
    assert flops(mode="hc") == flops(mode="mhc") == static
    assert flops(mode="hc", dynamic=True) == static + 2 * L * 2 * n * d * (n + 2)
    sink = 2 * iters * (n * (n - 1) + n * n)
    assert flops(mode="mhc", dynamic=True) == flops(mode="hc", dynamic=True) + 2 * L * sink


CASTS = {"bfloat16": lambda m: m.bfloat16(), "half": lambda m: m.half()}


@pytest.mark.parametrize("cast", CASTS)
@pytest.mark.parametrize("variant", ["hc dynamic", "mhc dynamic"])
def test_connection_parameters_stay_fp32_and_out_of_weight_decay(variant: str, cast: str) -> None:
    m = randomised(VARIANTS[variant], torch.float32)
    scalars = ("width", "depth", "width_scale", "depth_scale", "width_fn", "depth_fn")
    before = {
        (i, k): getattr(c, k).detach().clone()
        for i, c in enumerate(connections(m))
        for k in scalars
    }
    CASTS[cast](m)
    for (i, k), value in before.items():
        p = getattr(connections(m)[i], k)
        assert p.dtype == torch.float32 and torch.equal(p.detach(), value), (i, k)
    assert m(IDS).dtype == m.embed.weight.dtype
    _, no_decay = param_groups(m, 0.1)
    undecayed = {id(p) for p in no_decay["params"]}
    for c in connections(m):
        assert all(id(getattr(c, k)) in undecayed for k in scalars[:4])


def test_bf16_autocast_matches_fp32() -> None:
    m = randomised(VARIANTS["mhc dynamic"], torch.float32)
    with torch.no_grad():
        exact = m(IDS)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(IDS)
    torch.testing.assert_close(low.float(), exact, rtol=0, atol=0.03 * exact.abs().max().item())


def test_statistics_at_init() -> None:
    """HC at init: A_m one-hot, A_r = I, B = 1, gains 1; mHC's gain is 1 by construction."""
    hc = connection_statistics(build({"mode": "hc", "K": 4}).blocks[1])
    assert hc == {
        f"{s}/{k}": v
        for s in ("attn", "ffn")
        for k, v in {
            "read_mean": 0.25, "mix_mean": 0.25, "write_mean": 1.0,
            "gain_forward": 1.0, "gain_backward": 1.0,
        }.items()
    }  # fmt: skip
    m = connection_statistics(build({"mode": "mhc", "K": 4, "sinkhorn_iters": 50}).blocks[0])
    assert m["attn/gain_forward"] == pytest.approx(1, abs=1e-6)  # an fp32 model
    assert m["attn/write_mean"] == pytest.approx(2 * torch.sigmoid(torch.tensor(1.0)).item())


def test_training_logs_the_stream_statistics(
    altup, corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    outputs = tmp_path / "outputs"
    args = [*tiny_overrides(corpus_dir, cache_dir, outputs, steps=4), "logger=csv"]
    result = altup("train", "altup=mhc4", "altup.K=2", *args, "trainer.log_every_n_steps=2")
    assert result.code == 0, result.stderr
    (path,) = outputs.glob("*/*/csv/version_*/metrics.csv")
    rows = list(csv.DictReader(path.read_text().splitlines()))
    logged = [r for r in rows if r.get("streams/1/ffn/gain_forward")]
    assert [int(r["step"]) for r in logged] == [1, 3]  # after steps 2 and 4 (0-based log step)
    names = {k for k in rows[0] if k.startswith("streams/")}
    assert {f"streams/{i}/{s}/{k}" for i in (0, 1) for s in ("attn", "ffn")
            for k in ("read_mean", "mix_mean", "write_mean", "gain_forward", "gain_backward")
            } == names  # fmt: skip
    assert all(abs(float(r["streams/0/attn/gain_forward"]) - 1) < 1e-3 for r in logged)


BAD = [
    (["altup=hc4", "altup.K=0"], "altup.K must be >= 1, got 0"),
    (["altup=mhc4", "altup.sinkhorn_iters=0"], "altup.sinkhorn_iters must be >= 1, got 0"),
    (["altup=k2", "altup.dynamic=true"], "altup.dynamic does not apply to altup.mode=altup"),
    (
        ["altup=hc4", "altup.sinkhorn_iters=5"],
        "altup.sinkhorn_iters does not apply to altup.mode=hc",
    ),
    (["altup=mhc4", "altup.coef_clip=2"], "altup.coef_clip does not apply to altup.mode=mhc"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_bad_input_is_one_line_and_exit_2(
    altup, overrides: list[str], message: str, tmp_path: Path
) -> None:
    result = altup("train", *overrides, f"run.output_dir={tmp_path}")
    assert result.code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines == [f"error: {message}"], result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("variant", ["hc dynamic", "mhc"])
def test_export_and_state_dict_round_trip(variant: str, tmp_path: Path) -> None:
    import altup_cli

    m = randomised(VARIANTS[variant], torch.float32)
    altup_cli.save_export(m, tmp_path / "export")
    loaded, cfg = altup_cli.load(tmp_path / "export")
    assert cfg.altup == m.config.altup
    with torch.no_grad():
        assert torch.equal(loaded(IDS), m(IDS))
