"""Alternating Updates (Baykal et al., NeurIPS 2023): `altup.mode=altup` and `recycled`.

The token representation is K blocks of width d, held block-first as (K, B, T, d). Each
layer ℓ (§3, Alg. 1):
  predict  x̂ⁱ = Σⱼ P[i, j] xʲ                         (K×K trainable scalars)
  compute  ỹ  = L(input), input = x^{j*} (paper) or x̂^{j*} (Gemma 3n)
  correct  yⁱ = x̂ⁱ + g[i] · (ỹ − x̂^{j*})              (K trainable scalars)
j* is the layer's activated block, stored as a buffer so growth can insert layers without
renumbering. AltUp widens the embedding to V × K·d; Recycled-AltUp replicates the width-d
embedding K times. The scalars and the mixing stay fp32 under any cast or autocast.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from altup_cli.models.config import AltUpConfig, ModelConfig
from altup_cli.models.registry import Span, StreamVariant, register_stream_variant
from altup_cli.models.stream import GradSlot, StreamLayer, fp32, scalar

if TYPE_CHECKING:
    from altup_cli.models.kv_cache import LayerCache


class AltUpLayer(StreamLayer):
    """Predict → compute the wrapped layer on the activated block → correct.

    The stream is laid out block-first, (K, B, T, d), so predicting is one (K×K)·(K×N)
    matrix product and every block is a contiguous view.
    """

    def __init__(self, layer: nn.Module, K: int, active_block: int, layer_input: str) -> None:
        super().__init__()
        self.layer, self.K, self.layer_input = layer, K, layer_input
        self.predictor = scalar(torch.eye(K))  # identity init: x̂ = x
        self.corrector = scalar(torch.ones(K))
        # Stored (and checkpointed) rather than derived from the layer number, so growth
        # can insert layers; `_active` mirrors it as a Python int for cheap indexing.
        self.register_buffer("active_block", torch.tensor([active_block]), persistent=True)
        self._active = active_block
        self.register_load_state_dict_post_hook(lambda module, _: module.sync_schedule())

    def sync_schedule(self) -> None:
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

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """Every step is per token but the layer's, whose attention reads the `cache` (of
        its activated block's keys and values) when decoding."""
        if not torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self._plain(x, cos, sin, cache)
        # AltUp's algebra runs in fp32 whatever the autocast: the innovation ỹ − x̂^{j*} is
        # small next to the stream and would lose its bits in bf16 (spec, Numerics).
        slot = GradSlot() if self.layer_input == "original" else None
        if slot is not None:
            layer_in = _TakeBlock.apply(x, self._active, slot)
        else:
            with torch.autocast(x.device.type, enabled=False):
                flat = fp32(x).reshape(self.K, -1)
                layer_in = (self.predictor[self._active] @ flat).view(x.shape[1:]).type_as(x)
        layer_out = self.layer(layer_in, cos, sin, *(() if cache is None else (cache,)))
        with torch.autocast(x.device.type, enabled=False):
            return _Mix.apply(x, layer_out, self.mixing(), slot).type_as(x)

    def _plain(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None
    ) -> torch.Tensor:
        """The same function as plain tensor ops: without autograd (decoding, evaluation),
        in few small ops, as at batch 1 a decode step's time is mostly per-op overhead, and
        under torch.compile, which fuses them: y = (P − g ⊗ P[j*])·x + g ⊗ ỹ (`mixing()`'s
        two parts) as one `mm` and one `addr_`, without concatenating. Nothing is cached
        across calls: the fused AdamW step does not bump the parameters' version counters,
        so a cache could not tell that P and g have changed."""
        P, g = self.predictor, self.corrector
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        fp32_region = torch.autocast(device, enabled=False) if autocast else _NO_CONTEXT
        # `view`, not `reshape`, and no `type_as` to the same dtype: at batch 1 each op,
        # even a view, is a measurable share of AltUp's overhead per layer.
        with fp32_region:
            flat, row = fp32(x).view(self.K, -1), P[self._active]
            if self.layer_input == "original":
                layer_in = x[self._active]
            else:
                layer_in = _like(torch.mv(flat.t(), row).view(x.shape[1:]), x)
        layer_out = self.layer(layer_in, cos, sin, *(() if cache is None else (cache,)))
        with fp32_region:
            streams = torch.addr(P, g, row, alpha=-1)
            out = torch.mm(streams, flat).addr_(g, fp32(layer_out).view(-1))
        return _like(out.view(x.shape), x)


def _like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t in x's dtype (no op when it has it already)."""
    return t if t.dtype == x.dtype else t.to(x.dtype)


_NO_CONTEXT = contextlib.nullcontext()


class _TakeBlock(torch.autograd.Function):
    """x[j*] whose backward adds the layer-input gradient into the slot's stream gradient.
    Its backward always runs after `_Mix.backward`: its output feeds only the layer, whose
    output feeds only the mixing."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, block: int, slot: GradSlot) -> torch.Tensor:
        ctx.block, ctx.slot, ctx.shape = block, slot, x.shape
        return x[block]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        stream_grad = ctx.slot.take(ctx.shape, grad)
        stream_grad[ctx.block] += grad
        return stream_grad, None, None


class _Mix(torch.autograd.Function):
    """y = M · [x¹ … x^K, ỹ] in fp32 with a hand-written backward: [∂x; ∂ỹ] = Mᵀ·∂y in one
    product, and the stream's gradient passed through the slot when `_TakeBlock` made the
    layer input."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        layer_out: torch.Tensor,
        mixing: torch.Tensor,
        slot: GradSlot | None,
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


def active_block(cfg: AltUpConfig, layer_index: int) -> int:
    return layer_index % cfg.K if cfg.schedule == "alternating" else 0


def _wrap(cfg: ModelConfig, layer: nn.Module, layer_index: int) -> nn.Module:
    a = cfg.altup
    return AltUpLayer(layer, a.K, active_block(a, layer_index), a.layer_input)


def _split(cfg: AltUpConfig, embedded: torch.Tensor, d_model: int) -> torch.Tensor:
    """A K·d-wide embedding (B, T, K·d) → the block-first stream (K, B, T, d)."""
    return embedded.unflatten(-1, (cfg.K, d_model)).movedim(-2, 0).contiguous()


def _replicate(cfg: AltUpConfig, embedded: torch.Tensor, d_model: int) -> torch.Tensor:
    """Recycled-AltUp: the width-d embedding (B, T, d) as K equal blocks (K, B, T, d)."""
    return embedded.unsqueeze(0).expand(cfg.K, *embedded.shape)


def _readout(cfg: AltUpConfig, d_model: int) -> nn.Module:
    return Readout(cfg.readout, cfg.K, d_model)


def _readout_matrix(cfg: ModelConfig) -> int:
    a = cfg.altup
    return a.K * cfg.d_model * cfg.d_model if a.readout == "concat" else 0


def _parameters(cfg: ModelConfig) -> int:
    """Predictor P and corrector g in every layer, and a concat readout's K·d → d matrix."""
    K = cfg.altup.K
    return cfg.n_layers * (K * K + K) + _readout_matrix(cfg)


def _flops(cfg: ModelConfig, seq_len: int) -> float:
    """Predict + correct as one K × (K+1) product over [x¹ … x^K, ỹ] per layer; feeding the
    layer the predicted block adds one row of P: K·d more multiply-adds."""
    a, d = cfg.altup, cfg.d_model
    predict = 2 * a.K * (a.K + 1) * d + (2 * a.K * d if a.layer_input == "predicted" else 0)
    return float(cfg.n_layers * predict + 2 * _readout_matrix(cfg))


# The concat readout (d, K·d): outputs zero, inputs block by block.
_LAYOUTS = {Readout: {"proj.weight": {0: Span("d_model", zero=True), 1: Span("d_model_blocks")}}}
_REFUSALS = {"K": "a new AltUp block changes the readout (not one of the six transforms)"}
_K3 = {"mode": "altup", "K": 3, "readout": "concat", "layer_input": "predicted"}


def _variant(name: str, embed_width: Any, widen: Any, **facts: Any) -> StreamVariant:
    return StreamVariant(
        name=name, wrap=_wrap, embed_width=embed_width, widen=widen, readout=_readout,
        parameters=_parameters, flops=_flops, layouts=_LAYOUTS, growth_refusals=_REFUSALS,
        **facts,
    )  # fmt: skip


register_stream_variant(
    _variant(
        "altup", lambda a: a.K, _split,
        sweep={"altup_k2": ("ffn=dense", "altup=k2")},
        examples={
            "altup K=2": {"altup": {"mode": "altup", "K": 2}},
            "altup K=3": {"altup": _K3, "tie_embeddings": False},
        },
    )
)  # fmt: skip
register_stream_variant(
    _variant(
        "recycled", lambda a: 1, _replicate,
        sweep={"recycled_k2": ("ffn=dense", "altup=recycled_k2")},
        examples={"recycled K=2": {"altup": {"mode": "recycled", "K": 2}}},
    )
)  # fmt: skip
