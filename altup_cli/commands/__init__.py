"""The bodies of the `altup` commands, one module per command, each a plain function.

`altup_cli/cli.py` is Typer wiring only: it parses the command line and calls one function
here. A command composes what the layers below offer (config, runs, training, evaluation,
sweep, bench) and prints what the user reads. Only the CLI imports this package.
"""
