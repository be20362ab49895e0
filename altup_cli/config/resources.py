"""What this machine can hold and run: a model's training memory against the largest
memory here, and a GPU config against the devices here (checked at launch, so a GPU
config still dry-runs anywhere)."""

from __future__ import annotations

import os

from altup_cli.config.schema import Settings
from altup_cli.errors import require
from altup_cli.models.config import ModelConfig

BYTES_PER_TRAINED_PARAMETER = 16  # fp32 weight, gradient and Adam's two moments


def memory_bytes() -> int:
    """The most memory a model can be trained in here: host RAM or the largest GPU."""
    import torch

    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    gpus = [
        torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())
    ]
    return max([host, *gpus])


def require_fits(cfg: ModelConfig, where: str) -> None:
    """Refuse a model whose weights, gradients and Adam state alone exceed this machine's
    memory, before anything is allocated (a typo like d_model=1000000 asks for terabytes)."""
    from altup_cli.models.counting import parameter_counts

    params = parameter_counts(cfg)["total"]
    need, have = params * BYTES_PER_TRAINED_PARAMETER, memory_bytes()
    require(
        need <= have,
        f"{where}: the model has {params:,} parameters, which need {need / 2**30:,.1f} GiB "
        f"for weights, gradients and Adam state; this machine has {have / 2**30:,.1f} GiB",
    )


def require_devices(s: Settings) -> None:
    """At launch (not in validate, so a GPU config can be dry-run anywhere): a GPU
    accelerator or FSDP needs a CUDA device on this machine."""
    import torch

    t = s.trainer
    fsdp = "fsdp" in str(t.strategy)
    what = f"trainer.strategy={t.strategy}" if fsdp else f"trainer.accelerator={t.accelerator}"
    require(
        not (t.accelerator in ("gpu", "cuda") or fsdp) or torch.cuda.is_available(),
        f"{what} needs a CUDA GPU and this machine has none (Lightning's FSDP does not "
        "run on CPU); use trainer.accelerator=cpu, or trainer=ddp_cpu for several processes",
    )
