"""Per-task bookkeeping for continual streams: the accuracy matrix, and the best weights of each task."""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from plasticity_lightning.callbacks.base import TaskAwareCallback
from plasticity_lightning.callbacks.intervention import Intervention
from plasticity_lightning.callbacks.monitor import PlasticityMonitor
from plasticity_lightning.core.errors import PlasticityConfigError, check_choice, check_positive_int
from plasticity_lightning.core.tasks import TaskContext, get_task_context, per_task_accuracy_key, stopped_mid_task

log = logging.getLogger(__name__)


class TaskAccuracyTable(TaskAwareCallback):
    """The accuracy matrix of a continual run, printed, logged and saved.

    ``R[t][k]`` is the accuracy on task ``k`` at the last validation while training on task ``t`` (read from the
    ``val/acc_task_<k>`` values that the library's models log). When a task ends the callback prints one line
    and logs ``continual/new_task_acc`` (accuracy on the task just learned: the plasticity signal, which falls
    when a network loses plasticity), ``continual/avg_seen_acc`` and ``continual/avg_forgetting``. At the end of
    ``fit`` it prints the matrix (or a summary for long streams) and writes it as CSV to the log directory.

    Args:
        stage: ``"val"`` reads validation accuracies (``"test"`` reads ``test/acc_task_<k>``).
        filename: CSV file name inside ``trainer.log_dir`` (written when the trainer has a logger); ``None``
            disables the file.
        max_printed_tasks: print the full matrix only up to this many tasks.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[TaskAccuracyTable()], logger=False, enable_progress_bar=False)
    """

    def __init__(self, stage: str = "val", filename: str | None = "task_accuracy.csv", max_printed_tasks: int = 12):
        super().__init__()
        self.stage = check_choice("TaskAccuracyTable", "stage", stage, ("val", "test"))
        self.filename = filename
        self.max_printed_tasks = check_positive_int("TaskAccuracyTable", "max_printed_tasks", max_printed_tasks)
        self.num_tasks: int | None = None
        self.rows: dict[int, list[float]] = {}
        self._latest: tuple[int, list[float]] | None = None
        self.partial: tuple[int, list[float]] | None = None  # the unfinished task when fit stopped mid-task
        self._state_key: str | None = None

    @property
    def state_key(self) -> str:
        # Lightning reads state_key around every hook call (profiler names): build it once.
        if self._state_key is None:
            self._state_key = self._generate_state_key(stage=self.stage)
        return self._state_key

    # ------------------------------------------------------------------ collecting
    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        context = get_task_context(trainer)
        if context is None:
            return
        self.num_tasks = context.num_tasks
        metrics = trainer.callback_metrics
        values = []
        for k in range(context.num_tasks):
            value = metrics.get(per_task_accuracy_key(self.stage, k))
            values.append(float(value) if value is not None else math.nan)
        self._latest = (context.task_id, values)

    @override
    def on_task_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: TaskContext, previous_task: int | None
    ) -> None:
        if previous_task is not None:
            self._finish_task(trainer, previous_task)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.partial = None
        if self._latest is not None:
            task = self._latest[0]
            if stopped_mid_task(trainer):  # report the task as unfinished; a resumed fit finishes it
                self.partial = (task, list(self._latest[1]))
                rank_zero_info(f"Task {task} stopped before its end: accuracy on it so far {self._latest[1][task]:.4f}")
            else:
                self._finish_task(trainer, task)
        # trainer.log_dir broadcasts from rank 0: every rank must ask, never only rank 0 (it would hang)
        directory = Path(trainer.log_dir or trainer.default_root_dir)
        if not (self.rows or self.partial) or not trainer.is_global_zero:
            return
        self._print_matrix()
        # no logger (or fast_dev_run's dummy one) means no run directory to write into
        if trainer.loggers and not trainer.fast_dev_run:
            path = self._write_csv(directory)
            if path is not None:
                rank_zero_info(f"Task accuracy matrix saved to {path}")

    def _finish_task(self, trainer: pl.Trainer, task: int) -> None:
        if self._latest is None or self._latest[0] != task or task in self.rows:
            return
        self.rows[task] = list(self._latest[1])
        summary = self.summary()
        message = f"Task {task} done: accuracy on it {self.rows[task][task]:.4f}"
        if not math.isnan(summary["avg_seen_acc"]):
            message += f" | mean over tasks 0-{task}: {summary['avg_seen_acc']:.4f}"
        if not math.isnan(summary["avg_forgetting"]):
            message += f" | mean forgetting {summary['avg_forgetting']:.4f}"
        rank_zero_info(message)
        metrics = {f"continual/{name}": value for name, value in summary.items() if not math.isnan(value)}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ results
    def summary(self) -> dict[str, float]:
        """Standard continual-learning numbers from the finished rows.

        ``new_task_acc``: accuracy on the latest finished task right after learning it; ``avg_seen_acc``: mean
        accuracy over tasks 0..t after task t; ``avg_forgetting``: mean over earlier tasks k of
        (best accuracy on k after learning it − accuracy on k now). The last two are NaN when validation did not
        evaluate the earlier tasks (``eval_on: current``).
        """
        if not self.rows:
            return {}
        last = max(self.rows)
        row = self.rows[last]
        seen = [row[k] for k in range(last + 1) if not math.isnan(row[k])]
        if len(seen) < last + 1:
            seen = []  # earlier tasks were not evaluated: no mean over "all seen tasks" to report
        forgetting = []
        for k in range(last):
            history = [self.rows[t][k] for t in self.rows if k <= t < last and not math.isnan(self.rows[t][k])]
            if history and not math.isnan(row[k]):
                forgetting.append(max(history) - row[k])
        return {
            "new_task_acc": row[last],
            "avg_seen_acc": sum(seen) / len(seen) if seen else math.nan,
            "avg_forgetting": sum(forgetting) / len(forgetting) if forgetting else math.nan,
        }

    def _table_rows(self) -> list[tuple[int, list[float], bool]]:
        """(task, row, complete) for every finished task, then the unfinished one if fit stopped mid-task."""
        rows = [(t, self.rows[t], True) for t in sorted(self.rows)]
        if self.partial is not None and self.partial[0] not in self.rows:
            rows.append((self.partial[0], self.partial[1], False))
        return rows

    def _print_matrix(self) -> None:
        from rich.console import Console
        from rich.table import Table

        rows = self._table_rows()
        num_tasks = self.num_tasks or (max(t for t, _, _ in rows) + 1)
        if num_tasks <= self.max_printed_tasks:
            table = Table(title=f"{self.stage} accuracy on task k (columns) after training on task t (rows)")
            table.add_column("t", justify="right")
            for k in range(num_tasks):
                table.add_column(str(k), justify="right")
            for t, row, complete in rows:
                table.add_row(f"{t}" if complete else f"{t}*", *("" if math.isnan(v) else f"{v:.2f}" for v in row))
        else:
            table = Table(title=f"Accuracy on the newest task ({self.stage}) — the plasticity curve")
            table.add_column("task", justify="right")
            table.add_column("acc right after learning it", justify="right")
            # an evenly spaced selection (first and last included) keeps long streams readable
            step = max(1, math.ceil(len(rows) / self.max_printed_tasks))
            for index in sorted({*range(0, len(rows), step), len(rows) - 1}):
                t, row, complete = rows[index]
                table.add_row(f"{t}" if complete else f"{t}*", f"{row[t]:.3f}")
        console = Console()
        console.print(table)
        if self.partial is not None:
            console.print("* training stopped before this task's end", highlight=False)
        summary = self.summary()
        if summary:
            console.print(
                "  ".join(f"{name}={value:.4f}" for name, value in summary.items() if not math.isnan(value)),
                highlight=False,
            )

    def _write_csv(self, directory: Path) -> Path | None:
        if self.filename is None:
            return None
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.filename
        rows = self._table_rows()
        num_tasks = self.num_tasks or (max(t for t, _, _ in rows) + 1)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["after_task", "complete", *(f"acc_task_{k}" for k in range(num_tasks))])
            for t, row, complete in rows:
                writer.writerow([t, int(complete), *("" if math.isnan(v) else f"{v:.6f}" for v in row)])
        return path

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "num_tasks": self.num_tasks, "rows": dict(self.rows), "latest": self._latest}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_tasks = state_dict.get("num_tasks")
        self.rows = {int(k): list(v) for k, v in state_dict.get("rows", {}).items()}
        latest = state_dict.get("latest")
        self._latest = (int(latest[0]), list(latest[1])) if latest is not None else None


class RestoreBestPerTask(TaskAwareCallback):
    """When a task ends, load the weights that scored best on ``monitor`` during it (Dohare et al.'s early stopping).

    In their class-incremental CIFAR-100 runs the network trains for the whole task, but the one that moves on to
    the next task is the one with the best validation accuracy seen during the task. This callback keeps a copy
    (on the CPU) of the LightningModule's ``state_dict`` — parameters and buffers, e.g. BatchNorm statistics — at
    every strict improvement, and loads it when the next task starts and when the fit ends after a complete last
    task. The optimizer state and any intervention's statistics carry on from the last step, as in the reference
    code. A run without tasks is one task: the best weights are loaded at the end of the fit.

    It must come before the interventions that act when a task starts (``HeadReset``, ``ShrinkAndPerturb`` or
    ``ReDo`` with ``on_task_change``): loading the kept weights would undo them, so that order is refused at fit
    start. Monitors listed before it measure the network before the restore (a warning says so). After the restore
    at the end of the fit, the ``last`` checkpoint of every ``ModelCheckpoint(save_last=...)`` is written again, so it
    holds the weights that were kept.

    DDP: rank 0 decides whether a value improved (it alone needs the value) and every rank copies the same
    weights. Resume: the best value and the copy are in the checkpoint.

    Args:
        monitor: the logged value to compare; ``val/acc`` is the accuracy on every class seen so far in a
            cumulative class-incremental stream, the reference's criterion.
        mode: ``"max"`` or ``"min"``.
        verbose: log a line when weights are restored.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[RestoreBestPerTask(monitor="val/acc")], logger=False)
    """

    def __init__(self, monitor: str = "val/acc", mode: str = "max", verbose: bool = True) -> None:
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise PlasticityConfigError(f"RestoreBestPerTask.monitor={monitor!r} is invalid; expected a logged key")
        self.monitor = monitor
        self.mode = check_choice("RestoreBestPerTask", "mode", mode, ("max", "min"))
        self.verbose = verbose
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.restored: list[dict[str, Any]] = []  # one entry per restore: task, epoch, value
        self._state_key: str | None = None

    @property
    def state_key(self) -> str:
        if self._state_key is None:
            self._state_key = self._generate_state_key(monitor=self.monitor, mode=self.mode)
        return self._state_key

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        return self.best is None or (value > self.best if self.mode == "max" else value < self.best)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        for callback in trainer.callbacks[: trainer.callbacks.index(self)]:
            acts_on_task_start = getattr(type(callback), "on_task_start", None) not in (
                None,
                TaskAwareCallback.on_task_start,
            )
            if isinstance(callback, Intervention) and acts_on_task_start:
                raise PlasticityConfigError(
                    f"RestoreBestPerTask comes after {type(callback).__name__} in the callbacks: when a task ends it "
                    f"loads the task's best weights, which would undo what {type(callback).__name__} does when the "
                    "next task starts; list RestoreBestPerTask before it"
                )
            if isinstance(callback, PlasticityMonitor) and callback.on_task_change:
                rank_zero_warn(
                    f"{type(callback).__name__} comes before RestoreBestPerTask in the callbacks: on a task change it "
                    "measures the network before the best weights are restored"
                )

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.monitor)
        local = None if value is None else (float(value), self._improves(float(value)))
        # rank 0's value decides on every rank (a value logged on rank 0 only is enough), and all ranks fail alike
        decision = trainer.strategy.broadcast(local, src=0)
        if decision is None:
            raise PlasticityConfigError(
                f"RestoreBestPerTask.monitor={self.monitor!r} was not logged by validation; logged keys: "
                f"{', '.join(sorted(trainer.callback_metrics)[:20]) or 'none'}"
            )
        value, improved = decision
        if improved:
            self.best = value
            self.best_epoch = trainer.current_epoch
            self.snapshot = {name: t.detach().to("cpu", copy=True) for name, t in pl_module.state_dict().items()}

    @override
    def on_task_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: TaskContext, previous_task: int | None
    ) -> None:
        if previous_task is not None:
            self._restore(pl_module, previous_task)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if stopped_mid_task(trainer):
            return  # a resumed fit finishes the task, then restores
        if self._restore(pl_module, self.current_task):
            self._resave_last_checkpoints(trainer)

    @staticmethod
    def _resave_last_checkpoints(trainer: pl.Trainer) -> None:
        """Checkpoint callbacks saved the last epoch before the final restore: write their ``last`` files again."""
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.last_model_path:
                path = callback.last_model_path
                if trainer.is_global_zero and os.path.islink(path):
                    os.unlink(path)  # save_last="link" points at an epoch's file, which must keep what it holds
                trainer.save_checkpoint(path, weights_only=callback.save_weights_only)

    def _restore(self, pl_module: pl.LightningModule, task: int | None) -> bool:
        """Load the best weights of ``task`` (if it had a validation) and start the next task's record."""
        restored = self.snapshot is not None
        if not restored:
            rank_zero_warn(
                f"RestoreBestPerTask: no validation value of {self.monitor!r} during task {task}; weights kept as "
                "they are (does validation run during every task?)"
            )
        else:
            pl_module.load_state_dict(self.snapshot)
            self.restored.append({"task": task, "epoch": self.best_epoch, "value": self.best})
            if self.verbose:
                rank_zero_info(
                    f"Task {task}: restored the weights of epoch {self.best_epoch} ({self.monitor} = {self.best:.4f})"
                )
        self.best, self.best_epoch, self.snapshot = None, None, None
        return restored

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "best": self.best,
            "best_epoch": self.best_epoch,
            "snapshot": self.snapshot,
            "restored": list(self.restored),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.best = state_dict.get("best")
        self.best_epoch = state_dict.get("best_epoch")
        self.snapshot = state_dict.get("snapshot")
        self.restored = list(state_dict.get("restored", []))
