"""`altup bench --suite growth`: max |Δlogits| of every growth transform, and of all six
composed, on nano-sized models of every kind in fp32 and fp64.

The models are the registered growth examples (one per FFN kind and residual-stream
variant: `models.registry.growth_examples`), each kind's own ops (`ffn.d_key`) run where the
kind grows that field. They are randomised away from their initial values (norm gains,
AltUp scalars and BatchNorm statistics included) so that every rescaling rule is
exercised; Δlogits is measured on random tokens in eval mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from altup_cli.console import print_table, say
from altup_cli.growth import grow, parse_op
from altup_cli.models import ModelConfig, TransformerLM
from altup_cli.models.registry import ffn_kind, growth_examples

if TYPE_CHECKING:
    from altup_cli.bench import BenchOptions

SIX = ["mlp_width=+512", "heads=+2", "value_dim=+16", "key_dim=+16", "residual_width=+64"]
OPS = [*SIX, "layers=+2@1"]
ALL_SIX = " ".join(OPS)
OWN = ["ffn.d_key=+32"]  # ops of a kind's own fields, run where the kind grows them


def randomize_(model: TransformerLM, generator: torch.Generator) -> TransformerLM:
    """Move every parameter and BatchNorm statistic off its initial value, in place."""
    with torch.no_grad():
        for p in model.parameters():
            std = 0.3 if p.ndim < 2 else float(p.double().std()) + 0.02
            p.add_(torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p) * std)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0, generator=generator)
            elif name.endswith("running_mean"):
                b.normal_(0.0, 0.3, generator=generator)
    return model.eval()


def nano_model(kind: str, dtype: torch.dtype, seed: int = 0) -> TransformerLM:
    """The registered growth example `kind` (one per FFN kind and stream variant) at nano
    size, randomised."""
    overrides = growth_examples()[kind]
    cfg = ModelConfig(vocab_size=8192, d_model=128, n_layers=4, n_heads=4, d_ff=512, **overrides)
    model = TransformerLM(cfg).to(dtype)
    return randomize_(model, torch.Generator().manual_seed(seed))


def run(options: BenchOptions) -> None:
    """The growth suite takes no options."""
    run_growth_benchmark()


def run_growth_benchmark(batch: int = 4, seq_len: int = 128) -> list[dict[str, str]]:
    tokens = torch.randint(0, 8192, (batch, seq_len), generator=torch.Generator().manual_seed(1))
    named = {op.split("=")[0]: op for op in [*OPS, *OWN]} | {"all six": ALL_SIX}
    rows = []
    for kind in growth_examples():
        for dtype, tag in ((torch.float32, "fp32"), (torch.float64, "fp64")):
            model = nano_model(kind, dtype)
            grows = {f"ffn.{f}" for f in ffn_kind(model.config.ffn.kind).growable}
            row = {"model": kind, "dtype": tag}
            with torch.no_grad():
                reference = model(tokens)
                row["max |logits|"] = f"{float(reference.abs().max()):.2f}"
                for name, op in named.items():
                    if name.startswith("ffn.") and name not in grows:
                        continue
                    grown, _ = grow(model, [parse_op(o) for o in op.split()], seed=2)
                    row[name] = f"{float((grown(tokens) - reference).abs().max()):.1e}"
            rows.append(row)
    columns = {key: (lambda r, k=key: r.get(k, "—")) for key in ["model", "dtype", "max |logits|"]}
    columns |= {name: (lambda r, k=name: r.get(k, "—")) for name in named}
    print_table(
        f"max |Δlogits| after growth (nano size, {batch}×{seq_len} random tokens; {' '.join(OPS)})",
        columns,
        rows,
    )
    say("targets: ≤ 1e-5 in fp32, ≤ 1e-10 in fp64")
    return rows
