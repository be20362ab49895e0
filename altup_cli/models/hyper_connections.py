"""Hyper-Connections (Zhu et al., ICLR 2025, arXiv 2409.19606): `altup.mode=hc`.

The residual stream is n = `altup.K` copies of width d, held stream-first as (n, B, T, d)
like AltUp's blocks: `widen` copies the embedding n times, the read-out sums the streams
(`altup.readout`, default sum, as the paper and the public package do). Each sub-layer T of
a Block (attention, and separately the FFN) is wrapped by its own `Connection`:

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
        n, d = self.n, h.shape[-1]
        flat = fp32(h).reshape(-1, d)  # (n·tok, d): each stream normed alone
        # norm(h)·W = (h·(g ⊙ W)) / rms(h): the RMSNorm folded into one product for both
        # projections (A_m, A_r's n columns and B's one), so the normed n-wide stream is
        # never written out. W is applied as its (n+2, d) transpose, the faster layout.
        weights = torch.cat([self.width_fn, self.depth_fn[:, None]], dim=1)
        weights_t = (weights * fp32(self.norm.weight)[:, None]).t().contiguous()
        if slot is None:
            proj = (flat @ weights_t.t()) * self.norm.inverse_rms(flat)
        else:
            proj = _Projection.apply(flat, weights_t, self.norm.inverse_rms, slot)
        proj = proj.view(n, -1, n + 2).transpose(0, 1)  # (tok, n, n+2)
        wc, dc = self.dynamic_part(proj[..., : n + 1], proj[..., n + 1])
        return self.constrain(self.width + wc, self.depth + dc)

    def forward(self, h: torch.Tensor, branch: Branch) -> torch.Tensor:
        with torch.autocast(h.device.type, enabled=False):
            h32 = fp32(h)
            training = torch.is_grad_enabled() and not torch.compiler.is_compiling()
            # The training path: hand-written backwards that sum the stream's gradients
            # in place, handed on through the slot (write → read → dynamic projection).
            slot = GradSlot() if training else None
            alpha, beta = self.connections(h32 if self.dynamic else None, slot)
            if alpha.ndim == 2:
                return self._static(h, h32, alpha, beta, branch, slot)
            return self._per_token(h, h32, alpha, beta, branch, slot)

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
        self, h: Tensor, h32: Tensor, alpha: Tensor, beta: Tensor, branch: Branch,
        slot: GradSlot | None,
    ) -> Tensor:
        n, d = self.n, h.shape[-1]
        flat = h32.reshape(n, -1, d)  # (n, tok, d)
        if slot is not None:
            h0 = _TokenRead.apply(flat, alpha[..., 0], slot)
            y = branch(h0.view(h.shape[1:]).type_as(h))
            out = _TokenWrite.apply(flat, alpha[..., 1:], beta, fp32(y).reshape(-1, d), slot)
            return out.view(h.shape).type_as(h)
        y = branch(token_read(flat, alpha[..., 0]).view(h.shape[1:]).type_as(h))
        out = token_write(flat, alpha[..., 1:], beta, fp32(y).reshape(-1, d))
        return out.view(h.shape).type_as(h)


def token_read(flat: Tensor, read: Tensor) -> Tensor:
    """h₀[t] = Σₛ A_m[t, s]·Hₛ[t]: streams (n, tok, d), per-token reads (tok, n) → (tok, d)."""
    return torch.bmm(read.contiguous().unsqueeze(1), flat.transpose(0, 1)).squeeze(1)


def token_write(flat: Tensor, mix: Tensor, write: Tensor, y: Tensor) -> Tensor:
    """H'ᵤ[t] = Σₛ A_r[t, s, u]·Hₛ[t] + B[t, u]·y[t]: mix (tok, n, n), write (tok, n),
    y (tok, d) → (n, tok, d)."""
    if torch.is_grad_enabled():  # torch.compile's training graph: out= has no derivative
        out = torch.einsum("tsu,std->utd", mix, flat).contiguous()
    else:
        out = torch.empty_like(flat)
        _rowwise(mix.transpose(1, 2).contiguous(), flat.transpose(0, 1), out)  # (tok, u, s)
    return out.addcmul_(write.t().unsqueeze(-1), y)  # + B ⊗ y, token by token


def _rowwise(coefficients: Tensor, per_token: Tensor, out: Tensor) -> None:
    """out[i][t] = coefficients[t, i] · per_token[t] for (tok, m, k) coefficients, (tok, k, d)
    streams and (m, tok, d) out: one (tok, 1, k) × (tok, k, d) product per output stream
    written in place (a single (tok, m, d) product into a stream-first output runs matrix
    by matrix, and an einsum copies its result)."""
    for i in range(out.shape[0]):
        torch.bmm(coefficients[:, i : i + 1], per_token, out=out[i].unsqueeze(1))


class _TokenRead(torch.autograd.Function):
    """`token_read`; its backward adds A_m[t, s]·∂h₀[t] in place into the stream gradient
    `_TokenWrite.backward` left in the slot and leaves it there for `_Projection`, which
    runs last (its output, the connections, feeds both). Autograd's graph of the one
    product [h₀; H'] = αᵀH zero-filled an (n+1)-row gradient, and its per-token products
    ran matrix by matrix on transposed views."""

    @staticmethod
    def forward(ctx: Any, flat: Tensor, read: Tensor, slot: GradSlot) -> Tensor:
        ctx.save_for_backward(flat, read)
        ctx.slot = slot
        return token_read(flat, read)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        flat, read = ctx.saved_tensors
        stream_grad = ctx.slot.take(flat.shape, flat)
        grad_read = torch.bmm(flat.transpose(0, 1), grad.unsqueeze(-1)).squeeze(-1)
        ctx.slot.grad = stream_grad.addcmul_(read.t().unsqueeze(-1), grad)
        return None, grad_read, None  # the stream's gradient: `_Projection`'s to return


class _TokenWrite(torch.autograd.Function):
    """`token_write`; the stream's gradient ∂Hₛ[t] = Σᵤ A_r[t, s, u]·∂H'ᵤ[t] goes to
    `_TokenRead` through the slot."""

    @staticmethod
    def forward(
        ctx: Any, flat: Tensor, mix: Tensor, write: Tensor, y: Tensor, slot: GradSlot
    ) -> Tensor:
        ctx.save_for_backward(flat, mix, write, y)
        ctx.slot = slot
        return token_write(flat, mix, write, y)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, Tensor, Tensor, None]:
        flat, mix, write, y = ctx.saved_tensors
        per_token = grad.contiguous().transpose(0, 1)  # (tok, n, d)
        ctx.slot.grad = torch.empty_like(flat)
        _rowwise(mix, per_token, ctx.slot.grad)  # ∂Hₛ = Σᵤ A_r[s, u]·∂H'ᵤ
        grad_mix = torch.bmm(flat.transpose(0, 1), per_token.transpose(1, 2))
        grad_write = torch.bmm(per_token, y.unsqueeze(-1)).squeeze(-1)
        grad_y = torch.bmm(write.contiguous().unsqueeze(1), per_token).squeeze(1)
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
        flat.addmm_(scaled, weights_t).add_(x * correction)
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
