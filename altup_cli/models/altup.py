"""Alternating Updates (Baykal et al., NeurIPS 2023) around an ordinary layer stack.

AltUp / Recycled-AltUp: the token representation is K blocks of width d, held
block-first as (K, B, T, d). Each layer ℓ (§3, Alg. 1):
  predict  x̂ⁱ = Σⱼ P[i, j] xʲ                         (K×K trainable scalars)
  compute  ỹ  = L(input), input = x^{j*} (paper) or x̂^{j*} (Gemma 3n)
  correct  yⁱ = x̂ⁱ + g[i] · (ỹ − x̂^{j*})              (K trainable scalars)
j* is the layer's activated block, stored as a buffer so growth can insert layers without
renumbering. Sequence-AltUp applies the same trick along the sequence: the layer runs on
every k-th token (anchors) and the other tokens are predicted and corrected from their
anchor; stride-and-skip is the baseline where skipped tokens pass through. In a causal LM
fixed anchors (t ≡ 0 mod k in every layer) leave a non-anchor token unseen by every later
position; rotating anchors (layer ℓ's at t ≡ ℓ mod k, stored per layer) make every token
an anchor in some layer. The scalars and the mixing stay fp32 under any cast or autocast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

MODES = ("off", "altup", "recycled", "sequence", "stride_skip")
SCHEDULES = ("alternating", "same")
LAYER_INPUTS = ("original", "predicted")
READOUTS = ("sum", "mean", "first", "concat")
ANCHORS = ("fixed", "rotating")


@dataclass
class AltUpConfig:
    """`off`: the plain model. `altup`: a V×(K·d) embedding. `recycled`: the width-d
    embedding replicated K times. `sequence` / `stride_skip`: anchors every `stride` tokens,
    at t ≡ 0 (`fixed`: what configs from before `anchors` existed mean) or t ≡ ℓ mod k."""

    mode: str = "off"
    K: int = 2
    schedule: str = "alternating"
    layer_input: str = "original"
    readout: str = "sum"
    stride: int = 2
    anchors: str = "fixed"

    def __post_init__(self) -> None:
        checks = [
            (
                self.mode in MODES,
                f"altup.mode must be one of {', '.join(MODES)}, got {self.mode!r}",
            ),
            (self.K >= 1, f"altup.K must be >= 1, got {self.K}"),
            (self.stride >= 1, f"altup.stride must be >= 1, got {self.stride}"),
            (
                self.schedule in SCHEDULES,
                f"altup.schedule must be alternating or same, got {self.schedule!r}",
            ),
            (
                self.layer_input in LAYER_INPUTS,
                f"altup.layer_input must be original or predicted, got {self.layer_input!r}",
            ),
            (
                self.readout in READOUTS,
                f"altup.readout must be one of {', '.join(READOUTS)}, got {self.readout!r}",
            ),
            (
                self.anchors in ANCHORS,
                f"altup.anchors must be fixed or rotating, got {self.anchors!r}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def widens(self) -> bool:
        """Whether the stream carries a block axis (B, T, K, d): (Recycled-)AltUp."""
        return self.mode in ("altup", "recycled")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fp32(t: torch.Tensor) -> torch.Tensor:
    """At least fp32: bf16/fp16 are widened, fp64 (exactness tests) is kept."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _scalar(value: torch.Tensor) -> nn.Parameter:
    """An AltUp scalar parameter: fp32 and never weight-decayed."""
    param = nn.Parameter(value.float())
    param._no_weight_decay = True  # type: ignore[attr-defined]
    return param


class _FP32Scalars(nn.Module):
    """A wrapper whose own parameters (the AltUp scalars) `.to(bf16)`, `.half()` and
    `trainer.precision=bf16-true` leave in fp32: a 2⁻⁷ spacing near 1 would swallow their
    updates. The wrapped layer is cast as asked; fp64 (exactness tests) applies to all."""

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


class AltUpLayer(_FP32Scalars):
    """Predict → compute the wrapped layer on the activated block → correct.

    The stream is laid out block-first, (K, B, T, d), so predicting is one (K×K)·(K×N)
    matrix product and every block is a contiguous view.
    """

    def __init__(self, layer: nn.Module, K: int, active_block: int, layer_input: str) -> None:
        super().__init__()
        self.layer, self.K, self.layer_input = layer, K, layer_input
        self.predictor = _scalar(torch.eye(K))  # identity init: x̂ = x
        self.corrector = _scalar(torch.ones(K))
        # Stored (and checkpointed) rather than derived from the layer number, so growth
        # can insert layers; `_active` mirrors it as a Python int for cheap indexing.
        self.register_buffer("active_block", torch.tensor([active_block]), persistent=True)
        self._active = active_block
        self.register_load_state_dict_post_hook(lambda module, _: module.sync_active())

    def sync_active(self) -> None:
        self._active = int(self.active_block)

    def set_active_block(self, block: int) -> None:
        with torch.no_grad():
            self.active_block.fill_(block)
        self._active = block

    def mixing(self) -> torch.Tensor:
        """Predict and correct folded into one K × (K+1) matrix M acting on [x¹ … x^K, ỹ]:
        yⁱ = x̂ⁱ + g[i](ỹ − x̂^{j*}) = Σⱼ (P[i,j] − g[i] P[j*,j]) xʲ + g[i] ỹ."""
        P, g = self.predictor, self.corrector
        return torch.cat([P - g[:, None] * P[self._active][None, :], g[:, None]], dim=1)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # AltUp's algebra runs in fp32 whatever the autocast: the innovation ỹ − x̂^{j*} is
        # small next to the stream and would lose its bits in bf16 (spec, Numerics).
        fused = torch.is_grad_enabled() and not torch.compiler.is_compiling()
        slot = _GradSlot() if fused and self.layer_input == "original" else None
        if slot is not None:
            layer_in = _TakeBlock.apply(x, self._active, slot)
        elif self.layer_input == "original":
            layer_in = x[self._active]
        else:
            with torch.autocast(x.device.type, enabled=False):
                flat = fp32(x).reshape(self.K, -1)
                layer_in = (self.predictor[self._active] @ flat).view(x.shape[1:]).type_as(x)
        layer_out = self.layer(layer_in, cos, sin)
        with torch.autocast(x.device.type, enabled=False):
            if fused:
                return _Mix.apply(x, layer_out, self.mixing(), slot).type_as(x)
            return mix_reference(x, layer_out, self.mixing()).type_as(x)


def mix_reference(x: torch.Tensor, layer_out: torch.Tensor, mixing: torch.Tensor) -> torch.Tensor:
    """y = M · [x¹ … x^K, ỹ] in fp32, as plain tensor ops (what torch.compile fuses)."""
    K = x.shape[0]
    stacked = torch.cat([fp32(x).reshape(K, -1), fp32(layer_out).reshape(1, -1)])
    return (mixing @ stacked).view(x.shape)


class _GradSlot:
    """Hands the stream's gradient from `_Mix.backward` to `_TakeBlock.backward`, so the
    activated block's two gradients (through the mixing and through the layer) are summed
    in place instead of through a zero-filled K-block scatter and a K-block add."""

    grad: torch.Tensor | None = None


class _TakeBlock(torch.autograd.Function):
    """x[j*] whose backward adds the layer-input gradient into the slot's stream gradient.
    Its backward always runs after `_Mix.backward`: its output feeds only the layer, whose
    output feeds only the mixing."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, block: int, slot: _GradSlot) -> torch.Tensor:
        ctx.block, ctx.slot, ctx.shape = block, slot, x.shape
        return x[block]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        stream_grad, ctx.slot.grad = ctx.slot.grad, None
        if stream_grad is None:
            stream_grad = grad.new_zeros(ctx.shape)
        stream_grad[ctx.block] += grad
        return stream_grad, None, None


class _Mix(torch.autograd.Function):
    """`mix_reference` with a hand-written backward: [∂x; ∂ỹ] = Mᵀ·∂y in one product, and
    the stream's gradient passed through the slot when `_TakeBlock` made the layer input."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        layer_out: torch.Tensor,
        mixing: torch.Tensor,
        slot: _GradSlot | None,
    ) -> torch.Tensor:
        K = x.shape[0]
        flat, y = fp32(x).reshape(K, -1), fp32(layer_out).reshape(-1)
        out = torch.mm(mixing[:, :K], flat).addr_(mixing[:, K], y)
        ctx.save_for_backward(flat, y, mixing)
        ctx.slot, ctx.shapes = slot, (x.shape, layer_out.shape)
        ctx.dtypes = (x.dtype, layer_out.dtype)
        return out.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor, None]:
        flat, y, mixing = ctx.saved_tensors
        K = flat.shape[0]
        g = fp32(grad).reshape(K, -1)
        inputs_grad = torch.mm(mixing.t(), g)  # (K+1, N): rows ∂x¹…∂x^K, ∂ỹ
        mixing_grad = torch.cat([torch.mm(g, flat.t()), torch.mv(g, y)[:, None]], dim=1)
        x_shape, out_shape = ctx.shapes
        x_grad = inputs_grad[:K].view(x_shape).to(ctx.dtypes[0])
        out_grad = inputs_grad[K].view(out_shape).to(ctx.dtypes[1])
        if ctx.slot is not None:
            ctx.slot.grad, x_grad = x_grad, None
        return x_grad, out_grad, mixing_grad, None


class SequenceAltUpLayer(_FP32Scalars):
    """The layer runs on anchors (tokens o, o+k, o+2k, …) at their original rotary positions.

    `sequence`: every token t with anchor a = o + ⌊(t−o)/k⌋·k ≤ t (causal) is predicted as
    x̂_t = α·x_t + β·x_a and corrected with the anchor's innovation: y_t = x̂_t + γ·(ỹ_a − x̂_a).
    `stride_skip`: anchors take ỹ_a, the other tokens pass through unchanged. Tokens before
    the first anchor (t < o) have no anchor at or before them: they pass through.
    The offset o is 0 (`fixed`: no buffer, the state dict of before `anchors`) or stored per
    layer (`rotating`, so growth can insert layers), mirrored as `_offset` like the AltUp
    active block.
    """

    def __init__(
        self, layer: nn.Module, stride: int, skip_only: bool, offset: int | None = None
    ) -> None:
        super().__init__()
        self.layer, self.stride, self.skip_only = layer, stride, skip_only
        if not skip_only:
            self.predictor = _scalar(torch.tensor([1.0, 0.0]))  # (α, β): x̂_t = x_t
            self.corrector = _scalar(torch.tensor(1.0))  # γ
        self._offset = 0
        if offset is not None:
            self.register_buffer("anchor_offset", torch.tensor([offset]), persistent=True)
            self._offset = offset
            self.register_load_state_dict_post_hook(lambda module, _: module.sync_offset())

    def sync_offset(self) -> None:
        if hasattr(self, "anchor_offset"):
            self._offset = int(self.anchor_offset)

    def set_anchor_offset(self, offset: int) -> None:
        with torch.no_grad():
            self.anchor_offset.fill_(offset)
        self._offset = offset

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        o = self._offset
        if o == 0:
            return self._from_first_token(x, cos, sin)
        if o >= x.shape[1]:
            return x  # no anchor in a sequence this short: every token passes through
        tail = self._from_first_token(x[:, o:], cos[o:], sin[o:])
        return torch.cat([x[:, :o], tail], dim=1)

    def _from_first_token(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Anchors at tokens 0, k, 2k, … of `x`."""
        k, T = self.stride, x.shape[1]
        anchors = x[:, ::k]
        anchor_out = self.layer(anchors, cos[::k], sin[::k])
        if self.skip_only:
            out = x.clone()
            out[:, ::k] = anchor_out
            return out
        with torch.autocast(x.device.type, enabled=False):
            alpha, beta = self.predictor[0], self.predictor[1]
            of_anchor = torch.arange(T, device=x.device) // k  # anchor index of each token
            x32, a32 = fp32(x), fp32(anchors)
            predicted = alpha * x32 + beta * a32.index_select(1, of_anchor)
            pred_anchor = (alpha + beta) * a32
            innovation = (a32 - pred_anchor) + (fp32(anchor_out) - a32)
            out = predicted + self.corrector * innovation.index_select(1, of_anchor)
        return out.type_as(x)


def active_block(cfg: AltUpConfig, layer_index: int) -> int:
    return layer_index % cfg.K if cfg.schedule == "alternating" else 0


def anchor_offset(cfg: AltUpConfig, layer_index: int) -> int | None:
    """Layer ℓ's first anchor: ℓ mod k when rotating, so every token is an anchor in some
    layer once there are ≥ k layers; None (always 0, not stored) when fixed."""
    return layer_index % cfg.stride if cfg.anchors == "rotating" else None


def anchor_count(seq_len: int, stride: int, offset: int) -> int:
    """Anchors o, o+k, … below T: ⌈(T − o)/k⌉ (0 when o ≥ T). With rotating offsets a partial
    last stride gives some layers one anchor fewer than ⌈T/k⌉."""
    return max(0, -(-(seq_len - offset) // stride))


def wrap_layer(cfg: AltUpConfig, layer: nn.Module, layer_index: int) -> nn.Module:
    """The layer as the configured AltUp variant runs it (unchanged when AltUp is off)."""
    if cfg.mode in ("altup", "recycled"):
        return AltUpLayer(layer, cfg.K, active_block(cfg, layer_index), cfg.layer_input)
    if cfg.mode in ("sequence", "stride_skip"):
        skip_only, offset = cfg.mode == "stride_skip", anchor_offset(cfg, layer_index)
        return SequenceAltUpLayer(layer, cfg.stride, skip_only, offset)
    return layer


class Readout(nn.Module):
    """K blocks (K, B, T, d) → one (B, T, d) before the final norm and LM head."""

    def __init__(self, kind: str, K: int, d_model: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "concat":
            self.proj = nn.Linear(K * d_model, d_model, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.kind == "sum":
            return h.sum(0)
        if self.kind == "mean":
            return h.mean(0)
        if self.kind == "first":
            return h[0]
        return self.proj(h.movedim(0, -2).flatten(-2))  # blocks side by side: [x¹ … x^K]


def widen(cfg: AltUpConfig, embedded: torch.Tensor, d_model: int) -> torch.Tensor:
    """Embedding output (B, T, ·) → the block-first stream (K, B, T, d): split a K·d
    table, or replicate the width-d embedding (Recycled-AltUp)."""
    if cfg.mode == "altup":
        return embedded.unflatten(-1, (cfg.K, d_model)).movedim(-2, 0).contiguous()
    return embedded.unsqueeze(0).expand(cfg.K, *embedded.shape)
