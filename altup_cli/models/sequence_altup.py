"""Sequence-AltUp (Baykal et al. 2023, §4) and its stride-and-skip baseline:
`altup.mode=sequence` and `stride_skip`.

AltUp's trick along the sequence: a layer runs on every k-th token (anchors) and the
other tokens are predicted and corrected from their anchor; stride-and-skip is the
baseline where skipped tokens pass through. In a causal LM fixed anchors (t ≡ 0 mod k in
every layer) leave a non-anchor token unseen by every later position; rotating anchors
(layer ℓ's at t ≡ ℓ mod k, stored per layer) make every token an anchor in some layer.
`altup.sequence_layers` picks the layers that do this (all, middle, or indices); the
others run as plain layers on every token. The scalars and the mixing stay fp32.
Decoding with a cache runs the layer on the new anchors (their keys and values, alone,
kept for later anchors) and carries each row's last anchor to the tokens after it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from altup_cli.models.config import AltUpConfig, ModelConfig, select_layers
from altup_cli.models.registry import StreamVariant, register_stream_variant
from altup_cli.models.stream import StreamLayer, fp32, scalar

if TYPE_CHECKING:
    from altup_cli.models.kv_cache import LayerCache


class SequenceAltUpLayer(StreamLayer):
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
            self.predictor = scalar(torch.tensor([1.0, 0.0]))  # (α, β): x̂_t = x_t
            self.corrector = scalar(torch.tensor(1.0))  # γ
        self._offset = 0
        if offset is not None:
            self.register_buffer("anchor_offset", torch.tensor([offset]), persistent=True)
            self._offset = offset
            self.register_load_state_dict_post_hook(lambda module, _: module.sync_schedule())

    def positions(self) -> slice:
        return slice(self._offset, None, self.stride)

    def sync_schedule(self) -> None:
        if hasattr(self, "anchor_offset"):
            self._offset = int(self.anchor_offset)

    def set_anchor_offset(self, offset: int) -> None:
        with torch.no_grad():
            self.anchor_offset.fill_(offset)
        self._offset = offset

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None
    ) -> torch.Tensor:
        if cache is not None:
            return self._decode(x, cos, sin, cache)
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

    def _decode(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache
    ) -> torch.Tensor:
        """The step's new tokens x (B, T, d) at their positions: the layer runs on the new
        tokens that are an anchor in some row (all of them for a static cache), keeping
        the keys and values of the rows' anchors alone."""
        step = cache.step
        assert step is not None
        o, k, positions = self._offset, self.stride, step.positions
        is_anchor = (positions >= o) & ((positions - o) % k == 0)  # (B, T)
        if step.static:
            run = torch.arange(x.shape[1], device=x.device)
        else:
            run = is_anchor.any(0).nonzero().flatten()
        anchor_out = None
        if run.numel():
            view = cache.narrow(run, is_anchor.index_select(1, run))
            anchor_out = self.layer(
                x.index_select(1, run), cos.index_select(-2, run), sin.index_select(-2, run), view
            )
        if self.skip_only:
            if anchor_out is None:
                return x
            kept = torch.where(is_anchor.index_select(1, run)[..., None], anchor_out, x[:, run])
            return x.index_copy(1, run, kept)
        return self._correct(x, anchor_out, run, is_anchor, cache)

    def _correct(
        self,
        x: torch.Tensor,
        anchor_out: torch.Tensor | None,
        run: torch.Tensor,
        is_anchor: torch.Tensor,
        cache: LayerCache,
    ) -> torch.Tensor:
        """`_from_first_token`'s predict and correct, token by token: each token takes the
        last anchor at or before it, among the new tokens or carried in `cache.anchor`."""
        batch, T, d = x.shape
        with torch.autocast(x.device.type, enabled=False):
            alpha, beta = self.predictor[0], self.predictor[1]
            x32 = fp32(x)
            layer_out = torch.zeros_like(x32)
            if anchor_out is not None:
                layer_out = layer_out.index_copy(1, run, fp32(anchor_out))
            # at an anchor a, x_a is the token's own input: innovation (x_a − x̂_a) + (ỹ_a − x_a)
            innovation = (x32 - (alpha + beta) * x32) + (layer_out - x32)
            index = torch.arange(T, device=x.device).expand(batch, T)
            last = torch.where(is_anchor, index, -1).cummax(1).values  # (B, T); −1: none yet
            here = (last >= 0)[..., None]
            gather = last.clamp(min=0)[..., None].expand(batch, T, d)
            if cache.anchor is None:
                cache.anchor = (
                    torch.zeros(batch, 1, dtype=torch.bool, device=x.device),
                    x32.new_zeros(batch, 1, d),
                    x32.new_zeros(batch, 1, d),
                )
            had, carried_x, carried_innovation = cache.anchor
            anchor_x = torch.where(here, x32.gather(1, gather), carried_x)
            anchor_innovation = torch.where(here, innovation.gather(1, gather), carried_innovation)
            seen = here | had[..., None]
            predicted = alpha * x32 + beta * anchor_x
            out = torch.where(seen, predicted + self.corrector * anchor_innovation, x32)
            had.copy_(seen[:, -1])
            carried_x.copy_(anchor_x[:, -1:])
            carried_innovation.copy_(anchor_innovation[:, -1:])
        return out.type_as(x)


def anchor_offset(cfg: AltUpConfig, layer_index: int) -> int | None:
    """Layer ℓ's first anchor: ℓ mod k when rotating, so every token is an anchor in some
    layer once there are ≥ k layers; None (always 0, not stored) when fixed."""
    return layer_index % cfg.stride if cfg.anchors == "rotating" else None


def anchor_count(seq_len: int, stride: int, offset: int) -> int:
    """Anchors o, o+k, … below T: ⌈(T − o)/k⌉ (0 when o ≥ T). With rotating offsets a partial
    last stride gives some layers one anchor fewer than ⌈T/k⌉."""
    return max(0, -(-(seq_len - offset) // stride))


def sequence_layers(cfg: ModelConfig) -> list[int]:
    """The layers that run on anchors (`altup.sequence_layers`); the others see every token."""
    return select_layers(cfg.altup.sequence_layers, cfg.n_layers, "altup.sequence_layers")


def _check(cfg: ModelConfig) -> None:
    sequence_layers(cfg)  # indices in range


def _tokens(cfg: ModelConfig, seq_len: int) -> list[int]:
    """Layer ℓ runs on its n_ℓ anchors, ⌈T/k⌉ (rotating: ⌈(T − ℓ mod k)/k⌉), if it is a
    sequence layer, else on all T tokens."""
    a, chosen = cfg.altup, set(sequence_layers(cfg))
    return [
        anchor_count(seq_len, a.stride, anchor_offset(a, i) or 0) if i in chosen else seq_len
        for i in range(cfg.n_layers)
    ]


def _grow_layers(cfg: ModelConfig, at: int, added: int) -> AltUpConfig:
    """Inserting `added` layers before layer `at` keeps the same layers sequence layers
    (new layers are plain unless every layer is one)."""
    a = cfg.altup
    if a.sequence_layers == "all":
        return a
    kept = [i if i < at else i + added for i in sequence_layers(cfg)]
    return replace(a, sequence_layers=kept)


def _variant(name: str, skip_only: bool) -> StreamVariant:
    def wrap(cfg: ModelConfig, layer: nn.Module, layer_index: int) -> nn.Module:
        if layer_index not in sequence_layers(cfg):
            return layer
        offset = anchor_offset(cfg.altup, layer_index)
        return SequenceAltUpLayer(layer, cfg.altup.stride, skip_only, offset)

    def parameters(cfg: ModelConfig) -> int:
        return 0 if skip_only else 3 * len(sequence_layers(cfg))  # (α, β) and γ

    return StreamVariant(
        name=name, wrap=wrap, check=_check, parameters=parameters, tokens=_tokens,
        grow_layers=_grow_layers,
        examples={"sequence s=2": {"altup": {"mode": "sequence", "stride": 2}}}
        if not skip_only else {},
    )  # fmt: skip


register_stream_variant(_variant("sequence", skip_only=False))
register_stream_variant(_variant("stride_skip", skip_only=True))
