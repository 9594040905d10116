"""Reproductions of the PES paper's synthetic studies, behind ``pes-optax``.

* :func:`compare`: several estimators on one built-in task, with one plot and
  one table (influence balancing, toy regression; paper sections 2 and 3);
* :func:`meta_objective_grid`: the toy-regression heatmap;
* :func:`variance_study`: each ES estimator's error against the number of
  truncations per inner problem, on a tiny LSTM over text that ships with
  Python (paper section 4).

The core package never imports this subpackage; it needs matplotlib (and
tqdm for progress bars).
"""

from pes_optax.experiments._compare import DEFAULT_ENTRIES as DEFAULT_ENTRIES
from pes_optax.experiments._compare import (
    DEFAULT_GRID_RESOLUTION as DEFAULT_GRID_RESOLUTION,
)
from pes_optax.experiments._compare import ENTRY_SETTINGS as ENTRY_SETTINGS
from pes_optax.experiments._compare import GRID_BOUNDS as GRID_BOUNDS
from pes_optax.experiments._compare import TABLE_COLUMNS as TABLE_COLUMNS
from pes_optax.experiments._compare import ComparisonResult as ComparisonResult
from pes_optax.experiments._compare import Entry as Entry
from pes_optax.experiments._compare import compare as compare
from pes_optax.experiments._compare import format_table as format_table
from pes_optax.experiments._compare import make_entries as make_entries
from pes_optax.experiments._compare import parse_entry as parse_entry
from pes_optax.experiments._grid import meta_objective_grid as meta_objective_grid
from pes_optax.experiments._lstm import init_lstm_theta as init_lstm_theta
from pes_optax.experiments._lstm import lstm_problem as lstm_problem
from pes_optax.experiments._text import SCENARIOS as SCENARIOS
from pes_optax.experiments._text import character_tokens as character_tokens
from pes_optax.experiments._text import stdlib_corpus as stdlib_corpus
from pes_optax.experiments._variance import (
    DEFAULT_TRUNCATION_LENGTHS as DEFAULT_TRUNCATION_LENGTHS,
)
from pes_optax.experiments._variance import (
    ESTIMATOR_FACTORIES as ESTIMATOR_FACTORIES,
)
from pes_optax.experiments._variance import VarianceResult as VarianceResult
from pes_optax.experiments._variance import VarianceSettings as VarianceSettings
from pes_optax.experiments._variance import (
    check_settings as check_variance_settings,
)
from pes_optax.experiments._variance import summed_estimate as summed_estimate
from pes_optax.experiments._variance import variance_study as variance_study
from pes_optax.experiments._variance import write_outputs as write_variance_outputs

__all__ = (
    "DEFAULT_ENTRIES",
    "DEFAULT_GRID_RESOLUTION",
    "DEFAULT_TRUNCATION_LENGTHS",
    "ENTRY_SETTINGS",
    "ESTIMATOR_FACTORIES",
    "GRID_BOUNDS",
    "SCENARIOS",
    "TABLE_COLUMNS",
    "ComparisonResult",
    "Entry",
    "VarianceResult",
    "VarianceSettings",
    "character_tokens",
    "check_variance_settings",
    "compare",
    "format_table",
    "init_lstm_theta",
    "lstm_problem",
    "make_entries",
    "meta_objective_grid",
    "parse_entry",
    "stdlib_corpus",
    "summed_estimate",
    "variance_study",
    "write_variance_outputs",
)
