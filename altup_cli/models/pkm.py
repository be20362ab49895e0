"""Product-key memory (Lample et al. 2019): h heads retrieve k of N value rows each and return
their softmax-weighted sum, m(x) = Σ_heads Σ_{i ∈ top-k} softmax(s)_i · v_i.

The weighted sum is one `embedding_bag` (fused gather + sum, the table's gradient kept
factored; see `row_gradients.py`); `PKM.forward_naive` materialises the gather: the oracle.
"""

from __future__ import annotations

import torch

import altup_cli.models.product_keys as pk
from altup_cli.models.config import ModelConfig
from altup_cli.models.peer import check_peer
from altup_cli.models.product_keys import RetrievalLayer
from altup_cli.models.registry import FFNKind, Span, register_ffn_kind
from altup_cli.models.row_gradients import expert_table, weighted_rows


class PKM(RetrievalLayer):
    """(..., d) → (..., d) through a memory of N values of width d."""

    def __init__(
        self,
        d_model: int,
        num_values: int,
        heads: int = 4,
        topk: int = 32,
        d_key: int = 256,
        query_bn: bool = True,
        shared_keys: bool = False,
    ) -> None:
        super().__init__(d_model, num_values, heads, topk, d_key, query_bn, shared_keys)
        self.values = expert_table(num_values, d_model, d_model**-0.5)  # PKM: N(0, 1/d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, idx = self.route(flat)
        return weighted_rows(weights, self.values, idx).to(x.dtype).view(x.shape)

    def forward_naive(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        scores, idx = self.retrieval(flat)
        return torch.einsum("nhk,nhkd->nd", scores.softmax(-1), self.values[idx]).view(x.shape)


def _build(cfg: ModelConfig) -> PKM:
    f = cfg.ffn
    return PKM(cfg.d_model, f.num_experts, f.heads, f.topk, f.d_key, f.query_bn, f.shared_keys)


def _flops(cfg: ModelConfig) -> dict[str, float]:
    """Router, then g·v for each of the h·k retrieved values."""
    f = cfg.ffn
    values = pk.router_flops(cfg) + f.heads * f.topk * 2 * cfg.d_model
    return {"experts": float(values), "retrieval": pk.candidate_sums(cfg)}


register_ffn_kind(
    FFNKind(
        name="pkm",
        label="PKM",
        module=PKM,
        build=_build,
        check=check_peer,  # the same fields as PEER's, checked the same way
        parameters=lambda cfg: {
            "experts": pk.router_parameters(cfg) + cfg.ffn.num_experts * cfg.d_model
        },
        active_parameters=lambda cfg: (
            pk.router_parameters(cfg) + cfg.ffn.heads * cfg.ffn.topk * cfg.d_model
        ),
        flops=_flops,
        layout={
            **pk.RETRIEVAL_LAYOUT,
            "values": {0: Span("experts", zero=True), 1: Span("d_model", zero=True)},
        },
        **pk.RETRIEVAL_FACTS,
        sweep={"pkm": ("ffn=pkm", "altup=off")},
        examples={"pkm 64²": {"ffn": {"kind": "pkm", **pk.GROWTH_EXAMPLE}}},
    )
)
