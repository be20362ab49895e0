"""What the residual-stream variants share, and the plain stream (`altup.mode=off`).

A variant runs each layer (a `Block`, (…, T, d) → (…, T, d)) inside a `StreamLayer`
that holds it as `.layer`: its own parameters (mixing scalars) stay fp32 under any cast,
and it tells the model the positions its Block runs on and how to refresh Python copies of
the per-layer schedule it stores in buffers (after growth writes them in place).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from altup_cli.models.config import ModelConfig
from altup_cli.models.registry import StreamVariant, register_stream_variant


def fp32(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: bf16/fp16 are widened, fp64 (exactness tests) is kept."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def scalar(value: torch.Tensor) -> nn.Parameter:
    """A mixing scalar parameter: fp32 and never weight-decayed."""
    param = nn.Parameter(value.float())
    param._no_weight_decay = True  # type: ignore[attr-defined]
    return param


class GradSlot:
    """Hands the stream's gradient from the autograd Function that writes a layer's output
    into the stream to the one that read the layer's input from it (AltUp's `_Mix` →
    `_TakeBlock`, Hyper-Connections' write → read), so the stream's two gradients (through
    the mixing and through the layer) are summed in place, not in a separate pass. The
    reader's backward always runs second: its output feeds only the layer, whose output
    feeds only the writer."""

    grad: torch.Tensor | None = None

    def take(self, shape: torch.Size, like: torch.Tensor) -> torch.Tensor:
        """The stream gradient left here (the slot emptied), or zeros of `shape` if none."""
        grad, self.grad = self.grad, None
        return like.new_zeros(shape) if grad is None else grad


class StreamLayer(nn.Module):
    """A wrapped layer (`self.layer`) whose own parameters `.to(bf16)`, `.half()` and
    `trainer.precision=bf16-true` leave in fp32: a 2⁻⁷ spacing near 1 would swallow their
    updates. The wrapped layer is cast as asked; fp64 (exactness tests) applies to all."""

    layer: nn.Module

    def positions(self) -> slice:
        """The positions of the sequence the wrapped Block runs on."""
        return slice(None)

    def sync_schedule(self) -> None:
        """Refresh the Python copies of stored per-layer buffers (none here)."""

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Any:
        own = [p for p in self._parameters.values() if p is not None]
        keep = {id(t) for p in own for t in (p, p.grad) if t is not None}

        def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            narrowed = out.is_floating_point() and out.dtype.itemsize < 4
            if id(t) in keep and narrowed:
                return t.to(out.device, torch.float32)  # moved as asked, not narrowed
            return out

        return super()._apply(at_least_fp32, recurse)


def positions_run(layer: nn.Module) -> slice:
    """The positions at which a (possibly wrapped) layer runs its Block."""
    return layer.positions() if isinstance(layer, StreamLayer) else slice(None)


def _plain(cfg: ModelConfig, layer: nn.Module, layer_index: int) -> nn.Module:
    return layer


register_stream_variant(StreamVariant(name="off", wrap=_plain, examples={"dense": {}}))
