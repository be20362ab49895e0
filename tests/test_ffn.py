"""PEER, PKM and MoE: exact retrieval, the fast paths against their naive oracles (outputs
and gradients), Eq. 8, the lazy optimizer, expert usage, counting and training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from altup_cli.models import ModelConfig, TransformerLM, parameter_counts
from altup_cli.models.config import AltUpConfig, FFNConfig
from altup_cli.models.counting import active_parameters, forward_flops_per_token
from altup_cli.models.feedforward import MLP
from altup_cli.models.moe import MoE
from altup_cli.models.peer import PEER
from altup_cli.models.pkm import PKM
from altup_cli.models.product_keys import ExpertUsage, ProductKeyRetrieval
from altup_cli.models.row_gradients import has_row_grad, materialize_row_grad
from altup_cli.training import optim
from altup_cli.training.optim import build_optimizer
from tests.helpers.flops import count_flops

OPTIM = {"lr": 1e-2, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8}


def grads_of(module: torch.nn.Module, x: torch.Tensor, forward) -> dict[str, torch.Tensor]:
    """Output and every gradient (sparse ones made dense) of a fixed linear functional."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = forward(x)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)).sum().backward()
    result = {"out": out.detach(), "x": x.grad}
    for name, p in module.named_parameters():
        factored = materialize_row_grad(p)  # the fast path's expert tables
        if factored is not None:
            assert p.grad is None
            result[name] = factored.to_dense()
        elif p.grad is not None:
            result[name] = p.grad
    return result


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize(("num_keys", "topk"), [(16, 4), (256, 16), (1024, 32)])
def test_product_keys_return_the_exhaustive_top_k(shared: bool, num_keys: int, topk: int) -> None:
    torch.manual_seed(num_keys)
    r = ProductKeyRetrieval(24, num_keys, heads=3, topk=topk, d_key=8, shared_keys=shared)
    r = r.double().train()
    x = torch.randn(50, 24, dtype=torch.float64)
    scores, idx = r(x)
    best, best_idx = r.all_scores(x).topk(topk, dim=-1)
    torch.testing.assert_close(scores, best, rtol=0, atol=1e-12)
    assert torch.equal(idx, best_idx)  # random fp64 scores: no ties


def reference_retrieval(
    r: ProductKeyRetrieval, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k scores and flat indices from first principles, sharing no code with
    `ProductKeyRetrieval`: each head's query slice (BatchNorm'd by hand with the batch or
    running statistics) dotted with every full key [c_i; c'_j] (flat index i·√N + j),
    built by a loop, then sorted."""
    q = x @ r.query.weight.T
    bn = r.query_bn
    if bn is not None:
        mean, var = (q.mean(0), q.var(0, unbiased=False)) if bn.training else (
            bn.running_mean, bn.running_var)  # fmt: skip
        q = (q - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
    heads, d_key, root = r.heads, r.d_key, r.root
    scores, idx = [], []
    for h in range(heads):
        c = r.sub_keys[h if r.sub_keys.shape[0] > 1 else 0]  # (2, √N, d_key/2)
        keys = torch.stack([torch.cat([c[0, i], c[1, j]]) for i in range(root)
                            for j in range(root)])  # fmt: skip
        q_h = q[:, h * d_key : (h + 1) * d_key]
        all_h = (q_h[:, None, :] * keys[None]).sum(-1)  # (n, N) explicit dot products
        order = all_h.argsort(-1, descending=True)[:, : r.topk]
        scores.append(all_h.gather(-1, order))
        idx.append(order)
    return torch.stack(scores, 1), torch.stack(idx, 1)


@pytest.mark.parametrize("query_bn", [True, False])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize(("num_keys", "topk"), [(16, 4), (256, 16)])
def test_product_keys_equal_an_independent_full_key_reference(
    query_bn: bool, shared: bool, num_keys: int, topk: int
) -> None:
    """Catches what an oracle built on `sub_scores` cannot: a wrong sub-key table, half or
    head slice, or flat index layout. Training-mode (batch) and eval-mode (running) BN."""
    torch.manual_seed(num_keys + shared)
    r = ProductKeyRetrieval(24, num_keys, heads=3, topk=topk, d_key=8, query_bn=query_bn,
                            shared_keys=shared).double()  # fmt: skip
    if query_bn:  # non-trivial affine BN parameters
        torch.nn.init.normal_(r.query_bn.weight, 1.0, 0.3)
        torch.nn.init.normal_(r.query_bn.bias, 0.0, 0.3)
    x = torch.randn(40, 24, dtype=torch.float64)
    with torch.no_grad():
        for mode in ("train", "eval"):
            r.train(mode == "train")
            expected_scores, expected_idx = reference_retrieval(r, x)  # before BN updates
            scores, idx = r(x)
            torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-12, msg=mode)
            assert torch.equal(idx, expected_idx), mode  # random fp64 scores: no ties


PEER_CASES = [
    dict(query_bn=True, shared_keys=True, activation="gelu"),
    dict(query_bn=False, shared_keys=False, activation="relu"),
]


@pytest.mark.parametrize("options", PEER_CASES)
def test_peer_equals_its_naive_oracle(options: dict) -> None:
    torch.manual_seed(0)
    peer = PEER(16, 64, heads=3, topk=4, d_key=6, **options).double().train()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    assert_same(grads_of(peer, x, peer), grads_of(peer, x, peer.forward_naive))


def test_peer_with_k1_is_an_mlp_with_h_neurons() -> None:
    """Eq. 8: k = 1 makes each router weight 1, so a token's output is the MLP whose h
    hidden neurons are its h retrieved experts."""
    torch.manual_seed(1)
    d, h = 12, 5
    peer = PEER(d, 49, heads=h, topk=1, d_key=4, query_bn=False).double()
    x = torch.randn(7, d, dtype=torch.float64)
    with torch.no_grad():
        out = peer(x)
        _, idx = peer.retrieval(x)
        for t in range(x.shape[0]):
            mlp = MLP(d, h).double()
            mlp.w1.weight.copy_(peer.up[idx[t, :, 0]])
            mlp.w2.weight.copy_(peer.down[idx[t, :, 0]].T)
            torch.testing.assert_close(out[t], mlp(x[t]), rtol=0, atol=1e-12)


def test_pkm_equals_its_naive_oracle() -> None:
    torch.manual_seed(2)
    pkm = PKM(16, 81, heads=2, topk=5, d_key=4).double().train()
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    assert_same(grads_of(pkm, x, pkm), grads_of(pkm, x, pkm.forward_naive))


@pytest.mark.parametrize("routing", ["token_choice", "expert_choice"])
def test_moe_equals_its_naive_oracle(routing: str) -> None:
    torch.manual_seed(3)
    moe = MoE(16, 24, num_experts=5, topk=2, routing=routing, capacity=1.5).double().train()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    fast, naive = grads_of(moe, x, moe), grads_of(moe, x, moe.forward_naive)
    assert_same(fast, naive)
    assert (moe.aux_loss is not None) == (routing == "token_choice")


@pytest.mark.parametrize("topk", [1, 2])
def test_the_moe_router_learns_from_the_output(topk: int) -> None:
    """With top-1 the gate is the raw probability (Switch): renormalised it would be 1 and
    the router would get no gradient from the task loss."""
    torch.manual_seed(6)
    moe = MoE(8, 16, num_experts=4, topk=topk, balance_weight=0.0).train()
    moe(torch.randn(10, 8)).pow(2).sum().backward()
    assert moe.router.weight.grad.abs().sum() > 1e-4


def test_moe_balance_loss_is_one_when_uniform() -> None:
    moe = MoE(4, 8, num_experts=4, topk=1)
    probs = torch.full((8, 4), 0.25)
    mask = torch.eye(4, dtype=torch.bool).repeat(2, 1)  # each expert gets 2 of 8 tokens
    assert float(moe.balance_loss(probs, mask)) == pytest.approx(1.0)
    skewed = torch.zeros(8, 4, dtype=torch.bool)
    skewed[:, 0] = True
    assert float(moe.balance_loss(torch.eye(4)[[0] * 8], skewed)) == pytest.approx(4.0)


def test_expert_usage_and_unevenness_by_hand() -> None:
    usage = ExpertUsage(4)
    assert not list(usage.buffers())  # DDP would broadcast rank 0's (tests/test_ffn_ddp.py)
    usage.record(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0.5, 0.5], [0.25, 0.75]]))
    # Totals: expert 0 → 0.5, expert 1 → 1.5, experts 2 and 3 → 0; z = (0.25, 0.75, 0, 0).
    stats = usage.stats()
    assert stats["usage"] == 0.5
    expected = math.log(4) + 0.25 * math.log(0.25) + 0.75 * math.log(0.75)
    assert stats["unevenness"] == pytest.approx(expected, rel=1e-6)
    usage.reset()
    assert usage.stats()["usage"] == 0.0


def test_lazy_adam_touches_only_retrieved_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """With retrieval frozen and a fixed batch, lazy Adam on the sparse table gradients
    equals dense Adam on the zero-padded ones (never-retrieved rows get zero moments and
    zero updates there too), and rows never retrieved keep their values and moments."""
    monkeypatch.setattr(optim, "ROW_CHUNK", 5)  # many chunks of rows per table
    torch.manual_seed(4)
    peer = PEER(8, 400, heads=2, topk=3, d_key=4, query_bn=False)
    reference = PEER(8, 400, heads=2, topk=3, d_key=4, query_bn=False)
    reference.load_state_dict(peer.state_dict())
    for module in (peer, reference):
        module.retrieval.requires_grad_(False)
    lazy = build_optimizer(peer, OPTIM, table_lr=3e-3)
    assert [g["lazy"] for g in lazy.param_groups] == [False, False, True]
    dense = torch.optim.Adam([reference.up, reference.down], lr=3e-3, betas=(0.9, 0.95))
    before = peer.up.detach().clone()
    x = torch.randn(6, 8)
    for _ in range(3):
        for module in (peer, reference):
            module.zero_grad(set_to_none=True)
        peer(x).pow(2).sum().backward()
        reference.forward_naive(x).pow(2).sum().backward()
        assert peer.up.grad is None and has_row_grad(peer.up) and has_row_grad(peer.down)
        lazy.step()
        assert not has_row_grad(peer.up)
        dense.step()
    retrieved = sorted(set(peer.route(x)[1].flatten().tolist()))
    never = sorted(set(range(400)) - set(retrieved))
    assert torch.equal(peer.up[never], before[never])
    assert not lazy.state[peer.up]["exp_avg"][never].any()
    assert (peer.up[retrieved] != before[retrieved]).all(-1).all()
    for name in ("up", "down"):
        torch.testing.assert_close(
            getattr(peer, name), getattr(reference, name), rtol=1e-5, atol=1e-7
        )


def per_row_adam(
    table: torch.Tensor, grad: torch.Tensor, rows: list[int], moments: list[torch.Tensor],
    step: int, lr: float, betas: tuple[float, float], eps: float,
) -> None:  # fmt: skip
    """Adam, one row at a time, on the rows retrieved this step only; `step` counts the
    table's optimizer steps (one global count per table, not per row)."""
    m, v = moments
    (b1, b2) = betas
    with torch.no_grad():
        for i in rows:
            m[i] = b1 * m[i] + (1 - b1) * grad[i]
            v[i] = b2 * v[i] + (1 - b2) * grad[i] * grad[i]
            m_hat, v_hat = m[i] / (1 - b1**step), v[i] / (1 - b2**step)
            table[i] -= lr * m_hat / (v_hat.sqrt() + eps)


def test_lazy_adam_equals_per_row_adam_as_retrieval_sets_change(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each step retrieves a different set of rows: some first retrieved late, some again
    after gaps. Lazy Adam equals Adam written per row (moments of a row decay and it steps
    only when retrieved; bias corrections use the table's global step count)."""
    monkeypatch.setattr(optim, "ROW_CHUNK", 5)
    torch.manual_seed(8)
    peer = PEER(8, 100, heads=2, topk=3, d_key=4, query_bn=False).double()
    reference = PEER(8, 100, heads=2, topk=3, d_key=4, query_bn=False).double()
    reference.load_state_dict(peer.state_dict())
    for module in (peer, reference):
        module.retrieval.requires_grad_(False)  # the same retrieval in both, every step
    lr, betas, eps = 3e-3, (0.9, 0.95), 1e-8
    lazy = build_optimizer(peer, {**OPTIM, "beta1": betas[0], "beta2": betas[1]}, lr)
    moments = {n: [torch.zeros_like(reference.up) for _ in range(2)] for n in ("up", "down")}
    retrieved: list[set[int]] = []
    for step in range(1, 7):
        x = torch.randn(3, 8, dtype=torch.float64)
        rows = sorted(set(reference.retrieval(x)[1].flatten().tolist()))
        retrieved.append(set(rows))
        for module in (peer, reference):
            module.zero_grad(set_to_none=True)
        peer(x).pow(2).sum().backward()
        lazy.step()
        reference.forward_naive(x).pow(2).sum().backward()
        for name in ("up", "down"):
            table = getattr(reference, name)
            per_row_adam(table, table.grad, rows, moments[name], step, lr, betas, eps)
            torch.testing.assert_close(getattr(peer, name), table, rtol=0, atol=1e-12)
    late = retrieved[-1] - set().union(*retrieved[:2])  # first seen after step 2
    gaps = [r for r in range(100) if any(r in retrieved[s] and r not in retrieved[s + 1]
            and any(r in later for later in retrieved[s + 2 :]) for s in range(4))]  # fmt: skip
    assert late and gaps  # the schedule really exercises both


def model(ffn: dict, altup: dict | None = None) -> TransformerLM:
    torch.manual_seed(5)
    cfg = ModelConfig(
        vocab_size=97, d_model=16, n_layers=3, n_heads=2, d_ff=32, max_seq_len=16,
        ffn=FFNConfig(**ffn), altup=AltUpConfig(**(altup or {})),
    )  # fmt: skip
    return TransformerLM(cfg)


KINDS = [
    dict(kind="peer", num_experts=64, heads=2, topk=4, d_key=8),
    dict(kind="peer", num_experts=64, heads=2, topk=4, d_key=8, layers="all", query_bn=False),
    dict(kind="pkm", num_experts=49, heads=2, topk=3, d_key=6, shared_keys=False),
    dict(kind="moe", num_experts=4, topk=2, layers=[0, 2]),
    dict(kind="moe", num_experts=4, topk=1, routing="expert_choice", capacity=2.0),
]


@pytest.mark.parametrize("ffn", KINDS)
def test_counts_equal_the_module_and_flop_counter(ffn: dict) -> None:
    m = model(ffn).eval()
    cfg = m.config
    assert parameter_counts(cfg)["total"] == m.num_parameters()
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        counter = count_flops(lambda: m(ids))
    flops = forward_flops_per_token(cfg, 16)
    # FlopCounterMode sees matrix products and fused gathers, not the candidate sums.
    expected = (flops["total"] - flops["retrieval"]) * ids.numel()
    assert counter.get_total_flops() == pytest.approx(expected, rel=1e-12)
    assert active_parameters(cfg) < parameter_counts(cfg)["non_embedding"]


@pytest.mark.parametrize("ffn", KINDS)
@pytest.mark.parametrize("altup", [None, dict(mode="altup", K=2)])
def test_every_kind_trains_inside_the_model(ffn: dict, altup: dict | None) -> None:
    """One optimizer step moves every parameter that took part (with AltUp too), and the
    MoE balance loss reaches the router."""
    m = model(ffn, altup).train()
    opt = build_optimizer(m, OPTIM, table_lr=1e-2)
    ids = torch.randint(0, 97, (4, 16))
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    loss = F.cross_entropy(m(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    aux = m.aux_loss()
    assert (aux is not None) == (ffn["kind"] == "moe" and ffn.get("routing") != "expert_choice")
    (loss if aux is None else loss + aux).backward()
    opt.step()
    unchanged = [n for n, p in m.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, unchanged
    if ffn["kind"] in ("peer", "pkm"):
        usage = m.expert_usage()
        assert usage and all(0 < s["usage"] <= 1 for s in usage.values())


def test_old_checkpoints_with_a_string_ffn_still_load() -> None:
    cfg = ModelConfig.from_dict({"vocab_size": 97, "d_model": 16, "n_heads": 2, "ffn": "dense"})
    assert cfg.ffn == FFNConfig()


def test_the_ffn_recipe_compares_at_equal_flops() -> None:
    """Every variant of recipes/ffn-isoflop composes and is within 5% of the dense
    model's training FLOPs per token, as the recipe claims."""
    from altup_cli.compare import recipe_variants
    from altup_cli.config import compose_config, validate
    from altup_cli.models.counting import training_flops_per_token

    variants = recipe_variants([], "ffn-isoflop")
    assert [v.split()[0] for v in variants] == ["ffn=dense", "ffn=moe", "ffn=pkm", "ffn=peer"]
    flops = []
    for variant in variants:
        settings = validate(compose_config(variant.split(), "ffn-isoflop"))
        cfg = settings.model_config(vocab_size=8192)
        assert cfg.ffn.kind == variant.split()[0].removeprefix("ffn=")
        flops.append(training_flops_per_token(cfg, settings.data.seq_len)["total"])
    assert all(abs(f / flops[0] - 1) <= 0.05 for f in flops), flops


def test_expert_tables_run_eagerly_under_compile_and_cost_no_dynamo_import() -> None:
    """Eager PEER training never imports torch._dynamo (~70 MB resident, which the 1M
    benchmark's memory budget cannot spare); a compiled PEER runs the table kernels
    eagerly, so its factored table gradients equal the eager ones."""
    import subprocess
    import sys

    script = (
        "import sys, torch; from altup_cli.models.peer import PEER; "
        "p = PEER(8, 64, heads=2, topk=4, d_key=4); p(torch.randn(5, 8)).sum().backward(); "
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr

    torch.manual_seed(6)
    peer = PEER(8, 64, heads=2, topk=4, d_key=4, query_bn=False)
    x = torch.randn(5, 8)
    eager = grads_of(peer, x, peer)
    compiled = torch.compile(peer, backend="eager")
    under_compile = grads_of(peer, x, compiled)
    assert eager.keys() == under_compile.keys() and "up" in eager
    for name, value in eager.items():
        torch.testing.assert_close(under_compile[name], value, msg=name)


def init_promise(name: str, cfg: ModelConfig) -> float:
    """The std each parameter's own initialiser promises (1.0 / 0.0 for constant inits,
    marked by a negative sign: exactly that value everywhere)."""
    f, d, out = cfg.ffn, cfg.d_model, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    by_suffix = {
        "retrieval.query.weight": d**-0.5,  # unit-variance queries before BN
        "retrieval.sub_keys": (f.d_key // 2) ** -0.5,  # unit-scale sub-key scores
        "query_bn.weight": -1.0,
        "query_bn.bias": -0.0,
        "ffn.up": d**-0.5,  # PEER: u·x of unit scale for a unit-rms input
        "ffn.down": out,  # PEER: like the other output projections
        "ffn.values": d**-0.5,  # PKM: N(0, 1/d)
        "ffn.router.weight": cfg.init_std,
        "ffn.w1": cfg.init_std,  # MoE expert stacks
        "ffn.w2": out,
        "ffn.w1.weight": cfg.init_std,
        "ffn.w2.weight": out,
        "attn.wo.weight": out,
        "norm.weight": -1.0,
    }
    for suffix, std in by_suffix.items():
        if name.endswith(suffix):
            return std
    if name.endswith(("wq.weight", "wk.weight", "wv.weight")) or name == "embed.weight":
        return cfg.init_std
    raise AssertionError(f"no promised init for {name}")


INIT_KINDS = [
    dict(kind="peer", num_experts=1024, heads=4, topk=4, d_key=32, layers=[0, 1]),
    dict(kind="pkm", num_experts=1024, heads=2, topk=4, d_key=32, shared_keys=False),
    dict(kind="moe", num_experts=4, topk=2, layers=[1]),
]


@pytest.mark.parametrize("ffn", INIT_KINDS, ids=lambda f: f["kind"])
def test_every_parameter_has_its_initialisers_statistics_inside_a_model(ffn: dict) -> None:
    """The model's GPT-2 pass must not overwrite a sub-module's own initialiser (the query
    network's d^-½, the sub-keys' (d_key/2)^-½): each parameter's sample mean and std are
    those promised, within 6 standard errors."""
    torch.manual_seed(7)
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=2, d_ff=128,
                      max_seq_len=16, ffn=FFNConfig(**ffn))  # fmt: skip
    for name, p in TransformerLM(cfg).named_parameters():
        std, values = init_promise(name, cfg), p.detach().double().flatten()
        if std <= 0:
            assert torch.all(values == -std), name
            continue
        n = values.numel()
        assert abs(float(values.mean())) < 6 * std / math.sqrt(n), name
        assert float(values.std()) / std == pytest.approx(1.0, abs=6 / math.sqrt(2 * n)), name
