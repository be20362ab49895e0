"""Old import path of `altup bench`'s checks and suites, kept until cli.py calls
`altup_cli.bench.run_suite`."""

from altup_cli.bench import check_options, check_suite_options, given_options
from altup_cli.bench.altup import run_altup_benchmark
from altup_cli.bench.lightning import run_benchmark

__all__ = [
    "check_options",
    "check_suite_options",
    "given_options",
    "run_altup_benchmark",
    "run_benchmark",
]
