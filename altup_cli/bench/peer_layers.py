"""The layers the peer suite compares — our PEER, its naive oracle, the public reference
(PEER-pytorch) holding a copy of our weights, dense FFNs of width 4d and h·k — and one
timed step of a layer. Imports torch and the models alone (no Lightning, Hydra or W&B):
the suite's fresh measuring processes import it.

Settings are the reference's, matched by `reference_peer` (and tested equal to it, output
and gradients, in tests/test_peer_reference.py): h = 8 heads, k = 16 experts per head,
per-head sub-key tables, no query BatchNorm, softmax over each head's k scores, GELU. Our
d_key = 256 is a head's whole query; the reference's `dim_key` is one half of it (128).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from altup_cli.bench import measure
from altup_cli.models.feedforward import MLP
from altup_cli.models.peer import PEER
from altup_cli.models.row_gradients import flat_terms, row_chunks
from altup_cli.training.optim import ROW_CHUNK

HEADS, TOPK, D_KEY = 8, 16, 256
MATCHED = {"query_bn": False, "shared_keys": False}  # the reference's retrieval


def reference_available() -> bool:
    return importlib.util.find_spec("PEER_pytorch") is not None


def reference_query_weight(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Our query rows, ordered (head, half, feature), in the reference's (half, head,
    feature) order."""
    rows, d_in = weight.shape
    return weight.reshape(heads, 2, -1, d_in).transpose(0, 1).reshape(rows, d_in)


def _reference_module(d_model: int, num_experts: int, heads: int, topk: int, d_key: int) -> Any:
    from PEER_pytorch import PEER as ReferencePEER

    return ReferencePEER(
        d_model, heads=heads, num_experts=num_experts, num_experts_per_head=topk,
        dim_key=d_key // 2, non_competing_scores=False,  # softmax over the top k
    )  # fmt: skip


def reference_peer(ours: PEER) -> nn.Module:
    """The reference layer at our settings holding a copy of our weights (its
    `weight_down_embed` multiplies the input: our `up`)."""
    r = ours.retrieval
    if r.query_bn is not None or r.sub_keys.shape[0] != r.heads or ours.activation != "gelu":
        raise ValueError("the reference has per-head keys, no query BN and GELU only")
    ref = _reference_module(r.query.in_features, ours.up.shape[0], r.heads, r.topk, r.d_key)
    ref = ref.to(ours.up.dtype)
    with torch.no_grad():
        ref.to_queries[0].weight.copy_(reference_query_weight(r.query.weight, r.heads))
        ref.keys.copy_(r.sub_keys.permute(0, 2, 1, 3))
        ref.weight_down_embed.weight.copy_(ours.up)
        ref.weight_up_embed.weight.copy_(ours.down)
    return ref.train(ours.training)


def our_peer(d_model: int, num_experts: int) -> PEER:
    torch.manual_seed(0)
    return PEER(d_model, num_experts, HEADS, TOPK, D_KEY, **MATCHED).train()


def layer(kind: str, d_model: int, num_experts: int) -> nn.Module:
    """A fresh layer of `kind` (the reference with its own initial weights)."""
    if kind in ("peer", "naive"):
        return our_peer(d_model, num_experts)
    torch.manual_seed(0)
    if kind == "reference":
        return _reference_module(d_model, num_experts, HEADS, TOPK, D_KEY).train()
    return MLP(d_model, 4 * d_model if kind == "dense_4d" else HEADS * TOPK)


def _forward(kind: str, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    if kind == "naive":
        return module.forward_naive  # type: ignore[return-value]
    if kind == "reference":  # it takes (batch, seq, d)
        return lambda x: module(x[None])[0]
    return module


def layer_step(kind: str, module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """Forward and backward; for PEER also every gradient row of both tables, computed
    chunk by chunk as the optimizer does (and dropped), so it does the work the others'
    dense table gradients do."""
    module.zero_grad(set_to_none=True)
    _forward(kind, module)(x).backward(grad)
    if kind == "peer":
        for table in (module.up, module.down):
            for _rows in row_chunks(*flat_terms(table), ROW_CHUNK):
                pass


def layer_modules(kinds: list[str], d_model: int, num_experts: int) -> dict[str, nn.Module]:
    """The timed layers: naive is our PEER run through its oracle; the reference holds
    a copy of our PEER's weights."""
    ours = our_peer(d_model, num_experts)
    modules = {k: layer(k, d_model, num_experts) for k in kinds if k.startswith("dense")}
    if "peer" in kinds or "naive" in kinds:
        modules |= {k: ours for k in ("peer", "naive") if k in kinds}
    if "reference" in kinds:
        modules["reference"] = reference_peer(ours)
    return modules


def peak_rss_gib(kind: str, d_model: int, num_experts: int, tokens: int) -> float:
    """Peak RSS of a fresh process that builds the layer alone and runs two steps."""
    return measure.fresh_process_peak_gib(
        __name__, "_rss_probe", kind, d_model, num_experts, tokens
    )


def _rss_probe(kind: str, d_model: int, num_experts: int, tokens: int) -> None:
    module = layer(kind, d_model, num_experts)
    x = torch.randn(tokens, d_model).requires_grad_()
    grad = torch.randn(tokens, d_model)
    for _ in range(2):
        layer_step(kind, module, x, grad)
    measure.report_peak()
