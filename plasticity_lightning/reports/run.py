"""Read one finished run (CSV logger directory) and write its figures and a JSON summary.

A run directory is what Lightning's :class:`~lightning.pytorch.loggers.CSVLogger` writes (``metrics.csv``,
``hparams.yaml``) plus what the library's callbacks add: ``config.yaml`` (LightningCLI), ``learning_dynamics.json``
(:class:`~plasticity_lightning.callbacks.LearningDynamics`) and ``predictions.npz``
(:class:`~plasticity_lightning.callbacks.SavePredictions`). Every part is optional except ``metrics.csv``; a panel
whose inputs are missing is left out and the summary says which.

Figures (PNG):

* ``training_dynamics.png`` — 2×2: train/validation loss; validation R² (or accuracy) with the best epoch marked;
  time per epoch and memory use; generalisation gap (validation − training loss).
* ``residuals.png`` (regression) — residual histogram with a fitted normal, normal Q-Q plot, residual vs predicted,
  per-target residual box plots. Residuals are standardised per target so targets of different units share axes.
* ``predicted_vs_actual.png`` (regression) — one scatter per target, in the data's own units.
* ``baseline_comparison.png`` — the model against the baselines of ``predictions.npz`` (R², MAE, RMSE, MAPE for
  regression; accuracy for classification).
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from plasticity_lightning.core.errors import DataNotFoundError
from plasticity_lightning.core.serialization import json_safe
from plasticity_lightning.metrics.dynamics import loss_convergence_epoch

METRICS_FILE = "metrics.csv"


class _HparamsLoader(yaml.SafeLoader):
    """Safe loading that also reads the tuples Lightning writes into ``hparams.yaml`` (``!!python/tuple``)."""


_HparamsLoader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))


@dataclass
class RunData:
    """One run read from disk: a per-epoch metric table and the optional artifacts."""

    directory: Path
    epochs: np.ndarray
    columns: dict[str, np.ndarray]
    hparams: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    dynamics: dict[str, Any] | None = None
    predictions: dict[str, np.ndarray] | None = None

    @property
    def task(self) -> str:
        if self.predictions is not None and "task" in self.predictions:
            return str(self.predictions["task"])
        if "task" in self.hparams:
            return str(self.hparams["task"])
        return "regression" if any(name.endswith("r2") for name in self.columns) else "classification"

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed_everything")
        return int(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else None

    def column(self, *names: str) -> np.ndarray | None:
        """The first of ``names`` that was logged (with at least one value)."""
        for name in names:
            values = self.columns.get(name)
            if values is not None and np.isfinite(values).any():
                return values
        return None


def find_run_dirs(path: str | Path) -> list[Path]:
    """Every directory at or below ``path`` that holds a ``metrics.csv``, in sorted order."""
    root = Path(path)
    if (root / METRICS_FILE).is_file():
        return [root]
    found = sorted(p.parent for p in root.glob(f"**/{METRICS_FILE}")) if root.is_dir() else []
    if not found:
        raise DataNotFoundError(
            f"{root}: no {METRICS_FILE} at or below it; give the directory of a run logged with CSVLogger "
            "(e.g. runs/plasticity/version_0)"
        )
    return found


def read_epoch_table(path: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-epoch values of every column of a CSVLogger ``metrics.csv`` (the last value logged in each epoch).

    Rows without an epoch (loggers called directly, e.g. ``DeviceStatsMonitor``) take the epoch of the latest
    step that Lightning logged with one.
    """
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    known = sorted({(int(float(r["step"])), int(float(r["epoch"]))) for r in rows if r.get("epoch") and r.get("step")})
    steps = [s for s, _ in known]
    table: dict[int, dict[str, float]] = {}
    for row in rows:
        if row.get("epoch"):
            epoch = int(float(row["epoch"]))
        elif row.get("step") and steps:
            epoch = known[max(bisect.bisect_right(steps, int(float(row["step"]))) - 1, 0)][1]
        else:
            continue
        entry = table.setdefault(epoch, {})
        for name, value in row.items():
            if name not in ("epoch", "step") and value not in ("", None):
                entry[name] = float(value)
    epochs = np.array(sorted(table), dtype=int)
    names = sorted({name for entry in table.values() for name in entry})
    columns = {name: np.array([table[e].get(name, math.nan) for e in epochs]) for name in names}
    return epochs, columns


def load_run(path: str | Path) -> RunData:
    """Read the run at ``path`` (a run directory, or a directory holding exactly one)."""
    found = find_run_dirs(path)
    if len(found) > 1:
        listing = ", ".join(str(p) for p in found[:6])
        raise DataNotFoundError(f"{path} holds {len(found)} runs ({listing}); name one of them")
    directory = found[0]
    epochs, columns = read_epoch_table(directory / METRICS_FILE)

    def _yaml(name: str) -> dict[str, Any]:
        file = directory / name
        loaded = yaml.load(file.read_text(), Loader=_HparamsLoader) if file.is_file() else None
        return loaded if isinstance(loaded, dict) else {}

    dynamics_file = directory / "learning_dynamics.json"
    dynamics = json.loads(dynamics_file.read_text()) if dynamics_file.is_file() else None
    predictions_file = directory / "predictions.npz"
    predictions = dict(np.load(predictions_file, allow_pickle=False)) if predictions_file.is_file() else None
    return RunData(directory, epochs, columns, _yaml("hparams.yaml"), _yaml("config.yaml"), dynamics, predictions)


# ---------------------------------------------------------------------------------------------------- metrics
def regression_scores(predictions: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """R² (uniform average over targets), MAE, RMSE and MAPE, overall and per target, by scikit-learn's metrics in
    float64 (MAPE as a fraction, as ``val/mape`` is logged). scikit-learn rather than torchmetrics' functional R²,
    which treats sums of squares below an absolute 1e-4 as zero and so scores small-unit targets 1 or 0.

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


def baselines_of(predictions: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key.removeprefix("baseline_"): value for key, value in predictions.items() if key.startswith("baseline_")}


def score(task: str, predictions: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    return (regression_scores if task == "regression" else classification_scores)(predictions, targets)


# ---------------------------------------------------------------------------------------------------- summary
def _best(values: np.ndarray | None, epochs: np.ndarray, lowest: bool) -> tuple[float | None, int | None]:
    if values is None or not np.isfinite(values).any():
        return None, None
    masked = np.where(np.isfinite(values), values, np.inf if lowest else -np.inf)
    index = int(np.argmin(masked) if lowest else np.argmax(masked))
    return float(values[index]), int(epochs[index])


def train_loss(run: RunData) -> np.ndarray | None:
    return run.column("train/loss_epoch", "train/loss")


def val_loss(run: RunData) -> np.ndarray | None:
    return run.column("val/loss")


def summarize_run(run: RunData) -> dict[str, Any]:
    """The JSON summary of a run: best/final losses, convergence, gap, time, held-out scores and baselines."""
    epochs = run.epochs
    train, val = train_loss(run), val_loss(run)
    best_loss, best_epoch = _best(val, epochs, lowest=True)
    quality_name = "r2" if run.task == "regression" else "acc"
    best_quality, best_quality_epoch = _best(run.column(f"val/{quality_name}"), epochs, lowest=False)
    summary: dict[str, Any] = {
        "run_dir": str(run.directory),
        "task": run.task,
        "seed": run.seed,
        "epochs": len(epochs),
        "best_validation_loss": best_loss,
        "best_epoch": best_epoch,
        f"best_validation_{quality_name}": best_quality,
        f"best_{quality_name}_epoch": best_quality_epoch,
        "final_train_loss": _last(train),
        "final_validation_loss": _last(val),
        "convergence_epoch": None,
        "generalization_gap": None,
    }
    if val is not None and np.isfinite(val).any():
        finite = np.isfinite(val)
        summary["convergence_epoch"] = loss_convergence_epoch(val[finite].tolist(), epochs[finite].tolist())[0]
    if train is not None and val is not None:
        gap = val - train
        summary["generalization_gap"] = _last(gap)
    seconds = run.column("time/elapsed_seconds")
    summary["train_seconds"] = _last(seconds)
    if run.predictions is not None:
        preds, targets = run.predictions["predictions"], run.predictions["targets"]
        summary["split"] = str(run.predictions.get("split", "test"))
        summary["scores"] = score(run.task, preds, targets)
        summary["baselines"] = {
            name: score(run.task, values, targets) for name, values in baselines_of(run.predictions).items()
        }
        if "target_names" in run.predictions:
            summary["target_names"] = [str(n) for n in run.predictions["target_names"]]
    if run.dynamics is not None:
        summary["learning_dynamics"] = run.dynamics.get("summary")
    return summary


def _last(values: np.ndarray | None) -> float | None:
    if values is None:
        return None
    finite = values[np.isfinite(values)]
    return float(finite[-1]) if len(finite) else None


# ---------------------------------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_series(axis, epochs: np.ndarray, values: np.ndarray | None, label: str, **style: Any) -> bool:
    if values is None:
        return False
    finite = np.isfinite(values)
    axis.plot(epochs[finite], values[finite], label=label, **style)
    return True


def training_dynamics_figure(run: RunData, path: Path) -> Path:
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    epochs = run.epochs
    loss_axis, quality_axis, resource_axis, gap_axis = axes.flat

    _plot_series(loss_axis, epochs, train_loss(run), "train")
    _plot_series(loss_axis, epochs, val_loss(run), "validation")
    loss_axis.set(title="Loss", xlabel="epoch", ylabel="loss")
    if (train_loss(run) is not None and np.nanmin(train_loss(run)) > 0) or (
        val_loss(run) is not None and np.nanmin(val_loss(run)) > 0
    ):
        loss_axis.set_yscale("log")

    quality = "r2" if run.task == "regression" else "acc"
    label = "R²" if quality == "r2" else "accuracy"
    _plot_series(quality_axis, epochs, run.column(f"train/{quality}_epoch", f"train/{quality}"), "train")
    if _plot_series(quality_axis, epochs, run.column(f"val/{quality}"), "validation"):
        best, best_epoch = _best(run.column(f"val/{quality}"), epochs, lowest=False)
        quality_axis.axvline(best_epoch, color="grey", linestyle="--", label=f"best {best:.4f} @ {best_epoch}")
    quality_axis.set(title=label, xlabel="epoch", ylabel=label)

    seconds = run.column("time/epoch_seconds")
    if not _plot_series(resource_axis, epochs, seconds, "seconds per epoch", color="tab:blue"):
        resource_axis.text(0.5, 0.5, "no epoch times (add EpochTimer)", ha="center", transform=resource_axis.transAxes)
    resource_axis.set(title="Time and memory", xlabel="epoch", ylabel="seconds per epoch")
    # GPU memory (DeviceStatsMonitor's CUDA allocator stats) when there is any, else the host's RAM in use
    memory_name = next((n for n in sorted(run.columns) if "allocated_bytes.all.current" in n), None) or next(
        (n for n in sorted(run.columns) if "vm_percent" in n or "memory" in n.lower()), None
    )
    if memory_name is not None:
        twin = resource_axis.twinx()
        _plot_series(twin, epochs, run.columns[memory_name], memory_name.split("/")[-1], color="tab:red")
        twin.set_ylabel(memory_name.split("/")[-1])
        twin.legend(loc="upper right")

    train, val = train_loss(run), val_loss(run)
    if train is not None and val is not None:
        _plot_series(gap_axis, epochs, val - train, "validation − train loss", color="tab:purple")
        gap_axis.axhline(0, color="grey", linewidth=0.8)
    gap_axis.set(title="Generalisation gap", xlabel="epoch", ylabel="loss gap")

    for axis in (loss_axis, quality_axis, resource_axis, gap_axis):
        if axis.get_legend_handles_labels()[0]:
            axis.legend(loc="upper left")
        axis.grid(alpha=0.3)
    figure.suptitle(f"Training dynamics — {run.directory}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def residuals_figure(run: RunData, path: Path) -> Path:
    from scipy import stats

    plt = _pyplot()
    preds = run.predictions["predictions"].reshape(len(run.predictions["predictions"]), -1)
    targets = run.predictions["targets"].reshape(len(preds), -1)
    names = _target_names(run, preds.shape[1])
    residuals = preds - targets
    scale = residuals.std(axis=0)
    standardized = residuals / np.where(scale > 0, scale, 1)
    figure, axes = plt.subplots(2, 2, figsize=(12, 9))
    hist_axis, qq_axis, scatter_axis, box_axis = axes.flat

    flat = standardized.reshape(-1)
    hist_axis.hist(flat, bins=50, density=True, alpha=0.7, color="tab:blue")
    mu, sigma = stats.norm.fit(flat)
    grid = np.linspace(flat.min(), flat.max(), 200)
    hist_axis.plot(grid, stats.norm.pdf(grid, mu, sigma), color="tab:red", label=f"N({mu:.2f}, {sigma:.2f}²)")
    hist_axis.set(title="Standardised residuals", xlabel="residual / std", ylabel="density")
    hist_axis.legend()

    stats.probplot(flat, dist="norm", plot=qq_axis)
    qq_axis.set_title("Normal Q-Q")

    for k, name in enumerate(names):
        scatter_axis.scatter(preds[:, k], standardized[:, k], s=6, alpha=0.5, label=name)
    scatter_axis.axhline(0, color="grey", linewidth=0.8)
    scatter_axis.set(title="Residual vs predicted", xlabel="predicted", ylabel="residual / std")
    scatter_axis.legend(fontsize=7, markerscale=2)

    box_axis.boxplot([residuals[:, k] for k in range(len(names))])
    box_axis.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=8)
    box_axis.axhline(0, color="grey", linewidth=0.8)
    box_axis.set(title="Residuals per target (own units)", ylabel="residual")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _target_names(run: RunData, count: int) -> list[str]:
    names = run.predictions.get("target_names") if run.predictions is not None else None
    return [str(n) for n in names] if names is not None else [f"target_{k}" for k in range(count)]


def predicted_vs_actual_figure(run: RunData, path: Path) -> Path:
    plt = _pyplot()
    preds = run.predictions["predictions"].reshape(len(run.predictions["predictions"]), -1)
    targets = run.predictions["targets"].reshape(len(preds), -1)
    names = _target_names(run, preds.shape[1])
    scores = regression_scores(preds, targets)["per_target"]["r2"]
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 4 * rows), squeeze=False)
    for k, axis in enumerate(axes.flat):
        if k >= len(names):
            axis.axis("off")
            continue
        axis.scatter(targets[:, k], preds[:, k], s=6, alpha=0.5)
        low, high = (
            float(min(targets[:, k].min(), preds[:, k].min())),
            float(max(targets[:, k].max(), preds[:, k].max())),
        )
        axis.plot([low, high], [low, high], color="tab:red", linewidth=1)
        axis.set(title=f"{names[k]} (R² {scores[k]:.3f})", xlabel="actual", ylabel="predicted")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def baseline_figure(run: RunData, summary: dict[str, Any], path: Path) -> Path:
    plt = _pyplot()
    models = {"model": summary["scores"], **summary["baselines"]}
    names = ["r2", "mae", "rmse", "mape"] if run.task == "regression" else ["accuracy"]
    figure, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 4), squeeze=False)
    for axis, metric in zip(axes.flat, names, strict=True):
        values = [models[m][metric] for m in models]
        axis.bar(list(models), values, color=["tab:blue", *["tab:grey"] * (len(models) - 1)])
        axis.set(title=metric.upper() if metric != "accuracy" else "accuracy")
        for x, value in enumerate(values):
            axis.text(x, value, f"{value:.3g}", ha="center", va="bottom", fontsize=8)
    figure.suptitle(f"Model vs baselines ({summary.get('split', 'test')} split)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_run_report(path: str | Path, output: str | Path | None = None) -> dict[str, Any]:
    """Write the figures and ``summary.json`` of the run at ``path`` into ``output`` (default ``<run>/report``).

    Returns the summary, whose ``figures`` lists the files written and ``skipped`` the panels left out and why.
    """
    run = load_run(path)
    folder = Path(output) if output is not None else run.directory / "report"
    folder.mkdir(parents=True, exist_ok=True)
    summary = summarize_run(run)
    figures = [training_dynamics_figure(run, folder / "training_dynamics.png")]
    skipped: dict[str, str] = {}
    if run.task != "regression":
        skipped.update({"residuals": "classification run", "predicted_vs_actual": "classification run"})
    if run.predictions is None:
        reason = "no predictions.npz (add the SavePredictions callback)"
        panels = ("residuals", "predicted_vs_actual") if run.task == "regression" else ()
        skipped.update(dict.fromkeys((*panels, "baseline_comparison"), reason))
    else:
        if run.task == "regression":
            figures.append(residuals_figure(run, folder / "residuals.png"))
            figures.append(predicted_vs_actual_figure(run, folder / "predicted_vs_actual.png"))
        if summary["baselines"]:
            figures.append(baseline_figure(run, summary, folder / "baseline_comparison.png"))
        else:
            skipped["baseline_comparison"] = "predictions.npz holds no baselines"
    summary["figures"] = [str(f) for f in figures]
    summary["skipped"] = skipped
    (folder / "summary.json").write_text(json.dumps(json_safe(summary), indent=2, allow_nan=False))
    return summary
