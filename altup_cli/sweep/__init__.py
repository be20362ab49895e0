"""isoFLOP sweeps and the executors that run many training runs: `plan` (points of budgets ×
archs × sizes, each trained D = C / F tokens), `execute` (in-process, subprocess, local
parallel and SLURM/submitit executors, shared by the sweep and `altup compare`), `results`
(atomic CSV tables validated on read), `state` (the sweep directory's plan, lock and
shared-config check), `analyze` and `bootstrap` (per-budget parabolas, power laws and their
intervals), and `runner`, the sweep's orchestration (plan → train what is missing →
record → fit). May import config, runs and training; the commands import it.
"""
