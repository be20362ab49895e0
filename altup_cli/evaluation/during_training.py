"""Evaluation during training (`trainer.eval`): at every validation whose step is a
multiple of `trainer.eval.every` (and at the last step), perplexity and bits per byte on
the listed corpora and the listed lm-evaluation-harness tasks, logged to the run's loggers
at that step (beside the training curves) and merged into that step's point of the
validation curve (`metrics.json`, checkpoints). Rank 0 evaluates; the other ranks wait.

The scoring is this package's (imported when first needed): `perplexity` for the corpora,
`lm_harness` for tasks. Training does not import this module: the commands that train
(`altup train`, a sweep's or comparison's points) hand `during_training_callbacks(settings)`
to `training.run.train`, so training stays below evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from altup_cli.config import Settings


class DuringTrainingEval(L.Callback):
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.eval = settings.trainer.eval
        self.jobs: list[Any] | None = None
        self.tokenizer: Any = None
        self.evaluated_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.is_global_zero and self.jobs is None:
            self.jobs = self._prepare()

    def _prepare(self) -> list[Any]:
        """The corpora, checked and tokenized (cached) before the first step."""
        from altup_cli.data.tokenizer import load_tokenizer
        from altup_cli.evaluation.heldout import TrainingData, parse_source
        from altup_cli.evaluation.perplexity import PerplexityTask, PplOptions, RunTokenizer
        from altup_cli.runs.data import prepare_data

        s, e = self.settings, self.eval
        path = prepare_data(s).tokenizer_path  # cached by the run's own preparation
        self.tokenizer, eos = load_tokenizer(path)
        seed = s.run.seed if s.run.data_seed is None else s.run.data_seed
        trained = TrainingData(s.data, seed)
        options = PplOptions("val", e.stride, e.max_tokens, batch_size=e.batch_size,
                             progress=False)  # fmt: skip
        tok, cache = RunTokenizer(self.tokenizer, eos, path), Path(s.run.cache_dir).expanduser()
        jobs = [PerplexityTask(parse_source(c), options, trained, tok, cache) for c in e.ppl]
        for job in jobs:
            job.prepare()
        return jobs

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        due = step % self.eval.every == 0 or step >= trainer.max_steps
        if trainer.sanity_checking or step == 0 or not due or step == self.evaluated_step:
            return
        self.evaluated_step = step
        if not trainer.is_global_zero:
            trainer.strategy.barrier()
            return
        metrics = self.evaluate(pl_module.model, str(pl_module.device))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        curve = pl_module.curve
        if curve and curve[-1]["step"] == step:
            curve[-1].update(metrics)
        trainer.strategy.barrier()

    def evaluate(self, model: Any, device: str) -> dict[str, float]:
        """`eval/<corpus>/{loss,ppl,bits_per_byte}` and `eval/<task>/<metric>`."""
        import torch

        was_training = model.training
        model.eval()
        out: dict[str, float] = {}
        try:
            with torch.no_grad():
                for job in self.jobs or []:
                    job.options = _on(job.options, device)
                    result = job.evaluate(model, self.tokenizer, None)
                    for metric, value in result.metrics.items():
                        out[f"eval/{job.source.slug}/{metric}"] = value
                if self.eval.tasks:
                    out |= self._tasks(model, device)
        finally:
            model.train(was_training)
        return out

    def _tasks(self, model: Any, device: str) -> dict[str, float]:
        from altup_cli.evaluation.lm_harness import evaluate_tasks

        e = self.eval
        results = evaluate_tasks(model, self.tokenizer, list(e.tasks), limit=e.limit,
                                 num_fewshot=e.num_fewshot, batch_size=e.batch_size,
                                 device=device)  # fmt: skip
        return {f"eval/{task}/{metric}": float(value)
                for task, metrics in results.items() for metric, value in metrics.items()
                if isinstance(value, (int, float))}  # fmt: skip


def _on(options: Any, device: str) -> Any:
    from dataclasses import replace

    return replace(options, device=device)


def during_training_callbacks(settings: Settings) -> list[L.Callback]:
    """What `training.run.train` adds for `trainer.eval` (nothing while `every` is 0)."""
    return [DuringTrainingEval(settings)] if settings.trainer.eval.every else []
