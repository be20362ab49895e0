"""Our Hyper-Connections and mHC equal the public package `hyper-connections` (0.4.11):
`HyperConnections` and `ManifoldConstrainedHyperConnections` around the same Blocks' two
sub-layers, with its expand (n copies) and reduce (sum) of the streams, weights copied:
logits and every gradient, fp64, ≤ 1e-10.

What had to be matched (settings, not maths):
- the package's streams are batch-major, (b·s, T, d) with s inner; ours (n, B, T, d);
- its RMSNorm is F.normalize(x)·√d·(1 + γ) with γ = 0 at init; ours x/√(mean x² + eps)·g
  with g = 1: g = 1 + γ, and eps = 1e-300 (adds nothing to an fp64 mean of squares);
- `layer_index` 2ℓ (attention) and 2ℓ+1 (FFN): the stream each sub-layer reads at init;
- HC: `tanh=True` (the package default); mHC: `sinkhorn_iters` as ours, the default
  exp-domain Sinkhorn (not log-domain), one dynamic-α proposal; its mHC runs in fp32
  (`.float()` casts), kept at fp64 here so that fp64 can be compared;
- static HC/mHC: the package's dynamic parts are its zero-initialised projections (so
  α, β are the static ones exactly); only the shared parameters' gradients are compared.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hyper_connections import HyperConnections, ManifoldConstrainedHyperConnections
from hyper_connections.hyper_connections import get_expand_reduce_stream_functions
from torch import nn

from altup_cli.bench.growth import randomize_
from altup_cli.models import AltUpConfig, ModelConfig, TransformerLM
from altup_cli.models.hyper_connections import Connection

TOL = 1e-10
VOCAB, T = 61, 9


def our_model(mode: str, n: int, dynamic: bool, iters: int = 20) -> TransformerLM:
    torch.manual_seed(0)
    altup = AltUpConfig(
        mode=mode, K=n, dynamic=dynamic, **({"sinkhorn_iters": iters} if mode == "mhc" else {})
    )
    cfg = ModelConfig(
        vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=16,
        norm_eps=1e-300, altup=altup,
    )  # fmt: skip
    model = TransformerLM(cfg).double()
    return randomize_(model, torch.Generator().manual_seed(1))


def copied(ours: Connection, mode: str, n: int, d: int, index: int, iters: int) -> nn.Module:
    """The package's connection for sub-layer `index`, with our connection's weights."""
    if mode == "hc":
        theirs = HyperConnections(n, dim=d, layer_index=index, tanh=True)
    else:
        theirs = ManifoldConstrainedHyperConnections(
            n, dim=d, layer_index=index, sinkhorn_iters=iters
        )
    theirs = theirs.double()
    with torch.no_grad():
        theirs.static_alpha.copy_(ours.width)
        theirs.static_beta.copy_(ours.depth)
        if ours.dynamic:
            theirs.norm.gamma.copy_(ours.norm.weight - 1)
            theirs.dynamic_alpha_fn.copy_(ours.width_fn.view(theirs.dynamic_alpha_fn.shape))
            theirs.dynamic_beta_fn.copy_(ours.depth_fn)
            if mode == "hc":
                theirs.dynamic_alpha_scale.copy_(ours.width_scale)
                theirs.dynamic_beta_scale.copy_(ours.depth_scale)
            else:
                theirs.pre_branch_scale.copy_(ours.width_scale[:1])
                theirs.residual_scale.copy_(ours.width_scale[1:])
                theirs.h_post_scale.copy_(ours.depth_scale)
    return theirs


def their_grads(theirs: Any, mode: str, dynamic: bool) -> dict[str, torch.Tensor]:
    """The package's gradients under our parameter names."""
    g = {"width": theirs.static_alpha.grad, "depth": theirs.static_beta.grad}
    if dynamic:
        g["norm.weight"] = theirs.norm.gamma.grad
        g["width_fn"] = theirs.dynamic_alpha_fn.grad.reshape(-1, theirs.static_alpha.shape[1])
        g["depth_fn"] = theirs.dynamic_beta_fn.grad
        if mode == "hc":
            g["width_scale"] = theirs.dynamic_alpha_scale.grad
            g["depth_scale"] = theirs.dynamic_beta_scale.grad
        else:
            g["width_scale"] = torch.cat([theirs.pre_branch_scale.grad, theirs.residual_scale.grad])
            g["depth_scale"] = theirs.h_post_scale.grad
    return g


@pytest.fixture
def fp64_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """The package's mHC casts to fp32 (`.float()`); keep fp64 tensors fp64."""
    to_float = torch.Tensor.float
    monkeypatch.setattr(
        torch.Tensor, "float", lambda t: t if t.dtype == torch.float64 else to_float(t)
    )


CASES = [("hc", n, dyn) for n in (1, 2, 4) for dyn in (False, True)] + [
    ("mhc", n, dyn) for n in (1, 3, 4) for dyn in (False, True)
]


@pytest.mark.parametrize(("mode", "n", "dynamic"), CASES)
def test_equals_the_public_package(fp64_package, mode: str, n: int, dynamic: bool) -> None:
    iters = 7 if n == 3 else 20
    model = our_model(mode, n, dynamic, iters)
    d = model.config.d_model
    theirs = [
        [copied(c, mode, n, d, 2 * i + j, iters) for j, c in enumerate((b.attn_hc, b.ffn_hc))]
        for i, b in enumerate(model.blocks)
    ]
    expand, reduce = get_expand_reduce_stream_functions(n)
    ids = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(2))
    weights = torch.linspace(-1, 1, VOCAB, dtype=torch.float64)

    def reference() -> torch.Tensor:
        h = expand(model.embed(ids))  # (B·n, T, d), streams inner
        cos, sin = model.rotary.cos_sin(T, ids.device)
        for layer, (attn, ffn) in zip(model.blocks, theirs, strict=True):
            block = layer.layer
            branch_in, add = attn(h)
            h = add(block.attention_branch(branch_in, cos, sin))
            branch_in, add = ffn(h)
            h = add(block.ffn_branch(branch_in))
        return model.logits(model.final_norm(reduce(h)))

    runs = []
    for forward in (model, lambda _: reference()):
        model.zero_grad(set_to_none=True)
        for conn in (c for pair in theirs for c in pair):
            conn.zero_grad(set_to_none=True)
        logits = forward(ids)
        (logits * weights).sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        runs.append((logits.detach(), grads))
    (ours, our_grads), (ref, ref_grads) = runs
    assert float((ours - ref).abs().max()) <= TOL
    for name, grad in ref_grads.items():  # the embedding, Blocks, norms, head
        assert float((our_grads[name] - grad).abs().max()) <= TOL, name
    for i, layer in enumerate(model.blocks):
        for j, key in enumerate(("attn_hc", "ffn_hc")):
            conn = getattr(layer, key)
            package = their_grads(theirs[i][j], mode, dynamic)
            assert {k for k, _ in conn.named_parameters()} == set(package)
            for name, grad in package.items():
                ours_grad = our_grads[f"blocks.{i}.{key}.{name}"]
                err = float((ours_grad - grad.view(ours_grad.shape)).abs().max())
                assert err <= TOL, (i, key, name, err)
