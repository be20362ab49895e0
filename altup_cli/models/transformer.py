"""Decoder-only causal language model: pre-norm, RMSNorm, rotary attention, pluggable FFN.

Every shape that function-preserving growth changes is an independent field of
`ModelConfig`: residual width, layers, heads, query/key dim per head, value dim per head
and MLP width. The model reads top to bottom: RMSNorm, Rotary, Attention, Block,
TransformerLM. `TransformerLM.run_blocks` is the seam a wrapper (AltUp) uses to run one
block of a wider stream through each layer. `TransformerLM.decode` appends tokens to a
`KVCache` (`new_cache`) and returns their logits, as the full forward computes them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from altup_cli.models.config import ModelConfig
from altup_cli.models.feedforward import build_feedforward
from altup_cli.models.kv_cache import CacheView, KVCache, LayerCache
from altup_cli.models.laurel import Laurel
from altup_cli.models.product_keys import ExpertUsage
from altup_cli.models.registry import (
    FFN_KINDS,
    decoding_refusal,
    ffn_layouts,
    stream_variant,
    writes_stream,
)
from altup_cli.models.row_gradients import clear_row_grads
from altup_cli.models.stream import fp32, positions_run

Cache = LayerCache | CacheView | None  # what a layer decodes with (None: the full forward)


class RMSNorm(nn.Module):
    """y = x / rms(x) · gain. No mean subtraction, so zero-padding the width is exact."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def inverse_rms(self, x32: torch.Tensor) -> torch.Tensor:
        """1 / rms(x) over the last dim (with eps), kept for broadcasting."""
        # mean(x²) as ‖x‖²/d: vector_norm reads x once and writes no x²-sized temporary.
        norm = torch.linalg.vector_norm(x32, dim=-1, keepdim=True)
        return torch.rsqrt(norm.square() / x32.shape[-1] + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = fp32(x)
        return (x32 * self.inverse_rms(x32) * fp32(self.weight)).type_as(x)


class Rotary(nn.Module):
    """Rotary position embedding with a *stored* inverse-frequency table.

    The table is a persistent buffer so growing the query/key dim can append frequencies
    without changing the existing ones (recomputing from the new head dim would).
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=True)

    def cos_sin(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = fp32(self.inv_freq).to(device)
        positions = torch.arange(seq_len, device=device, dtype=inv_freq.dtype)
        angles = torch.outer(positions, inv_freq)
        return angles.cos(), angles.sin()

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (B, 1, T, D/2) at each row's own positions (B, T)."""
        inv_freq = fp32(self.inv_freq).to(positions.device)
        angles = positions.to(inv_freq.dtype)[..., None] * inv_freq
        return angles.cos()[:, None], angles.sin()[:, None]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[2i], x[2i+1]) by position·inv_freq[i]; x is (B, H, T, D)."""
    x32 = fp32(x).unflatten(-1, (-1, 2))
    x1, x2 = x32[..., 0], x32[..., 1]
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.flatten(-2).type_as(x)


class Attention(nn.Module):
    """Multi-head causal self-attention with separate query/key and value head dims."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.v_head_dim = cfg.n_heads, cfg.head_dim, cfg.v_head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.n_heads * cfg.v_head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.v_head_dim, cfg.d_model, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache = None
    ) -> torch.Tensor:
        """With a `cache`, x holds the new tokens only, and attention reads the cached ones."""
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_heads, self.v_head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = cache.attend(q, k, v)
        return self.wo(y.transpose(1, 2).reshape(batch, seq, self.n_heads * self.v_head_dim))


class Block(nn.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then + ffn(norm(x)). Width in = out.

    `token_mask` (B, T), set by `TransformerLM.features` for the length of one forward,
    marks the real tokens of a padded batch: the feed-forward layer then runs on those
    alone, since PEER/PKM query BatchNorm statistics, MoE routing and balance loss and
    expert usage mix tokens across the batch; padded positions get no feed-forward output.
    """

    def __init__(self, cfg: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = build_feedforward(cfg, layer_index)
        rank, d = cfg.altup.laurel_rank, cfg.d_model  # LAuReL beside attention, as Gemma 3n
        self.laurel = Laurel(d, rank, RMSNorm(d, cfg.norm_eps)) if rank else None
        self.token_mask: torch.Tensor | None = None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache = None
    ) -> torch.Tensor:
        x = x + self.attention_branch(x, cos, sin, cache)
        return x + self.ffn_branch(x)

    def attention_branch(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: Cache = None
    ) -> torch.Tensor:
        """The attention sub-layer's update to the residual stream, attn(norm(x)): what a
        variant that mixes streams around each sub-layer (Hyper-Connections) calls; with
        LAuReL, plus its low-rank term of the same normed input."""
        u = self.attn_norm(x)
        out = self.attn(u, cos, sin, cache)
        return out if self.laurel is None else out + self.laurel(u)

    def ffn_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward sub-layer's update to the residual stream, ffn(norm(x))."""
        return self.feedforward(self.ffn_norm(x))

    def feedforward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.token_mask
        if mask is None:
            return self.ffn(x)
        y = self.ffn(x[mask])  # (real tokens, d)
        return y.new_zeros(*mask.shape, y.shape[-1]).index_put((mask,), y)


def block_of(layer: nn.Module) -> Block:
    """The `Block` a (possibly wrapped) layer runs."""
    return next(m for m in layer.modules() if isinstance(m, Block))


class TransformerLM(nn.Module):
    """Token ids (B, T) → next-token logits (B, T, vocab).

    With AltUp the stream is (K, B, T, d) between the embedding and the readout; with a
    K·d-wide AltUp embedding, a tied LM head uses the table's first block (V × d).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        variant = stream_variant(cfg.altup.mode)
        wide = variant.embed_width(cfg.altup) > 1
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model * variant.embed_width(cfg.altup))
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(
            variant.wrap(cfg, Block(cfg, i), i) for i in range(cfg.n_layers)
        )
        self.widen = variant.widen
        self.readout = None if variant.readout is None else variant.readout(cfg.altup, cfg.d_model)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.head_from_embedding = cfg.tie_embeddings and wide
        if not self.head_from_embedding:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_embeddings and not wide:
            self.lm_head.weight = self.embed.weight

    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, init_std), output projections (the Linear layers writing the
        residual stream) scaled by 1/sqrt(2·layers); then each feed-forward kind's own init
        (product-key retrieval: unit-variance scores), which this pass would overwrite."""
        std, outputs = self.config.init_std, self._output_projections()
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                scale = self.config.output_std if name in outputs else std
                nn.init.normal_(module.weight, mean=0.0, std=scale)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        kinds = {kind.module: kind.init for kind in FFN_KINDS.values() if kind.init}
        for module in self.modules():
            init = kinds.get(type(module))
            if init is not None:
                init(module)

    def _output_projections(self) -> set[str]:
        """Attention's W_O and the feed-forward kinds' Linear layers that write the stream."""
        layouts, names = ffn_layouts(), set()
        for prefix, module in self.named_modules():
            if isinstance(module, Attention):
                names.add(f"{prefix}.wo")
            for tensor, spans in layouts.get(type(module), {}).items():
                if tensor.endswith(".weight") and writes_stream(spans):
                    names.add(f"{prefix}.{tensor.removesuffix('.weight')}")
        return names

    def run_blocks(self, h: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary.cos_sin(h.shape[-2], h.device)
        for block in self.blocks:
            h = block(h, cos, sin)
        return h

    def features(self, idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) → final-normed hidden states (B, T, d): what the LM head (or a
        task head) reads. `mask` (B, T) marks the real tokens of a right-padded batch:
        padding then reaches no batch statistic (see `Block`), and under causal attention
        the real positions' states do not depend on the padding at all."""
        if idx.shape[1] > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {idx.shape[1]} exceeds max_seq_len {self.config.max_seq_len}"
            )
        if mask is not None and mask.shape != idx.shape:
            raise ValueError(f"token mask of shape {tuple(mask.shape)} for ids {tuple(idx.shape)}")
        h = self.stream(idx)
        self.set_token_mask(mask)
        try:
            h = self.run_blocks(h)
        finally:
            self.set_token_mask(None)
        return self.finish(h)

    def stream(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids → the residual stream: embedded, and widened into K blocks by AltUp."""
        h = self.embed(idx)
        if self.widen is not None:
            h = self.widen(self.config.altup, h, self.config.d_model)
        return h

    def finish(self, h: torch.Tensor) -> torch.Tensor:
        """The last layer's stream → final-normed hidden states (B, T, d)."""
        if self.readout is not None:
            h = self.readout(h)
        return self.final_norm(h)

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Hand each layer's `Block` the mask of the positions it runs on."""
        if mask is not None:
            mask = mask.to(device=self.embed.weight.device, dtype=torch.bool)
        for layer in self.blocks:
            block = block_of(layer)
            block.token_mask = None if mask is None else mask[:, positions_run(layer)]

    def forward(self, idx: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.logits(self.features(idx, mask))

    def logits(self, h: torch.Tensor, head: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states (B, T, d) → next-token logits (B, T, vocab); `head`:
        a decode cache's contiguous copy of the tied head (see `new_cache`)."""
        if head is not None:
            return F.linear(h, head)
        if self.head_from_embedding:
            return F.linear(h, self.tied_head())
        return self.lm_head(h)

    def tied_head(self) -> torch.Tensor:
        """The LM head of a K·d-wide tied embedding: the table's first block (V × d), a
        strided view (row stride K·d)."""
        return self.embed.weight[:, : self.config.d_model]

    def new_cache(
        self,
        batch_size: int,
        max_len: int,
        pads: list[int] | None = None,
        static: bool = False,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache for `batch_size` rows of up to `max_len` tokens, row b left-padded
        by `pads[b]` (its tokens at positions slot − pads[b]); `static` for torch.compile.
        A ValueError for a model that cannot decode causally or a cache past its context."""
        refusal = decoding_refusal(self.config)
        if refusal:
            raise ValueError(refusal)
        pads = [0] * batch_size if pads is None else list(pads)
        if len(pads) != batch_size or min(pads, default=0) < 0:
            raise ValueError(f"pads {pads} for {batch_size} rows")
        if max_len - min(pads) > self.config.max_seq_len:
            raise ValueError(
                f"{max_len - min(pads)} tokens exceed max_seq_len {self.config.max_seq_len}"
            )
        layers = []
        for layer in self.blocks:
            attn = block_of(layer).attn
            sparse = positions_run(layer) != slice(None)
            layers.append((attn.n_heads, attn.head_dim, attn.v_head_dim, sparse))
        weight = self.embed.weight
        cache = KVCache(layers, max_len, pads, static, dtype or weight.dtype, weight.device)
        if self.head_from_embedding:
            # Read strided, the tied head's matrix-vector product took ~1.1 ms at batch 1
            # against 0.6 ms contiguous (V = 8192, d = 384): a decode copies it once.
            cache.head = self.tied_head().contiguous()
        return cache

    def decode(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Append the tokens idx (B, T) to `cache` (a prefill or one step); their logits
        (B, T, vocab) equal the full forward's at their positions. Run in eval mode."""
        step = cache.begin(idx.shape[1])
        logits = self.decode_step(idx, cache)
        cache.advance(step)
        return logits

    def decode_step(self, idx: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The model's part of `decode`, on a cache whose step has begun: what
        `torch.compile` compiles for a static cache."""
        step = cache.layers[0].step
        assert step is not None, "decode_step outside KVCache.begin / advance"
        h = self.stream(idx)
        cos, sin = self.rotary.at(step.positions)
        for layer, layer_cache in zip(self.blocks, cache.layers, strict=True):
            h = layer(h, cos, sin, layer_cache)
        return self.logits(self.finish(h), cache.head)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        clear_row_grads(self)  # the tables' factored gradients too

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the auxiliary losses (MoE load balance) of the last forward, if any."""
        losses = [
            m.aux_loss
            for m in self.modules()
            if isinstance(getattr(m, "aux_loss", None), torch.Tensor)
        ]
        return torch.stack(losses).sum() if losses else None

    def expert_usage(self) -> dict[str, dict[str, float]]:
        """Usage and unevenness (PEER Table 2) per PEER/PKM layer since the last reset."""
        return {
            name.removesuffix(".usage"): m.stats()
            for name, m in self.named_modules()
            if isinstance(m, ExpertUsage)
        }

    def reset_expert_usage(self) -> None:
        for m in self.modules():
            if isinstance(m, ExpertUsage):
                m.reset()

    def num_parameters(self) -> int:
        """Unique trainable parameters (a tied embedding counts once)."""
        return sum(p.numel() for p in self.parameters())
