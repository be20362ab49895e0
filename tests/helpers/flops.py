"""Independent FLOP counts: torch's FlopCounterMode, plus formulas for the few ops it has
none for that the project's hand-written backward passes use (matmul convention: 2 per
multiply-add); a count of the additions product-key retrieval executes (which
FlopCounterMode does not see); and a clock for benchmarks that ticks in FLOPs."""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Callable, Iterator, Mapping

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.module_tracker import ModuleTracker

aten = torch.ops.aten


def _outer_product(self_shape, vec1_shape, vec2_shape, *_, **__) -> int:
    return 2 * vec1_shape[0] * vec2_shape[0]


def _in_place_product(self_shape, mat1_shape, mat2_shape, *_, **__) -> int:
    return 2 * mat1_shape[0] * mat1_shape[1] * mat2_shape[1]


def _broadcast_outer_product(self_shape, factor1_shape, factor2_shape, *_, **__) -> int:
    """addcmul_ whose two factors both broadcast, a batched outer product (an mm with an
    inner dim of 1): a multiply-add per element of the result. With a full-size factor it
    is a scaling, elementwise work like any norm's, which FlopCounterMode never counts."""
    full = list(self_shape)
    if list(factor1_shape) == full or list(factor2_shape) == full:
        return 0
    return 2 * math.prod(self_shape)


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
    aten.addmm_: _in_place_product,
    aten.mv: _matrix_vector,
    aten._embedding_bag: _weighted_bag,
    aten._embedding_bag_forward_only: _weighted_bag,
}


# The per-token (dynamic) hyper-connections apply their batched outer products B ⊗ y and
# A_m ⊗ ∂h₀ as broadcast addcmul_ over the stream; counted only where asked, since an
# optimizer step's addcmul_ (Adam's second moment) is not a product of the model.
OUTER_PRODUCTS_AS_MULTIPLY_ADDS = {aten.addcmul_: _broadcast_outer_product}


def count_flops(fn: Callable[[], object], extra: Mapping = {}) -> FlopCounterMode:
    # FlopCounterMode has no formula for the CPU flash-attention kernel, so attention runs
    # on the math backend here, whose matmuls it counts (the CUDA kernels it counts as is).
    with (
        sdpa_kernel([SDPBackend.MATH]),
        FlopCounterMode(display=False, custom_mapping={**EXTRA_FORMULAS, **extra}) as counter,
    ):
        fn()
    return counter


ADDS = {aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor}


class CandidateSums(TorchDispatchMode):
    """Counts the floating-point additions executed inside modules whose name contains
    `scope` (one per element of each `add` output): product-key retrieval's candidate sums,
    counted where they happen rather than from a formula."""

    def __init__(self, scope: str = "retrieval") -> None:
        super().__init__()
        self.scope, self.count, self.tracker = scope, 0, ModuleTracker()

    def __enter__(self) -> CandidateSums:
        self.tracker.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        self.tracker.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inside = any(self.scope in name for name in self.tracker.parents)
        if func in ADDS and inside and out.is_floating_point():
            self.count += out.numel()
        return out


@contextlib.contextmanager
def flop_clock(module: types.ModuleType, extra: Mapping = {}) -> Iterator[FlopCounterMode]:
    """Within it, `module`'s `time.perf_counter` reads the FLOPs executed so far: a clock
    that ticks with the work done, so a benchmark's time ratios become work ratios."""
    with (
        sdpa_kernel([SDPBackend.MATH]),
        FlopCounterMode(display=False, custom_mapping={**EXTRA_FORMULAS, **extra}) as counter,
    ):
        clock = types.SimpleNamespace(perf_counter=lambda: float(counter.get_total_flops()))
        saved, module.time = module.time, clock  # type: ignore[attr-defined]
        try:
            yield counter
        finally:
            module.time = saved  # type: ignore[attr-defined]
