"""Shared fixtures: a generated English corpus, an isolated cache and output dir, and a way
to run the real `altup` entry point in-process and see its exit code and stderr."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.helpers.prose import make_prose

torch.set_num_threads(2)

@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    paragraphs = make_prose(600)
    for i in range(4):
        (root / f"part{i}.txt").write_text("\n\n".join(paragraphs[i::4]) + "\n")
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str


@pytest.fixture
def altup(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., CliResult]:
    """Run `altup ARGS…` through the real console-script entry point, in-process."""
    from altup_cli import cli

    def run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["altup", *args])
        capsys.readouterr()
        code = 0
        try:
            cli.main()
        except SystemExit as exit_:
            code = int(exit_.code or 0)
        out = capsys.readouterr()
        return CliResult(code, out.out, out.err)

    return run

