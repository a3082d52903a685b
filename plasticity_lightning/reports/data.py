"""Reading what a run logged: CSVLogger or TensorBoard scalars, plus the artifacts of the run-directory contract.

A run is read into one table with a row per logging call (``step``, ``epoch`` when logged, and every logged key),
whatever logger wrote it, and the optional files (:mod:`plasticity_lightning.core.rundir`). Unusable inputs raise a
:class:`~plasticity_lightning.core.errors.PlasticityConfigError` (or ``DataNotFoundError``) whose one line names the
file and what is wrong with it; ``plasticity`` prints it and exits with status 2.
"""

from __future__ import annotations

import json
import math
import zipfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from plasticity_lightning.core.errors import DataNotFoundError, PlasticityConfigError
from plasticity_lightning.core.rundir import (
    CONFIG_FILE,
    FINISHED_TASK_KEY,
    HPARAMS_FILE,
    LEARNING_DYNAMICS_FILE,
    METRICS_FILE,
    PLASTICITY_CYCLE_FILE,
    PREDICTIONS_FILE,
    TASK_ACCURACY_FILE,
    TASK_ID_KEY,
    TENSORBOARD_EVENTS_GLOB,
    per_task_accuracy_key,
)


def _read_predictions(path: Path) -> dict[str, np.ndarray]:
    """The arrays of ``predictions.npz``; pickled (object) arrays are refused in one line, never unpickled."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        raise PlasticityConfigError(
            f"{path}: not an .npz of plain arrays ({err}); the report never unpickles a run's files. "
            "Save numeric arrays (np.savez) or remove the file"
        ) from None


class _HparamsLoader(yaml.SafeLoader):
    """Safe loading that also reads the tuples Lightning writes into ``hparams.yaml`` (``!!python/tuple``)."""


_HparamsLoader.add_constructor("tag:yaml.org,2002:python/tuple", lambda loader, node: loader.construct_sequence(node))


def _is_run(directory: Path) -> bool:
    return (directory / METRICS_FILE).is_file() or any(directory.glob(TENSORBOARD_EVENTS_GLOB))


def find_run_dirs(path: str | Path) -> list[Path]:
    """Every run directory (a ``metrics.csv`` or TensorBoard event files) at or below ``path``, sorted.

    Args:
        path: a run directory or a folder of runs.
    """
    root = Path(path)
    if not root.exists():
        raise DataNotFoundError(f"{root}: no such file or directory")
    if root.is_dir() and _is_run(root):
        return [root]
    found: set[Path] = set()
    if root.is_dir():
        found.update(p.parent for p in root.glob(f"**/{METRICS_FILE}"))
        found.update(p.parent for p in root.glob(f"**/{TENSORBOARD_EVENTS_GLOB}"))
    found = {p for p in found if "report" not in p.relative_to(root).parts}  # never a report's own folder
    if not found:
        raise DataNotFoundError(
            f"{root} is not a run: no {METRICS_FILE} (CSVLogger) or {TENSORBOARD_EVENTS_GLOB} (TensorBoardLogger) at "
            "or below it; give a run directory such as runs/<name>/version_0"
        )
    return sorted(found)


# ---------------------------------------------------------------------------------------------------- metrics
def read_metrics_csv(path: str | Path) -> pd.DataFrame:
    """A CSVLogger ``metrics.csv`` as a float table (one row per logging call), checked.

    A file that is not one gets a one-line error naming the problem.

    Args:
        path: the ``metrics.csv`` file.
    """
    path = Path(path)
    raw = path.read_bytes()
    if b"\x00" in raw[:8192]:
        raise PlasticityConfigError(f"{path}: a binary file, not a CSVLogger metrics.csv")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PlasticityConfigError(f"{path}: not UTF-8 text (byte {err.start}), not a CSVLogger metrics.csv") from None
    if not text.strip():
        raise PlasticityConfigError(f"{path}: empty file, the run logged nothing")
    try:
        table = pd.read_csv(path, engine="c", low_memory=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        reason = " ".join(str(err).split())
        raise PlasticityConfigError(f"{path}: malformed CSV ({reason})") from None
    if "step" not in table.columns:
        columns = ", ".join(map(str, table.columns[:5]))
        raise PlasticityConfigError(f"{path}: no 'step' column (columns: {columns}), not a CSVLogger metrics.csv")
    if table.empty:
        raise PlasticityConfigError(f"{path}: header only, the run logged no values")
    for name in table.columns:
        if table[name].dtype.kind in "fiub":
            continue
        # pandas parsed this column as text: find the first entry that is not a number
        text = table[name].astype(str).str.strip()
        converted = pd.to_numeric(text.where(table[name].notna(), None), errors="coerce")
        bad = converted.isna() & table[name].notna()
        if bad.any():
            row = int(np.flatnonzero(bad.to_numpy())[0])
            raise PlasticityConfigError(
                f"{path}: column {name!r}, data row {row + 1} holds {text.iloc[row]!r}, not a number"
            )
        # the values through Python's correctly rounded float(): pandas 2.0's to_numeric reads a 20-digit integer
        # one ulp off (1.0000000000000002e+20); to_numeric above only decides which entries are numbers
        table[name] = text.where(converted.notna()).astype(float)
    table = table.astype(float)
    if table["step"].isna().any():
        row = int(np.flatnonzero(table["step"].isna().to_numpy())[0])
        raise PlasticityConfigError(f"{path}: data row {row + 1} has no step")
    if table.drop(columns=[c for c in ("step", "epoch") if c in table]).notna().to_numpy().sum() == 0:
        raise PlasticityConfigError(f"{path}: no logged values, only steps")
    return table


def read_tensorboard(directory: str | Path) -> pd.DataFrame:
    """Every scalar of the TensorBoard event files in ``directory``, as one table.

    Every scalar of the TensorBoard event files in ``directory``, read with TensorBoard's own ``EventAccumulator``, as
    one table: a row per (step, n-th value of a key at that step), so two measurements at one step stay two rows, as in
    a ``metrics.csv``.

    Args:
        directory: the folder of the event files.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    try:
        accumulator.Reload()
    except Exception as err:  # a damaged event file: TensorBoard raises its own errors
        raise PlasticityConfigError(f"{directory}: unreadable TensorBoard event file ({type(err).__name__})") from None
    records: list[tuple[int, int, float, str, float]] = []
    for tag in accumulator.Tags().get("scalars", []):
        seen: dict[int, int] = {}
        for event in accumulator.Scalars(tag):
            occurrence = seen.get(event.step, 0)
            seen[event.step] = occurrence + 1
            records.append((event.step, occurrence, event.wall_time, tag, event.value))
    if not records:
        raise PlasticityConfigError(f"{directory}: the TensorBoard event files hold no scalars")
    long = pd.DataFrame(records, columns=["step", "occurrence", "wall_time", "key", "value"])
    table = long.pivot_table(index=["step", "occurrence"], columns="key", values="value", aggfunc="last")
    order = long.groupby(["step", "occurrence"])["wall_time"].min()
    table = table.loc[order.sort_values(kind="stable").index].reset_index().drop(columns="occurrence")
    table.columns.name = None
    table["step"] = table["step"].astype(float)
    return table


# ---------------------------------------------------------------------------------------------------- runs
@dataclass
class RunData:
    """One run read from disk.

    Attributes:
        directory: the run directory.
        table: a row per logging call, sorted by step (ties keep the logging order): ``step``, ``epoch`` (NaN on
            rows that did not log it) and every logged key.
        source: ``"csv"`` or ``"tensorboard"``.
        hparams: ``hparams.yaml`` (empty when absent).
        config: LightningCLI's ``config.yaml`` (empty when absent).
        dynamics: ``learning_dynamics.json`` (``None`` when absent).
        predictions: ``predictions.npz`` (``None`` when absent).
        cycle: ``plasticity_cycle.json`` (``None`` when absent).
        task_accuracy: ``task_accuracy.csv`` as ``{after_task: row}`` (NaN where a task was not evaluated).
    """

    directory: Path
    table: pd.DataFrame
    source: str = "csv"
    hparams: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    dynamics: dict[str, Any] | None = None
    predictions: dict[str, np.ndarray] | None = None
    cycle: dict[str, Any] | None = None
    task_accuracy: dict[int, list[float]] | None = None

    # ------------------------------------------------------------------ what kind of run
    @property
    def columns(self) -> list[str]:
        return [c for c in self.table.columns if c not in ("step", "epoch")]

    @cached_property
    def _arrays(self) -> dict[str, np.ndarray]:
        return {name: self.table[name].to_numpy(dtype=float) for name in self.table.columns}

    @cached_property
    def _logged(self) -> frozenset[str]:
        return frozenset(name for name, values in self._arrays.items() if np.isfinite(values).any())

    def values(self, key: str) -> np.ndarray:
        """Every row's value of ``key`` (NaN where the row did not log it); empty when it was never logged."""
        return self._arrays.get(key, np.full(len(self.table), np.nan))

    def has(self, key: str) -> bool:
        """Whether ``key`` was logged with at least one finite value."""
        return key in self._logged

    @property
    def task(self) -> str:
        """``"regression"`` or ``"classification"``."""
        if self.predictions is not None and "task" in self.predictions:
            return str(self.predictions["task"])
        if "task" in self.hparams:
            return str(self.hparams["task"])
        return "regression" if any(name.endswith("r2") for name in self.columns) else "classification"

    @property
    def continual(self) -> bool:
        """Whether the run trained on a task stream (it logged a task id or a task-accuracy matrix)."""
        return self.task_accuracy is not None or self.has(TASK_ID_KEY) or bool(self._per_task_columns())

    def _per_task_columns(self) -> list[int]:
        prefix = per_task_accuracy_key("val", 0)[:-1]
        tails = [c[len(prefix) :] for c in self.columns if c.startswith(prefix)]
        return sorted(int(tail) for tail in tails if tail.isdigit())

    @property
    def seed(self) -> int | None:
        seed = self.config.get("seed_everything")
        return int(seed) if isinstance(seed, (int, float)) and not isinstance(seed, bool) else None

    @cached_property
    def num_tasks(self) -> int:
        """Tasks the run trained on: the highest task seen, plus one (a stream cut short counts what it reached)."""
        highest = -1
        if self.has(TASK_ID_KEY):
            highest = int(np.nanmax(self.values(TASK_ID_KEY)))
        if self.task_accuracy:
            highest = max(highest, max(self.task_accuracy))
        if highest < 0 and self._per_task_columns():  # no task id logged: the tasks that were evaluated
            highest = self._per_task_columns()[-1]
        return highest + 1

    # ------------------------------------------------------------------ series
    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps, values)`` of every finite value logged under ``key``, in logging order."""
        if key not in self.table.columns:
            return np.empty(0), np.empty(0)
        values = self.values(key)
        keep = np.isfinite(values)
        return self.values("step")[keep], values[keep]

    @cached_property
    def row_tasks(self) -> np.ndarray:
        """The task each row belongs to.

        The row's own ``task_id`` (the monitors log it with their values), else the task logged next at or after its
        step (a measurement belongs to the task it precedes), else the last one. NaN in runs without tasks.
        """
        if TASK_ID_KEY not in self.table.columns:
            return np.full(len(self.table), np.nan)
        tasks = self.table[TASK_ID_KEY]
        return tasks.fillna(tasks.bfill()).fillna(tasks.ffill()).to_numpy()

    @cached_property
    def training_tasks(self) -> np.ndarray:
        """The task of each row as training saw it.

        The last task logged at or before the row (validation and epoch-end rows follow the training steps they
        summarise).
        """
        if TASK_ID_KEY not in self.table.columns:
            return np.full(len(self.table), np.nan)
        tasks = self.table[TASK_ID_KEY]
        return tasks.ffill().fillna(tasks.bfill()).to_numpy()

    def by_task(self, key: str) -> tuple[list[int | None], list[float]]:
        """``(tasks, values)`` of ``key`` in logging order, each value with the task it measured."""
        if key not in self.table.columns:
            return [], []
        values = self.values(key)
        keep = np.isfinite(values)
        tasks = self.row_tasks[keep]
        return [None if math.isnan(t) else int(t) for t in tasks], values[keep].tolist()

    @cached_property
    def accuracy_matrix(self) -> dict[int, list[float]]:
        """``R[t][k]``: accuracy on task ``k`` at the last validation while training on task ``t``.

        From ``task_accuracy.csv`` when the run wrote one, else from the ``val/acc_task_<k>`` values of the table.
        """
        if self.task_accuracy:
            return self.task_accuracy
        width = self.num_tasks
        keys = [per_task_accuracy_key("val", k) for k in range(width)]
        if width <= 0 or not any(self.has(key) for key in keys):
            return {}
        rows: dict[int, list[float]] = {}
        tasks = self.training_tasks
        for k, key in enumerate(keys):
            if key not in self.table.columns:
                continue
            values = self.values(key)
            for index in np.flatnonzero(np.isfinite(values)):
                if not math.isnan(tasks[index]):
                    rows.setdefault(int(tasks[index]), [math.nan] * width)[k] = float(values[index])
        return dict(sorted(rows.items()))

    def epoch_table(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Per-epoch values of every key (the last value logged in each epoch).

        Rows without an epoch take the epoch of the latest row at or before their step that has one.
        """
        if "epoch" not in self.table.columns or not self.table["epoch"].notna().any():
            return np.empty(0, dtype=int), {}
        epochs = self.table["epoch"].ffill().bfill().astype(int)
        grouped = self.table.drop(columns=["epoch", "step"]).groupby(epochs.to_numpy(), sort=True).last()
        return grouped.index.to_numpy(dtype=int), {name: grouped[name].to_numpy(float) for name in grouped.columns}


def _read_task_accuracy(path: Path) -> dict[int, list[float]] | None:
    if not path.is_file():
        return None
    table = pd.read_csv(path)
    if "after_task" not in table.columns:
        raise PlasticityConfigError(f"{path}: no 'after_task' column, not a task-accuracy table")
    accuracy = [c for c in table.columns if c.startswith("acc_task_")]
    complete = table["complete"] if "complete" in table.columns else pd.Series(1, index=table.index)
    return {
        int(row["after_task"]): [float(row[c]) for c in accuracy]
        for (_, row), done in zip(table.iterrows(), complete, strict=True)
        if int(done) == 1
    }


def load_run(path: str | Path) -> RunData:
    """Read the run at ``path`` (a run directory, or a directory holding exactly one).

    Args:
        path: a run directory, or a directory holding exactly one.
    """
    found = find_run_dirs(path)
    if len(found) > 1:
        listing = ", ".join(str(p) for p in found[:6])
        raise PlasticityConfigError(f"{path} holds {len(found)} runs ({listing}); name one of them, or use --compare")
    directory = found[0]
    if (directory / METRICS_FILE).is_file():
        table, source = read_metrics_csv(directory / METRICS_FILE), "csv"
    else:
        table, source = read_tensorboard(directory), "tensorboard"
    if "epoch" not in table.columns:
        table["epoch"] = np.nan
    table = table.sort_values("step", kind="stable").reset_index(drop=True)

    def _yaml(name: str) -> dict[str, Any]:
        file = directory / name
        try:
            loaded = yaml.load(file.read_text(), Loader=_HparamsLoader) if file.is_file() else None
        except yaml.YAMLError:
            raise PlasticityConfigError(f"{file}: not valid YAML") from None
        return loaded if isinstance(loaded, dict) else {}

    def _json(name: str) -> dict[str, Any] | None:
        file = directory / name
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PlasticityConfigError(f"{file}: not valid JSON") from None

    predictions_file = directory / PREDICTIONS_FILE
    predictions = _read_predictions(predictions_file) if predictions_file.is_file() else None
    return RunData(
        directory=directory,
        table=table,
        source=source,
        hparams=_yaml(HPARAMS_FILE),
        config=_yaml(CONFIG_FILE),
        dynamics=_json(LEARNING_DYNAMICS_FILE),
        predictions=predictions,
        cycle=_json(PLASTICITY_CYCLE_FILE),
        task_accuracy=_read_task_accuracy(directory / TASK_ACCURACY_FILE),
    )


def read_epoch_table(path: str | Path) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Per-epoch values of every column of a CSVLogger ``metrics.csv`` (:meth:`RunData.epoch_table`).

    Args:
        path: the ``metrics.csv`` file.
    """
    table = read_metrics_csv(path)
    if "epoch" not in table.columns:
        table["epoch"] = np.nan
    return RunData(Path(path).parent, table.sort_values("step", kind="stable").reset_index(drop=True)).epoch_table()


def finished_task_values(run: RunData, key: str) -> dict[int, float]:
    """``{task: value}`` of a ``continual/*`` key.

    ``{task: value}`` of a ``continual/*`` key, each value with the task it describes (``continual/task`` on its row;
    runs written before that key existed: the n-th value is task n).
    """
    _, values = run.series(key)
    if not len(values):
        return {}
    if FINISHED_TASK_KEY in run.table.columns:
        tasks = run.values(FINISHED_TASK_KEY)[np.isfinite(run.values(key))]
        if np.isfinite(tasks).all():
            return {int(t): float(v) for t, v in zip(tasks, values, strict=True)}
    return {t: float(v) for t, v in enumerate(values)}
