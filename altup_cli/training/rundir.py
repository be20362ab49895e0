"""Moved to `altup_cli.runs`; these re-exports keep `altup_cli.cli` working meanwhile."""

from altup_cli.runs.checkpoint import find_resume_checkpoint as find_resume_checkpoint
from altup_cli.runs.rundir import planned_run_dir as planned_run_dir
