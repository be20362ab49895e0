"""Plain-PyTorch models: the transformer, its feed-forward kinds and residual-stream
variants, their registries (`config.py`), their parameter and FLOP counts, and decoding
token by token with a key/value cache (`kv_cache`, `sampling`, `generation`). No
Lightning, Hydra, W&B or Typer imports here; every other package may import this one, and
it imports none of them. Importing it registers every kind and variant, in the order the
messages list them: a new kind or variant is one module here, imported below.
"""

# The registry entries in order: dense, PEER, PKM, MoE; off, (Recycled-)AltUp, Sequence.
# Each module registers itself on import.
from altup_cli.models import feedforward, peer, pkm, moe  # noqa: F401, I001
from altup_cli.models import stream, altup, sequence_altup  # noqa: F401
from altup_cli.models import hyper_connections, mhc  # noqa: F401  (HC, mHC)
from altup_cli.models import gemma3n_altup  # noqa: F401  (Gemma 3n's AltUp)
from altup_cli.models.config import AltUpConfig, FFNConfig, ModelConfig
from altup_cli.models.registry import (
    FFN_KINDS,
    STREAM_VARIANTS,
    FFNKind,
    StreamVariant,
    ffn_kind,
    stream_variant,
)
from altup_cli.models.counting import (
    forward_flops_per_token,
    parameter_counts,
    training_flops_per_token,
)
from altup_cli.models.transformer import TransformerLM

__all__ = [
    "FFN_KINDS",
    "STREAM_VARIANTS",
    "AltUpConfig",
    "FFNConfig",
    "FFNKind",
    "ModelConfig",
    "StreamVariant",
    "TransformerLM",
    "ffn_kind",
    "forward_flops_per_token",
    "parameter_counts",
    "stream_variant",
    "training_flops_per_token",
]
