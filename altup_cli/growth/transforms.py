"""The six function-preserving transforms (Gesmundo & Maile 2023, §3) and PEER's own.

Each transform plans the grown config and, per tensor, where the old entries go
(`remap.Placement`); `grow_one(model, kind, size, adam_state)` applies a plan and returns
the grown model and its remapped Adam state (keyed by parameter name). The zero / free /
rescale rule of every tensor follows the paper's proofs (spec table):

| transform      | zero (output side)                 | free                      | rescale        |
|----------------|------------------------------------|---------------------------|----------------|
| mlp_width      | new W2 rows                        | new W1 columns            | —              |
| heads          | new head's W_O slice               | new W_Q, W_K, W_V         | —              |
| value_dim      | new W_O rows in every head's slice | new W_V columns           | —              |
| key_dim        | new W_K columns                    | new W_Q columns           | W_K·√(k̂/k)     |
| residual_width | new embedding, W_O, W2 outputs     | new input-side weights    | gains, eps     |
| layers         | the new layer's W_O and W2         | the rest of the new layer | —              |

The feed-forward kinds and stream variants describe their own tensors (the `layout` of
their registry entry); `layouts.py` places them, so mlp_width, residual_width and the
kinds' own `ffn.<field>` ops grow every registered kind's tensors the same way. PEER/PKM:
`ffn.d_key` (new sub-key columns zero) is exact; `ffn.num_experts` is not (new experts can
take top-k slots) and is only applied when the caller allows it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from altup_cli.growth.layouts import blocks_of, output_side, span_placements
from altup_cli.growth.remap import Axis, NamedState, Placement, blocked, prefix, rebuild
from altup_cli.models.config import ModelConfig
from altup_cli.models.registry import FALLBACK_KIND, FFN_KINDS, ffn_kind, stream_variant
from altup_cli.models.stream import StreamLayer
from altup_cli.models.transformer import Attention, Block, RMSNorm, TransformerLM

Placements = dict[str, Placement]
Result = tuple[TransformerLM, NamedState | None]
# A transform's plan: the grown config and where each grown tensor's entries come from.
Plan = tuple[ModelConfig, "Placements | Callable[[str], Placement]"]
Gen = torch.Generator | None

CORE_FIELDS = {  # transform → the ModelConfig field it grows
    "mlp_width": "d_ff",
    "heads": "n_heads",
    "value_dim": "v_head_dim",
    "key_dim": "head_dim",
    "residual_width": "d_model",
    "layers": "n_layers",
}
# The feed-forward fields some kind can grow: `ffn.d_key`, `ffn.num_experts`.
FFN_FIELDS = list(dict.fromkeys(f"ffn.{f}" for k in FFN_KINDS.values() for f in k.growable))
FIELDS = {**CORE_FIELDS, **{name: name for name in FFN_FIELDS}}


def current_size(cfg: ModelConfig, kind: str) -> int:
    field_name = FIELDS[kind]
    if field_name.startswith("ffn."):
        return getattr(cfg.ffn, field_name[4:])
    return getattr(cfg, field_name)


def inexact_reason(cfg: ModelConfig, kind: str) -> str | None:
    """Why growing `kind` changes the function of a model of `cfg`, or None if it does not."""
    if not kind.startswith("ffn."):
        return None
    return ffn_kind(cfg.ffn.kind).inexact_growth.get(kind[4:])


def grown_config(
    cfg: ModelConfig, kind: str, size: int, position: int | None = None
) -> ModelConfig:
    """The config after growing `kind` to `size`, or a ValueError naming why it cannot."""
    old = current_size(cfg, kind)
    if kind.startswith("ffn.") and kind[4:] not in ffn_kind(cfg.ffn.kind).growable:
        able = "/".join(k.label for k in FFN_KINDS.values() if kind[4:] in k.growable)
        raise ValueError(f"{kind} grows {able} layers; this model has ffn.kind={cfg.ffn.kind}")
    if size < old:
        raise ValueError(f"{kind}: cannot shrink from {old} to {size} (growth only enlarges)")
    if kind == "key_dim" and size % 2:
        raise ValueError(f"{kind} must stay even (rotary pairs / two key halves), got {size}")
    if kind.startswith("ffn."):
        ffn_kind(cfg.ffn.kind).check_growth(kind[4:], size)
        return replace(cfg, ffn=replace(cfg.ffn, **{kind[4:]: size}))
    if kind == "residual_width":
        return replace(cfg, d_model=size, norm_eps=cfg.norm_eps * old / size)
    if kind == "layers":
        return _with_layers(cfg, size, old if position is None else position)
    return replace(cfg, **{FIELDS[kind]: size})


def _with_layers(cfg: ModelConfig, n_layers: int, at: int) -> ModelConfig:
    """Layers inserted before `at`; the layers that had a kind or variant keep it."""
    old = cfg.n_layers
    if not 0 <= at <= old:
        raise ValueError(f"layers: insertion position {at} outside 0..{old}")
    ffn, added = cfg.ffn, n_layers - old
    if ffn.layers != "all" and ffn.kind != FALLBACK_KIND:
        kept = ffn.layer_indices(old)
        ffn = replace(ffn, layers=[i if i < at else i + added for i in kept])
    grow_layers = stream_variant(cfg.altup.mode).grow_layers
    altup = cfg.altup if grow_layers is None else grow_layers(cfg, at, added)
    return replace(cfg, n_layers=n_layers, ffn=ffn, altup=altup)


def placement_function(plan: Plan) -> Callable[[str], Placement]:
    """Name → placement; tensors a plan does not mention are copied unchanged."""
    placements = plan[1]
    if callable(placements):
        return placements
    return lambda name: placements.get(name) or Placement(name, fill="built")


def apply_plan(
    model: TransformerLM, plan: Plan, state: NamedState | None = None, generator: Gen = None
) -> Result:
    """The grown model built at the plan's config and filled from `model` (and the
    optimizer state moved the same way)."""
    cfg = plan[0]
    reference = model.embed.weight
    new = TransformerLM(cfg).to(reference.device)
    if reference.dtype != torch.float32:
        new = new.to(reference.dtype)
    new.train(model.training)
    generator = generator or torch.Generator().manual_seed(0)
    new_state = rebuild(model, new, placement_function(plan), state, generator)
    for layer in new.modules():  # their Python copies of the stored per-layer schedule
        if isinstance(layer, StreamLayer):
            layer.sync_schedule()
    return new, new_state


def _modules(model: TransformerLM, kind: type) -> list[tuple[str, torch.nn.Module]]:
    return [(f"{n}." if n else "", m) for n, m in model.named_modules() if isinstance(m, kind)]


def mlp_width(model: TransformerLM, d_ff: int) -> Plan:
    """MLP hidden width p → p̂: new W1 rows free, new W2 columns zero (MoE experts too)."""
    new_cfg = grown_config(model.config, "mlp_width", d_ff)
    return new_cfg, span_placements(model, "d_ff", new_cfg)


def _attention(
    model: TransformerLM, axes: dict[str, dict[int, Axis]], scale: dict[str, float] | None = None
) -> Placements:
    placements: Placements = {}
    for p, _ in _modules(model, Attention):
        for w, ax in axes.items():
            name = f"{p}{w}.weight"
            placements[name] = Placement(name, ax, scale=(scale or {}).get(w, 1.0))
    return placements


def heads(model: TransformerLM, n_heads: int) -> Plan:
    """Heads E → Ê: new heads' W_Q, W_K, W_V free, their slice of W_O zero."""
    c = model.config
    qk, v = c.n_heads * c.head_dim, c.n_heads * c.v_head_dim  # type: ignore[operator]
    placements = _attention(
        model,
        {
            "wq": {0: Axis(prefix(qk))},
            "wk": {0: Axis(prefix(qk))},
            "wv": {0: Axis(prefix(v))},
            "wo": {1: Axis(prefix(v), zero=True)},
        },
    )
    return grown_config(c, "heads", n_heads), placements


def value_dim(model: TransformerLM, v_head_dim: int) -> Plan:
    """Value dim per head v → v̂: new W_V columns free, new W_O rows of every head zero."""
    c = model.config
    ax = blocked(c.n_heads, c.v_head_dim, v_head_dim)  # type: ignore[arg-type]
    placements = _attention(model, {"wv": {0: Axis(ax)}, "wo": {1: Axis(ax, zero=True)}})
    new_cfg = grown_config(c, "value_dim", v_head_dim)
    return new_cfg, placements


def key_dim(model: TransformerLM, head_dim: int) -> Plan:
    """Query/key dim per head k → k̂: new W_Q columns free, new W_K columns zero, old W_K
    times √(k̂/k) so that q·k/√k̂ stays q·k/√k; the rotary table is extended, not
    recomputed (new channel pairs meet zero keys)."""
    c = model.config
    old = c.head_dim
    assert old is not None
    new_cfg = grown_config(c, "key_dim", head_dim)
    ax = blocked(c.n_heads, old, head_dim)
    placements = _attention(
        model,
        {"wq": {0: Axis(ax)}, "wk": {0: Axis(ax, zero=True)}},
        scale={"wk": math.sqrt(head_dim / old)},
    )
    placements["rotary.inv_freq"] = Placement(
        "rotary.inv_freq", {0: Axis(prefix(old // 2))}, fill="built"
    )
    return new_cfg, placements


def residual_width(model: TransformerLM, d_model: int) -> Plan:
    """Residual width h → ĥ: the stream becomes [x, 0]. Output sides writing to it are
    zero-padded, input sides reading it get free columns, and since RMS([x, 0]) =
    RMS(x)·√(h/ĥ), every RMSNorm gain is scaled by √(h/ĥ) and eps by h/ĥ (spec, transform 5).
    A K·d-wide (AltUp) embedding is padded block by block."""
    c = model.config
    d = c.d_model
    new_cfg = grown_config(c, "residual_width", d_model)
    grow, zero = Axis(prefix(d)), Axis(prefix(d), zero=True)
    embed_blocks = blocks_of(c, new_cfg, model.embed.weight.shape[1])
    placements: Placements = {
        "embed.weight": Placement("embed.weight", {1: Axis(embed_blocks, zero=True)}),
        "lm_head.weight": Placement("lm_head.weight", {1: grow}),  # untied heads only
    }
    for p, _ in _modules(model, RMSNorm):
        name = p + "weight"
        placements[name] = Placement(name, {0: grow}, scale=math.sqrt(d / d_model), fill="mean")
    for p, _ in _modules(model, Attention):
        for w in ("wq", "wk", "wv"):
            placements[f"{p}{w}.weight"] = Placement(f"{p}{w}.weight", {1: grow})
        placements[p + "wo.weight"] = Placement(p + "wo.weight", {0: zero})
    placements.update(span_placements(model, "d_model", new_cfg))
    return new_cfg, placements


def layers(model: TransformerLM, n_layers: int, position: int | None = None) -> Plan:
    """Insert n̂ − n layers before layer `position` (None: at the end). A new layer's output
    projections are zero, so it is the identity; its other weights are drawn at the scale
    of its neighbour's, and its wrapper's own tensors (AltUp scalars: predictor I, block
    its index mod K) are kept as built. Existing layers keep their stored schedules."""
    c = model.config
    new_cfg = grown_config(c, "layers", n_layers, position)
    added = n_layers - c.n_layers
    at = c.n_layers if position is None else position
    neighbour = max(at - 1, 0)
    old_names, outputs = set(model.state_dict()), output_side()
    in_block = {n.split(".")[0] for m in model.modules() if isinstance(m, Block)
                for n, _ in m.named_parameters()}  # fmt: skip

    def placement_of(name: str) -> Placement:
        if not name.startswith("blocks."):
            return Placement(name, fill="built")
        _, j, rest = name.split(".", 2)
        i = int(j)
        if i < at or i >= at + added:
            return Placement(f"blocks.{i if i < at else i - added}.{rest}", fill="built")
        inner = rest.removeprefix("layer.")  # the Block's tensors sit under a wrapper's .layer
        if inner.split(".")[0] not in in_block:
            return Placement(None)  # the wrapper's own: as built
        like = next(
            (f"blocks.{neighbour}.{w}{inner}" for w in ("", "layer.")
             if f"blocks.{neighbour}.{w}{inner}" in old_names),
            None,
        )  # fmt: skip
        return Placement(None, zero=rest.endswith(outputs), like=like)

    return new_cfg, placement_of


def _ffn_transform(field: str) -> Callable[[TransformerLM, int], Plan]:
    def transform(model: TransformerLM, size: int) -> Plan:
        new_cfg = grown_config(model.config, field, size)
        return new_cfg, span_placements(model, field, new_cfg)

    transform.__doc__ = f"{field}: every kind's tensors placed by their layouts."
    return transform


TRANSFORMS: dict[str, Callable[..., Plan]] = {
    "mlp_width": mlp_width,
    "heads": heads,
    "value_dim": value_dim,
    "key_dim": key_dim,
    "residual_width": residual_width,
    "layers": layers,
    **{field: _ffn_transform(field) for field in FFN_FIELDS},
}


def grow_one(
    model: TransformerLM,
    kind: str,
    size: int,
    state: NamedState | None = None,
    generator: Gen = None,
    position: int | None = None,
) -> Result:
    """One transform: `grow_one(model, "mlp_width", 2048, adam_state)` → (model, state)."""
    plan = layers(model, size, position) if kind == "layers" else TRANSFORMS[kind](model, size)
    return apply_plan(model, plan, state, generator)


# The transforms that preserve the function of every model that has them.
_INEXACT = {f"ffn.{f}" for k in FFN_KINDS.values() for f in k.inexact_growth}
EXACT = (*CORE_FIELDS, *(f for f in FFN_FIELDS if f not in _INEXACT))
