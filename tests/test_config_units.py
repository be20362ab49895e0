"""Unit tests of the config package's pieces and the shared checks in altup_cli.errors:
each catches a bug the CLI table would only see through a whole command (or not at all)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from altup_cli.config import (
    LR_POLICIES,
    MIN_VOCAB_SIZE,
    compose_config,
    compose_named,
    hydra_error_line,
    model_preset,
    validate,
)
from altup_cli.config import resources as config_resources
from altup_cli.config.schema import RunSettings, read_section
from altup_cli.errors import UserError, check_choice, choices_text, require

PACKAGE = Path(__file__).resolve().parent.parent / "altup_cli"

# --- require / check_choice -------------------------------------------------------------


def test_require_raises_the_message_only_when_the_condition_fails() -> None:
    require(True, "never raised")
    with pytest.raises(UserError, match=r"^data\.seq_len must be positive$"):
        require(False, "data.seq_len must be positive")


def test_require_raises_the_error_type_a_plain_layer_asks_for() -> None:
    """models/ raise ValueError so their callers can add where a value came from."""
    with pytest.raises(ValueError, match="bad width") as info:
        require(False, "bad width", ValueError)
    assert not isinstance(info.value, UserError)


@pytest.mark.parametrize(
    ("choices", "one_of", "text"),
    [
        (("bpe",), False, "bpe"),
        (("continue", "rewarm"), False, "continue or rewarm"),
        (("wandb", "csv", "none"), False, "wandb, csv or none"),
        (("a", "b", "c"), True, "one of a, b, c"),
    ],
)
def test_choices_text_reads_as_english(choices: tuple[str, ...], one_of: bool, text: str) -> None:
    assert choices_text(choices, one_of) == text


def test_check_choice_names_the_key_the_choices_and_the_value() -> None:
    check_choice("rewarm", LR_POLICIES, "growth.lr_policy")
    with pytest.raises(UserError) as info:
        check_choice("restart", LR_POLICIES, "--lr-policy")
    assert str(info.value) == "--lr-policy must be continue or rewarm, got 'restart'"
    with pytest.raises(UserError) as info:
        check_choice("pbs", ("local", "slurm"), "--executor", one_of=True)
    assert str(info.value) == "--executor must be one of local, slurm, got 'pbs'"
    with pytest.raises(ValueError, match=r"ffn\.kind must be dense or moe, got 'x'"):
        check_choice("x", ("dense", "moe"), "ffn.kind", error=ValueError)


def test_check_choice_does_not_accept_a_prefix_or_a_different_case() -> None:
    for value in ("continu", "Continue", "continue ", None):
        with pytest.raises(UserError):
            check_choice(value, LR_POLICIES, "growth.lr_policy")


# --- compose ----------------------------------------------------------------------------


class _Wrapped(Exception):
    def __str__(self) -> str:
        return ""


def test_hydra_error_line_lists_the_options_of_an_unknown_group() -> None:
    err = ValueError(
        "In 'config': Could not find 'model/nope'\n\nAvailable options in 'model':\n"
        "\tbase\n\ttiny\nConfig search path:\n\tprovider=hydra, path=pkg://hydra.conf\n"
    )
    assert hydra_error_line(err) == (
        "In 'config': Could not find 'model/nope' (available: base, tiny)"
    )


def test_hydra_error_line_keeps_the_append_hint_and_reads_an_empty_error_s_cause() -> None:
    err = ValueError("Could not override 'foo'.\nTo append to your config use +foo=1")
    assert hydra_error_line(err) == (
        "Could not override 'foo'. (unknown key; to append to your config use +foo=1)"
    )
    wrapped = _Wrapped()
    wrapped.__cause__ = RuntimeError("first line\nsecond line")
    assert hydra_error_line(wrapped) == "first line"
    assert hydra_error_line(_Wrapped()) == "_Wrapped"


def test_compose_named_turns_hydra_errors_into_one_config_line() -> None:
    with pytest.raises(UserError) as info:
        compose_named("config", ["model=nope"])
    assert str(info.value).startswith("config: In 'config': Could not find 'model/nope'")
    assert "\n" not in str(info.value) and "tiny" in str(info.value)
    assert compose_named("config", ["run.seed=7"]).run.seed == 7


def test_model_preset_reads_the_yaml_and_names_the_presets_when_unknown() -> None:
    assert model_preset("tiny")["d_model"] > 0
    with pytest.raises(UserError, match=r"unknown model preset 'huge' \(available: .*tiny"):
        model_preset("huge")


# --- schema -----------------------------------------------------------------------------


def test_read_section_refuses_unknown_missing_and_mistyped_keys() -> None:
    good = {"name": "r", "seed": 1, "output_dir": "o", "cache_dir": "c", "compile": False}
    assert read_section(RunSettings, good, "run") == RunSettings("r", 1, "o", "c", False)
    with pytest.raises(UserError, match=r"^run: unknown key\(s\) colour$"):
        read_section(RunSettings, {**good, "colour": 1}, "run")
    with pytest.raises(UserError, match=r"^run: missing key\(s\) seed$"):
        read_section(RunSettings, {k: v for k, v in good.items() if k != "seed"}, "run")
    with pytest.raises(UserError, match=r"^run\.seed: expected int, got 1\.5$"):
        read_section(RunSettings, {**good, "seed": 1.5}, "run")
    with pytest.raises(UserError, match="run: expected a mapping"):
        read_section(RunSettings, [1], "run")


def test_model_config_without_a_tokenizer_uses_the_smallest_vocabulary() -> None:
    s = validate(compose_config([]))
    assert s.model.get("vocab_size") is None
    assert s.model_config().vocab_size == -(-MIN_VOCAB_SIZE // 64) * 64 == 320
    assert s.model_config(1000).vocab_size == 1024
    # A set model.vocab_size is what is checked before the tokenizer exists, even a small one.
    assert validate(compose_config(["model.vocab_size=100"])).model_config().vocab_size == 100
    fixed = validate(compose_config(["model.vocab_size=512"]))
    assert fixed.model_config().vocab_size == 512
    with pytest.raises(UserError, match=r"model\.vocab_size=512 is below the tokenizer's 600"):
        fixed.model_config(600)


# --- growth -----------------------------------------------------------------------------


def test_growth_schedule_events_are_checked_against_the_model_they_meet() -> None:
    ok = 'growth.schedule=[{step: 2, ops: ["mlp_width=1024"]}, {step: 4, ops: ["layers=+1"]}]'
    assert len(validate(compose_config([ok, "trainer.max_steps=10"])).growth.pending()) == 2
    both = 'growth.schedule=[{step: 2, ops: ["layers=+1"], to: small}]'
    with pytest.raises(UserError, match=r"growth.schedule\[0\]: give exactly one of ops or to"):
        validate(compose_config([both, "trainer.max_steps=10"]))
    late = 'growth.schedule=[{step: 10, ops: ["layers=+1"]}]'
    with pytest.raises(UserError, match=r"step 10 is not below trainer.max_steps=10"):
        validate(compose_config([late, "trainer.max_steps=10"]))


# --- resources --------------------------------------------------------------------------


def test_require_devices_refuses_a_gpu_config_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config_resources.require_devices(validate(compose_config(["trainer.accelerator=cpu"])))
    gpu = validate(compose_config(["trainer.accelerator=gpu"]))
    with pytest.raises(UserError, match=r"trainer\.accelerator=gpu needs a CUDA GPU"):
        config_resources.require_devices(gpu)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    config_resources.require_devices(gpu)


# --- layering ---------------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["models", "growth", "data", "glue"])
def test_lower_layers_never_import_the_config_package(layer: str) -> None:
    """models <- growth/data/glue <- config: an import of config below it is a circle."""
    for path in sorted((PACKAGE / layer).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            bad = [n for n in names if n == "altup_cli.config" or n.startswith("altup_cli.config.")]
            assert not bad, f"{path.relative_to(PACKAGE)} imports {bad[0]}"


def test_the_config_package_imports_nothing_above_it() -> None:
    above = ("altup_cli.training", "altup_cli.runs", "altup_cli.commands", "altup_cli.cli",
             "altup_cli.sweep", "altup_cli.bench", "altup_cli.evaluation")  # fmt: skip
    for path in sorted((PACKAGE / "config").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(above), f"{path.name} imports {node.module}"


def test_the_settings_types_import_without_hydra() -> None:
    """runs/ and training/ import Settings; the benchmark's measuring processes import
    runs/ and must not carry Hydra in their peak memory."""
    import subprocess
    import sys

    code = (
        "import sys; from altup_cli.config import Settings, require_fits, check_type;"
        "assert 'hydra' not in sys.modules, 'hydra imported';"
        "from altup_cli.config import validate, compose_config, growth_events, hydra_error_line;"
        "import altup_cli.config as c, altup_cli.config.validation as v;"
        "assert callable(validate) and c.validate is v.validate is validate;"
        "assert callable(hydra_error_line) and 'hydra' in sys.modules;"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import altup_cli.config as config

        _ = config.nope


def test_a_gpu_config_s_size_is_checked_at_launch_not_in_validate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A GPU-scale recipe dry-runs on a small CPU machine (its size is checked at launch,
    against the GPUs there); the same model on the CPU is refused by validate."""
    monkeypatch.setattr(config_resources, "memory_bytes", lambda: 2**20)  # 1 MiB here
    validate(compose_config(["trainer.accelerator=gpu"]))
    with pytest.raises(UserError, match="GiB for weights, gradients and Adam state"):
        validate(compose_config(["trainer.accelerator=cpu"]))
    with pytest.raises(UserError, match="GiB for weights, gradients and Adam state"):
        validate(compose_config([]))  # auto: the CPU here
