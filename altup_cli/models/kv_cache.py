"""The key/value cache of incremental decoding: a prefill, then one token at a time, each
step computing what the full forward computes at that position.

One `LayerCache` per layer holds that layer's attention keys (B, H, L, D_qk) and values
(B, H, L, D_v), preallocated for L slots, and `valid` (B, L): the slots its attention may
read. Every row writes the same slots; a batch of prompts of different lengths is
left-padded, row b's token in slot j sitting at position j − pads[b] (what rotary and
Sequence-AltUp's anchors use). Padding is never valid, and a Sequence-AltUp layer marks
only its anchors valid, so its attention reads its anchors alone, as in the full forward.

`static=True` keeps every shape fixed (attention reads all L slots, masked), so that
`torch.compile` compiles one decode step once; otherwise attention reads the slots written.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Step:
    """The tokens one decoding call appends, in slots start … start + T − 1."""

    start: int
    positions: torch.Tensor  # (B, T) each row's position of each new token; < 0: padding
    slots: torch.Tensor  # (T,)
    static: bool

    @property
    def end(self) -> int | None:
        """One past the last slot attention reads (None: all of them, for static shapes)."""
        return None if self.static else self.start + self.slots.shape[0]

    @property
    def real(self) -> torch.Tensor:
        """(B, T): the new tokens that are not padding."""
        return self.positions >= 0


class LayerCache:
    """One layer's keys, values and valid slots; `step` is the call in progress.

    `holey` says a slot written may be invalid for some row (padding, or a Sequence-AltUp
    layer's non-anchors), so attention needs the valid mask and not just causality.
    `anchor` is a Sequence-AltUp layer's carried state: per row, whether it has met an
    anchor, and the last anchor's input and innovation (fp32)."""

    def __init__(
        self, shape: tuple[int, int, int], dims: tuple[int, int], holey: bool, **like: object
    ) -> None:
        batch, heads, slots = shape
        self.keys = torch.zeros(batch, heads, slots, dims[0], **like)  # type: ignore[arg-type]
        self.values = torch.zeros(batch, heads, slots, dims[1], **like)  # type: ignore[arg-type]
        self.valid = torch.zeros(batch, slots, dtype=torch.bool, device=self.keys.device)
        self.holey = holey
        self.step: Step | None = None
        self.anchor: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        which: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Store the new tokens' keys and values (those at indices `which` of the step's
        tokens when given, valid where `valid` says), then attend each query (B, H, T', D)
        to every valid slot at or before its own."""
        step = self.step
        assert step is not None, "LayerCache.attend outside a decoding step"
        slots = step.slots if which is None else step.slots.index_select(0, which)
        self.keys.index_copy_(2, slots, k.to(self.keys.dtype))
        self.values.index_copy_(2, slots, v.to(self.values.dtype))
        self.valid.index_copy_(1, slots, step.real if valid is None else valid)
        end = step.end
        keys, values = self.keys[:, :, :end], self.values[:, :, :end]
        mask = self._mask(slots, keys.shape[2], step.static)
        return F.scaled_dot_product_attention(q, keys, values, mask)

    def _mask(self, slots: torch.Tensor, width: int, static: bool) -> torch.Tensor | None:
        """(B or 1, 1, T', width): valid slots at or before each query's own slot. A query
        always sees its own slot, so padding attends to something and stays finite."""
        key_slots = torch.arange(width, device=slots.device)
        causal = key_slots[None, :] <= slots[:, None]  # (T', width)
        if not (self.holey or static):
            return None if slots.shape[0] == 1 else causal
        own = key_slots[None, :] == slots[:, None]
        return ((self.valid[:, None, :width] & causal) | own)[:, None]

    def narrow(self, which: torch.Tensor, valid: torch.Tensor) -> CacheView:
        """This cache as a layer sees it that runs on some of the step's tokens only."""
        return CacheView(self, which, valid)


@dataclass
class CacheView:
    """A `LayerCache` for a layer that runs on the step's tokens at indices `which`, of
    which those marked in `valid` (B, T') are kept for later queries."""

    cache: LayerCache
    which: torch.Tensor
    valid: torch.Tensor

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.cache.attend(q, k, v, self.which, self.valid)


class KVCache:
    """Every layer's `LayerCache` for `batch` rows of `max_len` slots, and the slots used.

    `pads[b]` is row b's left padding: its tokens are at positions slot − pads[b]. A
    `sparse` layer runs on some positions only (Sequence-AltUp's anchors). Made by
    `TransformerLM.new_cache`; `TransformerLM.decode` appends tokens."""

    def __init__(
        self,
        layers: Sequence[tuple[int, int, int, bool]],  # (heads, qk dim, value dim, sparse)
        max_len: int,
        pads: Sequence[int],
        static: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.max_len, self.static, self.length = max_len, static, 0
        self.head: torch.Tensor | None = None  # a tied head's contiguous copy (`new_cache`)
        self.pads = torch.tensor(list(pads), dtype=torch.long, device=device)
        padded = any(p > 0 for p in pads)
        self.layers = [
            LayerCache((len(pads), heads, max_len), (qk, v), padded or sparse, dtype=dtype,
                       device=device)
            for heads, qk, v, sparse in layers
        ]  # fmt: skip

    def begin(self, length: int) -> Step:
        """Hand every layer the step that appends `length` tokens."""
        if self.length + length > self.max_len:
            raise ValueError(
                f"the cache holds {self.max_len} tokens; {self.length} are used, "
                f"{length} more do not fit"
            )
        slots = torch.arange(self.length, self.length + length, device=self.pads.device)
        step = Step(self.length, slots[None, :] - self.pads[:, None], slots, self.static)
        for layer in self.layers:
            layer.step = step
        return step

    def advance(self, step: Step) -> None:
        self.length = step.start + step.slots.shape[0]
        for layer in self.layers:
            layer.step = None
