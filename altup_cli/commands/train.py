"""`altup train`: compose the config, continue a run if asked, validate, train."""

from __future__ import annotations

import sys

HELP = """
Hydra overrides select config groups (`model=tiny`) and set keys (`trainer.max_steps=200`).

**Examples**

* `altup train` — the quickstart: nano model, Shakespeare, 300 steps on CPU.

* `altup train model=tiny trainer.max_steps=200 data=text data.path=my.txt`

* `altup train --recipe mini-bible logger=csv`

* `altup train --dry-run model=base trainer=ddp` — print the config and run dir only.

* `altup train --resume auto` — continue the newest run of the same name.

* `altup train --resume outputs/2026-11-22/10-00-00_quickstart trainer.max_steps=600`

* `altup train model=nano growth=nano_to_tiny` — grow to the tiny shape at step 100.

Groups: model (nano tiny mini small base), data (shakespeare bible wiki text hf),
tokenizer (bpe gpt2 file), trainer (default ddp ddp_cpu fsdp), logger (wandb csv),
growth (none nano_to_tiny deepen).
"""


def train(overrides: list[str], recipe: str | None, dry_run: bool, resume: str | None) -> None:
    from omegaconf import OmegaConf

    from altup_cli.runs.checkpoint import run_dir_of
    from altup_cli.runs.request import plan_run
    from altup_cli.runs.rundir import planned_run_dir

    request = plan_run(overrides, recipe, resume)
    if dry_run:
        print(OmegaConf.to_yaml(request.cfg), end="")
        ckpt = request.checkpoint
        target = run_dir_of(ckpt) if ckpt is not None else planned_run_dir(request.settings)
        print(f"# run directory: {target}")
        return
    from altup_cli.evaluation.during_training import during_training_callbacks
    from altup_cli.training.run import train as run_training

    run_training(request, argv=sys.argv, callbacks=during_training_callbacks(request.settings))
