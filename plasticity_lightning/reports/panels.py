"""What a report draws: the charts that apply to a run, as plain data (no plotting library here).

A :class:`Chart` holds its series (x, y, and for comparisons a 95% band over seeds) or a heatmap. :func:`run_charts`
reads them from one run; :func:`compare_charts` overlays variants, each the mean of its seeds. Continual runs put
the task on the x-axis: one value per task (monitors: the measurement taken as the task starts, plus the state at
the end of training as the last point; accuracy: the task right after it was learned); other runs use the step.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from plasticity_lightning.core.rundir import (
    EPOCH_SECONDS_KEY,
    FROM_SCRATCH_ACCURACY_KEY,
    NEW_TASK_ACCURACY_KEY,
    NEW_TASK_LOSS_KEY,
    PLASTICITY_GAP_KEY,
    TRANSFER_KEYS,
)
from plasticity_lightning.metrics.continual_summary import matrix_coverage, per_task_series, seen_accuracy
from plasticity_lightning.metrics.statistics import t_interval
from plasticity_lightning.reports.data import RunData, finished_task_values


@dataclass
class Series:
    """One line (or bar, histogram, box) of a chart; ``low``/``high`` bound a 95% interval over ``seeds`` runs.

    Attributes:
        name: the legend entry.
        x: x values.
        y: y values (the mean over seeds in comparisons).
        low: lower bound of the 95% interval, per x (default ``None``: no band).
        high: upper bound of the 95% interval, per x (default ``None``).
        seeds: how many runs the values are over (default 1).
        mode: ``"lines"``, ``"markers"``, ``"lines+markers"`` (default), ``"bar"``, ``"histogram"`` or ``"box"``.
        group: the variant, in comparisons (default ``None``).
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    low: np.ndarray | None = None
    high: np.ndarray | None = None
    seeds: int = 1
    mode: str = "lines+markers"  # lines, markers, lines+markers, bar, histogram, box
    group: str | None = None  # the variant, in comparisons


@dataclass
class Chart:
    """A chart: series on shared axes (``kind="xy"``), or a heatmap ``z[row][column]``.

    Attributes:
        id: the chart's HTML id (and PNG name).
        section: the report section it belongs to.
        title: its title.
        x_label: the x axis label, with units.
        y_label: the y axis label, with units.
        series: its series (``kind="xy"``).
        kind: ``"xy"`` (default) or ``"heatmap"``.
        z: the heatmap's values ``z[row][column]`` (default ``None``).
        x_ticks: tick labels of the heatmap's columns (default ``None``).
        y_ticks: tick labels of its rows (default ``None``).
        log_y: a log-scale y axis (default False).
        note: a line under the title (default empty).
        value_range: fixed ``(low, high)`` of the y axis or colour scale (default ``None``: from the data).
    """

    id: str
    section: str
    title: str
    x_label: str
    y_label: str
    series: list[Series] = field(default_factory=list)
    kind: str = "xy"
    z: np.ndarray | None = None
    x_ticks: list[Any] | None = None
    y_ticks: list[Any] | None = None
    log_y: bool = False
    note: str = ""
    # The values the measure can take (accuracy and shares in [0, 1], ranks and norms ≥ 0): a comparison's 95% band
    # is cut to it, since a t-interval over two or three seeds can reach past 1.0 on an accuracy axis.
    value_range: tuple[float, float] | None = None

    @property
    def points(self) -> int:
        if self.kind == "heatmap":
            return int(np.isfinite(self.z).sum()) if self.z is not None else 0
        return sum(int(np.isfinite(s.y).sum()) for s in self.series)


# The per-layer measures of the monitors: ``<prefix>/<layer>/<measure>`` keys, grouped into sections.
MEASURES: dict[str, tuple[str, str]] = {
    "effective_rank": ("Rank", "Effective rank (Roy & Vetterli)"),
    "srank": ("Rank", "srank, δ = 0.01 (Kumar et al.)"),
    "stable_rank": ("Rank", "Stable rank ‖Φ‖F² / ‖Φ‖₂²"),
    "approximate_rank": ("Rank", "Approximate rank (99% of σ²)"),
    "dead_fraction": ("Dormant units", "Dead units (never active on the probe)"),
    "redo_dormant_fraction": ("Dormant units", "Dormant units (ReDo score ≤ τ)"),
    "low_activity_fraction": ("Dormant units", "Low-activity units (active on < 1% of inputs)"),
    "mean_abs_weight": ("Weights", "Mean |w|"),
    "distance_from_init": ("Weights", "Distance from init ‖θ − θ₀‖"),
    "activation_entropy": ("Entropy", "Activation entropy"),
    "prediction_entropy": ("Entropy", "Prediction entropy"),
    "grad_norm": ("Gradients", "Gradient norm"),
}
_MEASURE_KEY = re.compile(r"^(?P<prefix>[^/]+)/(?P<layer>.+)/(?P<measure>[^/]+)$")

# What the interventions log: ``<prefix>[/<layer>]/<name>``. Counters are running totals; events count one action.
INTERVENTIONS: dict[str, tuple[str, str]] = {
    "replaced": ("counter", "Units replaced so far (Continual Backprop)"),
    "recycled": ("events", "Units recycled so far (ReDo)"),
    "applied": ("counter", "Shrink & Perturb applications so far"),
    "resets": ("counter", "Head resets so far"),
    "penalty": ("value", "L2 Init penalty"),
    "collapses": ("counter", "Weight collapses so far (SurgeCollapse)"),
    "surges": ("counter", "Noise surges so far (SurgeCollapse)"),
}
_INTERVENTION_KEY = re.compile(r"^(?P<prefix>[^/]+)(?:/(?P<layer>.+))?/(?P<name>[^/]+)$")
_HEAD_KEY = re.compile(r"^(?P<prefix>[^/]+)/(?P<layer>\d+)/(?P<kind>head|gate)_(?P<head>\d+)$")
_COLLAPSE_KEYS = ("softmax_collapse", "zero_terms")


# ---------------------------------------------------------------------------------------------------- helpers
class _Axis:
    """The x-axis of a run's charts: the task for continual runs, the step otherwise."""

    def __init__(self, run: RunData) -> None:
        self.run = run
        self.continual = run.continual and run.num_tasks > 0
        self.label = "task" if self.continual else "step"

    def measurements(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """A monitor's values: per task (as each starts, then the end of training at x = tasks), or per step."""
        if not self.continual:
            return self.run.series(key)
        tasks, values = self.run.by_task(key)
        y = np.asarray(per_task_series(tasks, values, self.run.num_tasks))
        x = np.arange(len(y), dtype=float)
        return _trim(x, y)

    def last_in_task(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """A value's last entry while training on each task (continual), or every entry by step."""
        if not self.continual:
            return self.run.series(key)
        if key not in self.run.table.columns:
            return np.empty(0), np.empty(0)
        values = self.run.values(key)
        tasks = self.run.training_tasks
        keep = np.isfinite(values) & np.isfinite(tasks) & (tasks >= 0) & (tasks < self.run.num_tasks)
        y = np.full(self.run.num_tasks, np.nan)
        y[tasks[keep].astype(int)] = values[keep]  # later rows overwrite earlier ones: the task's last value
        return _trim(np.arange(len(y), dtype=float), y)


def _trim(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    finite = np.flatnonzero(np.isfinite(y))
    if not len(finite):
        return np.empty(0), np.empty(0)
    return x[: finite[-1] + 1], y[: finite[-1] + 1]


def _xy_chart(
    chart_id: str,
    section: str,
    title: str,
    x_label: str,
    y_label: str,
    series: list[Series],
    value_range: tuple[float, float] | None = None,
) -> Chart:
    drawn = [s for s in series if np.isfinite(s.y).any()]
    return Chart(chart_id, section, title, x_label, y_label, drawn, value_range=value_range)


SHARE = (0.0, 1.0)
DIFFERENCE_OF_SHARES = (-1.0, 1.0)
NON_NEGATIVE = (0.0, math.inf)


def measure_range(measure: str) -> tuple[float, float] | None:
    """The values a monitor measure can take: shares in [0, 1], ranks, norms and entropies ≥ 0; None if unknown."""
    if measure.endswith(("_fraction", "_share")):
        return SHARE
    if measure in MEASURES:
        return NON_NEGATIVE
    return None


def _layer_name(prefix: str, layer: str, prefixes: set[str]) -> str:
    return layer if len(prefixes) == 1 else f"{prefix}/{layer}"


def new_task_accuracy(run: RunData) -> np.ndarray:
    """Accuracy on each task right after learning it: the matrix's diagonal, else ``continual/new_task_acc``."""
    matrix = run.accuracy_matrix
    if matrix:
        return np.array([matrix[t][t] if t in matrix else np.nan for t in range(run.num_tasks)])
    values = finished_task_values(run, NEW_TASK_ACCURACY_KEY)
    return np.array([values.get(t, np.nan) for t in range(run.num_tasks)])


# ---------------------------------------------------------------------------------------------------- charts
def accuracy_charts(run: RunData, axis: _Axis) -> tuple[list[Chart], dict[str, str]]:
    """A continual run's accuracy panels and the reasons for each panel left out."""
    skipped: dict[str, str] = {}
    if not axis.continual:
        return [], {}
    matrix = run.accuracy_matrix
    charts = []
    tasks = np.arange(run.num_tasks, dtype=float)
    diagonal = new_task_accuracy(run)
    if matrix:
        seen = np.array(seen_accuracy(matrix, run.num_tasks))
        series = [Series("new-task accuracy", tasks, diagonal)]
        if matrix_coverage(matrix) == "seen":
            series.append(Series("mean over seen tasks", tasks, seen))
        else:
            skipped["accuracy/seen_tasks"] = "only the task being learned was evaluated (eval_on: current)"
        charts.append(
            _xy_chart(
                "accuracy/new_task",
                "Accuracy",
                "Accuracy on each task right after learning it",
                "task",
                "accuracy",
                series,
                SHARE,
            )
        )
        width = len(next(iter(matrix.values())))
        z = np.full((run.num_tasks, width), np.nan)
        for t, row in matrix.items():
            if t < run.num_tasks:
                z[t, : len(row)] = row
        charts.append(
            Chart(
                "accuracy/matrix",
                "Accuracy",
                "Accuracy on task k (column) after training on task t (row)",
                "evaluated task k",
                "after task t",
                kind="heatmap",
                z=z,
                x_ticks=list(range(width)),
                y_ticks=list(range(run.num_tasks)),
            )
        )
    else:
        if np.isfinite(diagonal).any():
            charts.append(
                _xy_chart(
                    "accuracy/new_task",
                    "Accuracy",
                    "Accuracy on each task right after learning it",
                    "task",
                    "accuracy",
                    [Series("new-task accuracy", tasks, diagonal)],
                    SHARE,
                )
            )
        skipped["accuracy/matrix"] = "no per-task accuracy was logged (add TaskAccuracyTable, or log val/acc_task_<k>)"
    charts += _gap_and_transfer_charts(run, charts)
    return charts, skipped


def _task_series(name: str, values: dict[int, float]) -> Series:
    tasks = sorted(values)
    return Series(name, np.array(tasks, dtype=float), np.array([values[t] for t in tasks]))


def _gap_and_transfer_charts(run: RunData, accuracy: list[Chart]) -> list[Chart]:
    """The from-scratch baseline (beside the new-task accuracy, and the gap) and transfer, when they were logged."""
    charts = []
    scratch = finished_task_values(run, FROM_SCRATCH_ACCURACY_KEY)
    if scratch:
        for chart in accuracy:
            if chart.id == "accuracy/new_task":
                chart.series.append(replace(_task_series("trained from scratch", scratch), mode="markers"))
    gap = finished_task_values(run, PLASTICITY_GAP_KEY)
    if gap:
        charts.append(
            _xy_chart(
                "accuracy/plasticity_gap",
                "Accuracy",
                "Plasticity gap: from-scratch minus continual accuracy on each new task",
                "task",
                "accuracy difference",
                [_task_series("plasticity gap", gap)],
                DIFFERENCE_OF_SHARES,
            )
        )
    labels = {
        "bwt": "backward transfer",
        "fwt_next": "forward transfer (next task)",
        "fwt_all": "forward transfer (all)",
    }
    transfer = [_task_series(labels[name], finished_task_values(run, key)) for name, key in TRANSFER_KEYS.items()]
    transfer = [series for series in transfer if len(series.x)]
    if transfer:
        charts.append(
            _xy_chart(
                "accuracy/transfer",
                "Accuracy",
                "Transfer after each task (Lopez-Paz & Ranzato 2017)",
                "after task",
                "accuracy difference",
                transfer,
                DIFFERENCE_OF_SHARES,
            )
        )
    return charts


def training_charts(run: RunData, axis: _Axis) -> list[Chart]:
    """Loss and accuracy (or R²) of training and validation, time per epoch and the generalisation gap."""
    quality = "r2" if run.task == "regression" else "acc"
    quality_label = "R²" if quality == "r2" else "accuracy"
    train_loss = "train/loss_epoch" if run.has("train/loss_epoch") else "train/loss"
    train_quality = f"train/{quality}_epoch" if run.has(f"train/{quality}_epoch") else f"train/{quality}"
    title_suffix = " at the end of each task" if axis.continual else ""
    charts = [
        _xy_chart(
            "training/loss",
            "Training",
            f"Loss{title_suffix}",
            axis.label,
            "loss",
            [
                Series("train", *axis.last_in_task(train_loss)),
                Series("validation", *axis.last_in_task("val/loss")),
                # a language model's loss on the task being learned: the plasticity signal of a text stream
                Series("validation, task being learned", *axis.last_in_task(NEW_TASK_LOSS_KEY)),
            ],
        ),
        _xy_chart(
            f"training/{quality}",
            "Training",
            f"{quality_label.capitalize()}{title_suffix}",
            axis.label,
            quality_label,
            [
                Series("train", *axis.last_in_task(train_quality)),
                Series("validation", *axis.last_in_task(f"val/{quality}")),
            ],
            SHARE if quality == "acc" else None,  # R² has no lower bound
        ),
    ]
    if axis.continual:
        return charts  # per-epoch time and a validation-minus-training gap across changing tasks say nothing per task
    epochs, columns = run.epoch_table()
    if EPOCH_SECONDS_KEY in columns:
        charts.append(
            _xy_chart(
                "training/time",
                "Training",
                "Time per epoch",
                "epoch",
                "seconds",
                [Series("seconds per epoch", epochs.astype(float), columns[EPOCH_SECONDS_KEY])],
            )
        )
    train_epoch = columns.get(train_loss)
    if train_epoch is not None and "val/loss" in columns:
        charts.append(
            _xy_chart(
                "training/gap",
                "Training",
                "Generalisation gap (validation − training loss)",
                "epoch",
                "loss gap",
                [Series("validation − train", epochs.astype(float), columns["val/loss"] - train_epoch)],
            )
        )
    return charts


def measure_charts(run: RunData, axis: _Axis) -> list[Chart]:
    """One chart per monitor measure, a series per layer."""
    found: dict[str, dict[str, str]] = {}
    prefixes: dict[str, set[str]] = {}
    for key in run.columns:
        match = _MEASURE_KEY.match(key)
        if match and match["measure"] in MEASURES and run.has(key):
            found.setdefault(match["measure"], {})[key] = match["layer"]
            prefixes.setdefault(match["measure"], set()).add(match["prefix"])
    # prediction entropy is logged as <prefix>/predictions/prediction_entropy: the same shape, layer "predictions"
    charts = []
    x_label = "task (measured as it starts; the last point: end of training)" if axis.continual else "step"
    for measure, (section, title) in MEASURES.items():
        if measure not in found:
            continue
        series = []
        for key, layer in sorted(found[measure].items(), key=lambda item: (item[1] == "all", item[1])):
            prefix = key.split("/", 1)[0]
            series.append(Series(_layer_name(prefix, layer, prefixes[measure]), *axis.measurements(key)))
        label = title.split(" (")[0]
        chart = _xy_chart(f"measure/{measure}", section, title, x_label, label, series, measure_range(measure))
        charts.append(chart)
    return charts


def intervention_charts(run: RunData, axis: _Axis) -> list[Chart]:
    """What the interventions did: running totals per layer (CBP replacements, ReDo recycles) and events."""
    found: dict[str, list[tuple[str, str]]] = {}
    for key in run.columns:
        match = _INTERVENTION_KEY.match(key)
        if match and match["name"] in INTERVENTIONS and run.has(key):
            layer = match["layer"] or "all"
            if (
                match["name"] == "recycled"
                and layer == "all"
                and any(
                    k.startswith(f"{match['prefix']}/") and k.endswith("/recycled") and k != key for k in run.columns
                )
            ):
                continue  # ReDo's total of a step; its layers are drawn
            found.setdefault(match["name"], []).append((key, layer))
    charts = []
    for name, (kind, title) in INTERVENTIONS.items():
        if name not in found:
            continue
        series = []
        for key, layer in sorted(found[name], key=lambda item: (item[1] == "all", item[1])):
            if kind == "events":
                steps, values = run.series(key)
                running = np.cumsum(values)
                if axis.continual:
                    x, y = _events_per_task(run, key, running)
                else:
                    x, y = steps, running
            else:
                x, y = axis.last_in_task(key)
            series.append(Series(layer, x, y))
        label = "at the end of each task" if axis.continual else ""
        charts.append(
            _xy_chart(f"intervention/{name}", "Interventions", f"{title} {label}".strip(), axis.label, title, series)
        )
    return charts


def _events_per_task(run: RunData, key: str, running: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values = run.values(key)
    tasks = run.training_tasks[np.isfinite(values)]
    y = np.full(run.num_tasks, np.nan)
    for task, total in zip(tasks, running, strict=True):
        if not math.isnan(task):
            y[int(task)] = total
    # tasks without an event keep the running total of the tasks before them
    for t in range(1, len(y)):
        if np.isnan(y[t]) and not np.isnan(y[t - 1]):
            y[t] = y[t - 1]
    return _trim(np.arange(len(y), dtype=float), y)


def head_charts(run: RunData) -> tuple[list[Chart], dict[str, str]]:
    """Attention entropy per head and the head gates over time (heatmaps), and PlasticityCycle's decisions."""
    charts: list[Chart] = []
    for kind, title in (("head", "Attention entropy per head"), ("gate", "Head gates (0: pruned, 1: live)")):
        keys = sorted(
            ((k, _HEAD_KEY.match(k)) for k in run.columns if _HEAD_KEY.match(k) and _HEAD_KEY.match(k)["kind"] == kind),
            key=lambda item: (int(item[1]["layer"]), int(item[1]["head"])),
        )
        keys = [(k, m) for k, m in keys if run.has(k)]
        if not keys:
            continue
        steps = np.unique(np.concatenate([run.series(k)[0] for k, _ in keys]))
        z = np.full((len(keys), len(steps)), np.nan)
        for row, (key, _) in enumerate(keys):
            at, values = run.series(key)
            z[row, np.searchsorted(steps, at)] = values
        charts.append(
            Chart(
                f"heads/{kind}",
                "Attention heads",
                f"{title} over time",
                "step",
                "layer.head",
                kind="heatmap",
                z=z,
                x_ticks=steps.tolist(),
                y_ticks=[f"{m['layer']}.{m['head']}" for _, m in keys],
            )
        )
    skipped = {}
    cycles = (run.cycle or {}).get("cycles") or []
    if cycles:
        before = [_perplexity(c.get("before")) for c in cycles]
        after = [_perplexity(c.get("after")) for c in cycles]
        index = np.arange(len(cycles), dtype=float)
        kept = np.array([1.0 if c.get("success") else np.nan for c in cycles])
        charts.append(
            _xy_chart(
                "heads/cycles",
                "Attention heads",
                "PlasticityCycle: validation perplexity before and after each cycle",
                "cycle",
                "perplexity",
                [
                    Series("before", index, np.array(before)),
                    Series("after", index, np.array(after)),
                    Series("kept", index, np.array(after) * kept, mode="markers"),
                ],
            )
        )
    elif run.cycle is not None:
        skipped["heads/cycles"] = "plasticity_cycle.json holds no finished cycle"
    return charts, skipped


def _perplexity(measurement: Any) -> float:
    if isinstance(measurement, dict) and isinstance(measurement.get("perplexity"), (int, float)):
        return float(measurement["perplexity"])
    return math.nan


def cycle_table(run: RunData) -> tuple[list[str], list[list[Any]]]:
    """PlasticityCycle's decisions as table rows: one per cycle, its scalar fields and perplexities."""
    cycles = (run.cycle or {}).get("cycles") or []
    columns: list[str] = []
    rows = []
    for cycle in cycles:
        flat = {k: v for k, v in cycle.items() if isinstance(v, (int, float, str, bool)) or v is None}
        flat["perplexity before"] = _perplexity(cycle.get("before"))
        flat["perplexity after"] = _perplexity(cycle.get("after"))
        for name in flat:
            if name not in columns:
                columns.append(name)
        rows.append(flat)
    return columns, [[row.get(c) for c in columns] for row in rows]


def collapse_charts(run: RunData) -> list[Chart]:
    """Grokking runs: train and held-out accuracy beside the softmax-collapse and zero-loss shares."""
    keys = {name: [k for k in run.columns if k.endswith(f"/{name}") and run.has(k)] for name in _COLLAPSE_KEYS}
    if not any(keys.values()):
        return []
    accuracy = [
        Series(label, *run.series(key))
        for label, key in (
            ("train", "train/acc_epoch" if run.has("train/acc_epoch") else "train/acc"),
            ("validation", "val/acc"),
            ("test", "test/acc"),
        )
    ]
    shares = [Series(key, *run.series(key)) for name in _COLLAPSE_KEYS for key in keys[name]]
    return [
        _xy_chart(
            "collapse/accuracy", "Numerical stability", "Train and held-out accuracy", "step", "accuracy", accuracy
        ),
        _xy_chart(
            "collapse/shares",
            "Numerical stability",
            "Softmax collapse and zero loss terms",
            "step",
            "share of rows",
            shares,
        ),
    ]


def regression_charts(run: RunData, scores: dict[str, Any] | None) -> list[Chart]:
    """Residual suite and predicted against actual, from ``predictions.npz``."""
    from scipy import stats

    preds = run.predictions["predictions"].reshape(len(run.predictions["predictions"]), -1).astype(float)
    targets = run.predictions["targets"].reshape(len(preds), -1).astype(float)
    names = _target_names(run, preds.shape[1])
    residuals = preds - targets
    scale = residuals.std(axis=0)
    standardized = residuals / np.where(scale > 0, scale, 1)
    flat = standardized.reshape(-1)
    mu, sigma = stats.norm.fit(flat)
    grid = np.linspace(flat.min(), flat.max(), 200)
    (theoretical, ordered), _ = stats.probplot(flat, dist="norm")
    charts = [
        Chart(
            "regression/residuals",
            "Regression",
            "Standardised residuals",
            "residual / std",
            "density",
            [
                Series("residuals", flat, flat, mode="histogram"),
                Series(f"N({mu:.2f}, {sigma:.2f}²)", grid, stats.norm.pdf(grid, mu, sigma), mode="lines"),
            ],
        ),
        Chart(
            "regression/qq",
            "Regression",
            "Normal Q-Q",
            "theoretical quantile",
            "ordered residual / std",
            [
                Series("residuals", theoretical, ordered, mode="markers"),
                Series("normal", theoretical, theoretical, mode="lines"),
            ],
        ),
        Chart(
            "regression/residual_vs_predicted",
            "Regression",
            "Residual against prediction",
            "predicted",
            "residual / std",
            [Series(name, preds[:, k], standardized[:, k], mode="markers") for k, name in enumerate(names)],
        ),
        Chart(
            "regression/residual_box",
            "Regression",
            "Residuals per target (own units)",
            "target",
            "residual",
            [
                Series(name, np.full(len(residuals), k, dtype=float), residuals[:, k], mode="box")
                for k, name in enumerate(names)
            ],
        ),
    ]
    r2 = (scores or {}).get("per_target", {}).get("r2", [math.nan] * len(names))
    for k, name in enumerate(names):
        low, high = (
            float(min(targets[:, k].min(), preds[:, k].min())),
            float(max(targets[:, k].max(), preds[:, k].max())),
        )
        charts.append(
            Chart(
                f"regression/predicted_vs_actual/{name}",
                "Regression",
                f"{name}: predicted against actual (R² {r2[k]:.3f})",
                "actual",
                "predicted",
                [
                    Series(name, targets[:, k], preds[:, k], mode="markers"),
                    Series("identity", np.array([low, high]), np.array([low, high]), mode="lines"),
                ],
            )
        )
    return charts


def baseline_charts(run: RunData, scores: dict[str, Any] | None, baselines: dict[str, Any]) -> list[Chart]:
    """The model against the baselines of ``predictions.npz``: R², MAE, RMSE, MAPE (regression) or accuracy."""
    charts = []
    if scores is not None and baselines:
        models = {"model": scores, **baselines}
        for metric in ("r2", "mae", "rmse", "mape") if run.task == "regression" else ("accuracy",):
            values = np.array([float(models[m][metric]) for m in models])
            charts.append(
                Chart(
                    f"baselines/{metric}",
                    "Baselines",
                    f"{metric.upper() if metric != 'accuracy' else 'Accuracy'}: model against the baselines",
                    "",
                    metric,
                    [Series(metric, np.arange(len(models), dtype=float), values, mode="bar")],
                    x_ticks=list(models),
                )
            )
    return charts


def _target_names(run: RunData, count: int) -> list[str]:
    names = run.predictions.get("target_names") if run.predictions is not None else None
    return [str(n) for n in names] if names is not None else [f"target_{k}" for k in range(count)]


def run_charts(
    run: RunData, scores: dict[str, Any] | None = None, baselines: dict[str, Any] | None = None
) -> tuple[list[Chart], dict[str, str]]:
    """Every chart that applies to ``run``, and the panels left out with the reason (each listed once).

    Args:
        run: the run.
        scores: its held-out regression scores (:func:`~plasticity_lightning.reports.regression_scores`; default
            ``None``).
        baselines: the baselines' scores from ``predictions.npz``, by name (default ``None``).
    """
    axis = _Axis(run)
    charts: list[Chart] = []
    skipped: dict[str, str] = {}
    accuracy, reasons = accuracy_charts(run, axis)
    charts += accuracy
    skipped.update(reasons)
    charts += training_charts(run, axis)
    charts += measure_charts(run, axis)
    charts += intervention_charts(run, axis)
    heads, reasons = head_charts(run)
    charts += heads
    skipped.update(reasons)
    charts += collapse_charts(run)
    if run.predictions is not None:
        if run.task == "regression":
            charts += regression_charts(run, scores)
        charts += baseline_charts(run, scores, baselines or {})
    elif run.task == "regression":
        skipped["regression"] = "no predictions.npz (add the SavePredictions callback)"
    drawn = [c for c in charts if c.points > 0]
    for chart in charts:
        if chart.points == 0:
            skipped.setdefault(chart.id, "nothing was logged for it")
    groups = {
        "Rank": "no rank measures (add RankMonitor)",
        "Dormant units": "no dormancy measures (add DormantUnitMonitor)",
        "Weights": "no weight measures (add WeightMonitor)",
        "Interventions": "no intervention logged anything",
    }
    for section, reason in groups.items():
        if not any(c.section == section for c in drawn):
            skipped.setdefault(section, reason)
    return drawn, skipped


# ---------------------------------------------------------------------------------------------------- compare
def _aggregate(
    series: Sequence[Series], value_range: tuple[float, float] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    x = np.unique(np.concatenate([s.x for s in series]))
    stacked = np.full((len(series), len(x)), np.nan)
    for row, s in enumerate(series):
        stacked[row, np.searchsorted(x, s.x)] = s.y
    mean, low, high, _ = t_interval(stacked)
    if value_range is not None:
        low, high = np.clip(low, *value_range), np.clip(high, *value_range)
    return x, mean, low, high, len(series)


def compare_charts(variants: dict[str, list[RunData]]) -> tuple[list[Chart], dict[str, str]]:
    """Charts of every variant overlaid, each series the mean of the variant's runs with a 95% band.

    Heatmaps are drawn once per variant (its mean). Only charts that every variant has are drawn; the rest are listed.

    Args:
        variants: ``{variant name: runs}``, one run per seed (:func:`~plasticity_lightning.reports.load_variants`).
    """
    per_variant: dict[str, dict[str, list[Chart]]] = {}
    for name, runs in variants.items():
        by_id: dict[str, list[Chart]] = {}
        for run in runs:
            for chart in run_charts(run)[0]:
                if not chart.id.startswith(("regression/", "baselines/")):
                    by_id.setdefault(chart.id, []).append(chart)
        per_variant[name] = by_id
    names = list(variants)
    shared = [i for i in per_variant[names[0]] if all(i in per_variant[n] for n in names[1:])]
    skipped = {
        chart_id: f"only in {', '.join(n for n in names if chart_id in per_variant[n])}"
        for chart_id in dict.fromkeys(i for n in names for i in per_variant[n])
        if chart_id not in shared
    }
    charts: list[Chart] = []
    for chart_id in shared:
        template = per_variant[names[0]][chart_id][0]
        if template.kind == "heatmap":
            for name in names:
                matrices = [c.z for c in per_variant[name][chart_id]]
                rows = max(m.shape[0] for m in matrices)
                columns = max(m.shape[1] for m in matrices)
                stacked = np.full((len(matrices), rows, columns), np.nan)
                for index, matrix in enumerate(matrices):
                    stacked[index, : matrix.shape[0], : matrix.shape[1]] = matrix
                mean = t_interval(stacked)[0]
                ticks = per_variant[name][chart_id][0]
                charts.append(
                    replace(
                        template,
                        id=f"{chart_id}/{name}",
                        title=f"{template.title} — {name} (mean of {len(matrices)})",
                        z=mean,
                        x_ticks=ticks.x_ticks if mean.shape[1] == len(ticks.x_ticks or []) else None,
                        y_ticks=ticks.y_ticks if mean.shape[0] == len(ticks.y_ticks or []) else None,
                    )
                )
            continue
        series = []
        for name in names:
            runs = per_variant[name][chart_id]
            for label in dict.fromkeys(s.name for c in runs for s in c.series):
                parts = [s for c in runs for s in c.series if s.name == label]
                x, mean, low, high, seeds = _aggregate(parts, template.value_range)
                series.append(Series(label, x, mean, low, high, seeds=seeds, mode=parts[0].mode, group=name))
        charts.append(replace(template, series=series))
    return charts, skipped
