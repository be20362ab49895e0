"""`altup bench`: one module per suite — `lightning` (Lightning vs a bare PyTorch loop),
`altup` (the residual-stream variants), `peer` (the PEER layer beside the public
reference), `growth` (exactness of the growth transforms) — and `measure`, the one home of
device resolution, timing, peak memory and the interleaving of the variants compared.
Here: the suite registry, the option checks and `run_suite`, the one entry point. The
suites may import models, growth, training and config; this package is imported only by
the commands and the CLI (and the peer suite's fresh measuring processes, so importing it
and `measure` adds torch alone: no Lightning, Hydra or W&B).
"""

from __future__ import annotations

import importlib
from collections.abc import Set
from dataclasses import dataclass, field
from typing import Any

from altup_cli.bench.measure import resolve_device
from altup_cli.errors import UserError

_TIMING = frozenset({"--steps", "--warmup", "--batch-size", "--seq-len", "--device"})
# Suite name (= its module's name) -> the options it uses; any other given is refused.
SUITES: dict[str, frozenset[str]] = {
    "lightning": _TIMING | {"--models", "--repeats"},
    "altup": _TIMING | {"--models", "--compile"},
    "peer": frozenset({"--repeats", "--batch-size", "--seq-len", "--device"})
    | {"--d-models", "--experts", "--tokens", "--naive-max"},
    "growth": frozenset(),
    "decode": frozenset({"--models", "--steps", "--repeats", "--batch-size", "--seq-len"})
    | {"--device", "--compile"},
}


@dataclass(frozen=True)
class BenchOptions:
    """The `altup bench` options as given (lists still comma-separated text) and the
    names of those given on the command line rather than left at their defaults."""

    models: str
    steps: int
    warmup: int
    repeats: int
    batch_size: int
    seq_len: int
    device: str
    compile: bool
    d_models: str
    experts: str
    tokens: int
    naive_max: int
    given: frozenset[str] = field(default_factory=frozenset)

    @property
    def presets(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]

    @property
    def counts(self) -> dict[str, int]:
        """The options that must be positive integers, by option name."""
        return {
            "--steps": self.steps, "--repeats": self.repeats, "--batch-size": self.batch_size,
            "--seq-len": self.seq_len, "--tokens": self.tokens, "--naive-max": self.naive_max,
        }  # fmt: skip


def run_suite(suite: str, options: BenchOptions) -> None:
    """Check the options (nothing runs before they pass), run the suite, print its tables."""
    check_options(suite, options.presets, options.counts, options.warmup, options.device)
    check_suite_options(suite, options.given, options.device)
    importlib.import_module(f"{__name__}.{suite}").run(options)


def check_options(
    suite: str, presets: list[str], counts: dict[str, int], warmup: int, device: str
) -> None:
    """Refuse bad `altup bench` options before anything runs: `counts` (option → value)
    must be positive, `--warmup` at least 0, the device one there is, and the presets of
    the suites that take `--models` known."""
    for option, value in counts.items():
        if value < 1:
            raise UserError(f"{option} must be a positive integer, got {value}")
    if warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {warmup}")
    resolve_device(device)
    if "--models" in SUITES.get(suite, ()):
        from altup_cli.bench.lightning import preset_config

        if not presets:
            raise UserError("--models must name at least one model preset")
        for preset in presets:
            preset_config(preset)


def given_options(ctx: Any) -> frozenset[str]:
    """The options of a click/typer context that were given (on the command line or by
    environment), not left at their defaults. Sources are compared by name: typer may
    bring its own copy of click's `ParameterSource`."""
    defaults = (None, "DEFAULT", "DEFAULT_MAP")
    return frozenset(
        p.opts[0]
        for p in ctx.command.params
        if p.name and getattr(ctx.get_parameter_source(p.name), "name", None) not in defaults
    )


def check_suite_options(suite: str, given: Set[str], device: str) -> None:
    """Refuse, in one line, an unknown suite, an option the suite would ignore, and a
    `--device` naming a GPU for the peer suite (its layers and memory probes run on the
    CPU, `auto` too)."""
    if suite not in SUITES:
        raise UserError(f"--suite must be {', '.join(SUITES)}, got {suite!r}")
    unused = sorted(given - SUITES[suite] - {"--suite"})
    if unused:
        uses = ", ".join(sorted(SUITES[suite])) or "no options"
        raise UserError(f"{unused[0]} does nothing in the {suite} suite (it uses {uses})")
    if suite == "peer" and "--device" in given and resolve_device(device).type != "cpu":
        raise UserError(f"--device {device}: the peer suite runs on the CPU only")


def int_list(text: str, option: str) -> list[int]:
    """Comma-separated positive integers, or a one-line refusal naming `option`."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{option} must list positive integers, got {text!r}")
    return values
