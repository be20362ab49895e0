"""`altup generate`: complete prompts with a trained model (run directory, checkpoint or
export), streaming the text of a single completion as it comes; with `--json`, a record of
the prompts, completions, token counts, seed and tokens/s.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from altup_cli.bench.measure import resolve_device
from altup_cli.console import console, say
from altup_cli.errors import UserError, first_line
from altup_cli.files import write_json
from altup_cli.runs.export import load, load_tokenizer
from altup_cli.runs.generation import Generation, encode_rows, generate_text, sampling_settings


def generate(
    target: str,
    prompt: str | None,
    prompts_file: str | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int | None,
    num_samples: int,
    device: str,
    compile: bool,
    json_path: str | None,
) -> Generation:
    """Check the options, load the model and tokenizer, generate and print the completions."""
    sampling = sampling_settings(temperature, top_k, top_p)
    prompts = read_prompts(prompt, prompts_file)
    torch_device = resolve_device(device)
    model, _ = load(target)
    tokenizer = load_tokenizer(target)
    model.to(torch_device)
    encode_rows(model, tokenizer, prompts, max_new_tokens, num_samples)  # refused: nothing printed
    single = len(prompts) == 1 and num_samples == 1
    stream = TextStream(tokenizer) if single else None
    rows = len(prompts) * num_samples
    say(f"[dim]{rows} completion(s) of up to {max_new_tokens} tokens on {torch_device}[/dim]")
    if stream is not None:  # after the header, which would otherwise land after the prompt
        print(prompts[0], end="", flush=True)
    result = generate_text(
        model, tokenizer, prompts, max_new_tokens, sampling, seed, num_samples,
        compile=compile, on_token=None if stream is None else stream.add,
    )  # fmt: skip
    if stream is not None:
        stream.flush()
        print()
    else:
        print_completions(result, num_samples)
    new = sum(c.new_tokens for c in result.completions)
    seconds = result.prefill_seconds + result.decode_seconds
    seeded = "" if sampling.greedy else f", seed {result.seed}"
    rate = f"{result.tokens_per_second:.1f} tokens/s"
    say(f"[dim]{new} new tokens in {seconds:.2f} s ({rate}){seeded}[/dim]")
    if json_path:
        write_record(Path(json_path), target, result, sampling, max_new_tokens, compile)
    return result


def read_prompts(prompt: str | None, prompts_file: str | None) -> list[str]:
    """The one `--prompt`, or each non-blank line of `--prompts-file`."""
    if (prompt is None) == (prompts_file is None):
        raise UserError("give one of --prompt TEXT or --prompts-file FILE")
    if prompt is not None:
        if not prompt:
            raise UserError("--prompt is empty: give at least one token of text")
        return [prompt]
    path = Path(prompts_file).expanduser()  # type: ignore[arg-type]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"--prompts-file {prompts_file}: {first_line(err)}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise UserError(f"--prompts-file {prompts_file}: no prompts in it (one per line)")
    return prompts


class TextStream:
    """Prints a completion's text as its tokens come: decoded in full each time and only
    the new end written, held back while a character is still incomplete."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.tokens, self.printed = tokenizer, [], ""

    def add(self, row: int, token: int) -> None:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd") or not text.startswith(self.printed):
            return
        sys.stdout.write(text[len(self.printed) :])
        sys.stdout.flush()
        self.printed = text

    def flush(self) -> None:
        text = self.tokenizer.decode(self.tokens)
        if text.startswith(self.printed):
            sys.stdout.write(text[len(self.printed) :])
        sys.stdout.flush()


def print_completions(result: Generation, num_samples: int) -> None:
    """Each completion after a dim header on stderr: the prompt and its new text on stdout."""
    for row, c in enumerate(result.completions):
        label = f"prompt {row // num_samples + 1}"
        label += f", sample {c.sample + 1}" if num_samples > 1 else ""
        console.rule(f"[dim]{label} · {c.new_tokens} tokens · {c.stop}[/dim]")
        print(c.prompt + c.text, flush=True)


def write_record(
    path: Path, target: str, result: Generation, sampling: Any, max_new_tokens: int, compile: bool
) -> None:
    record = {
        "model": target,
        "settings": {
            **asdict(sampling), "max_new_tokens": max_new_tokens, "seed": result.seed,
            "compile": compile,
        },
        "completions": [asdict(c) for c in result.completions],
        "new_tokens": sum(c.new_tokens for c in result.completions),
        "prefill_seconds": result.prefill_seconds,
        "decode_seconds": result.decode_seconds,
        "tokens_per_second": result.tokens_per_second,
    }  # fmt: skip
    try:
        write_json(path, record)
    except OSError as err:
        raise UserError(f"--json {path}: {first_line(err)}") from None
    say(f"[dim]wrote {path}[/dim]")
