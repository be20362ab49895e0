"""Gemma 3n's AltUp (transformers' `Gemma3nTextAltUp` and its use in `Gemma3nTextModel`):
`altup.mode=gemma3n`, n = `altup.K` streams (4 in Gemma 3n), held stream-first as
(n, B, T, d) like AltUp's blocks.

Per token, a router reads a stream v: c(v) = tanh(W_r · RMSNorm(v) / d) ∈ Rⁿ. Each layer:
  predict  x̂ᵢ = xᵢ + Σⱼ C[i, j] xⱼ,   C = reshape(W_p · c(x₀), n × n)   (residual form)
  compute  ỹ  = Block(x̂₀)                     (the active stream is 0, fed its prediction)
  correct  yᵢ = x̂ᵢ + (1 + (W_c · c(ỹ))ᵢ) · (ỹ − x̂₀)
  scale    yᵢ += s ⊙ y₀ for i ≥ 1             (s = `correct_output_scale`, init 0)
`altup.coef_clip` clips W_p and W_c to ±clip (Gemma 3n: 120): in training W_p is clipped
in place before each forward, as Gemma 3n does, and the forward reads both clipped, in
training and in eval alike (Gemma 3n leaves W_c unclipped in eval, so its eval and training
functions differ once W_c leaves the range; here they do not).

The scaled corrected output: Gemma3nTextModel feeds s ⊙ y₀ only into its per-layer-input
branch (a gate, the per-layer token embedding, a projection and a norm), whose result it
adds to streams 1..n−1; stream 0 never sees it. There are no per-layer embeddings here, so
that branch is the identity: streams 1..n−1 receive s ⊙ y₀, zero at init.

Widen: streams 1..n−1 are d×d projections of stream 0 (the embedding), each rescaled to
its RMS; readout: streams 1..n−1 projected back, rescaled to stream 0's RMS, and the n
streams averaged. The projections sit in layer 0's wrapper (the registry's `widen` takes
no module) and the readout module; they start at N(0, 1/d), so a projection keeps its
input's RMS and Gemma's floor of 10⁻⁵ on the mean square (set for its unit-RMS stream)
does not bind at init. W_p and W_c start at 0 (x̂ = x, unit correction): stream 0 then
runs exactly as the baseline's residual stream, and with n = 1 the model is the baseline.
The router, coefficients and their products stay fp32 under any cast or autocast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from altup_cli.models import laurel
from altup_cli.models.altup import _replicate
from altup_cli.models.config import AltUpConfig, ModelConfig
from altup_cli.models.registry import Span, StreamVariant, register_stream_variant
from altup_cli.models.stream import StreamLayer, fp32, scalar
from altup_cli.models.transformer import RMSNorm

if TYPE_CHECKING:
    from altup_cli.models.kv_cache import LayerCache

RMS_FLOOR = 1e-5  # Gemma3nTextModel's floor on a projected stream's mean square


def rms(x: torch.Tensor) -> torch.Tensor:
    return x.pow(2).mean(-1, keepdim=True).sqrt()


def matched(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`projected` rescaled to the RMS `target` (…, 1)."""
    return projected * target / projected.pow(2).mean(-1, keepdim=True).clamp(min=RMS_FLOOR).sqrt()


def projections(n: int, d_model: int) -> nn.Parameter:
    """n − 1 d×d projections (out, in), at N(0, 1/d): each keeps its input's RMS."""
    return nn.Parameter(torch.randn(max(n - 1, 0), d_model, d_model) * d_model**-0.5)


class Gemma3nAltUpLayer(StreamLayer):
    """Predict → the Block on the predicted stream 0 → correct → scale (module docstring).
    Layer 0 also widens: it replaces streams 1..n−1 of the replicated embedding by the
    RMS-matched projections of stream 0."""

    def __init__(self, layer: nn.Module, cfg: ModelConfig, widens: bool) -> None:
        super().__init__()
        n, d = cfg.altup.K, cfg.d_model
        self.layer, self.n, self.clip = layer, n, cfg.altup.coef_clip
        self.router = scalar(torch.randn(n, d) * cfg.init_std)  # Gemma 3n's modality_router
        self.router_norm = RMSNorm(d, cfg.norm_eps)
        # The router's 1/d, stored so that growing d keeps it (an int: no cast rounds it)
        self.register_buffer("router_width", torch.tensor(d), persistent=True)
        self.prediction_coefs = scalar(torch.zeros(n * n, n))  # W_p: c → C (row-major n × n)
        self.correction_coefs = scalar(torch.zeros(n, n))  # W_c
        self.correct_output_scale = scalar(torch.zeros(d))
        self.stream_projections = projections(n, d) if widens else None
        self._coefs: tuple[torch.Tensor, torch.Tensor] | None = None  # the last forward's

    def route(self, v: torch.Tensor) -> torch.Tensor:
        """c(v) = tanh(W_r · RMSNorm(v) / d), per token: (…, d) → (…, n), fp32."""
        return torch.tanh((self.router_norm(fp32(v)) / self.router_width) @ self.router.t())

    def coefficient_maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W_p and W_c, clipped to ±coef_clip; in training W_p is clipped in place first."""
        P, G = self.prediction_coefs, self.correction_coefs
        if self.clip is None:
            return P, G
        if self.training:
            with torch.no_grad():
                P.clamp_(-self.clip, self.clip)
        return P.clamp(-self.clip, self.clip), G.clamp(-self.clip, self.clip)

    def widen(self, x0: torch.Tensor) -> torch.Tensor:
        """Stream 0 (B, T, d) → the n streams: x₀ and its RMS-matched projections."""
        if self.stream_projections is None or self.n == 1:
            return x0.unsqueeze(0)
        projected = torch.einsum("kod,btd->kbto", self.stream_projections, x0)
        return torch.cat([x0.unsqueeze(0), matched(projected, rms(x0))])

    def predict(self, x: torch.Tensor, P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x̂ = x + C·x over the streams, C (B, T, n, n) from the router on x₀."""
        coefs = (self.route(x[0]) @ P.t()).unflatten(-1, (self.n, self.n))
        mixed = torch.matmul(coefs, x.permute(1, 2, 0, 3)).permute(2, 0, 1, 3)  # Σⱼ C[i,j] xⱼ
        return x + mixed, coefs

    def correct(
        self, predicted: torch.Tensor, out: torch.Tensor, G: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """yᵢ = x̂ᵢ + (1 + W_c·c(ỹ))ᵢ (ỹ − x̂₀); then s ⊙ y₀ added to streams 1..n−1."""
        gains = 1 + self.route(out) @ G.t()  # (B, T, n)
        y = predicted + gains.permute(2, 0, 1).unsqueeze(-1) * (out - predicted[0])
        if self.n > 1:
            y = torch.cat([y[:1], y[1:] + self.correct_output_scale * y[0]])
        return y, gains

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        """Every step is per token but the Block's, whose attention reads the `cache`."""
        with torch.autocast(x.device.type, enabled=False):
            x32 = fp32(x)
            if self.stream_projections is not None:
                x32 = self.widen(x32[0])
            P, G = self.coefficient_maps()
            predicted, coefs = self.predict(x32, P)
        decoding = () if cache is None else (cache,)
        out = self.layer(predicted[0].type_as(x), cos, sin, *decoding)
        with torch.autocast(x.device.type, enabled=False):
            y, gains = self.correct(predicted, fp32(out), G)
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            self._coefs = (coefs.detach(), gains.detach())
        return y.type_as(x)


class Gemma3nReadout(nn.Module):
    """n streams (n, B, T, d) → (B, T, d): stream 0 and the RMS-matched projections of
    streams 1..n−1 (Gemma 3n's altup_unembed_projections), averaged."""

    def __init__(self, n: int, d_model: int) -> None:
        super().__init__()
        self.n = n
        self.unembed_projections = projections(n, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.n == 1:
            return h[0]
        h32 = fp32(h)
        weight = fp32(self.unembed_projections)
        projected = torch.einsum("kbtd,kod->kbto", h32[1:], weight)
        streams = torch.cat([h32[:1], matched(projected, rms(h32[0]))])
        return streams.mean(0).type_as(h)


def statistics(layer: nn.Module) -> dict[str, float]:
    """Per layer: mean |W_p|, mean |W_c|, the mean of s, and from the last training
    forward the mean |C| over tokens and the mean correction gain 1 + W_c·c."""
    assert isinstance(layer, Gemma3nAltUpLayer)
    stats = {
        "prediction_coefs_abs": float(layer.prediction_coefs.detach().abs().mean()),
        "correction_coefs_abs": float(layer.correction_coefs.detach().abs().mean()),
        "correct_output_scale": float(layer.correct_output_scale.detach().mean()),
    }
    if layer._coefs is not None:
        coefs, gains = layer._coefs
        stats["prediction_abs"] = float(coefs.abs().mean())
        stats["correction_gain"] = float(gains.mean())
    return stats


def _wrap(cfg: ModelConfig, layer: nn.Module, layer_index: int) -> nn.Module:
    return Gemma3nAltUpLayer(layer, cfg, widens=layer_index == 0)


def _readout(cfg: AltUpConfig, d_model: int) -> nn.Module:
    return Gemma3nReadout(cfg.K, d_model)


def _parameters(cfg: ModelConfig) -> int:
    """Per layer: W_r (n·d), the router norm's gain and s (d each), W_p (n³), W_c (n²);
    the n − 1 widening and n − 1 unembedding d×d projections."""
    n, d = cfg.altup.K, cfg.d_model
    per_layer = n * d + 2 * d + n**3 + n**2
    return cfg.n_layers * per_layer + 2 * (n - 1) * d * d


def _flops(cfg: ModelConfig, seq_len: int) -> float:
    """Per layer and token: the router twice (2·2nd), W_p·c (2n³), C·x (2n²d), W_c·c (2n²);
    the n − 1 projections in and out (2·2(n−1)d²). Norms, tanh, RMS matching and the
    elementwise correction are free by the counting convention."""
    n, d = cfg.altup.K, cfg.d_model
    per_layer = 4 * n * d + 2 * n**3 + 2 * n * n * d + 2 * n * n
    return float(cfg.n_layers * per_layer + 4 * (n - 1) * d * d)


def _grow_layers(cfg: ModelConfig, at: int, added: int) -> AltUpConfig:
    """Layers insert exactly after layer 0 (an inserted layer's W_p, W_c and s as built,
    zero, and its zero output projections make it the identity); not before it."""
    if at == 0:
        raise ValueError(
            "layers: altup.mode=gemma3n widens the stream in layer 0 (its stream "
            "projections); insert layers at position 1 or later"
        )
    return cfg.altup


# Growth: the router reads the stream (new columns free; its 1/d is stored, and the norm's
# gain and eps rescale), s scales stream 0 (new entries meet zeros), and each projection
# writes new rows zero: [P·x, 0] has the RMS ratio of P·x while the RMS floor does not bind.
_PROJECTION = {1: Span("d_model", zero=True), 2: Span("d_model")}
_LAYOUTS = {
    Gemma3nAltUpLayer: {
        "router": {1: Span("d_model")},
        "correct_output_scale": {0: Span("d_model")},
        "stream_projections": _PROJECTION,
    },
    Gemma3nReadout: {"unembed_projections": _PROJECTION},
    laurel.Laurel: laurel.LAYOUT,  # LAuReL's, with any variant (layouts are per module type)
}
_REFUSALS = {"K": "a new Gemma 3n AltUp stream needs new projections and coefficient maps"}


register_stream_variant(
    StreamVariant(
        name="gemma3n", wrap=_wrap, widen=_replicate, readout=_readout,
        parameters=_parameters, flops=_flops, layouts=_LAYOUTS, grow_layers=_grow_layers,
        growth_refusals=_REFUSALS, options=frozenset({"coef_clip"}), statistics=statistics,
        sweep={"gemma3n": ("ffn=dense", "altup=gemma3n")},
    )
)  # fmt: skip
# No growth example (the growth benchmark's rows, each grown by layers=+1@0 too): layers
# cannot insert before layer 0 while the stream projections sit there.
