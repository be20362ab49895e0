"""`altup compare`: variants × seeds trained on the same data and tokens, compared with
paired statistics, tables and plots. `plan` turns variants and seeds into runs, `stats`
holds the paired statistics (plain Python), `results` the results.csv table, `plots` the
PNGs, `report` the tables, comparison.json and W&B run, and `runner` the command itself,
which trains through the sweep's executors (`altup_cli.sweep.execute`). The CLI imports
this package; nothing below the commands does.
"""

from altup_cli.compare.plan import DEFAULT_VARIANTS, recipe_variants
from altup_cli.compare.runner import RunsFailed, compare

__all__ = ["DEFAULT_VARIANTS", "RunsFailed", "compare", "recipe_variants"]
