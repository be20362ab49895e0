"""`altup bench`: speed, memory and exactness measured side by side in one run."""

from __future__ import annotations

HELP = """Measure training-step time and peak memory side by side in one run.

Prints ratios (Lightning step vs a bare PyTorch loop on the same model and batch).

**Examples**

* `altup bench` — the tiny and mini presets on this machine's device.

* `altup bench --models tiny,mini --steps 30 --repeats 3`

* `altup bench --suite altup --models mini` — baseline, AltUp K=2, Recycled K=2,
  Sequence-AltUp stride 2 and the dense 2d model, as ratios to the baseline.

* `altup bench --suite peer` — the PEER layer (N = 128² … 1024², CPU) beside the public
  reference implementation (PEER-pytorch, `pip install 'altup[bench]'`; its rows are
  skipped without it), its naive oracle and dense FFNs of width 4d and h·k, then a full
  training step with PEER, the reference and dense; every ratio from this run.

* `altup bench --suite peer --d-models 512 --experts 256 --repeats 5`

* `altup bench --suite growth` — max |Δlogits| of every growth transform (and all six
  composed) on nano-sized dense, AltUp, PEER, PKM and MoE models, fp32 and fp64.

An option the chosen suite does not use is refused (exit 2).
"""


def bench(suite: str, given: frozenset[str], **options: object) -> None:
    from altup_cli.bench import BenchOptions, run_suite

    run_suite(suite, BenchOptions(**options, given=given))  # type: ignore[arg-type]
