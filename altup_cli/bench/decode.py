"""`altup bench --suite decode`: inference latency, the metric the AltUp paper states its
gains in. For the baseline, AltUp K=2, Recycled K=2, Sequence-AltUp stride 2, the dense
model of width 2d and PEER in the middle layer (one preset, default mini), at batch 1 and 8:
the prefill time of a prompt, and the latency per new token decoded with the KV cache and
without it (the full forward over the whole prefix for every token), as ratios to the
baseline. With `--compile`, the cached decode step also runs on a static cache, eager and
under `torch.compile`.

Every measurement (a model at a batch size: prefill, cached decode, uncached decode) is one
call of the interleaving, so a slow spell of a shared machine hits every model alike; each
figure is the median over `--repeats` rounds. The uncached latency is the mean of the full
forward at the midpoints of four equal stretches of the new tokens (its cost grows with the
prefix), over the tokens the cached decode chose.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from altup_cli.bench.altup import altup_variants
from altup_cli.bench.lightning import random_batches
from altup_cli.bench.measure import clock, interleave, resolve_device, timed
from altup_cli.console import console, print_table
from altup_cli.models import FFNConfig, ModelConfig, TransformerLM
from altup_cli.models.generation import decoder
from altup_cli.models.kv_cache import KVCache

if TYPE_CHECKING:
    from altup_cli.bench import BenchOptions

DEFAULTS = {"--models": "mini", "--seq-len": 64, "--steps": 256, "--batch-size": 8}
UNCACHED_POINTS = 4


def decode_variants(preset: str, context: int) -> dict[str, ModelConfig]:
    """The altup suite's variants and PEER (its default layer: N = 256², middle layer)."""
    variants = altup_variants(preset, context)
    peer = replace(variants["baseline"], ffn=FFNConfig(kind="peer", layers="middle"))
    return {**variants, "peer_middle": peer}


def run(options: BenchOptions) -> None:
    """The suite's own defaults for the options not given: the mini preset, a 64-token
    prompt, 256 new tokens, batch 1 and 8."""
    o, given = options, options.given
    presets = o.presets if "--models" in given else [str(DEFAULTS["--models"])]
    prompt = o.seq_len if "--seq-len" in given else int(DEFAULTS["--seq-len"])
    new = o.steps if "--steps" in given else int(DEFAULTS["--steps"])
    large = o.batch_size if "--batch-size" in given else int(DEFAULTS["--batch-size"])
    batches = sorted({1, large})
    for preset in presets:
        run_decode_benchmark(preset, prompt, new, batches, o.repeats, o.device, o.compile)


def run_decode_benchmark(
    preset: str,
    prompt_len: int,
    new_tokens: int,
    batches: list[int],
    repeats: int,
    device_name: str = "auto",
    compile: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Prefill and per-token latency of each variant at each batch size, as ratios to the
    baseline (and with `compile`, the cached step eager and compiled on a static cache)."""
    device = resolve_device(device_name)
    models = built(decode_variants(preset, prompt_len + new_tokens), device)
    vocab = models["baseline"].config.vocab_size
    prompts = {b: random_batches(vocab, b, prompt_len - 1, 1)[0].to(device) for b in batches}
    for model in models.values():  # untimed: first calls allocate and pick kernels
        latencies(model, prompts[1], 2, device)
    console.print(
        f"[dim]{preset}: {len(models)} models × batch {', '.join(map(str, batches))}, "
        f"{prompt_len}-token prompt + {new_tokens} new tokens, {repeats} interleaved rounds[/dim]"
    )
    calls = {
        (name, b): _call(latencies, models[name], prompts[b], new_tokens, device)
        for name in models
        for b in batches
    }
    rows = table_rows(interleave(calls, repeats, rotate=True), batches)
    title = f"Decode latency vs baseline — {preset}, {device}, {prompt_len}-token prompt"
    print_table(f"{title}, {new_tokens} new tokens", COLUMNS, rows)
    tables = {"latency": rows}
    if compile:
        tables["compile"] = compiled_rows(models, prompts, new_tokens, repeats, device)
        print_table(
            f"Cached decode step, compiled vs eager — {preset}, {device}",
            COMPILE,
            tables["compile"],
        )
    return tables


def built(cfgs: dict[str, ModelConfig], device: torch.device) -> dict[str, TransformerLM]:
    models = {}
    for name, cfg in cfgs.items():
        torch.manual_seed(0)
        models[name] = TransformerLM(cfg).to(device).eval()
    return models


def _call(fn: Callable[..., Any], *args: Any) -> Callable[[int], Any]:
    return lambda _round: fn(*args)


def latencies(
    model: TransformerLM, prompt: torch.Tensor, new_tokens: int, device: torch.device
) -> dict[str, float]:
    """Seconds of the prefill (cached, and the plain forward) and per new token, greedy,
    with the cache and without it."""
    batch, length = prompt.shape
    with torch.no_grad():
        cache = model.new_cache(batch, length + new_tokens)
        prefill, logits = timed(lambda: model.decode(prompt, cache), device)
        plain, _ = timed(lambda: model(prompt), device)
        tokens = [logits[:, -1].argmax(-1, keepdim=True)]
        start = clock(device)
        for _ in range(new_tokens):
            tokens.append(model.decode(tokens[-1], cache)[:, -1].argmax(-1, keepdim=True))
        cached = (clock(device) - start) / new_tokens
        ids = torch.cat([prompt, *tokens], 1)
        ends = [
            length + int((i + 0.5) * new_tokens / UNCACHED_POINTS) for i in range(UNCACHED_POINTS)
        ]
        uncached = statistics.mean(timed(lambda n=n: model(ids[:, :n]), device)[0] for n in ends)
    return {"prefill": prefill, "prefill_plain": plain, "cached": cached, "uncached": uncached}


def table_rows(
    results: dict[tuple[str, int], list[dict[str, float]]], batches: list[int]
) -> list[dict[str, Any]]:
    """Medians over the rounds, with each figure's ratio to the baseline's at that batch."""
    medians = {
        key: {m: statistics.median(r[m] for r in rounds) for m in rounds[0]}
        for key, rounds in results.items()
    }
    rows = []
    for b in batches:
        base = medians[("baseline", b)]
        for (name, batch), m in medians.items():
            if batch != b:
                continue
            ratios = {f"{k}_ratio": m[k] / base[k] for k in m}
            rows.append(
                {"variant": name, "batch": b, **m, **ratios, "speedup": m["uncached"] / m["cached"]}
            )
    return rows


def compiled_rows(
    models: dict[str, TransformerLM],
    prompts: dict[int, torch.Tensor],
    new_tokens: int,
    repeats: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    """Per-token latency of the cached step: eager (the default cache), eager on a static
    cache, and compiled on a static cache (compiled before the timing), interleaved within
    each model. One model at a time, with dynamo reset between them: every model's step is
    one code object, so compiled together they would share one cache of graphs whose guard
    checks (and recompile limit) slow the first-compiled models' calls."""
    rows = []
    for name, model in models.items():
        rows += _compiled_model_rows(name, model, prompts, new_tokens, repeats, device)
    return rows


def _compiled_model_rows(
    name: str,
    model: TransformerLM,
    prompts: dict[int, torch.Tensor],
    new_tokens: int,
    repeats: int,
    device: torch.device,
) -> list[dict[str, Any]]:
    torch._dynamo.reset()
    console.print(f"[dim]compiling {name}'s decode step[/dim]")
    stepper = decoder(model, compile=True)
    for prompt in prompts.values():  # one graph per batch size, compiled untimed
        static_latency(model, prompt, 2, stepper, device)
    calls: dict[tuple[int, str], Callable[[int], float]] = {}
    for b, prompt in prompts.items():
        calls[(b, "eager")] = _call(
            static_latency, model, prompt, new_tokens, model.decode, device, False
        )
        calls[(b, "static")] = _call(
            static_latency, model, prompt, new_tokens, model.decode, device
        )
        calls[(b, "compiled")] = _call(static_latency, model, prompt, new_tokens, stepper, device)
    results = interleave(calls, repeats, rotate=True)
    rows = []
    for b in prompts:
        eager, static, compiled = (
            statistics.median(results[(b, kind)]) for kind in ("eager", "static", "compiled")
        )
        rows.append({"variant": name, "batch": b, "eager": eager, "static": static,
                     "compiled": compiled, "ratio": compiled / eager})  # fmt: skip
    return rows


def static_latency(
    model: TransformerLM,
    prompt: torch.Tensor,
    new_tokens: int,
    step: Callable[[torch.Tensor, KVCache], torch.Tensor],
    device: torch.device,
    static: bool = True,
) -> float:
    """Seconds per new token of `step` after an eager prefill, on a static cache or not."""
    batch, length = prompt.shape
    with torch.no_grad():
        cache = model.new_cache(batch, length + new_tokens, static=static)
        token = model.decode(prompt, cache)[:, -1].argmax(-1, keepdim=True)
        start = clock(device)
        for _ in range(new_tokens):
            token = step(token, cache)[:, -1].argmax(-1, keepdim=True)
        return (clock(device) - start) / new_tokens


def _ms(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: f"{r[key] * 1e3:.2f}"


def _ratio(key: str) -> Callable[[dict[str, Any]], str]:
    return lambda r: f"{r[key]:.2f}"


COLUMNS = {
    "variant": lambda r: r["variant"],
    "batch": lambda r: str(r["batch"]),
    "prefill ms": _ms("prefill"),
    "prefill ratio": _ratio("prefill_ratio"),
    "no-cache prefill ms": _ms("prefill_plain"),
    "cached ms/token": _ms("cached"),
    "cached ratio": _ratio("cached_ratio"),
    "uncached ms/token": _ms("uncached"),
    "uncached ratio": _ratio("uncached_ratio"),
    "cache speedup": lambda r: f"{r['speedup']:.1f}×",
}
COMPILE = {
    "variant": lambda r: r["variant"],
    "batch": lambda r: str(r["batch"]),
    "eager ms/token": _ms("eager"),
    "static eager ms/token": _ms("static"),
    "compiled ms/token": _ms("compiled"),
    "compiled / eager": _ratio("ratio"),
}
