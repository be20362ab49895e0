"""Expert tables (PEER, PKM): fused gathers, and a gradient kept in factored form until
the optimizer steps.

Reading rows: `expert_dots` (table[idx]·x, by embedding_bag's per-sample-weight kernel)
and `weighted_rows` (Σ w·table[idx], one embedding_bag) never build the gathered rows.

A PEER/PKM table row i only ever receives Σ_{(t,j): idx[t,j] = i} coeff[t,j] · vecs[t]: a
sum of token vectors (the layer input x, or the output gradient ∂y) weighted by per-
retrieval scalars. Backward stores just (idx, coeff, vecs) — O(tokens · (h·k + d)) — on the
table instead of a gradient tensor; the optimizer turns it into rows chunk by chunk (one
weighted `embedding_bag` per chunk of distinct rows), so no O(N·d), nor even an
O(retrieved rows · d), gradient ever exists at once. `materialize_row_grad` builds the
ordinary (sparse, coalesced) gradient for anyone who wants it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_TERMS = "_row_grad_terms"


def expert_table(rows: int, width: int, std: float) -> nn.Parameter:
    """An N-row table, N(0, std²), tagged so the optimizer steps it lazily."""
    table = nn.Parameter(torch.empty(rows, width).normal_(0.0, std))  # no N×d temporaries
    table._sparse_rows = True  # type: ignore[attr-defined]
    return table


def is_table(param: torch.Tensor) -> bool:
    return getattr(param, "_sparse_rows", False)


def add_row_grad(
    table: torch.Tensor, idx: torch.Tensor, coeff: torch.Tensor, vecs: torch.Tensor
) -> None:
    """Accumulate one backward's factored gradient: rows idx (n, m), coeff (n, m), vecs (n, d)."""
    terms = table.__dict__.setdefault(_TERMS, [])
    terms.append((idx.detach(), coeff.detach().to(vecs.dtype), vecs.detach()))


def has_row_grad(table: torch.Tensor) -> bool:
    return bool(table.__dict__.get(_TERMS))


def clear_row_grad(table: torch.Tensor) -> None:
    table.__dict__.pop(_TERMS, None)


def clear_row_grads(module: nn.Module) -> None:
    for param in module.parameters():
        clear_row_grad(param)


def flat_terms(
    table: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The accumulated terms concatenated: rows (M,), coeff (M,), token (M,) indexing
    vecs (T, d)."""
    terms = table.__dict__.get(_TERMS, [])
    rows, coeffs, tokens, vecs, offset = [], [], [], [], 0
    for idx, coeff, vec in terms:
        n, m = idx.shape
        rows.append(idx.flatten())
        coeffs.append(coeff.flatten())
        tokens.append(torch.arange(offset, offset + n, device=idx.device).repeat_interleave(m))
        vecs.append(vec)
        offset += n
    return torch.cat(rows), torch.cat(coeffs), torch.cat(tokens), torch.cat(vecs)


def row_chunks(
    rows: torch.Tensor,
    coeff: torch.Tensor,
    tokens: torch.Tensor,
    vecs: torch.Tensor,
    max_rows: int,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(distinct rows, their gradient rows) in chunks of at most `max_rows` rows: for each
    row, Σ coeff · vecs[token] over its entries, as one weighted bag."""
    order = rows.argsort()
    distinct, counts = torch.unique_consecutive(rows[order], return_counts=True)
    starts = counts.cumsum(0) - counts
    for first in range(0, distinct.numel(), max_rows):
        chunk_starts = starts[first : first + max_rows]
        begin = int(chunk_starts[0])
        end = begin + int(counts[first : first + max_rows].sum())
        entries = order[begin:end]
        values = F.embedding_bag(
            tokens[entries],
            vecs,
            chunk_starts - begin,
            per_sample_weights=coeff[entries],
            mode="sum",
        )
        yield distinct[first : first + max_rows], values


def materialize_row_grad(table: torch.Tensor) -> torch.Tensor | None:
    """The accumulated factored gradient as a coalesced sparse tensor of `table`'s shape."""
    if not has_row_grad(table):
        return None
    rows, coeff, tokens, vecs = flat_terms(table)
    index, values = next(row_chunks(rows, coeff, tokens, vecs, max_rows=rows.numel()))
    return torch.sparse_coo_tensor(
        index[None], values.to(table.dtype), table.shape, is_coalesced=True,
        check_invariants=False,
    )  # fmt: skip


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


def eager_when_compiled(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`torch.compiler.disable(fn)`, made only when a compiled model first calls `fn`:
    making it imports torch._dynamo (~70 MB of resident memory), which eager runs — and
    the 1M-expert benchmark's memory budget — do without."""
    disabled: list[Callable[..., torch.Tensor]] = []

    @functools.wraps(fn)
    def run(*args: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            if not disabled:
                disabled.append(torch.compiler.disable(fn))
            return disabled[0](*args)
        return fn(*args)

    return run


# Both run eagerly inside a compiled model: their backward stores the tables' factored
# gradients on the parameters, a side effect graphs cannot hold.
@eager_when_compiled
def weighted_rows(weights: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """y[t] = Σ_j weights[t, j] · table[idx[t, j]], (n, d); the table's gradient factored."""
    return _ExpertSum.apply(weights, table, idx)


@eager_when_compiled
def expert_dots(x: torch.Tensor, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """h[t, j] = table[idx[t, j]] · x[t], (n, m); the table's gradient factored."""
    return _ExpertDots.apply(x, table, idx)
