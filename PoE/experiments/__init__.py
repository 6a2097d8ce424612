"""Composite-task experiments: a pool scored over every combination of n of a list of tasks, beside the Oracle
and the training-based baselines; the rows, tables, CSV files and plots of Run_Evaluation and Run_Experiments.

scoring.py (combinations scored without training), comparison.py (the methods compared, baseline runs recorded),
tables.py (Markdown and CSV), plots.py (PNG)."""

from PoE.experiments.comparison import (
    MAX_RECORD_BYTES,
    METHOD_ORDER,
    OracleSource,
    Plan,
    append_record,
    compare,
    read_record,
    record_key,
    same_combination_rows,
    summarize_methods,
)
from PoE.experiments.plots import plot_results, replot, save_figure
from PoE.experiments.scoring import (
    ComboResult,
    combination_rows,
    cross_expert_rows,
    oracle_combinations,
    pool_combinations,
    sample_combinations,
    summarize,
)
from PoE.experiments.tables import (
    METHOD_COLUMNS,
    SUMMARY_COLUMNS,
    markdown_table,
    write_csv,
    write_table,
    write_text,
)

__all__ = [
    "MAX_RECORD_BYTES",
    "METHOD_COLUMNS",
    "METHOD_ORDER",
    "SUMMARY_COLUMNS",
    "ComboResult",
    "OracleSource",
    "Plan",
    "append_record",
    "combination_rows",
    "compare",
    "cross_expert_rows",
    "markdown_table",
    "oracle_combinations",
    "plot_results",
    "pool_combinations",
    "read_record",
    "record_key",
    "replot",
    "same_combination_rows",
    "sample_combinations",
    "save_figure",
    "summarize",
    "summarize_methods",
    "write_csv",
    "write_table",
    "write_text",
]
