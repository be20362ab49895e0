"""Runs on disk: the sole owner of the run directory and checkpoint format.

`rundir` names and claims run directories and is the only reader and writer of `run.json`
and `.hydra/{config,overrides}.yaml`; `checkpoint` reads checkpoints without unpickling,
resolves "a run directory or a .ckpt" to the checkpoint file, and edits a checkpoint dict
(a grown model in place of the old one); `resume` merges a resumed run's config; `export`
saves and loads the safetensors export; `data` prepares a run's corpus, tokenizer and token
stream. No Lightning here: this package may import config, models, data, growth, files and
errors; training, the commands, the CLI and the package API import it.
"""
