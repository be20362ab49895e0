"""PEER, Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts", §2).

f(x) = Σ_heads Σ_{i ∈ top-k} g_i(x) · σ(u_iᵀx) · v_i  over N single-neuron experts, found by
product-key retrieval; g is the softmax of the k retrieved scores of each head.

The fast path never builds the (tokens × h·k × d) gather of the expert tables
(`row_gradients.py`):
- u_iᵀx and the router-weight gradient are gathered dot products computed by
  embedding_bag's per-sample-weight kernel; the output is one weighted `embedding_bag`;
- the tables' gradients stay factored (indices, per-retrieval coefficients, token
  vectors) and a lazy Adam (`altup_cli.training.optim`) turns them into rows chunk by
  chunk, so a step at N = 1024² touches only the retrieved rows and never holds a
  table-sized, or even a retrieved-rows-sized, gradient.
`PEER.forward_naive` is the obviously-correct materialising version: the oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import altup_cli.models.product_keys as pk
from altup_cli.models.config import FFNConfig, ModelConfig
from altup_cli.models.product_keys import RetrievalLayer
from altup_cli.models.registry import FFNKind, Span, register_ffn_kind
from altup_cli.models.row_gradients import expert_dots, expert_table, weighted_rows

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


def check_activation(name: str) -> None:
    if name not in ACTIVATIONS:
        raise ValueError(f"ffn.activation must be gelu or relu, got {name!r}")


class PEER(RetrievalLayer):
    """(..., d) → (..., d): h heads retrieve k of N single-neuron experts each."""

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        heads: int = 8,
        topk: int = 16,
        d_key: int = 256,
        query_bn: bool = True,
        shared_keys: bool = True,
        activation: str = "gelu",
        output_std: float = 0.02,
    ) -> None:
        check_activation(activation)
        super().__init__(d_model, num_experts, heads, topk, d_key, query_bn, shared_keys)
        self.activation = activation
        # u·x has unit scale for a unit-rms input (the pre-FFN RMSNorm's output); the value
        # rows start at the scale of the model's other output projections.
        self.up = expert_table(num_experts, d_model, d_model**-0.5)
        self.down = expert_table(num_experts, d_model, output_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        gates, idx = self.route(flat)
        hidden = ACTIVATIONS[self.activation](expert_dots(flat, self.up, idx))
        return weighted_rows(gates * hidden, self.down, idx).to(x.dtype).view(x.shape)

    def forward_naive(self, x: torch.Tensor) -> torch.Tensor:
        """The same function, materialising the (n, h, k, d) gathers as common code does."""
        flat = x.reshape(-1, x.shape[-1])
        scores, idx = self.retrieval(flat)
        gates = scores.softmax(dim=-1)
        u, v = self.up[idx], self.down[idx]  # (n, h, k, d) each
        hidden = ACTIVATIONS[self.activation](torch.einsum("nhkd,nd->nhk", u, flat))
        return torch.einsum("nhk,nhkd->nd", gates * hidden, v).view(x.shape)


def _build(cfg: ModelConfig) -> PEER:
    f = cfg.ffn
    return PEER(
        cfg.d_model, f.num_experts, f.heads, f.topk, f.d_key, f.query_bn, f.shared_keys,
        f.activation, cfg.output_std,
    )  # fmt: skip


def check_peer(f: FFNConfig) -> None:
    pk.check_retrieval(f)
    check_activation(f.activation)


def _flops(cfg: ModelConfig) -> dict[str, float]:
    """Router, then u·x and g·σ·v for each of the h·k retrieved experts."""
    f = cfg.ffn
    experts = pk.router_flops(cfg) + f.heads * f.topk * 4 * cfg.d_model
    return {"experts": float(experts), "retrieval": pk.candidate_sums(cfg)}


register_ffn_kind(
    FFNKind(
        name="peer",
        label="PEER",
        module=PEER,
        build=_build,
        check=check_peer,
        parameters=lambda cfg: {
            "experts": pk.router_parameters(cfg) + 2 * cfg.ffn.num_experts * cfg.d_model
        },
        active_parameters=lambda cfg: (
            pk.router_parameters(cfg) + cfg.ffn.heads * cfg.ffn.topk * 2 * cfg.d_model
        ),
        flops=_flops,
        layout={
            **pk.RETRIEVAL_LAYOUT,
            "up": {0: Span("experts"), 1: Span("d_model")},
            "down": {0: Span("experts", zero=True), 1: Span("d_model", zero=True)},
        },
        **pk.RETRIEVAL_FACTS,
        sweep={"peer": ("ffn=peer", "altup=off")},
        examples={"peer 64²": {"ffn": {"kind": "peer", **pk.GROWTH_EXAMPLE}}},
    )
)
