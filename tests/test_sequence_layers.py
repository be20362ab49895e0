"""`altup.sequence_layers`: Sequence-AltUp / stride-and-skip in the layers it picks and plain
layers (every token) elsewhere. The model matches a per-token reference, parameters and
training FLOPs equal the module's and FlopCounterMode's counts layer by layer, inserting
layers keeps the same layers sequence layers and the function, a bad choice is one line,
and configs and checkpoints without the key keep every layer a sequence layer."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import altup_cli
from altup_cli.bench.growth import randomize_
from altup_cli.growth import grow, parse_op
from altup_cli.models import ModelConfig, TransformerLM, parameter_counts, training_flops_per_token
from altup_cli.models.config import AltUpConfig
from altup_cli.models.sequence_altup import SequenceAltUpLayer
from tests.helpers.flops import count_flops
from tests.test_altup import BASE, IDS
from tests.test_growth import TOLERANCE, max_change, text_batch

SPECS = ["middle", [0, 2], [3], [1, 2, 3]]
CASES = list(itertools.product(["sequence", "stride_skip"], ["fixed", "rotating"], [2, 3], SPECS))


def chosen(spec: str | list[int], n_layers: int = BASE["n_layers"]) -> list[int]:
    return [n_layers // 2] if spec == "middle" else list(spec)


def sequence_model(mode: str, anchors: str, stride: int, spec, seed: int = 0) -> TransformerLM:
    torch.manual_seed(seed)
    altup = AltUpConfig(mode=mode, stride=stride, anchors=anchors, sequence_layers=spec)
    m = TransformerLM(ModelConfig(**BASE, altup=altup)).eval()
    with torch.no_grad():
        for i, layer in enumerate(m.blocks):
            if isinstance(layer, SequenceAltUpLayer) and not layer.skip_only:
                layer.predictor.copy_(torch.tensor([0.9 + 0.05 * i, 0.2]))
                layer.corrector.fill_(0.8)
    return m


def reference(m: TransformerLM, ids: torch.Tensor) -> torch.Tensor:
    """Layer by layer, token by token: a sequence layer ℓ runs on its anchors t ≡ o (mod k)
    (o = ℓ mod k rotating, 0 fixed), each later token takes the last anchor at or before
    it; a plain layer runs on every token."""
    a, T = m.config.altup, ids.shape[1]
    picked = chosen(a.sequence_layers)
    x = m.embed(ids)
    cos, sin = m.rotary.cos_sin(T, ids.device)
    for ell, layer in enumerate(m.blocks):
        if ell not in picked:
            x = layer(x, cos, sin)
            continue
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


@pytest.mark.parametrize(("mode", "anchors", "stride", "spec"), CASES)
def test_only_the_chosen_layers_run_on_anchors(mode, anchors, stride, spec) -> None:
    m = sequence_model(mode, anchors, stride, spec)
    wrapped = [isinstance(layer, SequenceAltUpLayer) for layer in m.blocks]
    assert wrapped == [i in chosen(spec) for i in range(BASE["n_layers"])]
    for T in (22, 2):
        ids = IDS[:, :T]
        with torch.no_grad():
            torch.testing.assert_close(m(ids), reference(m, ids), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("mode", "anchors", "stride", "spec"), CASES)
@pytest.mark.parametrize("T", [23, 2])
def test_flops_and_parameters_are_counted_per_layer(mode, anchors, stride, spec, T) -> None:
    m = sequence_model(mode, anchors, stride, spec)
    cfg = m.config
    assert parameter_counts(cfg)["total"] == m.num_parameters()
    ids = torch.randint(0, 301, (2, T), generator=torch.Generator().manual_seed(T))
    counter = count_flops(lambda: F.cross_entropy(m(ids).flatten(0, 1), ids.flatten()).backward())
    expected = training_flops_per_token(cfg, T)["total"] * 2 * T
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)


def test_fewer_sequence_layers_cost_more_flops_than_all() -> None:
    def flops(spec) -> float:
        altup = AltUpConfig(mode="sequence", stride=2, anchors="rotating", sequence_layers=spec)
        return training_flops_per_token(ModelConfig(**BASE, altup=altup), 24)["total"]

    plain = training_flops_per_token(ModelConfig(**BASE), 24)["total"]
    assert flops("all") < flops([0, 2]) < flops("middle") < plain


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([4], r"altup\.sequence_layers: \[4\] out of range for 4 layers"),
        ([-1], r"altup\.sequence_layers: \[-1\] out of range"),
        ([1, 1], r"altup\.sequence_layers has repeated indices"),
        ("first", r"altup\.sequence_layers must be all, middle or a list of layer indices"),
    ],
)
def test_a_bad_choice_is_a_one_line_value_error(spec, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**BASE, altup=AltUpConfig(mode="sequence", sequence_layers=spec))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["altup.sequence_layers=[0,7]"], "altup.sequence_layers: [7] out of range"),
        (["altup.sequence_layers=first"], "altup.sequence_layers must be all, middle or a list"),
        (["altup.sequence_layers=[1,1]"], "altup.sequence_layers has repeated indices"),
    ],
)
def test_a_bad_choice_on_the_command_line_is_one_line_and_exit_2(
    altup, overrides: list[str], message: str, tmp_path: Path, cache_dir: Path
) -> None:
    result = altup("train", "altup=sequence_s2", *overrides,
                   f"run.output_dir={tmp_path}", f"run.cache_dir={cache_dir}")  # fmt: skip
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.code == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not any(tmp_path.iterdir())


def test_other_modes_ignore_the_choice() -> None:
    """Like ffn.layers for dense: a mode that has no sequence layers checks no indices."""
    for mode in ("off", "altup", "recycled"):
        ModelConfig(**BASE, altup=AltUpConfig(mode=mode, sequence_layers=[9]))


def test_a_config_without_the_key_runs_every_layer_on_anchors(tmp_path: Path) -> None:
    """Exports and checkpoints from before `altup.sequence_layers` keep today's model: every
    layer a sequence layer, the same state dict."""
    every = sequence_model("sequence", "rotating", 2, "all")
    assert all(isinstance(layer, SequenceAltUpLayer) for layer in every.blocks)
    altup_cli.save_export(every, tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["model"]["altup"]["sequence_layers"]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    loaded, cfg = altup_cli.load(tmp_path)
    assert cfg.altup.sequence_layers == "all"
    old = ModelConfig.from_dict({**BASE, "altup": {"mode": "sequence"}})
    assert old.altup.sequence_layers == "all"
    assert set(loaded.state_dict()) == set(every.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS), every(IDS), rtol=0, atol=0)


def grown_model(mode: str, spec, dtype: torch.dtype) -> TransformerLM:
    altup = AltUpConfig(mode=mode, stride=2, anchors="rotating", sequence_layers=spec)
    cfg = ModelConfig(vocab_size=256, d_model=16, n_layers=3, n_heads=2, d_ff=32,
                      max_seq_len=64, altup=altup)  # fmt: skip
    return randomize_(TransformerLM(cfg).to(dtype), torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", ["sequence", "stride_skip"])
@pytest.mark.parametrize(("spec", "op", "after"), [
    ([0, 2], "layers=+2@1", [0, 4]),
    ([0, 2], "layers=+1@0", [1, 3]),
    ([0, 2], "layers=+1", [0, 2]),
    ("middle", "layers=+1@1", [2]),
    ("all", "layers=+2@1", "all"),
])  # fmt: skip
def test_inserting_layers_keeps_the_sequence_layers_and_the_function(
    mode: str, spec, op: str, after, dtype: torch.dtype
) -> None:
    model = grown_model(mode, spec, dtype)
    grown, _ = grow(model, [parse_op(op)])
    assert grown.config.altup.sequence_layers == after
    n = grown.config.n_layers
    expect = list(range(n)) if after == "all" else after
    assert [isinstance(b, SequenceAltUpLayer) for b in grown.blocks] == [
        i in expect for i in range(n)
    ]
    old_offsets = [int(b.anchor_offset) for b in model.blocks if hasattr(b, "anchor_offset")]
    new_offsets = [int(b.anchor_offset) for b in grown.blocks if hasattr(b, "anchor_offset")]
    if after != "all":  # the old sequence layers keep their stored anchors
        assert new_offsets == old_offsets
    assert max_change(model, grown, text_batch()) <= TOLERANCE[dtype]
    for six in ["mlp_width=48", "heads=3", "value_dim=12", "key_dim=12", "residual_width=24"]:
        assert max_change(model, grow(model, [parse_op(six)])[0], text_batch()) <= TOLERANCE[dtype]
