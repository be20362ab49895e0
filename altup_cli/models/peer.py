"""PEER, Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts", §2).

f(x) = Σ_heads Σ_{i ∈ top-k} g_i(x) · σ(u_iᵀx) · v_i  over N single-neuron experts, found by
product-key retrieval; g is the softmax of the k retrieved scores of each head.

The fast path never builds the (tokens × h·k × d) gather of the expert tables:
- the output side is one `embedding_bag` with per-sample weights g·σ(h) (a fused gather +
  weighted sum, forward and backward);
- the input side u_iᵀx is `_ExpertDots`: gathered rows in token chunks, the gradient with
  respect to x again an `embedding_bag`;
- the tables' gradients are sparse (only the retrieved rows), to be stepped by a lazy Adam
  (`altup_cli.training.optim`), so a step at N = 1024² does not touch all N rows.
`PEER.forward_naive` is the obviously-correct materialising version: the oracle.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from altup_cli.models.product_keys import ProductKeyRetrieval

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}
_CHUNK_ELEMENTS = 1 << 22  # gathered floats per chunk of `_ExpertDots.forward` (16 MiB)


def expert_table(rows: int, width: int, std: float) -> nn.Parameter:
    """An N-row table whose gradient is sparse; tagged so the optimizer steps it lazily."""
    table = nn.Parameter(torch.randn(rows, width) * std)
    table._sparse_rows = True  # type: ignore[attr-defined]
    return table


def sparse_row_grad(table: torch.Tensor, index: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Σ rows into `table`-shaped gradient at `index` (repeats summed when coalesced)."""
    return torch.sparse_coo_tensor(index[None], rows, table.shape, check_invariants=False)


class _ExpertDots(torch.autograd.Function):
    """h[t, m] = u_{idx[t, m]} · x[t] without keeping the gathered rows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        n, m = idx.shape
        out = x.new_empty(n, m)
        step = max(1, _CHUNK_ELEMENTS // (m * x.shape[1]))
        for start in range(0, n, step):
            rows = F.embedding(idx[start : start + step], table)  # (c, m, d)
            out[start : start + step] = torch.bmm(rows, x[start : start + step, :, None])[..., 0]
        ctx.save_for_backward(x, table, idx)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, table, idx = ctx.saved_tensors
        grad_x = grad_table = None
        if ctx.needs_input_grad[0]:  # ∂x[t] = Σ_m ∂h[t,m] · u_{idx[t,m]}: a weighted bag
            grad_x = F.embedding_bag(idx, table, per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:  # ∂u_i = Σ_{(t,m): idx=i} ∂h[t,m] · x[t]
            rows = (grad[:, :, None] * x[:, None, :]).flatten(0, 1)
            grad_table = sparse_row_grad(table, idx.flatten(), rows)
        return grad_x, grad_table, None


class PEER(nn.Module):
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
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"ffn.activation must be gelu or relu, got {activation!r}")
        self.retrieval = ProductKeyRetrieval(
            d_model, num_experts, heads, topk, d_key, query_bn, shared_keys
        )
        self.activation = activation
        # u·x has unit scale for a unit-rms input (the pre-FFN RMSNorm's output); the value
        # rows start at the scale of the model's other output projections.
        self.up = expert_table(num_experts, d_model, d_model**-0.5)
        self.down = expert_table(num_experts, d_model, output_std)
        self.usage = ExpertUsage(num_experts)

    @property
    def num_experts(self) -> int:
        return self.up.shape[0]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, d) → router weights g and expert indices, each (n, h·k)."""
        scores, idx = self.retrieval(x)
        gates = scores.softmax(dim=-1)
        self.usage.record(idx, gates)
        return gates.flatten(1), idx.flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        gates, idx = self.route(flat)
        hidden = ACTIVATIONS[self.activation](_ExpertDots.apply(flat, self.up, idx))
        out = F.embedding_bag(
            idx, self.down, per_sample_weights=gates * hidden, mode="sum", sparse=True
        )
        return out.view(x.shape)

    def forward_naive(self, x: torch.Tensor) -> torch.Tensor:
        """The same function, materialising the (n, h, k, d) gathers as common code does."""
        flat = x.reshape(-1, x.shape[-1])
        scores, idx = self.retrieval(flat)
        gates = scores.softmax(dim=-1)
        u, v = self.up[idx], self.down[idx]  # (n, h, k, d) each
        hidden = ACTIVATIONS[self.activation](torch.einsum("nhkd,nd->nhk", u, flat))
        return torch.einsum("nhk,nhkd->nd", gates * hidden, v).view(x.shape)


class ExpertUsage(nn.Module):
    """Summed router weight per expert over the batches since the last `reset` (PEER Table 2):
    usage = fraction of experts with non-zero total; unevenness = KL(z‖uniform)."""

    def __init__(self, num_experts: int) -> None:
        super().__init__()
        self.register_buffer("totals", torch.zeros(num_experts), persistent=False)
        self.enabled = True

    @torch.no_grad()
    def record(self, idx: torch.Tensor, weights: torch.Tensor) -> None:
        if self.enabled and self.training:
            self.totals.index_add_(
                0, idx.flatten(), weights.detach().flatten().to(self.totals.dtype)
            )

    def stats(self) -> dict[str, float]:
        total = float(self.totals.sum())
        if total <= 0:
            return {"usage": 0.0, "unevenness": float("nan")}
        z = self.totals / total
        used = z > 0
        kl = math.log(z.numel()) + float((z[used] * z[used].log()).sum())
        return {"usage": float(used.float().mean()), "unevenness": kl}

    def reset(self) -> None:
        self.totals.zero_()
