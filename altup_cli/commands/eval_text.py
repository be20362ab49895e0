"""`altup eval ppl` and `altup eval lambada`: a pretrained model scored on held-out text.

Everything is checked first (settings, model, tokenizer, every corpus or file), then each
corpus is scored and the results go to a rich table, `<kind>.json` beside `config.yaml`
(evaluation/report.py) and one W&B run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from altup_cli.console import say
from altup_cli.errors import UserError, check_choice

HELP_PPL = """Perplexity and bits per byte of a checkpoint on held-out text.

Each `--data` is an embedded corpus (`shakespeare`, `bible`, `wiki`: its held-out split,
exactly the sequences a run trained on it holds out for validation), local text
(`text:PATH`, a file, directory or glob; `--format file`: one document per file, `line`:
one per non-blank line) or a Hugging Face dataset (`hf:NAME[:CONFIG][@SPLIT]`, a
`save_to_disk` directory or a hub name). Default: the run's own training corpus. A model is
never scored on its own training sequences: its training corpus is scored on the split its
run held out, and `--split all` on it is refused (`--split all` scores other embedded
corpora whole). Text the run did not train on is scored whole; a model without a run
config (a bare export) is flagged *training data unknown*.

Convention: every token is scored exactly once, with windows of the model's context C
starting every `--stride` S tokens (default S = C: disjoint windows), each scoring only the
tokens the previous window did not reach: a token has at least C − S tokens of history,
except at a document's start (documents are scored after an EOS). bits/byte = Σ token
loss (nats) / (ln 2 · UTF-8 bytes of the scored text), comparable across tokenizers.
Settings: conf/eval/ppl.yaml (`eval.batch_size=…`, `eval.device=…`, `eval.text_field=…`).

**Examples**

* `altup eval ppl outputs/2026-11-22/10-00-00_quickstart` — the training corpus's held-out split.

* `altup eval ppl RUN --data shakespeare --data bible --data wiki --stride 64`

* `altup eval ppl RUN --data text:notes/ --format line --max-tokens 100000`

* `altup eval ppl RUN --data hf:Salesforce/wikitext:wikitext-103-raw-v1@test` (network)
"""

HELP_LAMBADA = """LAMBADA last-word accuracy and the final word's perplexity.

`--data` is OpenAI's LAMBADA JSONL (`{"text": "…"}` per line). The final word is the last
whitespace-separated word; it is right when greedy prediction from the context gets every
one of its tokens. Reported beside always guessing the most common final word and the
uniform distribution. Settings: conf/eval/ppl.yaml.

**Examples**

* `altup eval lambada outputs/2026-11-22/10-00-00_quickstart --data lambada_test.jsonl`

* `altup eval lambada RUN/checkpoints/last.ckpt --data lambada_test.jsonl eval.batch_size=32`
"""


def load_scoring_model(checkpoint: str, device: str) -> tuple[Any, Any]:
    """The model (in eval mode, on `device`) and its tokenizer (a UserError otherwise)."""
    from altup_cli.runs.export import load, load_tokenizer

    model, _ = load(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    return model.to(device), tokenizer


def eval_ppl(
    checkpoint: str, data: list[str], split: str, stride: int | None, max_tokens: int | None,
    fmt: str, overrides: list[str], out: str | None,
) -> Path:  # fmt: skip
    from altup_cli.config.eval_text import compose_text_eval_settings, resolve_device
    from altup_cli.data.tokenizer import load_tokenizer as tokenizer_and_eos
    from altup_cli.evaluation import perplexity as ppl
    from altup_cli.evaluation.heldout import (
        FORMATS,
        SPLITS,
        parse_source,
        tokenizer_file,
        training_data,
    )

    check_choice(split, SPLITS, "--split")
    check_choice(fmt, FORMATS, "--format")
    if stride is not None and stride < 1:
        raise UserError(f"--stride must be >= 1, got {stride}")
    if max_tokens is not None and max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    settings, raw = compose_text_eval_settings(overrides)
    device = resolve_device(settings.device)
    model, _ = load_scoring_model(checkpoint, device)
    if stride is not None and stride > model.config.max_seq_len:
        raise UserError(f"--stride {stride} exceeds the model's context {model.config.max_seq_len}")
    trained = training_data(checkpoint)
    if not data and trained is None:
        raise UserError(f"{checkpoint}: no run config to find its training corpus; name --data")
    sources = [parse_source(d) for d in data] or [_own_source(trained)]
    path = tokenizer_file(checkpoint)
    tokenizer, eos = tokenizer_and_eos(path)
    options = ppl.PplOptions(split, stride, max_tokens, fmt, settings.batch_size,
                             settings.text_field, settings.encoding, device)  # fmt: skip
    tok = ppl.RunTokenizer(tokenizer, eos, path)
    cache = Path(settings.cache_dir).expanduser()
    jobs = [ppl.PerplexityTask(s, options, trained, tok, cache) for s in dict.fromkeys(sources)]
    for job in jobs:
        job.prepare()
    header = {"checkpoint": str(checkpoint), "model": model.config.to_dict(),
              "convention": ppl.CONVENTION, "split": split, "stride": stride,
              "max_tokens": max_tokens, "format": fmt}  # fmt: skip
    return _run("ppl", checkpoint, out, settings, raw, header, jobs, model, tokenizer,
                ppl.print_report, ppl.summary)  # fmt: skip


def _own_source(trained: Any) -> Any:
    from altup_cli.evaluation.heldout import Source

    d = trained.data
    if d.source == "text":
        return Source("text", d.path or "")
    if d.source == "hf":
        return Source("hf", d.name or "", d.subset, d.split)
    return Source("embedded", d.name or "")


def eval_lambada(checkpoint: str, data: str, overrides: list[str], out: str | None) -> Path:
    from altup_cli.config.eval_text import compose_text_eval_settings, resolve_device
    from altup_cli.evaluation import lambada

    settings, raw = compose_text_eval_settings(overrides)
    device = resolve_device(settings.device)
    model, tokenizer = load_scoring_model(checkpoint, device)
    from altup_cli.data.tokenizer import EOS

    if tokenizer.token_to_id(EOS) is None:
        raise UserError(f"{checkpoint}: its tokenizer has no {EOS} token to start a passage")
    job = lambada.LambadaTask(data, settings.batch_size, device)
    job.prepare()
    header = {"checkpoint": str(checkpoint), "model": model.config.to_dict(),
              "convention": lambada.__doc__.split("\n\n", 1)[1].replace("\n", " ").strip(),
              "data": str(data)}  # fmt: skip
    return _run("lambada", checkpoint, out, settings, raw, header, [job], model, tokenizer,
                lambada.print_report, lambada.summary)  # fmt: skip


def _run(
    kind: str, checkpoint: str, out: str | None, settings: Any, raw: dict[str, Any],
    header: dict[str, Any], jobs: list[Any], model: Any, tokenizer: Any, show: Any, summary: Any,
) -> Path:  # fmt: skip
    """The shared tail: the report directory, each task scored, the table, W&B."""
    from altup_cli.evaluation.report import EvalReport, log_summary, new_eval_directory
    from altup_cli.training.loggers import make_logger

    run_dir = new_eval_directory(kind, out, settings.output_dir, checkpoint)
    report = EvalReport(kind, run_dir, header)
    report.start({"eval": raw})
    say(f"[bold]altup eval {kind}[/bold] {checkpoint} → {run_dir}")
    logger = make_logger(settings.logger, run_dir, run_dir.name, job_type=f"eval-{kind}",
                         config={"eval": raw})  # fmt: skip
    for job in jobs:
        say(job.describe())
        report.add(job.name, job.evaluate(model, tokenizer, logger), job.baseline_name)
    final = report.finish()
    show(final)
    if logger:
        log_summary(logger, *summary(final))
    say(f"results: {report.path}")
    return run_dir
