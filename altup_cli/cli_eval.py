"""`altup eval …`: the evaluation sub-commands' Typer wrappers (glue, lm, ppl, lambada);
their bodies are plain functions in `altup_cli.commands`. `altup_cli.cli` mounts `eval_app`.
"""

from __future__ import annotations

import typer

from altup_cli.commands import eval as eval_cmd
from altup_cli.commands import eval_lm as eval_lm_cmd
from altup_cli.commands import eval_text as eval_text_cmd

eval_app = typer.Typer(help="Evaluate pretrained checkpoints.", no_args_is_help=True)


@eval_app.command(
    "glue",
    help=eval_cmd.HELP_GLUE,
)
def eval_glue(
    checkpoint: str = typer.Argument(
        ..., help="A run directory, export directory or .ckpt written by altup."
    ),
    overrides: list[str] = typer.Argument(None, help="Settings, e.g. eval.epochs=5."),
    tasks: str = typer.Option(
        "all", help="Comma-separated: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli; or all."
    ),
    data_dir: str = typer.Option(
        "glue_data",
        "--data-dir",
        help="GLUE's TSV layout (TASK/train.tsv, dev.tsv; MNLI dev_matched.tsv, "
        "dev_mismatched.tsv); with eval.source=hf a save_to_disk directory or a hub name.",
    ),
    out: str | None = typer.Option(
        None,
        "--out",
        "-o",
        help="Result directory (default OUTPUT_DIR/glue/TIME_RUN); must not exist.",
    ),
) -> None:
    """Fine-tune and score a checkpoint on GLUE."""
    eval_cmd.eval_glue(checkpoint, tasks, data_dir, list(overrides or []), out)


@eval_app.command("lm", help=eval_lm_cmd.HELP_LM)
def eval_lm(
    checkpoint: str = typer.Argument(
        ..., help="A run directory, export directory or .ckpt written by altup."
    ),
    overrides: list[str] = typer.Argument(None, help="Settings, e.g. eval.logger.kind=none."),
    tasks: str = typer.Option(
        ..., help="Comma-separated lm-eval task names, e.g. arc_easy,hellaswag,copa."
    ),
    limit: int | None = typer.Option(None, help="Score the first N examples of each task."),
    num_fewshot: int | None = typer.Option(
        None, "--num-fewshot", help="Examples in each prompt (default: the task's own, 0)."
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Requests per forward pass."),
    device: str = typer.Option("cpu", help="cpu, cuda, cuda:1, mps."),
    out: str | None = typer.Option(
        None, "--out", "-o", help="Result directory (default OUTPUT_DIR/lm/TIME_RUN); must be new."
    ),
) -> None:
    """Zero-shot benchmarks through lm-evaluation-harness."""
    eval_lm_cmd.eval_lm(checkpoint, tasks, limit, num_fewshot, batch_size, device,
                        list(overrides or []), out)  # fmt: skip


@eval_app.command("ppl", help=eval_text_cmd.HELP_PPL)
def eval_ppl(
    checkpoint: str = typer.Argument(
        ..., help="A run directory, export directory or .ckpt written by altup."
    ),
    overrides: list[str] = typer.Argument(None, help="Settings, e.g. eval.batch_size=32."),
    data: list[str] = typer.Option(
        None,
        "--data",
        "-d",
        help="shakespeare | bible | wiki | text:PATH | hf:NAME[:CONFIG][@SPLIT] (repeat for "
        "several; default: the run's training corpus).",
    ),
    split: str = typer.Option(
        "val", help="val: held-out splits; all: embedded corpora whole (never the training one)."
    ),
    stride: int | None = typer.Option(
        None, help="Tokens between window starts, 1..context (default: the context)."
    ),
    max_tokens: int | None = typer.Option(
        None, "--max-tokens", help="Score at most this many tokens per corpus."
    ),
    fmt: str = typer.Option(
        "file", "--format", help="text: one document per file, or per non-blank line."
    ),
    out: str | None = typer.Option(
        None, "--out", "-o", help="Result directory (default OUTPUT_DIR/ppl/TIME_RUN); must be new."
    ),
) -> None:
    """Perplexity and bits per byte on held-out text."""
    eval_text_cmd.eval_ppl(checkpoint, list(data or []), split, stride, max_tokens, fmt,
                           list(overrides or []), out)  # fmt: skip


@eval_app.command("lambada", help=eval_text_cmd.HELP_LAMBADA)
def eval_lambada(
    checkpoint: str = typer.Argument(
        ..., help="A run directory, export directory or .ckpt written by altup."
    ),
    overrides: list[str] = typer.Argument(None, help="Settings, e.g. eval.batch_size=32."),
    data: str = typer.Option(..., "--data", "-d", help='LAMBADA JSONL: {"text": ...} per line.'),
    out: str | None = typer.Option(
        None, "--out", "-o", help="Result directory (default OUTPUT_DIR/lambada/TIME_RUN)."
    ),
) -> None:
    """LAMBADA last-word accuracy and perplexity."""
    eval_text_cmd.eval_lambada(checkpoint, data, list(overrides or []), out)
