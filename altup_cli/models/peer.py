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
from altup_cli.models.row_gradients import add_row_grad, clear_row_grads, expert_table

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


def _bags(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, m) indices as n bags of m: flat indices, bag offsets and each index's bag."""
    n, m = idx.shape
    bag = torch.arange(n, device=idx.device)
    return idx.flatten(), bag * m, bag.repeat_interleave(m)


def gathered_dots(vecs: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out[t, j] = table[idx[t, j]] · vecs[t], (n, m), without materialising the gathered
    rows: embedding_bag's per-sample-weight gradient kernel computes exactly these dots."""
    flat, offsets, bag = _bags(idx)
    dots = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        vecs.contiguous(), table, flat, offsets, bag, 0, -1
    )
    return dots.view(idx.shape)


class _ExpertDots(torch.autograd.Function):
    """h[t, j] = u_{idx[t, j]} · x[t]."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        x = x.to(table.dtype)
        ctx.save_for_backward(x, table, idx)
        return gathered_dots(x, table, idx)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, table, idx = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:  # ∂x[t] = Σ_j ∂h[t,j] · u_{idx[t,j]}: a weighted bag
            grad_x = F.embedding_bag(idx, table, per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:  # ∂u_i = Σ_{(t,j): idx=i} ∂h[t,j] · x[t]
            add_row_grad(table, idx, grad, x)
        return grad_x, None, None


class _ExpertSum(torch.autograd.Function):
    """y[t] = Σ_j w[t, j] · v_{idx[t, j]}: a weighted bag; the table's gradient is stored
    factored (`row_gradients`)."""

    @staticmethod
    def forward(
        ctx: Any, weights: torch.Tensor, table: torch.Tensor, idx: torch.Tensor
    ) -> torch.Tensor:
        weights = weights.to(table.dtype)
        ctx.save_for_backward(weights, table, idx)
        return F.embedding_bag(idx, table, per_sample_weights=weights, mode="sum")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weights, table, idx = ctx.saved_tensors
        grad = grad.to(table.dtype)
        grad_w = gathered_dots(grad, table, idx) if ctx.needs_input_grad[0] else None
        if ctx.needs_input_grad[1]:  # ∂v_i = Σ_{(t,j): idx=i} w[t,j] · ∂y[t]
            add_row_grad(table, idx, weights, grad)
        return grad_w, None, None


def weighted_rows(weights: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """y[t] = Σ_j weights[t, j] · table[idx[t, j]], (n, d), with a sparse row gradient."""
    return _ExpertSum.apply(weights, table, idx)


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

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        clear_row_grads(self)  # the tables' factored gradients too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        gates, idx = self.route(flat)
        hidden = ACTIVATIONS[self.activation](_ExpertDots.apply(flat, self.up, idx))
        return weighted_rows(gates * hidden, self.down, idx).to(x.dtype).view(x.shape)

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
