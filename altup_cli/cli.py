"""The `altup` command line: thin Typer wrappers around plain functions."""

from __future__ import annotations

import os
import sys

import typer

from altup_cli.cli_eval import eval_app
from altup_cli.commands import bench as bench_cmd
from altup_cli.commands import grow as grow_cmd
from altup_cli.commands import recipes as recipes_cmd
from altup_cli.commands import sweep as sweep_cmd
from altup_cli.commands import train as train_cmd
from altup_cli.errors import UserError

app = typer.Typer(
    name="altup",
    help="Train, grow, sweep and evaluate AltUp / PEER / growth language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)


@app.callback()
def _root() -> None:
    """altup: an experiment runner for efficient-transformer research."""


@app.command(help=train_cmd.HELP, no_args_is_help=False)
def train(
    overrides: list[str] = typer.Argument(
        None, help="Hydra overrides, e.g. model=tiny trainer.max_steps=200"
    ),
    recipe: str | None = typer.Option(
        None, "--recipe", "-r", help="A named experiment from recipes/."
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the composed config and run directory; create nothing."
    ),
    resume: str | None = typer.Option(
        None, "--resume", help="'auto' or a run directory / .ckpt to continue."
    ),
) -> None:
    """Train a language model."""
    train_cmd.train(list(overrides or []), recipe, dry_run, resume)


@app.command(
    help="""Train variants × seeds on the same data and tokens; report paired statistics and plots.

Each `--variant` is a space-separated list of overrides added to the shared ones. Every
variant × seed is an ordinary run in `<dir>/runs/<variant>/<seed>/`; `--vary` says what a
seed changes: model init (`run.seed`), data order and held-out split (`run.data_seed`) or
both. Per variant: mean and sd of the final validation loss, the mean paired difference to
the first variant with a 95% t-interval over seeds, and the seeds it wins. `results.csv`
gets a row as each run finishes: re-running the same command trains only what is missing
and resumes unfinished runs. Plots (loss vs tokens, vs FLOPs, final losses) go beside it.

**Examples**

* `altup compare --recipe altup-vs-dense` — baseline, AltUp K=2, Recycled-AltUp K=2.

* `altup compare --recipe altup-vs-dense --seeds 0,1,2 --executor local --jobs 2`

* `altup compare --recipe altup-vs-dense --variant altup=off --variant "altup=k2 altup.K=4"`

* `altup compare trainer.max_steps=50 --variant altup=off --variant altup=sequence_s2 --vary init`
"""
)
def compare(
    overrides: list[str] = typer.Argument(None, help="Overrides shared by every variant."),
    recipe: str | None = typer.Option(None, "--recipe", "-r", help="A recipe from recipes/."),
    variant: list[str] = typer.Option(
        None,
        "--variant",
        "-v",
        help="Overrides of one variant (repeat the option for each); default: the recipe's "
        "`variants:` list, else altup=off, altup=k2, altup=recycled_k2.",
    ),
    seeds: str | None = typer.Option(
        None, help="Comma-separated seeds, e.g. 0,1,2 (default: recipe's seeds:, else run.seed)."
    ),
    vary: str = typer.Option(
        "both", help="What a seed changes: init (run.seed), data (run.data_seed) or both."
    ),
    executor: str = typer.Option(
        "inprocess", help="inprocess, subprocess, local (--jobs N), slurm or submitit-local."
    ),
    jobs: int = typer.Option(1, help="Parallel local processes (--executor local)."),
    directory: str | None = typer.Option(
        None, "--dir", help="Comparison directory (default <output_dir>/compares/<run.name>)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan; start nothing."),
    partition: str | None = typer.Option(None, help="SLURM partition."),
    gpus_per_node: int = typer.Option(0, help="SLURM GPUs per job."),
    cpus_per_task: int = typer.Option(0, help="CPUs per job (submitit)."),
    timeout_min: int = typer.Option(60, help="Job time limit in minutes (submitit)."),
) -> None:
    """Compare variants under equal data and tokens (exit code 1 if some runs failed)."""
    from altup_cli.compare import RunsFailed
    from altup_cli.compare import compare as run_compare

    try:
        run_compare(
            list(overrides or []), recipe, list(variant or []) or None, seeds, vary, executor,
            jobs, directory, dry_run,
            {"partition": partition, "gpus_per_node": gpus_per_node,
             "cpus_per_task": cpus_per_task, "timeout_min": timeout_min},
        )  # fmt: skip
    except RunsFailed as err:
        print(f"error: {err}", file=sys.stderr)
        raise typer.Exit(1) from None


@app.command(help=grow_cmd.HELP)
def grow(
    checkpoint: str = typer.Argument(..., help="A run directory or a .ckpt written by altup."),
    ops: list[str] = typer.Argument(None, help="Growth ops, e.g. mlp_width=2048 layers=+2."),
    out: str = typer.Option(..., "--out", "-o", help="New run directory (must not exist)."),
    to: str | None = typer.Option(None, "--to", help="Grow to a preset's shape: model=NAME."),
    allow_inexact: bool = typer.Option(
        False, "--allow-inexact", help="Allow ffn.num_experts growth (reports the change)."
    ),
    lr_policy: str = typer.Option(
        "continue", "--lr-policy", help="continue the LR schedule, or rewarm it."
    ),
    rewarm_steps: int | None = typer.Option(
        None, "--rewarm-steps", help="Rewarm length (default: optim.warmup_steps)."
    ),
    seed: int = typer.Option(0, help="Seed of the new (free) weights."),
) -> None:
    """Grow a checkpoint function-preservingly."""
    grow_cmd.grow_checkpoint(
        checkpoint, list(ops or []), out, to, allow_inexact, lr_policy, rewarm_steps, seed
    )


sweep_app = typer.Typer(help="isoFLOP sweeps: plan, run (resumable) and fit.", no_args_is_help=True)
app.add_typer(sweep_app, name="sweep")


@sweep_app.command(
    "isoflop",
    help=sweep_cmd.HELP_ISOFLOP,
)
def sweep_isoflop(
    overrides: list[str] = typer.Argument(None, help="Hydra overrides shared by every point."),
    recipe: str | None = typer.Option(None, "--recipe", "-r", help="A recipe from recipes/."),
    budgets: str | None = typer.Option(None, help="Comma-separated FLOP budgets, increasing."),
    sizes: str | None = typer.Option(None, help="Model presets or d<width>x<layers>."),
    arch: str | None = typer.Option(None, help="dense, moe, pkm, peer, altup_k2, recycled_k2."),
    executor: str = typer.Option(
        "subprocess", help="subprocess, inprocess, local (--jobs N), slurm or submitit-local."
    ),
    jobs: int = typer.Option(1, help="Parallel local processes (--executor local)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan; start nothing."),
    min_steps: int | None = typer.Option(
        None, help="Flag (and skip) points with fewer steps (default: recipe's, else 20)."
    ),
    run_flagged: bool = typer.Option(False, "--run-flagged", help="Train flagged points too."),
    directory: str | None = typer.Option(
        None, "--dir", help="Sweep directory (default <output_dir>/sweeps/<run.name>)."
    ),
    partition: str | None = typer.Option(None, help="SLURM partition."),
    gpus_per_node: int = typer.Option(0, help="SLURM GPUs per job."),
    cpus_per_task: int = typer.Option(0, help="CPUs per job (submitit)."),
    timeout_min: int = typer.Option(60, help="Job time limit in minutes (submitit)."),
    samples: int = typer.Option(1000, help="Bootstrap resamples for exponent intervals."),
) -> None:
    """Run an isoFLOP sweep (exit code 1 if some points failed)."""
    slurm = {"partition": partition, "gpus_per_node": gpus_per_node,
             "cpus_per_task": cpus_per_task, "timeout_min": timeout_min}  # fmt: skip
    sweep_cmd.isoflop_command(
        list(overrides or []), recipe, budgets, arch, sizes, executor, jobs, dry_run,
        min_steps, run_flagged, directory, slurm, samples,
    )  # fmt: skip


@sweep_app.command("analyze")
def sweep_analyze(
    directory: str = typer.Argument(..., help="A sweep directory (with results.csv)."),
    samples: int = typer.Option(1000, help="Bootstrap resamples for exponent intervals."),
) -> None:
    """Fit and plot a sweep's results: parabolas per budget, power laws across budgets."""
    sweep_cmd.analyze_command(directory, samples)


app.add_typer(eval_app, name="eval")


@app.command()
def recipes() -> None:
    """List the named experiments in recipes/."""
    recipes_cmd.recipes()


@app.command(help=bench_cmd.HELP)
def bench(
    ctx: typer.Context,
    models: str = typer.Option("tiny,mini", help="lightning, altup: comma-separated presets."),
    steps: int = typer.Option(20, help="lightning, altup: timed optimizer steps."),
    warmup: int = typer.Option(5, help="lightning, altup: untimed steps before them."),
    repeats: int = typer.Option(
        3, help="lightning: alternating repetitions; peer, decode: interleaved rounds."
    ),
    batch_size: int = typer.Option(
        16, help="Sequences per step (peer: of its full training step, 4 unless given)."
    ),
    seq_len: int = typer.Option(256, help="Tokens per sequence (peer: of its full step)."),
    device: str = typer.Option("auto", help="auto, cpu or cuda (peer: cpu only)."),
    suite: str = typer.Option(
        "lightning",
        help="lightning (vs bare loop), altup (variants), peer (FFN layer) or growth (exactness).",
    ),
    compile: bool = typer.Option(False, "--compile", help="altup: torch.compile the models."),
    d_models: str = typer.Option("256,512", help="peer suite: model widths."),
    experts: str = typer.Option("128,256,512,1024", help="peer suite: √N values."),
    tokens: int = typer.Option(1024, help="peer suite: tokens per layer step."),
    naive_max: int = typer.Option(1024, help="peer suite: largest √N the naive oracle runs at."),
) -> None:
    """Benchmark training-step throughput."""
    from altup_cli.bench import given_options

    bench_cmd.bench(
        suite, given_options(ctx), models=models, steps=steps, warmup=warmup, repeats=repeats,
        batch_size=batch_size, seq_len=seq_len, device=device, compile=compile,
        d_models=d_models, experts=experts, tokens=tokens, naive_max=naive_max,
    )  # fmt: skip


@app.command(
    help="""Complete prompts with a trained model; stream the text as it comes.

Greedy at `--temperature 0`, else sampled from the top-k tokens and the top-p nucleus,
reproducibly for a `--seed`. Several prompts (`--prompts-file`, one per line) and
`--num-samples` run as one batch, printed when done. Each completion stops at the
tokenizer's end-of-text token or after `--max-new-tokens`. Expert-choice MoE models are
refused (their routing is not causal).

**Examples**

* `altup generate outputs/2026-11-22/10-00-00_quickstart --prompt "ROMEO:"`

* `altup generate RUN --prompt "To be" --temperature 0 --max-new-tokens 40` — greedy.

* `altup generate RUN/checkpoints/last.ckpt --prompts-file prompts.txt --num-samples 3
  --top-p 0.9 --seed 1 --json samples.json`
"""
)
def generate(
    model: str = typer.Argument(..., help="A run directory, export directory or .ckpt."),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="The text to complete."),
    prompts_file: str | None = typer.Option(
        None, "--prompts-file", help="A text file of prompts, one per line."
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens per completion."),
    temperature: float = typer.Option(0.8, help="0: greedy; higher: more random."),
    top_k: int = typer.Option(0, "--top-k", help="Sample from the k likeliest tokens (0: all)."),
    top_p: float = typer.Option(
        1.0, "--top-p", help="Sample from the likeliest tokens of total probability p, in (0, 1]."
    ),
    seed: int | None = typer.Option(None, help="Seed of the sampling (default: a random one)."),
    num_samples: int = typer.Option(1, "--num-samples", help="Completions per prompt."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    compile: bool = typer.Option(
        False, "--compile", help="torch.compile the decode step (a static cache)."
    ),
    json_path: str | None = typer.Option(
        None, "--json", help="Write prompts, completions, token counts and tokens/s here."
    ),
) -> None:
    """Generate text with a trained model."""
    from altup_cli.commands.generate import generate as run_generate

    run_generate(
        model, prompt, prompts_file, max_new_tokens, temperature, top_k, top_p, seed,
        num_samples, device, compile, json_path,
    )  # fmt: skip


def main() -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        app()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))


if __name__ == "__main__":
    main()
