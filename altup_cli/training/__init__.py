"""Lightning training around the plain-PyTorch models: the LightningModules (`lm_module`,
`glue`), the data module, callbacks, the growth schedule, the optimizer, LR schedules
(`schedules`, plain arithmetic), the one logger factory (`loggers`), the one Trainer factory
(`trainer`, with the language-model callbacks), atomic checkpoint IO and `run.train`. It
imports models, growth, data, glue, config and runs (never the commands or the CLI); the
commands and the CLI import it, and nothing below them does."""
