"""Every recipe trains for two steps, shrunk to seconds on the test corpus but keeping what
it is about: its AltUp, feed-forward and growth choices, and each of its `altup compare`
variants. Also: every recipe that `altup train --help` names exists."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from altup_cli.compare import recipe_variants
from altup_cli.config import compose_config, list_recipes, model_preset
from altup_cli.growth.ops import PRESET_FIELDS
from altup_cli.sweep.plan import ARCHS
from tests.helpers.prose import tiny_overrides
from tests.test_train import _run_dir

# What a CPU test machine cannot have (the hub, GPUs, big vocabularies): replaced, per
# recipe, on top of tiny_overrides (tiny dims, data=text on the test corpus, 2 steps).
OFFLINE = {
    "base-fineweb": ["tokenizer=bpe", "trainer=default"],
    "peer-table1": ["tokenizer=bpe", "trainer=default"],
}
COMPARED = {"altup-vs-dense"}  # run by `altup compare` with its default AltUp trio
SUBPROCESS = {"ddp-cpu-smoke"}  # DDP launches its ranks by re-running the command
KEPT = ("altup", "ffn")  # config groups whose every value must survive the shrinking


def _variants(recipe: str) -> list[list[str]]:
    """What the recipe trains, as override lists: its isoFLOP sweep's archs, its `altup
    compare` variants, or just itself."""
    cfg = compose_config([], recipe)
    if cfg.get("sweep"):
        return [ARCHS[arch] for arch in cfg["sweep"]["arch"]]
    if cfg.get("variants") or recipe in COMPARED:
        return [shlex.split(v) for v in recipe_variants([], recipe)]
    return [[]]


def _growth_to_one_step(overrides: list[str], recipe: str) -> list[str]:
    """Every growth event of the composed config moved to step 1 (of 2)."""
    schedule = compose_config(overrides, recipe)["growth"]["schedule"]
    return [f"growth.schedule.{i}.step=1" for i in range(len(schedule))]


def _train(altup: Any, recipe: str, args: list[str], out: Path) -> Path:
    if recipe in SUBPROCESS:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "altup_cli.cli", "train", "--recipe", recipe, *args]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    else:
        result = altup("train", "--recipe", recipe, *args)
        assert result.code == 0, result.stderr
    return _run_dir(out)


def _check_kept(run: Path, recipe: str, variant: list[str]) -> None:
    """The trained run kept the recipe's altup and ffn settings and growth targets."""
    wanted = compose_config(variant, recipe)
    ran = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    for group in KEPT:
        assert ran[group] == wanted[group], (recipe, variant, group)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 2 and metrics["train_loss"] is not None
    events = list(wanted["growth"]["schedule"])
    applied = metrics["growth"]
    assert [e["step"] for e in applied] == [1] * len(events)
    for event, done in zip(events, applied, strict=True):
        assert done["max_abs_dlogits"] <= 1e-5, done
        if "to" in event:
            _check_preset_shape(run, model_preset(event["to"]))


def _check_preset_shape(run: Path, preset: dict[str, Any]) -> None:
    import altup_cli

    _, cfg = altup_cli.load(run)
    heads = preset["n_heads"]
    expected = {**preset, "head_dim": preset["head_dim"] or preset["d_model"] // heads}
    expected["v_head_dim"] = preset["v_head_dim"] or preset["d_model"] // heads
    assert {f: getattr(cfg, f) for f in PRESET_FIELDS} == {f: expected[f] for f in PRESET_FIELDS}


@pytest.mark.parametrize("recipe", list_recipes())
def test_every_recipe_trains_two_steps(
    altup, recipe: str, corpus_dir: Path, cache_dir: Path, tmp_path: Path
) -> None:
    for i, variant in enumerate(_variants(recipe)):
        out = tmp_path / f"variant{i}"
        args = [*OFFLINE.get(recipe, []), *variant]
        args += [*tiny_overrides(corpus_dir, cache_dir, out, steps=2), "logger=none"]
        args += _growth_to_one_step(variant, recipe)
        run = _train(altup, recipe, args, out)
        _check_kept(run, recipe, variant)


def test_every_recipe_named_in_the_train_help_exists(altup) -> None:
    result = altup("train", "--help")
    assert result.code == 0
    named = set(re.findall(r"--recipe[\s=]+([a-z][\w.-]*)", result.stdout))
    assert named and named <= set(list_recipes()), named - set(list_recipes())


def test_the_train_help_names_existing_groups_and_the_growth_config_step() -> None:
    from altup_cli.commands.train import HELP as TRAIN_EXAMPLES
    from altup_cli.config import conf_dir

    text = " ".join(TRAIN_EXAMPLES.split())
    groups = re.findall(r"(\w+) \(([\w ]+)\)", text.split("Groups:")[1])
    assert len(groups) >= 6
    for group, options in groups:
        missing = [o for o in options.split() if not (conf_dir() / group / f"{o}.yaml").is_file()]
        assert not missing, (group, missing)
    (step,) = re.findall(r"growth=nano_to_tiny` — grow to the tiny shape at step (\d+)", text)
    schedule = yaml.safe_load((conf_dir() / "growth" / "nano_to_tiny.yaml").read_text())
    assert [e["step"] for e in schedule["schedule"]] == [int(step)]
