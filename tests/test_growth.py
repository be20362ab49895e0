"""Function-preserving growth: exactness of every transform and of random compositions,
trainability of what is new, and the optimizer state moved with the parameters."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from altup_cli.bench.growth import randomize_
from altup_cli.growth import TRANSFORMS, apply_plan, grow, parse_op, plan
from altup_cli.growth.remap import new_mask, old_entries, place
from altup_cli.growth.transforms import layers as layers_plan
from altup_cli.growth.transforms import placement_function
from altup_cli.models.altup import AltUpLayer
from altup_cli.models.config import AltUpConfig, FFNConfig, ModelConfig
from altup_cli.models.row_gradients import is_table, materialize_row_grad
from altup_cli.models.transformer import TransformerLM
from altup_cli.training.optim import build_optimizer, group_names, indexed_state_dict, named_state
from tests.helpers.prose import make_prose

KINDS = {
    "baseline": {},
    "untied": {"tie_embeddings": False},
    "altup_k2": {"altup": AltUpConfig(mode="altup", K=2)},
    "altup_k3": {
        "altup": AltUpConfig(mode="altup", K=3, readout="concat", layer_input="predicted"),
        "tie_embeddings": False,
    },
    "recycled": {"altup": AltUpConfig(mode="recycled", K=2)},
    "sequence": {"altup": AltUpConfig(mode="sequence", stride=2)},
    "sequence_rotating": {"altup": AltUpConfig(mode="sequence", stride=2, anchors="rotating")},
    "peer": {
        "ffn": FFNConfig(kind="peer", num_experts=64, heads=2, topk=4, d_key=8, layers="middle")
    },
    # Every layer PEER/PKM: an inserted layer's expert table is its output side.
    "peer_all": {
        "ffn": FFNConfig(kind="peer", num_experts=64, heads=2, topk=4, d_key=8, layers="all")
    },
    "pkm_all": {
        "ffn": FFNConfig(kind="pkm", num_experts=64, heads=2, topk=4, d_key=8, layers="all")
    },
    "moe": {"ffn": FFNConfig(kind="moe", num_experts=4, topk=2)},
}
SIX = ["mlp_width=48", "heads=3", "value_dim=12", "key_dim=12", "residual_width=24"]
LAYER_OPS = ["layers=+2@1", "layers=+1@1", "layers=+1"]  # +2 in the middle shifts a K=3
# AltUp pattern; +1 shifts a stride-2 rotating Sequence-AltUp one
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


def random_model(kind: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> TransformerLM:
    """A small model with every parameter and statistic off its initial value: norm gains,
    AltUp scalars and BatchNorm statistics random too, so rescaling rules are exercised."""
    cfg = ModelConfig(
        vocab_size=256, d_model=16, n_layers=3, n_heads=2, d_ff=32, max_seq_len=64, **KINDS[kind]
    )
    return randomize_(TransformerLM(cfg).to(dtype), torch.Generator().manual_seed(seed))


def text_batch(length: int = 24, rows: int = 2) -> torch.Tensor:
    """Real text as bytes (the models above have a 256-token vocabulary)."""
    data = torch.tensor(list(" ".join(make_prose(4)).encode())[: rows * length])
    return data.view(rows, length)


def max_change(model: TransformerLM, grown: TransformerLM, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((grown(x) - model(x)).abs().max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_transform_preserves_the_function(kind: str, dtype: torch.dtype) -> None:
    model = random_model(kind, dtype)
    x = text_batch()
    ops = SIX + LAYER_OPS + (["ffn.d_key=12"] if kind.startswith(("peer", "pkm")) else [])
    changes = {op: max_change(model, grow(model, [parse_op(op)])[0], x) for op in ops}
    assert max(changes.values()) <= TOLERANCE[dtype], changes


def test_the_checks_can_fail() -> None:
    """Dropping one rule of the residual-width transform (the eps rescale, or the zero
    output side) breaks exactness far beyond the fp64 tolerance."""
    model = random_model("baseline", torch.float64)
    x = text_batch()
    cfg, placements = TRANSFORMS["residual_width"](model, 24)
    grown, _ = apply_plan(model, (cfg, placements))
    assert max_change(model, grown, x) <= 1e-10
    unscaled_eps = copy.deepcopy(grown)
    for m in unscaled_eps.modules():
        if hasattr(m, "eps"):
            m.eps = model.config.norm_eps
    assert max_change(model, unscaled_eps, x) > 1e-10
    assert isinstance(placements, dict)
    placements["blocks.0.attn.wo.weight"].axes[0].zero = False
    assert max_change(model, apply_plan(model, (cfg, placements))[0], x) > 1e-3


GROWABLE = {
    "mlp_width": st.integers(1, 16),
    "heads": st.integers(1, 2),
    "value_dim": st.integers(1, 4),
    "key_dim": st.sampled_from([2, 4]),
    "residual_width": st.integers(1, 8),
    "layers": st.integers(1, 2),
}


@st.composite
def compositions(draw: st.DrawFn) -> tuple[str, list[str]]:
    kind = draw(st.sampled_from(["baseline", "altup_k2", "altup_k3", "peer", "peer_all"]))
    names = draw(st.lists(st.sampled_from(list(GROWABLE)), min_size=2, max_size=6))
    names += [n for n in GROWABLE if n not in names]  # all six, the drawn ones first
    ops, n_layers = [], 3
    for name in names:
        amount = draw(GROWABLE[name])
        if name == "layers":
            at = draw(st.integers(0, n_layers))
            ops.append(f"layers=+{amount}@{at}")
            n_layers += amount
        else:
            ops.append(f"{name}=+{amount}")
    return kind, ops


@settings(max_examples=25, deadline=None)
@given(compositions(), st.sampled_from([torch.float32, torch.float64]))
def test_random_compositions_of_all_six_preserve_the_function(
    case: tuple[str, list[str]], dtype: torch.dtype
) -> None:
    kind, ops = case
    model = random_model(kind, dtype)
    grown, _ = grow(model, [parse_op(op) for op in ops], seed=1)
    assert max_change(model, grown, text_batch()) <= TOLERANCE[dtype], ops


def test_altup_layer_insertion_keeps_stored_active_blocks() -> None:
    model = random_model("altup_k3")
    before = [layer.active_block.item() for layer in model.blocks]
    grown, _ = grow(model, [parse_op("layers=+2@1")])
    after = [layer.active_block.item() for layer in grown.blocks]
    assert after[:1] + after[3:] == before
    assert all(isinstance(b, AltUpLayer) for b in grown.blocks)
    assert [b.predictor.detach().tolist() for b in grown.blocks[1:3]] == [torch.eye(3).tolist()] * 2


def gradients(model: TransformerLM, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    logits = model(x[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).backward()
    out = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else materialize_row_grad(p)
        out[name] = torch.zeros_like(p) if g is None else g.to_dense()
    return out


PLANS = [("mlp_width", 48), ("heads", 3), ("value_dim", 12), ("key_dim", 12)]
PLANS += [("residual_width", 24), ("layers", 5)]


@pytest.mark.parametrize("kind", ["baseline", "altup_k2", "peer", "peer_all"])
@pytest.mark.parametrize(("transform", "size"), PLANS)
def test_new_parameters_train_and_are_not_clones(kind: str, transform: str, size: int) -> None:
    """Every new entry block gets a non-zero gradient on real text — the zero side at once,
    the free side after one step has made the zero side non-zero — and new units
    (rows of free weights) differ from each other and from the old ones."""
    model = random_model(kind).train()
    p = layers_plan(model, size, 1) if transform == "layers" else TRANSFORMS[transform](model, size)
    grown, _ = apply_plan(model, p, generator=torch.Generator().manual_seed(3))
    placement_of = placement_function(p)
    x = text_batch(33, 4)
    first = gradients(grown, x)
    with torch.no_grad():
        for name, param in grown.named_parameters():
            param.sub_(0.05 * first[name])
    second = gradients(grown, x)
    for name, param in grown.named_parameters():
        mask = new_mask(param, placement_of(name))
        if not mask.any() or name.endswith(("predictor", "corrector")):
            continue
        moved = (first[name].abs() + second[name].abs())[mask]
        assert moved.max() > 0, f"{name}: new entries get no gradient"
        rows = param.detach().reshape(param.shape[0], -1)
        new_rows = mask.reshape(param.shape[0], -1).all(1)
        if is_table(param):  # an expert no token retrieved yet has not trained yet
            new_rows &= rows.abs().sum(1) > 0
        fresh = rows[new_rows]
        if param.ndim >= 2 and len(fresh) and fresh.abs().sum() > 0:
            distances = torch.cdist(fresh, rows) + torch.eye(len(rows))[new_rows] * 1e9
            assert distances.min() > 0, f"{name}: new units are clones"


def adam_settings() -> dict[str, float]:
    return {"lr": 1e-2, "weight_decay": 0.0, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}


@pytest.mark.parametrize("kind", ["baseline", "altup_k2", "peer", "peer_all"])
@pytest.mark.parametrize(("transform", "size"), PLANS)
def test_adam_state_moves_with_the_parameters(kind: str, transform: str, size: int) -> None:
    """Moments have their parameter's grown shape, new first moments are 0 and new second
    moments the mean of the old; with the same gradient on the old coordinates, one step
    after growth moves them exactly as the step without growth does."""
    torch.manual_seed(0)
    model = random_model(kind).train()
    o = adam_settings()
    opt = build_optimizer(model, o)
    x = text_batch(33, 4)
    for g_name, g in gradients(model, x).items():  # one real step: non-trivial moments
        dict(model.named_parameters())[g_name].grad = g
    opt.step()
    groups = group_names(model, 0.0, None)
    old_state = named_state(opt.state_dict(), groups)
    p = layers_plan(model, size, 1) if transform == "layers" else TRANSFORMS[transform](model, size)
    grown, state = apply_plan(model, p, copy.deepcopy(old_state))
    assert state is not None
    placement_of = placement_function(p)
    new_opt = build_optimizer(grown, o)
    new_opt.load_state_dict(
        indexed_state_dict(state, group_names(grown, 0.0, None), opt.state_dict())
    )
    new_params = dict(grown.named_parameters())
    old_params = dict(model.named_parameters())
    for name, moments in state.items():
        param, placement = new_params[name], placement_of(name)
        assert moments["exp_avg"].shape == param.shape, name
        mask = new_mask(param, placement)
        if mask.any():
            assert moments["exp_avg"][mask].abs().max() == 0
            seeded = old_state[placement.source]["exp_avg_sq"].mean()  # type: ignore[index]
            assert torch.allclose(moments["exp_avg_sq"][mask], seeded.expand(int(mask.sum())))
    g = torch.Generator().manual_seed(5)
    for param in old_params.values():
        param.grad = torch.randn(param.shape, generator=g)
    for name, param in new_params.items():  # random, with the old gradient on old entries
        param.grad = torch.randn(param.shape, generator=g)
        placement = placement_of(name)
        if placement.source is not None:
            place(param.grad, placement, old_params[placement.source].grad)
    before_old = {n: q.detach().clone() for n, q in old_params.items()}
    before_new = {n: q.detach().clone() for n, q in new_params.items()}
    opt.step()
    new_opt.step()
    for name, param in new_params.items():
        placement = placement_of(name)
        if placement.source is None:
            continue
        step_new = old_entries(param.detach() - before_new[name], placement)
        step_old = old_params[placement.source].detach() - before_old[placement.source]
        torch.testing.assert_close(step_new, step_old, rtol=1e-5, atol=1e-8, msg=name)


def test_bad_ops_are_refused_before_anything_changes() -> None:
    cfg = random_model("baseline").config
    for text, message in [
        ("width=3", "unknown growth transform"),
        ("mlp_width", "cannot parse"),
        ("heads=2@1", "only layers take"),
        ("ffn.heads=16", "per-head output gate"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_op(text)
    for ops, message in [
        (["mlp_width=16"], "cannot shrink"),
        (["key_dim=9"], "even"),
        (["ffn.d_key=16"], "PEER/PKM"),
        (["layers=+1@7"], "outside"),
        (["mlp_width=32"], "nothing to grow"),
    ]:
        with pytest.raises(ValueError, match=message):
            plan(cfg, [parse_op(o) for o in ops])
    peer = random_model("peer").config
    with pytest.raises(ValueError, match="allow-inexact"):
        plan(peer, [parse_op("ffn.num_experts=144")])


def test_expert_growth_is_inexact_but_keeps_every_old_expert() -> None:
    """N = 8² → 12²: old expert (i, j) moves from i·8+j to i·12+j with its rows and moments;
    the output changes (new experts can win top-k slots) and only with the flag."""
    model = random_model("peer")
    grown, _ = grow(model, [parse_op("ffn.num_experts=144")], allow_inexact=True)
    old, new = model.blocks[1].ffn, grown.blocks[1].ffn
    i, j = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    moved = (i * 12 + j).flatten()
    assert torch.equal(new.up[moved], old.up)
    assert torch.equal(new.down[moved], old.down)
    assert torch.equal(new.retrieval.sub_keys[:, :, :8], old.retrieval.sub_keys)
    assert max_change(model, grown, text_batch()) > 0
