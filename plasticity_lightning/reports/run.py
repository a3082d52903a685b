"""``plasticity report RUN_DIR``: the report of one run — an interactive HTML page, a JSON summary, PNGs on request.

The report reads what the run logged (:mod:`plasticity_lightning.reports.data`: a CSVLogger or TensorBoard run and
the files of the run-directory contract) and draws the panels that apply (:mod:`~plasticity_lightning.reports.panels`):
for continual runs the accuracy on each new task, the task-accuracy matrix, ranks, dormant units, weights and what
the interventions did, per task; for other runs the training curves; attention-head, grokking and regression
panels where their data exist. A panel with no data is left out and listed once in the summary with the reason.

The summary of a continual run is per task: the first ``k`` tasks against the last ``k`` for every measure (``k``
a tenth of the stream, at least 1), never a best epoch of the mixed validation accuracy. Other runs get the best
and final losses, the convergence epoch, held-out scores and baselines.

Everything is written to a temporary folder first and moved into place, so a failed report leaves nothing behind.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.core.files import atomic_directory
from plasticity_lightning.core.rundir import (
    ELAPSED_SECONDS_KEY,
    NEW_TASK_LOSS_KEY,
    NEW_TASK_PERPLEXITY_KEY,
    REPORT_DIR,
    REPORT_HTML,
    SUMMARY_FILE,
)
from plasticity_lightning.core.serialization import json_safe
from plasticity_lightning.metrics.continual_summary import (
    COVERAGE_TEXT,
    accuracy_matrix_summary,
    first_and_last,
    matrix_coverage,
    seen_accuracy,
    summary_window,
)
from plasticity_lightning.metrics.dynamics import loss_convergence_epoch
from plasticity_lightning.reports.data import RunData, find_run_dirs, load_run
from plasticity_lightning.reports.figures import html_table, report_html, write_pngs
from plasticity_lightning.reports.panels import (
    _MEASURE_KEY,
    INTERVENTIONS,
    MEASURES,
    Chart,
    _Axis,
    cycle_table,
    new_task_accuracy,
    run_charts,
)

__all__ = [
    "continual_summary",
    "find_run_dirs",
    "load_run",
    "regression_scores",
    "summarize_run",
    "write_run_report",
]


# ---------------------------------------------------------------------------------------------------- scores
def regression_scores(predictions: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """R², MAE, RMSE and MAPE, overall and per target.

    R² (uniform average over targets), MAE, RMSE and MAPE, overall and per target, by scikit-learn's metrics in float64
    (MAPE as a fraction, as ``val/mape`` is logged). scikit-learn rather than torchmetrics' functional R², which treats
    sums of squares below an absolute 1e-4 as zero and so scores small-unit targets 1 or 0.

    Args:
        predictions: predicted targets, ``[N]`` or ``[N, targets]``.
        targets: true targets, the same shape.

    Example::

        >>> scores = regression_scores(np.array([[1.0], [2.0], [4.0]]), np.array([[1.0], [2.0], [3.0]]))
        >>> round(scores["r2"], 4), round(scores["mae"], 4), round(scores["mape"], 4)
        (0.5, 0.3333, 0.1111)
    """
    from sklearn import metrics

    preds = np.asarray(predictions, dtype=np.float64).reshape(len(predictions), -1)
    target = np.asarray(targets, dtype=np.float64).reshape(len(targets), -1)
    scorers = {
        "r2": metrics.r2_score,
        "mae": metrics.mean_absolute_error,
        "rmse": metrics.root_mean_squared_error,
        "mape": metrics.mean_absolute_percentage_error,
    }
    per_target = {name: scorer(target, preds, multioutput="raw_values").tolist() for name, scorer in scorers.items()}
    overall = {name: float(np.mean(values)) for name, values in per_target.items()}
    overall["rmse"] = float(np.sqrt(np.mean((preds - target) ** 2)))  # over every value, not a mean of RMSEs
    return {**overall, "per_target": per_target}


def classification_scores(predictions: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """Accuracy of predicted class ids."""
    return {"accuracy": float((predictions.reshape(-1) == targets.reshape(-1)).mean())}


def score(task: str, predictions: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    return (regression_scores if task == "regression" else classification_scores)(predictions, targets)


def _baselines(predictions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key.removeprefix("baseline_"): value for key, value in predictions.items() if key.startswith("baseline_")}


# ---------------------------------------------------------------------------------------------------- summaries
def _best(values: np.ndarray | None, epochs: np.ndarray, lowest: bool) -> tuple[float | None, int | None]:
    if values is None or not np.isfinite(values).any():
        return None, None
    masked = np.where(np.isfinite(values), values, np.inf if lowest else -np.inf)
    index = int(np.argmin(masked) if lowest else np.argmax(masked))
    return float(values[index]), int(epochs[index])


def _last(values: np.ndarray | None) -> float | None:
    if values is None:
        return None
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if len(finite) else None


def _column(columns: dict[str, np.ndarray], *names: str) -> np.ndarray | None:
    for name in names:
        values = columns.get(name)
        if values is not None and np.isfinite(values).any():
            return values
    return None


def continual_summary(run: RunData, window: int | None = None) -> dict[str, Any]:
    """The per-task summary of a continual run.

    For every measure, the mean of its first ``window`` tasks and of its last ``window`` (monitors: measured as each
    task starts, the last window ending at the end of training), what the accuracy matrix measured, and the
    interventions' totals.

    Args:
        run: the run (:func:`~plasticity_lightning.reports.load_run`).
        window: tasks averaged at each end of the stream (default ``None``: a tenth of the stream, at least 1).
    """
    tasks = run.num_tasks
    window = window or summary_window(tasks)
    matrix = run.accuracy_matrix
    axis = _Axis(run)
    measures: dict[str, dict[str, float]] = {}
    measured = [("continual/new_task_acc", new_task_accuracy(run).tolist())]
    for key in (NEW_TASK_LOSS_KEY, NEW_TASK_PERPLEXITY_KEY):  # a language model's, on the task being learned
        if run.has(key):
            measured.append((key, axis.last_in_task(key)[1].tolist()))
    if matrix and matrix_coverage(matrix) == "seen":  # a mean over the few tasks evaluated is no mean over the seen
        seen = seen_accuracy(matrix, tasks)
        measured.append(("continual/avg_seen_acc", seen))
    for name, values in measured:
        first, last = first_and_last(values, window)
        if math.isfinite(first) or math.isfinite(last):
            measures[name] = {"first": first, "last": last}
    for key in run.columns:
        match = _MEASURE_KEY.match(key)
        if match and match["measure"] in MEASURES and run.has(key):
            first, last = first_and_last(axis.measurements(key)[1].tolist(), window)
            measures[key] = {"first": first, "last": last}
    interventions = {}
    for key in run.columns:
        name = key.rsplit("/", 1)[-1]
        if name in INTERVENTIONS and INTERVENTIONS[name][0] != "value" and run.has(key):
            values = run.series(key)[1]
            interventions[key] = float(values.sum() if INTERVENTIONS[name][0] == "events" else values[-1])
    return {
        "kind": "continual",
        "tasks": tasks,
        "window": window,
        "accuracy_measured": COVERAGE_TEXT[matrix_coverage(matrix)],
        "measures": measures,
        "interventions": interventions,
        "final": accuracy_matrix_summary(matrix) if matrix else {},
    }


def summarize_run(run: RunData, window: int | None = None) -> dict[str, Any]:
    """The JSON summary of a run.

    Per task for continual runs; otherwise best/final losses, convergence, gap, time, held-out scores and baselines.

    Args:
        run: the run (:func:`~plasticity_lightning.reports.load_run`).
        window: tasks averaged at each end of the stream (default ``None``: a tenth of the stream, at least 1).
    """
    summary: dict[str, Any] = {"run_dir": str(run.directory), "task": run.task, "seed": run.seed, "source": run.source}
    if run.continual and run.num_tasks > 0:
        summary.update(continual_summary(run, window))
        return summary
    epochs, columns = run.epoch_table()
    train = _column(columns, "train/loss_epoch", "train/loss")
    val = _column(columns, "val/loss")
    best_loss, best_epoch = _best(val, epochs, lowest=True)
    quality_name = "r2" if run.task == "regression" else "acc"
    best_quality, best_quality_epoch = _best(_column(columns, f"val/{quality_name}"), epochs, lowest=False)
    summary.update(
        {
            "kind": run.task,
            "epochs": len(epochs),
            "best_validation_loss": best_loss,
            "best_epoch": best_epoch,
            f"best_validation_{quality_name}": best_quality,
            f"best_{quality_name}_epoch": best_quality_epoch,
            "final_train_loss": _last(train),
            "final_validation_loss": _last(val),
            "convergence_epoch": None,
            "generalization_gap": None,
            "train_seconds": _last(_column(columns, ELAPSED_SECONDS_KEY)),
        }
    )
    if val is not None:
        finite = np.isfinite(val)
        summary["convergence_epoch"] = loss_convergence_epoch(val[finite].tolist(), epochs[finite].tolist())[0]
    if train is not None and val is not None:
        summary["generalization_gap"] = _last(val - train)
    if run.predictions is not None:
        preds, targets = run.predictions["predictions"], run.predictions["targets"]
        summary["split"] = str(run.predictions.get("split", "test"))
        summary["scores"] = score(run.task, preds, targets)
        summary["baselines"] = {name: score(run.task, v, targets) for name, v in _baselines(run.predictions).items()}
        if "target_names" in run.predictions:
            summary["target_names"] = [str(n) for n in run.predictions["target_names"]]
    if run.dynamics is not None:
        summary["learning_dynamics"] = run.dynamics.get("summary")
    return summary


# ---------------------------------------------------------------------------------------------------- tables
def measure_label(key: str) -> str:
    """A readable name of a summary measure key."""
    names = {
        "continual/new_task_acc": "new-task accuracy",
        "continual/avg_seen_acc": "mean accuracy over seen tasks",
        NEW_TASK_LOSS_KEY: "new-task loss",
        NEW_TASK_PERPLEXITY_KEY: "new-task perplexity",
    }
    if key in names:
        return names[key]
    match = _MEASURE_KEY.match(key)
    return f"{match['measure']} ({match['layer']})" if match else key


def summary_tables(run: RunData, summary: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The page's tables: the per-task summary and accuracy matrix (continual), or the run's numbers."""
    tables = []
    if summary.get("kind") == "continual":
        window = summary["window"]
        rows = [
            [measure_label(k), v["first"], v["last"], v["last"] - v["first"]] for k, v in summary["measures"].items()
        ]
        tables.append(
            (
                "Per-task summary",
                "per-task-summary",
                f'<p class="muted">Means of the first {window} and the last {window} of {summary["tasks"]} tasks '
                f"(monitors: measured as each task starts; the last window ends at the end of training). Accuracy "
                f"measured: {summary['accuracy_measured']}.</p>"
                + html_table(["measure", f"first {window}", f"last {window}", "change"], rows, "summary-table"),
            )
        )
        if summary["interventions"]:
            tables.append(
                (
                    "Interventions",
                    "interventions-table",
                    html_table(["logged total", "value"], list(summary["interventions"].items())),
                )
            )
        matrix = run.accuracy_matrix
        if matrix:
            width = len(next(iter(matrix.values())))
            rows = [[f"after task {t}", *row] for t, row in matrix.items()]
            tables.append(
                (
                    "Accuracy matrix",
                    "accuracy-matrix",
                    '<details open><summary class="muted">Accuracy on task k (columns) after training on task t '
                    "(rows); – where it was not evaluated.</summary>"
                    + html_table(["", *(f"task {k}" for k in range(width))], rows, "accuracy-matrix-table")
                    + "</details>",
                )
            )
    else:
        keep = {k: v for k, v in summary.items() if isinstance(v, (int, float, str)) or v is None}
        tables.append(("Summary", "run-summary", html_table(["", "value"], list(keep.items()), "summary-table")))
        if "scores" in summary:
            models = {"model": summary["scores"], **summary.get("baselines", {})}
            names = [n for n in ("r2", "mae", "rmse", "mape", "accuracy") if n in summary["scores"]]
            rows = [[model, *(scores.get(n) for n in names)] for model, scores in models.items()]
            tables.append(("Held-out scores", "scores", html_table(["", *names], rows)))
    columns, rows = cycle_table(run)
    if rows:
        tables.append(("PlasticityCycle decisions", "cycles", html_table(columns, rows, "cycle-table")))
    return tables


# ---------------------------------------------------------------------------------------------------- writing
def prepare_output(folder: Path) -> None:
    """Refuse to replace a folder that is not a report: ``--output`` into a folder holding other files."""
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / SUMMARY_FILE).exists())):
        raise PlasticityConfigError(
            f"--output {folder}: exists and is not a report folder (no {SUMMARY_FILE}); give a new or empty folder"
        )


def write_report_files(
    folder: Path,
    title: str,
    subtitle: list[str],
    charts: list[Chart],
    tables: list[tuple[str, str, str]],
    summary: dict[str, Any],
    png: bool,
    extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Write ``report.html``, the PNGs (``png``) and ``summary.json`` into ``folder`` atomically."""
    prepare_output(folder)
    notes = [f"{panel}: {reason}" for panel, reason in summary.get("skipped", {}).items()]
    with atomic_directory(folder) as staging:
        (staging / REPORT_HTML).write_text(report_html(title, subtitle, charts, tables, notes), encoding="utf-8")
        files = [folder / REPORT_HTML]
        if png and charts:
            files += [folder / "png" / p.name for p in write_pngs(charts, staging / "png")]
        for name, text in (extra or {}).items():
            (staging / name).write_text(text)
            files.append(folder / name)
        summary["files"] = [str(f) for f in files]
        (staging / SUMMARY_FILE).write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
    return summary


def write_run_report(
    path: str | Path, output: str | Path | None = None, png: bool = False, window: int | None = None
) -> dict[str, Any]:
    """Write the report of the run at ``path`` into ``output`` (default ``<run>/report``).

    ``report.html``, ``summary.json`` and, with ``png``, one PNG per chart under ``png/``.

    Returns the summary: its ``panels`` lists the charts drawn, ``skipped`` the panels left out and why, ``files``
    what was written.

    Args:
        path: the run directory.
        output: the output folder (default ``None``: ``<run>/report``).
        png: also write one PNG per chart (needs Chromium; default False).
        window: tasks averaged at each end of the stream (default ``None``: a tenth of the stream, at least 1).
    """
    run = load_run(path)
    folder = Path(output) if output is not None else run.directory / REPORT_DIR
    summary = summarize_run(run, window)
    charts, skipped = run_charts(run, summary.get("scores"), summary.get("baselines"))
    summary["panels"] = [chart.id for chart in charts]
    summary["skipped"] = skipped
    kind = f"continual, {run.num_tasks} tasks" if summary.get("kind") == "continual" else run.task
    subtitle = [str(run.directory), f"{kind} · {run.source} · seed {run.seed}"]
    return write_report_files(
        folder,
        f"plasticity report — {run.directory.name}",
        subtitle,
        charts,
        summary_tables(run, summary),
        summary,
        png,
    )
