"""The command line: every recipe composes, and bad input is one line + exit code 2."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import yaml

from altup_cli.config import list_recipes
from tests.conftest import tiny_overrides


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_composes(altup, recipe: str, tmp_path: Path) -> None:
    result = altup("train", "--dry-run", "--recipe", recipe, f"run.output_dir={tmp_path}")
    assert result.code == 0, result.stderr
    config = yaml.safe_load(result.stdout.split("# run directory:")[0])
    assert config["run"]["name"] == recipe
    assert not any(tmp_path.iterdir())  # --dry-run creates nothing


def test_dry_run_shows_overrides_and_the_quickstart_defaults(altup, tmp_path: Path) -> None:
    result = altup(
        "train", "--dry-run", "model=tiny", "trainer.max_steps=7", f"run.output_dir={tmp_path}"
    )
    config = yaml.safe_load(result.stdout.split("# run directory:")[0])
    assert config["model"]["d_model"] == 256 and config["trainer"]["max_steps"] == 7
    assert config["data"]["name"] == "shakespeare" and config["logger"]["kind"] == "wandb"
    assert f"# run directory: {tmp_path}" in result.stdout
    assert not any(tmp_path.iterdir())


def test_help_shows_examples(altup) -> None:
    result = altup("train", "--help")
    assert result.code == 0
    assert "altup train model=tiny" in result.stdout and "--resume" in result.stdout


BAD = [
    (["modle=tiny"], "modle"),
    (["model=huge"], "model/huge"),
    (["model.width=3"], "model.width"),
    (["+model.width=3"], "width"),
    (["model.d_model=wide"], "expected int"),
    (["trainer.max_steps=0"], "max_steps must be positive"),
    (["trainer.max_steps=1.5"], "expected int"),
    (["model.n_heads=3"], "does not divide"),
    (["data.seq_len=5000"], "exceeds model.max_seq_len"),
    (["data.val_fraction=1.5"], "val_fraction"),
    (["optim.lr=-1"], "lr must be positive"),
    (["data=text"], "data.path is required"),
    (["data=text", "data.path=/no/such/file.txt"], "no text files"),
    (["tokenizer=file", "tokenizer.path=/no/such/dir"], "does not exist"),
    (["logger.mode=sometimes"], "logger.mode"),
    (["altup=k2", "altup.K=0"], "altup.K must be >= 1"),
    (["altup=sequence_s2", "altup.stride=0"], "altup.stride must be >= 1"),
    (["altup=k3"], "altup/k3"),
    (["altup=k2", "altup.readout=wide"], "altup.readout"),
    (["ffn=peer", "ffn.num_experts=1000"], "ffn.num_experts must be a perfect square"),
    (["ffn=peer", "ffn.num_experts=64", "ffn.topk=9"], "exceeds √ffn.num_experts = 8"),
    (["ffn=pkm", "ffn.d_key=33"], "ffn.d_key must be even"),
    (["ffn=peer", "ffn.heads=0"], "ffn.heads must be >= 1"),
    (["ffn=peer", "ffn.layers=first"], "ffn.layers must be all, middle or a list"),
    (["ffn=peer", "ffn.layers=[0,7]"], "ffn.layers: [7] out of range"),
    (["ffn=moe", "ffn.topk=9"], "ffn.topk=9 exceeds ffn.num_experts=8"),
    (["ffn=moe", "ffn.routing=random"], "ffn.routing"),
    (["ffn=sparse"], "ffn/sparse"),
    (["ffn=peer", "trainer=fsdp"], "ffn=peer does not support trainer.strategy=fsdp"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_bad_input_is_one_line_and_exit_2(
    altup, overrides: list[str], message: str, tmp_path: Path, cache_dir: Path
) -> None:
    result = altup("train", *overrides, f"run.output_dir={tmp_path}", f"run.cache_dir={cache_dir}")
    assert result.code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # no run directory left behind


def test_unknown_recipe(altup) -> None:
    result = altup("train", "--recipe", "nope")
    assert result.code == 2 and "unknown recipe 'nope'" in result.stderr


class _Evil:
    def __reduce__(self):  # would run code if the checkpoint were unpickled blindly
        return (Path("/tmp/altup-pwned").touch, ())


@pytest.mark.parametrize("kind", ["missing", "garbage", "foreign", "pickled-code"])
def test_bad_resume_checkpoints(
    altup, kind: str, tmp_path: Path, corpus_dir: Path, cache_dir: Path
) -> None:
    ckpt = tmp_path / "x.ckpt"
    if kind == "garbage":
        ckpt.write_bytes(b"\x00not a checkpoint")
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, ckpt)
    elif kind == "pickled-code":
        ckpt.write_bytes(pickle.dumps({"altup": _Evil(), "state_dict": {}}))
    before = sorted(p.name for p in tmp_path.iterdir())
    outputs = tmp_path / "outputs"
    result = altup("train", "--resume", str(ckpt), *tiny_overrides(corpus_dir, cache_dir, outputs))
    assert result.code == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not Path("/tmp/altup-pwned").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_resume_auto_without_earlier_run_starts_fresh(altup, tmp_path: Path) -> None:
    result = altup("train", "--dry-run", "--resume", "auto", f"run.output_dir={tmp_path}")
    assert result.code == 0 and "starting a new one" in result.stderr
