"""Our PEER layer equals the public reference implementation (PEER-pytorch) at matched
settings — per-head sub-keys, no query BatchNorm, softmax over each head's top k — once the
reference holds our weights: the same output, and the same gradients for the input, the
query network, the sub-keys and both expert tables. Skipped where PEER-pytorch is not
installed (`pip install -e .[bench]`)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("PEER_pytorch")

from altup_cli.bench.peer_layers import reference_peer, reference_query_weight
from altup_cli.models.peer import PEER
from altup_cli.models.row_gradients import materialize_row_grad


def _pair(d: int, n: int, heads: int, topk: int, d_key: int) -> tuple[PEER, torch.nn.Module]:
    torch.manual_seed(0)
    ours = PEER(d, n, heads, topk, d_key, query_bn=False, shared_keys=False).double()
    with torch.no_grad():  # table rows of unit scale, so every term matters
        ours.down.normal_()
    return ours, reference_peer(ours).double()


@pytest.mark.parametrize(
    ("d", "n", "heads", "topk", "d_key"), [(16, 64, 2, 4, 8), (24, 256, 3, 5, 12)]
)
@pytest.mark.parametrize("naive", [False, True])
def test_our_peer_equals_the_reference_with_its_weights(
    d: int, n: int, heads: int, topk: int, d_key: int, naive: bool
) -> None:
    ours, ref = _pair(d, n, heads, topk, d_key)
    x = torch.randn(3, 7, d, dtype=torch.float64)
    grad = torch.randn(3, 7, d, dtype=torch.float64)
    x_ours, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours = (ours.forward_naive if naive else ours)(x_ours)
    y_ref = ref(x_ref)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-12, atol=1e-12)
    y_ours.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    query_grad = reference_query_weight(ours.retrieval.query.weight.grad, heads)
    torch.testing.assert_close(query_grad, ref.to_queries[0].weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        ours.retrieval.sub_keys.grad.permute(0, 2, 1, 3), ref.keys.grad, rtol=1e-10, atol=1e-12
    )
    for table, embed in ((ours.up, ref.weight_down_embed), (ours.down, ref.weight_up_embed)):
        dense = table.grad if naive else materialize_row_grad(table).to_dense()
        torch.testing.assert_close(dense, embed.weight.grad, rtol=1e-10, atol=1e-12)
