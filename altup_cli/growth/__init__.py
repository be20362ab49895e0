"""Function-preserving growth (Gesmundo & Maile 2023): plain PyTorch, no Lightning/Hydra/W&B.

`grow(model, [parse_op("mlp_width=2048"), …], state)` returns a larger model computing the
same function (and its remapped Adam state); `transforms.py` holds the six transforms and
the feed-forward kinds' own (`ffn.d_key`, `ffn.num_experts`), which place each registered
kind's tensors by the layout its registry entry declares; `remap.py` the tensor and
optimizer-state moves they share. It imports only `altup_cli.models`; training, config
and the commands import it.
"""

from altup_cli.growth.ops import GrowthOp, grow, parse_op, plan, preset_ops
from altup_cli.growth.remap import NamedState
from altup_cli.growth.transforms import EXACT, TRANSFORMS, apply_plan, grow_one

__all__ = [
    "EXACT",
    "TRANSFORMS",
    "GrowthOp",
    "NamedState",
    "apply_plan",
    "grow",
    "grow_one",
    "parse_op",
    "plan",
    "preset_ops",
]
