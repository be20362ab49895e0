"""The command line: every recipe composes, and bad input is one line + exit code 2."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import yaml

from altup_cli.config import list_recipes
from tests.helpers.prose import tiny_overrides


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
    # Found by driving the tool as a hostile user (each printed a traceback or wrote outside
    # the output tree).
    (["run.name=../../../x"], "run.name must be"),
    (["run.name=a/b"], "no path separators"),
    (["run.name=" + "x" * 300], "run.name must be 1-100"),
    (["run.name=.hidden"], "run.name must be"),
    (["optim.lr=inf"], "optim.lr: expected a finite number"),
    (["optim.lr=nan"], "optim.lr: expected a finite number"),
    (["optim.lr=1e400"], "finite"),
    (["model.d_model=1000000"], "GiB for weights, gradients and Adam state"),
    (["trainer.precision=fp7"], "trainer.precision must be one of"),
    (["trainer.strategy=banana"], "trainer.strategy must be one of"),
    (["data.encoding=klingon"], "unknown encoding 'klingon'"),
    (["trainer.divergence_patience=-1"], "divergence_patience must be >= 0"),
    # Every other value check of the config.
    (["trainer.accumulate_grad_batches=0"], "accumulate_grad_batches must be positive"),
    (["trainer.val_check_interval=0"], "val_check_interval must be positive"),
    (["trainer.limit_val_batches=-1"], "limit_val_batches must be >= 0"),
    (["trainer.log_every_n_steps=0"], "log_every_n_steps must be positive"),
    (["trainer.num_nodes=0"], "num_nodes must be positive"),
    (["trainer.devices=0"], "trainer.devices must be a positive int"),
    (["trainer.accelerator=abacus"], "trainer.accelerator must be"),
    (["data.source=ftp"], "data.source must be"),
    (["data=hf"], "data.name is required with data=hf"),
    (["data.name=null"], "data.name is required with data.source=embedded"),
    (["tokenizer=file"], "tokenizer.path is required"),
    (["data.seq_len=0"], "data.seq_len must be positive"),
    (["data.batch_size=0"], "data.batch_size must be positive"),
    (["data.num_workers=-1"], "num_workers must be >= 0"),
    (["tokenizer.kind=sentencepiece"], "tokenizer.kind must be bpe or file"),
    (["tokenizer.vocab_size=100"], "vocab_size must be at least 257"),
    (["optim.min_lr_ratio=2"], "min_lr_ratio must be in [0, 1]"),
    (["optim.warmup_steps=-1"], "warmup_steps must be >= 0"),
    (["optim.schedule_steps=0"], "schedule_steps must be positive"),
    (["optim.grad_clip=-1"], "grad_clip must be >= 0"),
    (["optim.beta2=1"], "beta2 must be in [0, 1)"),
    (["logger.kind=tensorboard"], "logger.kind must be wandb, csv or none"),
    (["growth.lr_policy=restart"], "growth.lr_policy must be continue or rewarm"),
    (["growth.rewarm_steps=0"], "rewarm_steps must be positive"),
    (["growth=nano_to_tiny", "trainer.max_steps=100"], "would never apply"),
    (["growth=nano_to_tiny", "trainer=ddp_cpu"], "growth.schedule runs on one device"),
    (["+extra=1"], "unknown top-level key"),
]


def _tree(*roots: Path) -> dict[str, bytes]:
    """Every file's bytes, except the cache's (empty) lock file that data preparation takes."""
    return {
        str(p): p.read_bytes()
        for root in roots
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


@pytest.mark.parametrize(("overrides", "message"), BAD)
def test_bad_input_is_one_line_and_exit_2(
    altup, overrides: list[str], message: str, tmp_path: Path, cache_dir: Path
) -> None:
    before = _tree(cache_dir)
    result = altup("train", *overrides, f"run.output_dir={tmp_path}", f"run.cache_dir={cache_dir}")
    assert result.code == 2
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir())  # no run directory left behind
    assert _tree(cache_dir) == before


@pytest.mark.parametrize("key", ["run.output_dir", "run.cache_dir"])
@pytest.mark.parametrize("where", ["file", "below a file"])
def test_a_directory_setting_that_names_a_file_is_one_line(
    altup, key: str, where: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "results.txt"
    blocker.write_text("an earlier result\n")
    target = blocker if where == "file" else blocker / "sub"
    other = "run.cache_dir" if key == "run.output_dir" else "run.output_dir"
    before = _tree(tmp_path)
    result = altup("train", f"{key}={target}", f"{other}={tmp_path / 'other'}")
    assert result.code == 2 and f"{key}=" in result.stderr and "is a file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert _tree(tmp_path) == before


def test_a_corpus_shorter_than_two_sequences_leaves_no_run_directory(
    altup, tmp_path: Path, cache_dir: Path
) -> None:
    text = tmp_path / "short.txt"
    text.write_text("The old king speaks of the sea. " * 4)
    outputs = tmp_path / "outputs"
    args = tiny_overrides(text, cache_dir, outputs)
    result = altup("train", *args, "data.seq_len=64")
    assert result.code == 2 and "fewer than 2 sequences" in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert not outputs.exists()


def test_unknown_recipe(altup) -> None:
    result = altup("train", "--recipe", "nope")
    assert result.code == 2 and "unknown recipe 'nope'" in result.stderr


class _Evil:
    def __reduce__(self):  # would run code if the checkpoint were unpickled blindly
        return (Path("/tmp/altup-pwned").touch, ())


@pytest.mark.parametrize("kind", ["missing", "garbage", "text", "foreign", "pickled-code"])
def test_bad_resume_checkpoints(
    altup, kind: str, tmp_path: Path, corpus_dir: Path, cache_dir: Path
) -> None:
    ckpt = tmp_path / "x.ckpt"
    if kind == "garbage":
        ckpt.write_bytes(b"\x00not a checkpoint")
    elif kind == "text":  # torch.load raised KeyError: 105 on it
        ckpt.write_text("it was the best of times, it was the worst of times\n")
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
