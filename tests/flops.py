"""An independent FLOP count: torch's FlopCounterMode, plus formulas for the few ops it has
none for that the project's hand-written backward passes use (matmul convention: 2 per
multiply-add)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _outer_product(self_shape, vec1_shape, vec2_shape, *_, **__) -> int:
    return 2 * vec1_shape[0] * vec2_shape[0]


def _matrix_vector(mat_shape, vec_shape, *_, **__) -> int:
    return 2 * mat_shape[0] * mat_shape[1]


def _weighted_bag(weight_shape, indices_shape, *_, **__) -> int:
    """embedding_bag with per-sample weights: a multiply-add per gathered element."""
    return 2 * math.prod(indices_shape) * weight_shape[1]


def _gathered_dots(grad_shape, weight_shape, indices_shape, *_, **__) -> int:
    """embedding_bag's per-sample-weight kernel: one d-long dot product per index."""
    return 2 * math.prod(indices_shape) * weight_shape[1]


EXTRA_FORMULAS = {
    aten._embedding_bag_per_sample_weights_backward: _gathered_dots,
    aten.addr: _outer_product,
    aten.addr_: _outer_product,
    aten.mv: _matrix_vector,
    aten._embedding_bag: _weighted_bag,
    aten._embedding_bag_forward_only: _weighted_bag,
}


def count_flops(fn: Callable[[], object]) -> FlopCounterMode:
    # FlopCounterMode has no formula for the CPU flash-attention kernel, so attention runs
    # on the math backend here, whose matmuls it counts (the CUDA kernels it counts as is).
    with (
        sdpa_kernel([SDPBackend.MATH]),
        FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter,
    ):
        fn()
    return counter
