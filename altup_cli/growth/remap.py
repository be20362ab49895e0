"""Moving a model's tensors (and their Adam moments) into a grown model.

A transform describes, for each tensor of the grown model, where the old tensor's entries
sit (`Placement`: per grown axis the positions of the old entries, and whether the new
entries along it must be zero). Everything else follows one rule (Gesmundo & Maile §3):
old entries are copied (times `scale`), new entries on an output side are zero, and the
other new entries are "free" — random at the scale of the old tensor, so new units train
and are not clones. Adam moments move with the same index maps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

# {parameter name: {"step": …, "exp_avg": …, "exp_avg_sq": …}}: Adam state keyed by name.
NamedState = dict[str, dict[str, torch.Tensor]]


@dataclass
class Axis:
    """Where the old entries of one dimension sit in the grown dimension."""

    positions: torch.Tensor  # (old size,) indices into the grown size
    zero: bool = False  # new entries along this axis must be zero (an output side)


@dataclass
class Placement:
    """How one tensor of the grown model is filled.

    `source` None: a tensor the old model did not have (an inserted layer's): it is zero
    when `zero`, drawn at the scale of old tensor `like` when given, else kept as built.
    `fill` picks the value of free new entries: `random` (N(0, std of the old tensor)),
    `mean` (the mean of the old entries after scaling: norm gains) or `built` (as the
    grown model's constructor made them: buffers, BatchNorm, AltUp scalars).
    """

    source: str | None
    axes: dict[int, Axis] = field(default_factory=dict)
    scale: float = 1.0
    fill: str = "random"
    zero: bool = False
    like: str | None = None


def prefix(old: int) -> torch.Tensor:
    """New entries appended at the end."""
    return torch.arange(old)


def blocked(blocks: int, old: int, new: int) -> torch.Tensor:
    """A dimension of `blocks` equal slices (heads, AltUp blocks), each grown at its end."""
    return (torch.arange(blocks)[:, None] * new + torch.arange(old)[None, :]).flatten()


def _index(positions: dict[int, torch.Tensor], shape: torch.Size) -> tuple[torch.Tensor, ...]:
    """Broadcasting index tensors selecting the old entries' places in the grown tensor."""
    ndim = len(shape)
    return tuple(
        positions.get(d, torch.arange(shape[d])).view([-1 if i == d else 1 for i in range(ndim)])
        for d in range(ndim)
    )


def new_mask(new: torch.Tensor, placement: Placement, zero_only: bool = False) -> torch.Tensor:
    """Entries of the grown tensor that are new (along some zero axis, if `zero_only`)."""
    if placement.source is None:
        return torch.ones(new.shape, dtype=torch.bool, device=new.device)
    mask = torch.zeros(new.shape, dtype=torch.bool)
    for d, axis in placement.axes.items():
        if zero_only and not axis.zero:
            continue
        along = torch.ones(new.shape[d], dtype=torch.bool)
        along[axis.positions] = False
        mask |= along.view([-1 if i == d else 1 for i in range(new.ndim)])
    return mask.to(new.device)


def _random_like(t: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.randn(t.shape, generator=generator, dtype=torch.float64) * std).to(t)


def _scale_of(t: torch.Tensor) -> float:
    return float(t.double().std()) if t.numel() > 1 else 0.0


def fill_tensor(
    new: torch.Tensor,
    placement: Placement,
    old_tensors: dict[str, torch.Tensor],
    generator: torch.Generator,
) -> None:
    """Write `new` in place from the old tensors as `placement` says."""
    if placement.source is None:
        if placement.zero:
            new.zero_()
        elif placement.like in old_tensors and new.ndim >= 2:
            std = _scale_of(old_tensors[placement.like])
            if std > 0:
                new.copy_(_random_like(new, std, generator))
        return
    old = old_tensors[placement.source].to(new.device, new.dtype) * placement.scale
    if placement.fill == "random" and new.ndim >= 1:
        std = _scale_of(old_tensors[placement.source])
        if std > 0:
            new.copy_(_random_like(new, std, generator))
    elif placement.fill == "mean" and new.ndim >= 1:
        new.fill_(float(old.double().mean()))
    new.masked_fill_(new_mask(new, placement, zero_only=True), 0.0)
    place(new, placement, old)


def move_state(
    old_state: dict[str, torch.Tensor], placement: Placement, param: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One parameter's Adam state in the grown shape: moments moved with the parameter's
    index map; new first moments 0, new second moments the mean of the old ones (a zero
    second moment under an inherited step count would inflate the first updates)."""
    moved: dict[str, torch.Tensor] = {}
    for key, value in old_state.items():
        if not isinstance(value, torch.Tensor) or value.ndim == 0 or not placement.axes:
            moved[key] = value.clone() if isinstance(value, torch.Tensor) else value
            continue
        seed = float(value.double().mean()) if key == "exp_avg_sq" else 0.0
        grown = torch.full(param.shape, seed, dtype=value.dtype, device=value.device)
        place(grown, placement, value)
        moved[key] = grown
    return moved


def rebuild(
    old_model: nn.Module,
    new_model: nn.Module,
    placement_of: Callable[[str], Placement],
    state: NamedState | None,
    generator: torch.Generator,
) -> NamedState | None:
    """Fill every parameter and persistent buffer of `new_model` from `old_model`; return
    the optimizer state remapped the same way (None if none was given)."""
    old_tensors = {k: v.detach() for k, v in old_model.state_dict(keep_vars=True).items()}
    new_state: NamedState | None = None if state is None else {}
    with torch.no_grad():
        for name, tensor in [*new_model.named_parameters(), *_persistent_buffers(new_model)]:
            placement = placement_of(name)
            fill_tensor(tensor.data, placement, old_tensors, generator)
            source = placement.source
            if state is not None and new_state is not None and source in state:
                new_state[name] = move_state(state[source], placement, tensor)
    return new_state


def _persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    keys = set(model.state_dict())
    return [(n, b) for n, b in model.named_buffers() if n in keys]


def _positions(placement: Placement, device: torch.device) -> dict[int, torch.Tensor]:
    return {d: a.positions.to(device) for d, a in placement.axes.items()}


def place(new: torch.Tensor, placement: Placement, old: torch.Tensor) -> None:
    """Write `old` into the entries of the grown tensor `new` that hold the old ones."""
    if placement.axes:
        new[_index(_positions(placement, new.device), new.shape)] = old
    else:
        new.copy_(old)


def old_entries(new: torch.Tensor, placement: Placement) -> torch.Tensor:
    """The entries of a grown tensor that hold the old tensor's, in the old shape."""
    if not placement.axes:
        return new
    return new[_index(_positions(placement, new.device), new.shape)]
