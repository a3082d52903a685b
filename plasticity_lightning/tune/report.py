"""The tune report: Optuna's own charts (``optuna.visualization``) on the page ``plasticity report`` writes.

``<tune folder>/report/report.html`` (interactive, offline: plotly.js inlined once) with the optimisation history,
parameter importances, parallel coordinates, intermediate values (when trials were pruned) and the Pareto front
(several objectives), a table of every trial, and ``summary.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from plasticity_lightning.core.files import atomic_directory
from plasticity_lightning.core.rundir import REPORT_DIR, REPORT_HTML, SUMMARY_FILE
from plasticity_lightning.core.serialization import json_safe
from plasticity_lightning.reports.figures import FigureChart, html_table, report_html
from plasticity_lightning.tune.search import SearchSpec

# the page's own chart style (reports.figures.figure), applied to Optuna's figures
_LAYOUT = {"template": "plotly_white", "height": 380, "margin": {"l": 60, "r": 20, "t": 50, "b": 50}}


def _chart(name: str, section: str, title: str, make: Any, notes: list[str]) -> FigureChart | None:
    """One Optuna chart as a page chart; a chart Optuna cannot draw yet (too few trials) becomes a note."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ExperimentalWarning and "too few trials" warnings: the note says it
            figure = make()
    except (ValueError, RuntimeError, ZeroDivisionError) as err:
        notes.append(f"{title}: {' '.join(str(err).split())}")
        return None
    if not figure.data:
        notes.append(f"{title}: nothing to draw yet (no completed trial with these values)")
        return None
    figure.update_layout(title={"text": title, "font": {"size": 14}}, **_LAYOUT)
    return FigureChart(id=name, section=section, title=title, x_label="", y_label="", plotly=figure.to_plotly_json())


def tune_charts(study: Any, spec: SearchSpec) -> tuple[list[FigureChart], list[str]]:
    """Optuna's charts of ``study``: history, importances, parallel coordinates, intermediate values, Pareto.

    Args:
        study: the Optuna study.
        spec: the search it ran.
    """
    from optuna import visualization as vis
    from optuna.trial import TrialState

    notes: list[str] = []
    charts = []
    names = [objective.name for objective in spec.objectives]
    for index, name in enumerate(names):
        target = (lambda t, i=index: t.values[i]) if len(names) > 1 else None
        charts.append(
            _chart(
                f"history-{index}",
                "Optimisation",
                f"History: {name}",
                lambda target=target, name=name: vis.plot_optimization_history(study, target=target, target_name=name),
                notes,
            )
        )
        charts.append(
            _chart(
                f"importance-{index}",
                "Parameters",
                f"Parameter importances for {name}",
                lambda target=target, name=name: vis.plot_param_importances(study, target=target, target_name=name),
                notes,
            )
        )
        charts.append(
            _chart(
                f"parallel-{index}",
                "Parameters",
                f"Parallel coordinates: {name}",
                lambda target=target, name=name: vis.plot_parallel_coordinate(study, target=target, target_name=name),
                notes,
            )
        )
    if any(t.state == TrialState.PRUNED for t in study.get_trials(deepcopy=False)):
        charts.append(
            _chart(
                "intermediate",
                "Optimisation",
                f"Intermediate values ({spec.pruning_monitor})",
                lambda: vis.plot_intermediate_values(study),
                notes,
            )
        )
    if len(names) > 1:
        charts.append(
            _chart(
                "pareto",
                "Optimisation",
                "Pareto front",
                lambda: vis.plot_pareto_front(study, target_names=names),
                notes,
            )
        )
    return [chart for chart in charts if chart is not None], notes


def trials_table(study: Any, spec: SearchSpec) -> str:
    """Every trial: number, state, objective values, parameters, run directory and the reason of a failure.

    Args:
        study: the Optuna study.
        spec: the search it ran.
    """
    keys = [param.key for param in spec.params]
    columns = ["trial", "state", *[o.name for o in spec.objectives], *keys, "fit s", "run directory", "reason"]
    rows = []
    for trial in study.get_trials(deepcopy=False):
        values = list(trial.values) if trial.values else [None] * len(spec.objectives)
        rows.append(
            [
                trial.number,
                trial.state.name.lower() + (" (baseline)" if trial.user_attrs.get("baseline") else ""),
                *values,
                *[trial.params.get(key) for key in keys],
                trial.user_attrs.get("fit_seconds"),
                trial.user_attrs.get("run_dir", ""),
                trial.user_attrs.get("fail_reason", ""),
            ]
        )
    return html_table(columns, rows, table_id="trials")


def write_tune_report(study: Any, spec: SearchSpec, folder: Path, summary: dict[str, Any]) -> Path:
    """Write ``report.html`` and ``summary.json`` into ``folder/report`` atomically; returns the page's path.

    Args:
        study: the Optuna study.
        spec: the search it ran.
        folder: the tuning folder (the report goes in ``folder/report``).
        summary: the tuning summary, written as ``summary.json``.
    """
    charts, notes = tune_charts(study, spec)
    counts = ", ".join(f"{n} {state}" for state, n in summary["trials"].items())
    subtitle = [
        f"study {summary['study']} · {summary['storage']}",
        f"{counts} · objectives: {', '.join(summary['objectives'])}",
    ]
    tables = [("Trials", "trials", trials_table(study, spec))]
    target = folder / REPORT_DIR
    with atomic_directory(target) as staging:
        page = report_html(f"plasticity tune: {summary['study']}", subtitle, charts, tables, notes)
        (staging / REPORT_HTML).write_text(page, encoding="utf-8")
        record = {**summary, "panels": [chart.id for chart in charts], "skipped": notes}
        (staging / SUMMARY_FILE).write_text(json.dumps(json_safe(record), indent=2, allow_nan=False))
    return target / REPORT_HTML
