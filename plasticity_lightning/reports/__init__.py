"""Reading finished runs back: per-run figures and summaries (``plasticity report RUN_DIR``) and seed-level
comparisons of variants with Wilcoxon signed-rank tests and Cohen's d (``plasticity report --compare``)."""

from plasticity_lightning.reports.compare import cohens_d, compare_runs, format_table, wilcoxon_p, write_comparison
from plasticity_lightning.reports.run import (
    RunData,
    find_run_dirs,
    load_run,
    read_epoch_table,
    regression_scores,
    summarize_run,
    write_run_report,
)

__all__ = [
    "RunData",
    "cohens_d",
    "compare_runs",
    "find_run_dirs",
    "format_table",
    "load_run",
    "read_epoch_table",
    "regression_scores",
    "summarize_run",
    "wilcoxon_p",
    "write_comparison",
    "write_run_report",
]
