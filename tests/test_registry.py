"""The feed-forward kind and residual-stream variant registries: an unregistered name is one
line, every entry's growth layout describes its module's tensors (so growth cannot skip
one), its training facts agree with the module it builds, every entry's growth example
grows exactly, and a kind or a variant defined in one place (here, in the test) builds,
counts its parameters and FLOPs as FlopCounterMode does, and grows exactly."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from altup_cli.bench.growth import randomize_
from altup_cli.growth import grow, parse_op
from altup_cli.growth.layouts import SPANS
from altup_cli.growth.transforms import EXACT
from altup_cli.models import (
    FFN_KINDS,
    STREAM_VARIANTS,
    FFNKind,
    ModelConfig,
    StreamVariant,
    TransformerLM,
    ffn_kind,
    forward_flops_per_token,
    parameter_counts,
    stream_variant,
)
from altup_cli.models.config import AltUpConfig, FFNConfig
from altup_cli.models.counting import active_parameters
from altup_cli.models.product_keys import ExpertUsage
from altup_cli.models.registry import Span, growth_examples, module_layouts, sweep_archs
from altup_cli.models.row_gradients import is_table
from altup_cli.models.stream import StreamLayer, scalar
from tests.helpers.flops import count_flops

# Every size distinct, so an axis's length tells which config field it runs along.
SIZES = dict(vocab_size=97, d_model=24, n_layers=3, n_heads=2, d_ff=40, max_seq_len=32)
FFN = {
    "dense": {},
    "peer": dict(num_experts=49, heads=3, topk=2, d_key=10, shared_keys=False),
    "pkm": dict(num_experts=49, heads=3, topk=2, d_key=10),
    "moe": dict(num_experts=5, topk=2),
}
SIX = ["mlp_width=+8", "heads=+1", "value_dim=+4", "key_dim=+4", "residual_width=+8"]
LAYERS = ["layers=+2@1", "layers=+1@0", "layers=+1"]


def test_the_registries_hold_the_kinds_and_variants_in_message_order() -> None:
    assert list(FFN_KINDS) == ["dense", "peer", "pkm", "moe"]
    assert list(STREAM_VARIANTS) == [
        "off", "altup", "recycled", "sequence", "stride_skip", "hc", "mhc", "gemma3n",
    ]  # fmt: skip
    assert set(FFN) == set(FFN_KINDS)  # a new kind is added to this test's table too


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: FFNConfig(kind="glu"), "ffn.kind must be one of dense, peer, pkm, moe, got 'glu'"),
        (lambda: ffn_kind("glu"), "ffn.kind must be one of"),
        (lambda: AltUpConfig(mode="hyper"), "altup.mode must be one of off, altup, recycled, "
                                            "sequence, stride_skip, hc, mhc, gemma3n, "
                                            "got 'hyper'"),
        (lambda: stream_variant("hyper"), "altup.mode must be one of"),
        (lambda: ModelConfig.from_dict({"ffn": {"kind": "glu"}}), "ffn.kind must be one of"),
        (lambda: ModelConfig.from_dict({"ffn": "glu"}), "ffn.kind must be one of"),
    ],
)  # fmt: skip
def test_an_unregistered_name_is_a_one_line_value_error(make, message: str) -> None:
    with pytest.raises(ValueError) as err:
        make()
    assert message in str(err.value) and "\n" not in str(err.value)


def kind_model(kind: str, **extra) -> TransformerLM:
    torch.manual_seed(0)
    ffn = FFNConfig(kind=kind, layers=[1], **FFN[kind])
    return TransformerLM(ModelConfig(**SIZES, ffn=ffn, **extra))


@pytest.mark.parametrize("kind", list(FFN))
def test_each_layout_describes_its_module(kind: str) -> None:
    """Every laid-out tensor exists, its spans are ones growth knows and match the axis
    lengths, and every axis as long as d_model or d_ff is laid out: residual_width and
    mlp_width cannot leave a tensor of a kind behind."""
    entry = ffn_kind(kind)
    module = kind_model(kind).blocks[1].ffn
    assert type(module) is entry.module
    tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    assert set(entry.layout) <= set(tensors)
    length = {"d_model": SIZES["d_model"], "d_model_blocks": SIZES["d_model"], "d_ff": 40}
    for name, tensor in tensors.items():
        spans = entry.layout.get(name, {})
        for axis, span in spans.items():
            assert span.dim in SPANS, (name, span)
            if span.dim in length:
                assert tensor.shape[axis] % length[span.dim] == 0, (name, axis)
        for axis, n in enumerate(tensor.shape):
            if n in (SIZES["d_model"], SIZES["d_ff"]):
                assert axis in spans, f"{kind}: {name} axis {axis} ({n}) is not laid out"


def test_every_registered_layout_uses_known_spans() -> None:
    for layout in module_layouts().values():
        for spans in layout.values():
            assert all(s.dim in SPANS for s in spans.values())


@pytest.mark.parametrize("kind", list(FFN))
def test_training_facts_agree_with_the_module(kind: str) -> None:
    entry, module = ffn_kind(kind), kind_model(kind).blocks[1].ffn
    has_tables = any(is_table(p) for p in module.parameters())
    assert entry.logs_expert_usage == any(isinstance(m, ExpertUsage) for m in module.modules())
    assert entry.supports_fsdp == (not has_tables)  # factored table gradients: DDP only
    assert all(f in FFNConfig.__dataclass_fields__ for f in entry.growable)
    for arch, overrides in entry.sweep.items():
        assert f"ffn={kind}" in overrides, arch


def test_sweep_archs_and_growth_examples_are_the_registered_ones() -> None:
    assert sweep_archs() == {
        "dense": ["ffn=dense", "altup=off"],
        "moe": ["ffn=moe", "altup=off"],
        "pkm": ["ffn=pkm", "altup=off"],
        "peer": ["ffn=peer", "altup=off"],
        "altup_k2": ["ffn=dense", "altup=k2"],
        "recycled_k2": ["ffn=dense", "altup=recycled_k2"],
        "hc4": ["ffn=dense", "altup=hc4"],
        "hc4_dynamic": ["ffn=dense", "altup=hc4_dynamic"],
        "mhc4": ["ffn=dense", "altup=mhc4"],
        "gemma3n": ["ffn=dense", "altup=gemma3n"],
    }
    assert list(growth_examples()) == [
        "dense", "altup K=2", "altup K=3", "recycled K=2", "sequence s=2",
        "hc ×4", "hc ×4 dynamic", "peer 64²", "pkm 64²", "moe 4×top-2",
    ]  # fmt: skip


def example_model(name: str) -> TransformerLM:
    cfg = ModelConfig(vocab_size=256, d_model=16, n_layers=3, n_heads=2, d_ff=32,
                      max_seq_len=64, **growth_examples()[name])  # fmt: skip
    model = TransformerLM(cfg).to(torch.float64)
    return randomize_(model, torch.Generator().manual_seed(0))


def max_change(model: TransformerLM, ops: list[str], allow_inexact: bool = False) -> float:
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(4))
    grown, _ = grow(model, [parse_op(op) for op in ops], seed=2, allow_inexact=allow_inexact)
    with torch.no_grad():
        return float((grown(ids) - model(ids)).abs().max())


@pytest.mark.parametrize("name", list(growth_examples()))
def test_every_growth_example_grows_exactly(name: str) -> None:
    model = example_model(name)
    kind = ffn_kind(model.config.ffn.kind)
    own = [f"ffn.{f}=+2" for f in kind.growable if f"ffn.{f}" in EXACT]  # PEER/PKM: d_key
    changes = {op: max_change(model, [op]) for op in [*SIX, *LAYERS, *own]}
    assert max(changes.values()) <= 1e-10, changes


# A kind defined in one place: a gated MLP, w2 · (gelu(w1 · x) ⊙ w3 · x).
class GatedMLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x)) * self.w3(x))


GATED = FFNKind(
    name="gated",
    label="gated MLP",
    module=GatedMLP,
    build=lambda cfg: GatedMLP(cfg.d_model, cfg.d_ff),
    parameters=lambda cfg: {"mlp": 3 * cfg.d_model * cfg.d_ff},
    active_parameters=lambda cfg: 3 * cfg.d_model * cfg.d_ff,
    flops=lambda cfg: {"mlp": 6 * cfg.d_model * cfg.d_ff},
    layout={
        "w1.weight": {0: Span("d_ff"), 1: Span("d_model")},
        "w3.weight": {0: Span("d_ff"), 1: Span("d_model")},
        "w2.weight": {0: Span("d_model", zero=True), 1: Span("d_ff", zero=True)},
    },
)


# A variant defined in one place: each layer's update scaled by a learned gate g (init 1),
# y = x + g · (L(x) − x).
class GatedLayer(StreamLayer):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer, self.gate = layer, scalar(torch.tensor(1.0))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x + self.gate * (self.layer(x, cos, sin) - x)


GATED_STREAM = StreamVariant(
    name="gated",
    wrap=lambda cfg, layer, i: GatedLayer(layer),
    parameters=lambda cfg: cfg.n_layers,
)


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(FFN_KINDS, "gated", GATED)
    monkeypatch.setitem(STREAM_VARIANTS, "gated", GATED_STREAM)


@pytest.mark.parametrize("layers", [[1], "all"])
@pytest.mark.parametrize("mode", ["off", "gated"])
def test_a_new_kind_and_variant_need_only_their_entries(registered, layers, mode: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(**SIZES, ffn=FFNConfig(kind="gated", layers=layers),
                      altup=AltUpConfig(mode=mode))  # fmt: skip
    model = TransformerLM(cfg)
    counts = parameter_counts(cfg)
    assert counts["total"] == model.num_parameters()
    assert active_parameters(cfg) == counts["non_embedding"]
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        counter = count_flops(lambda: model(ids))
    assert counter.get_total_flops() == forward_flops_per_token(cfg, 16)["total"] * ids.numel()
    # Its output projection starts at the scale of the others (GPT-2's 1/sqrt(2·layers)).
    gated = [m for m in model.modules() if isinstance(m, GatedMLP)]
    assert gated and all(m.w2.weight.std() < 0.5 * m.w1.weight.std() for m in gated)
    model = randomize_(model.to(torch.float64), torch.Generator().manual_seed(2))
    changes = {op: max_change(model, [op]) for op in [*SIX, *LAYERS]}
    assert max(changes.values()) <= 1e-10, changes


def test_growth_refuses_a_kinds_field_it_does_not_grow(registered) -> None:
    cfg = replace(ModelConfig(**SIZES), ffn=FFNConfig(kind="gated"))
    model = TransformerLM(cfg)
    message = r"ffn\.d_key grows PEER/PKM layers; this model has ffn\.kind=gated"
    with pytest.raises(ValueError, match=message):
        grow(model, [parse_op("ffn.d_key=12")])


def test_a_refused_field_names_every_variant_s_reason() -> None:
    """altup.K is refused by several variants, each for its own reason: the message gives
    them all (and an upper-case field name reaches the refusal, not a parse error)."""
    with pytest.raises(ValueError) as err:
        parse_op("altup.K=3")
    message = str(err.value)
    assert message.startswith("altup.K cannot grow function-preservingly: ")
    for name in ("altup", "recycled", "gemma3n"):
        assert stream_variant(name).growth_refusals["K"] in message
    assert "altup/recycled: " in message and "\n" not in message
