"""Shared test helpers (never imported by the package): `flops` (FlopCounterMode extensions
and independent counts), `glue` (GLUE fixture files in the real formats), `wandb_records`
(a reader of offline W&B run files), `prose` (the generated English corpus and the tiny
run overrides)."""
