"""Old import path of the peer suite, kept until cli.py calls `altup_cli.bench.run_suite`."""

from typing import Any

from altup_cli.bench import peer
from altup_cli.bench.peer import check_experts

__all__ = ["check_experts", "run_peer_benchmark"]


def run_peer_benchmark(*args: Any) -> list[dict[str, Any]]:
    """Looked up in the suite at call time, so a test's stand-in for it is the one run."""
    return peer.run_peer_benchmark(*args)
