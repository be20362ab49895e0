"""Hyper-Connections (Zhu et al., ICLR 2025, arXiv 2409.19606): `altup.mode=hc`.

The residual stream is n = `altup.K` copies of width d, shaped stream-first as (n, B, T, d)
like AltUp's blocks (dynamic connections keep its memory token-first, (B, T, n, d) viewed
as (n, B, T, d), so each token's n×d slab is contiguous for the per-token bmm): `widen`
copies the embedding n times, the read-out sums the streams (`altup.readout`, default sum,
as the paper and the public package do). Each sub-layer T of a Block (attention, and
separately the FFN) is wrapped by its own `Connection`:

  width   [h₀ | H'] = αᵀH,  α = [A_m | A_r] ∈ R^{n×(n+1)}  (h₀ = Σₛ A_m[s]·Hₛ, T's input)
  depth   H'ₜ ← H'ₜ + B[t] · T(h₀)                             (B ∈ Rⁿ)

i.e. H' = A_rᵀH + Bᵀ·T(HᵀA_m). Static HC learns α and B; dynamic HC (`altup.dynamic`) adds
per-token parts tanh(norm(Hₛ)·W)·s (W zero, s = 10⁻² at init), stream by stream, as the
public package `hyper-connections` writes them. At init A_m = e_{k mod n} (k the
sub-layer's index), A_r = I, B = 1: every stream equals the pre-norm baseline's residual
stream, so the summed read-out is n times it and the final RMSNorm removes the n.
The connections' scalars and the mixing stay fp32 under any cast or autocast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from altup_cli.models.altup import _readout, _replicate
from altup_cli.models.config import AltUpConfig, ModelConfig
from altup_cli.models.registry import Span, StreamVariant, register_stream_variant
from altup_cli.models.stream import GradSlot, StreamLayer, fp32, scalar
from altup_cli.models.transformer import RMSNorm

if TYPE_CHECKING:
    from altup_cli.models.kv_cache import LayerCache

Branch = Callable[[torch.Tensor], torch.Tensor]
DYNAMIC_SCALE = 1e-2  # the dynamic parts' scale at init (the public package's)


class Connection(StreamLayer):
    """One sub-layer's hyper-connection: (n, B, T, d) → the branch's input (B, T, d), and
    back. A StreamLayer only so its own parameters stay fp32; it wraps a branch given at
    call time rather than a `.layer`."""

    def __init__(self, n: int, d_model: int, eps: float, read: int, dynamic: bool) -> None:
        super().__init__()
        self.n, self.dynamic = n, dynamic
        width = torch.cat([torch.zeros(n, 1), torch.eye(n)], dim=1)
        width[read % n, 0] = 1.0
        self.width = scalar(width)  # α = [A_m | A_r]: column 0 reads, columns 1.. mix
        self.depth = scalar(torch.ones(n))  # B
        if dynamic:
            self.norm = RMSNorm(d_model, eps)
            self.width_fn = nn.Parameter(torch.zeros(d_model, n + 1))
            self.depth_fn = nn.Parameter(torch.zeros(d_model))
            self.width_scale = scalar(torch.full(self.width_scale_shape(), DYNAMIC_SCALE))
            self.depth_scale = scalar(torch.tensor(DYNAMIC_SCALE))

    def width_scale_shape(self) -> tuple[int, ...]:
        return ()  # one scale for A_m and A_r together

    def constrain(self, alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """α and B as the connection applies them (HC: as they are; mHC projects them)."""
        return alpha, beta

    def dynamic_part(self, wc: torch.Tensor, dc: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """HC: tanh of the normed projections, scaled."""
        return wc.tanh() * self.width_scale, dc.tanh() * self.depth_scale

    def connections(
        self, h: Tensor | None = None, slot: GradSlot | None = None
    ) -> tuple[Tensor, Tensor]:
        """α (n, n+1) and B (n,), or per token (tok, n, n+1) and (tok, n) when dynamic and
        given the stream h (n, B, T, d); `slot`: the training path's (see `_Projection`)."""
        if h is None or not self.dynamic:
            return self.constrain(self.width, self.depth)
        return self.token_connections(token_first(fp32(h)), slot)

    def token_connections(
        self, tokens: Tensor, slot: GradSlot | None
    ) -> tuple[Tensor, Tensor]:
        """The dynamic α and B of the streams held token-first, (tok, n, d)."""
        n, d = self.n, tokens.shape[-1]
        flat = tokens.view(-1, d)  # (tok·n, d): each stream normed alone
        # norm(h)·W = (h·(g ⊙ W)) / rms(h): the RMSNorm folded into one product for both
        # projections (A_m, A_r's n columns and B's one), so the normed n-wide stream is
        # never written out. W is applied as its (n+2, d) transpose, the faster layout.
        weights = torch.cat([self.width_fn, self.depth_fn[:, None]], dim=1)
        weights_t = (weights * fp32(self.norm.weight)[:, None]).t().contiguous()
        if slot is None:
            proj = (flat @ weights_t.t()) * self.norm.inverse_rms(flat)
        else:
            proj = _Projection.apply(flat, weights_t, self.norm.inverse_rms, slot)
        proj = proj.view(-1, n, n + 2)  # (tok, n, n+2)
        wc, dc = self.dynamic_part(proj[..., : n + 1], proj[..., n + 1])
        return self.constrain(self.width + wc, self.depth + dc)

    def forward(self, h: torch.Tensor, branch: Branch) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            h32 = fp32(h)
            training = torch.is_grad_enabled() and not torch.compiler.is_compiling()
            # The training path: hand-written backwards that sum the stream's gradients
            # in place, handed on through the slot (write → read → dynamic projection).
            slot = GradSlot() if training else None
            if not self.dynamic:
                alpha, beta = self.connections()
                return self._static(h, h32, alpha, beta, branch, slot)
            tokens = token_first(h32)
            alpha, beta = self.token_connections(tokens, slot)
            return self._per_token(h, tokens, alpha, beta, branch, slot)

    def _static(
        self, h: Tensor, h32: Tensor, alpha: Tensor, beta: Tensor, branch: Branch,
        slot: GradSlot | None,
    ) -> Tensor:
        flat = h32.reshape(self.n, -1)
        if slot is not None:
            y = branch(_Read.apply(flat, alpha[:, 0], slot).view(h.shape[1:]).type_as(h))
            out = _Write.apply(flat, alpha[:, 1:], beta, fp32(y).reshape(-1), slot)
            return out.view(h.shape).type_as(h)
        mixed = alpha.t() @ flat  # (n+1, N): [h₀; A_rᵀH]
        y = branch(mixed[0].view(h.shape[1:]).type_as(h))
        out = torch.addr(mixed[1:], beta, fp32(y).reshape(-1))  # + B ⊗ T(h₀)
        return out.view(h.shape).type_as(h)

    def _per_token(
        self, h: Tensor, tokens: Tensor, alpha: Tensor, beta: Tensor, branch: Branch,
        slot: GradSlot | None,
    ) -> Tensor:
        d = h.shape[-1]
        if slot is not None:
            h0 = _TokenRead.apply(tokens, alpha[..., 0], slot)
            y = fp32(branch(h0.view(h.shape[1:]).type_as(h))).reshape(-1, d)
            out = _TokenWrite.apply(tokens, alpha[..., 1:], beta, y, slot)
        else:
            y = branch(token_read(tokens, alpha[..., 0]).view(h.shape[1:]).type_as(h))
            out = token_write(tokens, alpha[..., 1:], beta, fp32(y).reshape(-1, d))
        return stream_first(out, h.shape).type_as(h)


def token_first(h: Tensor) -> Tensor:
    """The streams (n, B, T, d) as (tok, n, d): a view when their memory is token-first,
    as the dynamic connections write them, else a copy (the widened embedding). Per token,
    the n × d block is then one contiguous matrix: each per-token product below is one
    batched matmul over contiguous memory, where the stream-first layout made the write
    one product per output stream, each a pass over the whole n-wide stream."""
    n, d = h.shape[0], h.shape[-1]
    return h.movedim(0, -2).reshape(-1, n, d).contiguous()


def stream_first(tokens: Tensor, shape: torch.Size) -> Tensor:
    """(tok, n, d) → the logical stream shape (n, B, T, d), its memory left token-first."""
    return tokens.view(*shape[1:-1], *tokens.shape[1:]).movedim(-2, 0)


def token_read(tokens: Tensor, read: Tensor) -> Tensor:
    """h₀[t] = Σₛ A_m[t, s]·H[t, s]: streams (tok, n, d), per-token reads (tok, n) → (tok, d)."""
    # Coefficients made contiguous: bmm runs a strided batch matrix by matrix.
    return torch.bmm(read.contiguous().unsqueeze(1), tokens).squeeze(1)


def token_write(tokens: Tensor, mix: Tensor, write: Tensor, y: Tensor) -> Tensor:
    """H'[t, u] = Σₛ A_r[t, s, u]·H[t, s] + B[t, u]·y[t]: streams (tok, n, d), mix
    (tok, n, n), write (tok, n), y (tok, d) → (tok, n, d)."""
    out = torch.bmm(mix.transpose(1, 2).contiguous(), tokens)
    return out.addcmul_(write.unsqueeze(-1), y.unsqueeze(1))  # + B ⊗ y, token by token


def row_dots(v: Tensor, tokens: Tensor) -> Tensor:
    """(tok, d), (tok, n, d) → (tok, n): v[t]·H[t, s], as v's row times Hᵀ, which bmm runs
    as one transposed product (3.5× faster than H times v as a column at n=4, d=384)."""
    return torch.bmm(v.unsqueeze(1), tokens.transpose(1, 2)).squeeze(1)


class _TokenRead(torch.autograd.Function):
    """`token_read`; its backward adds A_m[t, s]·∂h₀[t] in place into the stream gradient
    `_TokenWrite.backward` left in the slot and leaves it there for `_Projection`, which
    runs last (its output, the connections, feeds both). Autograd's graph of the one
    product [h₀; H'] = αᵀH zero-filled an (n+1)-row gradient."""

    @staticmethod
    def forward(ctx: Any, tokens: Tensor, read: Tensor, slot: GradSlot) -> Tensor:
        ctx.save_for_backward(tokens, read)
        ctx.slot = slot
        return token_read(tokens, read)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        tokens, read = ctx.saved_tensors
        stream_grad = ctx.slot.take(tokens.shape, tokens)
        grad_read = row_dots(grad, tokens)
        ctx.slot.grad = stream_grad.addcmul_(read.unsqueeze(-1), grad.unsqueeze(1))
        return None, grad_read, None  # the stream's gradient: `_Projection`'s to return


class _TokenWrite(torch.autograd.Function):
    """`token_write`; the stream's gradient ∂H[t, s] = Σᵤ A_r[t, s, u]·∂H'[t, u] goes to
    `_TokenRead` through the slot."""

    @staticmethod
    def forward(
        ctx: Any, tokens: Tensor, mix: Tensor, write: Tensor, y: Tensor, slot: GradSlot
    ) -> Tensor:
        ctx.save_for_backward(tokens, mix, write, y)
        ctx.slot = slot
        return token_write(tokens, mix, write, y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, Tensor, Tensor, None]:
        tokens, mix, write, y = ctx.saved_tensors
        ctx.slot.grad = torch.bmm(mix.contiguous(), grad)  # ∂H = A_r·∂H'
        grad_mix = torch.bmm(tokens, grad.transpose(1, 2))
        grad_write = row_dots(y, grad)
        grad_y = torch.bmm(write.contiguous().unsqueeze(1), grad).squeeze(1)
        return None, grad_mix, grad_write, grad_y, None


class _Projection(torch.autograd.Function):
    """The dynamic connections' normed projection p = (x·Wᵀ)·r, r = 1/rms(x) per row
    (x the streams (n·tok, d), W (n+2, d)), whose backward adds
    ∂x = r·(∂p·W) − x·(r²/d)·Σⱼ ∂pⱼ·pⱼ (r's derivative is −r³x/d) in place into the stream
    gradient the read and write left in the slot, and returns it: autograd's graph of the
    norm and the product writes ∂x three times over and sums the copies."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weights_t: Tensor, inverse_rms: Callable[[Tensor], Tensor],
        slot: GradSlot,
    ) -> Tensor:
        r = inverse_rms(x)
        proj = torch.mm(x, weights_t.t()).mul_(r)
        ctx.save_for_backward(x, weights_t, r, proj)
        ctx.slot = slot
        return proj

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        x, weights_t, r, proj = ctx.saved_tensors
        flat = ctx.slot.take(x.shape, x).view(x.shape)
        scaled = grad * r
        correction = (grad * proj).sum(-1, keepdim=True).mul_(r.square()).div_(-x.shape[-1])
        flat.addmm_(scaled, weights_t).addcmul_(x, correction)
        return flat, scaled.t() @ x, None, None


class _Read(torch.autograd.Function):
    """h₀ = Hᵀ A_m (H flat, (n, N)); its backward adds A_m ⊗ ∂h₀ in place into the stream
    gradient `_Write.backward` left in the slot. Autograd's graph of the one-product
    [h₀; A_rᵀH] = αᵀH instead zero-fills and copies an (n+1)-row gradient, the n× stream's
    memory traffic several times over a step."""

    @staticmethod
    def forward(ctx: Any, flat: Tensor, read: Tensor, slot: GradSlot) -> Tensor:
        ctx.save_for_backward(flat, read)
        ctx.slot = slot
        return read @ flat

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        flat, read = ctx.saved_tensors
        return ctx.slot.take(flat.shape, flat).addr_(read, grad), flat @ grad, None


class _Write(torch.autograd.Function):
    """H' = A_rᵀH + B ⊗ y; the stream's gradient A_r·∂H' goes to `_Read` through the slot."""

    @staticmethod
    def forward(
        ctx: Any, flat: Tensor, mix: Tensor, write: Tensor, y: Tensor, slot: GradSlot
    ) -> Tensor:
        ctx.save_for_backward(flat, mix, write, y)
        ctx.slot = slot
        return torch.mm(mix.t(), flat).addr_(write, y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, Tensor, Tensor, None]:
        flat, mix, write, y = ctx.saved_tensors
        ctx.slot.grad = torch.mm(mix, grad)
        return None, torch.mm(flat, grad.t()), torch.mv(grad, y), write @ grad, None


class HyperConnectionLayer(StreamLayer):
    """A Block with a hyper-connection around each of its two sub-layers."""

    connection: type[Connection] = Connection

    def __init__(self, layer: nn.Module, cfg: ModelConfig, layer_index: int, **extra: Any) -> None:
        super().__init__()
        a = cfg.altup
        self.layer = layer

        def make(read: int) -> Connection:
            return self.connection(a.K, cfg.d_model, cfg.norm_eps, read, a.dynamic, **extra)

        # Sub-layer k = 2ℓ (attention), 2ℓ+1 (FFN) reads stream k mod n at init.
        self.attn_hc, self.ffn_hc = make(2 * layer_index), make(2 * layer_index + 1)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """Every step is per token but attention, which reads the `cache` when decoding."""
        block = self.layer
        x = self.attn_hc(x, lambda h: block.attention_branch(h, cos, sin, cache))
        return self.ffn_hc(x, block.ffn_branch)


def connection_statistics(layer: nn.Module) -> dict[str, float]:
    """Per sub-layer: the means of A_m, A_r and B, and A_r's signal gains (the mHC paper's
    Amax gain: the max absolute column sum, H' = A_rᵀH forward, and the max absolute row
    sum, the gradient backward), of the static part (the dynamic part at zero input)."""
    stats: dict[str, float] = {}
    for name, conn in (("attn", layer.attn_hc), ("ffn", layer.ffn_hc)):
        with torch.no_grad():
            alpha, beta = conn.connections()
            a_m, a_r = alpha[:, 0].double(), alpha[:, 1:].double()
            stats[f"{name}/read_mean"] = float(a_m.mean())
            stats[f"{name}/mix_mean"] = float(a_r.mean())
            stats[f"{name}/write_mean"] = float(beta.double().mean())
            stats[f"{name}/gain_forward"] = float(a_r.abs().sum(0).max())
            stats[f"{name}/gain_backward"] = float(a_r.abs().sum(1).max())
    return stats


def connection_parameters(cfg: ModelConfig, dynamic_scales: int) -> int:
    """Per connection α (n(n+1)) and B (n); dynamic: the norm gain (d), W_α (d(n+1)),
    W_β (d) and the scales; two connections a layer; a concat read-out's K·d → d matrix."""
    n, d = cfg.altup.K, cfg.d_model
    per = n * (n + 1) + n + (d * (n + 3) + dynamic_scales if cfg.altup.dynamic else 0)
    return 2 * cfg.n_layers * per + _readout_matrix(cfg)


def connection_flops(cfg: ModelConfig, per_token_extra: float = 0.0) -> float:
    """Per connection and token: the width mix αᵀH, 2n(n+1)d, and the depth B ⊗ T(h₀), 2nd;
    dynamic: the projections of the n normed streams onto n+2 columns, 2nd(n+2), and
    `per_token_extra` (mHC's Sinkhorn); two connections a layer; a concat read-out."""
    n, d = cfg.altup.K, cfg.d_model
    per = 2 * n * (n + 1) * d + 2 * n * d
    if cfg.altup.dynamic:
        per += 2 * n * d * (n + 2) + per_token_extra
    return float(2 * cfg.n_layers * per + 2 * _readout_matrix(cfg))


def _readout_matrix(cfg: ModelConfig) -> int:
    a = cfg.altup
    return a.K * cfg.d_model * cfg.d_model if a.readout == "concat" else 0


# The dynamic projections read the residual width: new rows meet zeros of the padded stream.
CONNECTION_LAYOUT = {"width_fn": {0: Span("d_model")}, "depth_fn": {0: Span("d_model")}}


def _widen(cfg: AltUpConfig, embedded: torch.Tensor, d_model: int) -> torch.Tensor:
    return _replicate(cfg, embedded, d_model)  # n copies of the embedding


STREAMS_REFUSAL = "a new stream would start as a copy of the embedding and add to the read-out"


def family_variant(name: str, layer: type[HyperConnectionLayer], **facts: Any) -> StreamVariant:
    """A Hyper-Connections variant: n copies of the embedding, connections around each
    sub-layer, the streams read out as `altup.readout` says (sum)."""
    refusals = {"K": STREAMS_REFUSAL, **facts.pop("growth_refusals", {})}
    return StreamVariant(
        growth_refusals=refusals,
        name=name,
        wrap=lambda cfg, block, i: layer(block, cfg, i),
        widen=_widen,
        readout=_readout,
        statistics=connection_statistics,
        layouts={layer.connection: CONNECTION_LAYOUT},
        **facts,
    )


# Layers insert exactly (no `grow_layers` needed): an inserted layer's connections as built
# (A_r = I, B = 1, dynamic parts zero) and its zero output projections make it the identity.
register_stream_variant(
    family_variant(
        "hc", HyperConnectionLayer,
        parameters=lambda cfg: connection_parameters(cfg, dynamic_scales=2),
        flops=lambda cfg, T: connection_flops(cfg),
        options=frozenset({"dynamic"}),
        sweep={
            "hc4": ("ffn=dense", "altup=hc4"),
            "hc4_dynamic": ("ffn=dense", "altup=hc4_dynamic"),
        },
        examples={
            "hc ×4": {"altup": {"mode": "hc", "K": 4}},
            "hc ×4 dynamic": {"altup": {"mode": "hc", "K": 4, "dynamic": True}},
        },
    )
)  # fmt: skip
