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

PEER/PKM: `ffn.d_key` (new sub-key columns zero) is exact; `ffn.num_experts` is not (new
experts can take top-k slots) and is only applied when the caller allows it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import torch

from altup_cli.growth.remap import Axis, NamedState, Placement, blocked, prefix, rebuild
from altup_cli.models.altup import AltUpLayer, Readout, SequenceAltUpLayer
from altup_cli.models.feedforward import MLP
from altup_cli.models.moe import MoE
from altup_cli.models.peer import PEER
from altup_cli.models.pkm import PKM
from altup_cli.models.product_keys import ProductKeyRetrieval
from altup_cli.models.transformer import Attention, ModelConfig, RMSNorm, TransformerLM

Placements = dict[str, Placement]
Result = tuple[TransformerLM, NamedState | None]
# A transform's plan: the grown config and where each grown tensor's entries come from.
Plan = tuple[ModelConfig, "Placements | Callable[[str], Placement]"]
Gen = torch.Generator | None

# Output projections of a layer: zero in an inserted layer, so the layer is the identity.
OUTPUT_SIDE = ("attn.wo.weight", "ffn.w2.weight", "ffn.w2", "ffn.down", "ffn.values")
ALTUP_SCALARS = ("predictor", "corrector")  # kept as built in a new layer: x̂ = x


FIELDS = {  # transform → the ModelConfig (or ffn) field it grows
    "mlp_width": "d_ff",
    "heads": "n_heads",
    "value_dim": "v_head_dim",
    "key_dim": "head_dim",
    "residual_width": "d_model",
    "layers": "n_layers",
    "ffn.d_key": "ffn.d_key",
    "ffn.num_experts": "ffn.num_experts",
}


def current_size(cfg: ModelConfig, kind: str) -> int:
    field_name = FIELDS[kind]
    if field_name.startswith("ffn."):
        return getattr(cfg.ffn, field_name[4:])
    return getattr(cfg, field_name)


def grown_config(
    cfg: ModelConfig, kind: str, size: int, position: int | None = None
) -> ModelConfig:
    """The config after growing `kind` to `size`, or a ValueError naming why it cannot."""
    old = current_size(cfg, kind)
    if kind.startswith("ffn.") and cfg.ffn.kind not in ("peer", "pkm"):
        raise ValueError(f"{kind} grows PEER/PKM layers; this model has ffn.kind={cfg.ffn.kind}")
    if size < old:
        raise ValueError(f"{kind}: cannot shrink from {old} to {size} (growth only enlarges)")
    if kind in ("key_dim", "ffn.d_key") and size % 2:
        raise ValueError(f"{kind} must stay even (rotary pairs / two key halves), got {size}")
    if kind == "ffn.num_experts" and math.isqrt(size) ** 2 != size:
        raise ValueError(f"ffn.num_experts must be a perfect square, got {size}")
    if kind == "residual_width":
        return replace(cfg, d_model=size, norm_eps=cfg.norm_eps * old / size)
    if kind == "layers":
        at = old if position is None else position
        if not 0 <= at <= old:
            raise ValueError(f"layers: insertion position {at} outside 0..{old}")
        ffn = cfg.ffn
        if ffn.layers != "all" and ffn.kind != "dense":  # keep the same layers' kind
            kept = ffn.layer_indices(old)
            ffn = replace(ffn, layers=[i if i < at else i + size - old for i in kept])
        return replace(cfg, n_layers=size, ffn=ffn)
    if kind.startswith("ffn."):
        return replace(cfg, ffn=replace(cfg.ffn, **{kind[4:]: size}))
    return replace(cfg, **{FIELDS[kind]: size})


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
        if isinstance(layer, AltUpLayer):
            layer.sync_active()
        elif isinstance(layer, SequenceAltUpLayer):
            layer.sync_offset()
    return new, new_state


def _modules(model: TransformerLM, kind: type) -> list[tuple[str, torch.nn.Module]]:
    return [(f"{n}." if n else "", m) for n, m in model.named_modules() if isinstance(m, kind)]


def mlp_width(model: TransformerLM, d_ff: int) -> Plan:
    """MLP hidden width p → p̂: new W1 rows free, new W2 columns zero (MoE experts too)."""
    old = model.config.d_ff
    grow, zero = Axis(prefix(old)), Axis(prefix(old), zero=True)
    placements: Placements = {}
    for p, _ in _modules(model, MLP):
        placements[p + "w1.weight"] = Placement(p + "w1.weight", {0: grow})
        placements[p + "w2.weight"] = Placement(p + "w2.weight", {1: zero})
    for p, _ in _modules(model, MoE):  # w1 (E, d, p), w2 (E, p, d)
        placements[p + "w1"] = Placement(p + "w1", {2: grow})
        placements[p + "w2"] = Placement(p + "w2", {1: zero})
    new_cfg = grown_config(model.config, "mlp_width", d_ff)
    return new_cfg, placements


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
    AltUp's K·d embedding is padded block by block."""
    c = model.config
    d = c.d_model
    grow, zero = Axis(prefix(d)), Axis(prefix(d), zero=True)
    K = c.altup.K if c.altup.mode == "altup" else 1
    placements: Placements = {
        "embed.weight": Placement("embed.weight", {1: Axis(blocked(K, d, d_model), zero=True)}),
        "lm_head.weight": Placement("lm_head.weight", {1: grow}),  # untied heads only
    }

    def put(name: str, axes: dict[int, Axis], **kwargs: object) -> None:
        placements[name] = Placement(name, axes, **kwargs)  # type: ignore[arg-type]

    for p, _ in _modules(model, RMSNorm):
        put(p + "weight", {0: grow}, scale=math.sqrt(d / d_model), fill="mean")
    for p, _ in _modules(model, Attention):
        for w in ("wq", "wk", "wv"):
            put(f"{p}{w}.weight", {1: grow})
        put(p + "wo.weight", {0: zero})
    for p, _ in _modules(model, MLP):
        put(p + "w1.weight", {1: grow})
        put(p + "w2.weight", {0: zero})
    for p, _ in _modules(model, MoE):
        put(p + "router.weight", {1: grow})
        put(p + "w1", {1: grow})
        put(p + "w2", {2: zero})
    for p, _ in _modules(model, ProductKeyRetrieval):
        put(p + "query.weight", {1: grow})
    for p, _ in _modules(model, PEER):
        put(p + "up", {1: grow})
        put(p + "down", {1: zero})
    for p, _ in _modules(model, PKM):
        put(p + "values", {1: zero})
    for p, m in _modules(model, Readout):
        if m.kind == "concat":  # (d, K·d): outputs zero, inputs block by block
            put(p + "proj.weight", {0: zero, 1: Axis(blocked(c.altup.K, d, d_model))})
    new_cfg = grown_config(c, "residual_width", d_model)
    return new_cfg, placements


def layers(model: TransformerLM, n_layers: int, position: int | None = None) -> Plan:
    """Insert n̂ − n layers before layer `position` (None: at the end). A new layer's output
    projections are zero, so it is the identity; its other weights are drawn at the scale
    of its neighbour's. Existing layers keep their stored AltUp active blocks; a new AltUp
    layer has predictor I and activates block (its index mod K)."""
    c = model.config
    new_cfg = grown_config(c, "layers", n_layers, position)
    added = n_layers - c.n_layers
    at = c.n_layers if position is None else position
    neighbour = max(at - 1, 0)

    def placement_of(name: str) -> Placement:
        if not name.startswith("blocks."):
            return Placement(name, fill="built")
        _, j, rest = name.split(".", 2)
        i = int(j)
        if i < at or i >= at + added:
            return Placement(f"blocks.{i if i < at else i - added}.{rest}", fill="built")
        like = None if rest.endswith(ALTUP_SCALARS) else f"blocks.{neighbour}.{rest}"
        return Placement(None, zero=rest.endswith(OUTPUT_SIDE), like=like)

    return new_cfg, placement_of


def key_dim_ffn(model: TransformerLM, d_key: int) -> Plan:
    """PEER/PKM query/key dim d_key → d̂_key: each head's two query halves gain free
    features (BatchNorm'd as before), the sub-keys gain zero columns: scores unchanged."""
    c = model.config
    new_cfg = grown_config(c, "ffn.d_key", d_key)
    half, new_half = c.ffn.d_key // 2, d_key // 2
    placements: Placements = {}
    for p, m in _modules(model, ProductKeyRetrieval):
        features = Axis(blocked(m.heads * 2, half, new_half))
        placements[p + "query.weight"] = Placement(p + "query.weight", {0: features})
        for b in ("weight", "bias", "running_mean", "running_var"):
            name = f"{p}query_bn.{b}"
            placements[name] = Placement(name, {0: features}, fill="built")
        placements[p + "sub_keys"] = Placement(p + "sub_keys", {3: Axis(prefix(half), zero=True)})
    return new_cfg, placements


def experts(model: TransformerLM, num_experts: int) -> Plan:
    """PEER/PKM N = r² → N̂ = r̂²: NOT function-preserving (new experts can enter a top-k).
    Sub-key tables gain free rows; flat index i·r + j moves to i·r̂ + j in the expert
    tables and their moments; new experts' output rows are zero."""
    c = model.config
    new_cfg = grown_config(c, "ffn.num_experts", num_experts)
    r, new_r = math.isqrt(c.ffn.num_experts), math.isqrt(num_experts)
    rows = blocked(r, r, new_r)
    placements: Placements = {}
    for p, _ in _modules(model, ProductKeyRetrieval):
        placements[p + "sub_keys"] = Placement(p + "sub_keys", {2: Axis(prefix(r))})
    for p, _ in _modules(model, PEER):
        placements[p + "up"] = Placement(p + "up", {0: Axis(rows)})
        placements[p + "down"] = Placement(p + "down", {0: Axis(rows, zero=True)})
    for p, _ in _modules(model, PKM):
        placements[p + "values"] = Placement(p + "values", {0: Axis(rows, zero=True)})
    return new_cfg, placements


TRANSFORMS: dict[str, Callable[..., Plan]] = {
    "mlp_width": mlp_width,
    "heads": heads,
    "value_dim": value_dim,
    "key_dim": key_dim,
    "residual_width": residual_width,
    "layers": layers,
    "ffn.d_key": key_dim_ffn,
    "ffn.num_experts": experts,
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


EXACT = ("mlp_width", "heads", "value_dim", "key_dim", "residual_width", "layers", "ffn.d_key")
