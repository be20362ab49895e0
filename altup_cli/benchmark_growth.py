"""Old import path of the growth suite, kept until cli.py calls `altup_cli.bench.run_suite`."""

from altup_cli.bench.growth import run_growth_benchmark

__all__ = ["run_growth_benchmark"]
