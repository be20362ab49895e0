"""Product-key memory (Lample et al. 2019): h heads retrieve k of N value rows each and return
their softmax-weighted sum, m(x) = Σ_heads Σ_{i ∈ top-k} softmax(s)_i · v_i.

The weighted sum is one `embedding_bag` (fused gather + sum, the table's gradient kept
factored; see `row_gradients.py`); `PKM.forward_naive` materialises the gather: the oracle.
"""

from __future__ import annotations

import torch

from altup_cli.models.product_keys import RetrievalLayer
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
