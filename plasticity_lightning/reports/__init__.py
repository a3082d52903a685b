"""Reading finished runs back (``plasticity report``).

An interactive offline HTML report with the panels that apply to a run (continual runs per task: new-task accuracy, the
accuracy matrix, ranks, dormant units, weights, interventions), a per-task or per-run JSON summary, PNGs on request, and
comparisons of variants over seeds (mean and 95% band per variant, Wilcoxon signed-rank tests and Cohen's d).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from plasticity_lightning.core.lazy import lazy_exports

if TYPE_CHECKING:
    from plasticity_lightning.reports.callback import PlasticityReport
    from plasticity_lightning.reports.compare import (
        cohens_d,
        compare_runs,
        format_table,
        load_variants,
        wilcoxon_p,
        write_comparison,
    )
    from plasticity_lightning.reports.data import (
        RunData,
        find_run_dirs,
        load_run,
        read_epoch_table,
        read_metrics_csv,
        read_tensorboard,
    )
    from plasticity_lightning.reports.panels import Chart, Series, compare_charts, run_charts
    from plasticity_lightning.reports.run import continual_summary, regression_scores, summarize_run, write_run_report

_EXPORTS = {
    "Chart": "plasticity_lightning.reports.panels",
    "PlasticityReport": "plasticity_lightning.reports.callback",
    "RunData": "plasticity_lightning.reports.data",
    "Series": "plasticity_lightning.reports.panels",
    "cohens_d": "plasticity_lightning.reports.compare",
    "compare_charts": "plasticity_lightning.reports.panels",
    "compare_runs": "plasticity_lightning.reports.compare",
    "continual_summary": "plasticity_lightning.reports.run",
    "find_run_dirs": "plasticity_lightning.reports.data",
    "format_table": "plasticity_lightning.reports.compare",
    "load_run": "plasticity_lightning.reports.data",
    "load_variants": "plasticity_lightning.reports.compare",
    "read_epoch_table": "plasticity_lightning.reports.data",
    "read_metrics_csv": "plasticity_lightning.reports.data",
    "read_tensorboard": "plasticity_lightning.reports.data",
    "regression_scores": "plasticity_lightning.reports.run",
    "run_charts": "plasticity_lightning.reports.panels",
    "summarize_run": "plasticity_lightning.reports.run",
    "wilcoxon_p": "plasticity_lightning.reports.compare",
    "write_comparison": "plasticity_lightning.reports.compare",
    "write_run_report": "plasticity_lightning.reports.run",
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

__all__ = [
    "Chart",
    "PlasticityReport",
    "RunData",
    "Series",
    "cohens_d",
    "compare_charts",
    "compare_runs",
    "continual_summary",
    "find_run_dirs",
    "format_table",
    "load_run",
    "load_variants",
    "read_epoch_table",
    "read_metrics_csv",
    "read_tensorboard",
    "regression_scores",
    "run_charts",
    "summarize_run",
    "wilcoxon_p",
    "write_comparison",
    "write_run_report",
]
