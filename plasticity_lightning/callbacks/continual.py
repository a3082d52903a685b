"""Per-task bookkeeping for continual streams: the accuracy matrix, and the best weights of each task."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from typing_extensions import override

from plasticity_lightning.callbacks.interventions.base import Intervention
from plasticity_lightning.callbacks.monitors.base import PlasticityMonitor
from plasticity_lightning.callbacks.task_aware import TaskAwareCallback, log_scalars
from plasticity_lightning.core.batches import supervised_batch
from plasticity_lightning.core.errors import PlasticityConfigError, check_choice, check_positive_int
from plasticity_lightning.core.files import write_csv_atomic, write_text_atomic
from plasticity_lightning.core.rundir import (
    FINISHED_TASK_KEY,
    FROM_SCRATCH_ACCURACY_KEY,
    PLASTICITY_GAP_KEY,
    TASK_ACCURACY_FILE,
    run_directory,
)
from plasticity_lightning.core.tasks import TaskContext, get_task_context, per_task_accuracy_key, stopped_mid_task
from plasticity_lightning.metrics.continual import (
    COVERAGE_TEXT,
    PerTaskAccuracy,
    accuracy_matrix_summary,
    first_and_last,
    matrix_coverage,
    per_task_series,
    summary_window,
    transfer_summary,
)
from plasticity_lightning.policies.resets import fresh_copy

log = logging.getLogger(__name__)


class TaskAccuracyTable(TaskAwareCallback):
    """The accuracy matrix of a continual run, printed, logged and saved.

    ``R[t][k]`` is the accuracy on task ``k`` at the last validation while training on task ``t`` (read from the
    ``val/acc_task_<k>`` values that the library's models log). A cell is NaN (blank in the CSV) when task ``k`` was
    not evaluated then: with ``eval_on: current`` only the diagonal is measured, and a value that an earlier
    validation left in ``trainer.callback_metrics`` is never taken for a new one. When a task ends the callback
    prints one line and logs ``continual/new_task_acc`` (accuracy on the task just learned: the plasticity signal,
    which falls when a network loses plasticity), ``continual/avg_seen_acc`` and ``continual/avg_forgetting``
    (only when the cells they need were measured), with ``continual/task``, the task they describe. At the end of
    ``fit`` it prints the matrix (or the plasticity curve for long streams), the first tasks against the last for
    the new-task accuracy and for every plasticity monitor on the trainer, and the ``plasticity report`` command;
    it writes the matrix as CSV into the run directory (also when fit stops on an exception, e.g. a SIGTERM).

    Transfer (Lopez-Paz & Ranzato 2017): before the first training step of a fresh fit, the callback measures the
    randomly initialised network on every task the validation data holds (one extra pass over it, the global RNG
    left as it was, so training is unchanged): the random-init row ``b``. Each finished task then also logs
    ``continual/bwt`` (backward transfer) and, when validation evaluates future tasks (``eval_on: all``),
    ``continual/fwt_next`` and ``continual/fwt_all`` (forward transfer to the next task and to every future one);
    see :func:`~plasticity_lightning.metrics.continual.transfer_summary`. Next to the CSV, a JSON file of the same name
    (``task_accuracy.json``) holds the summary, the transfer numbers and the random-init row (``null`` where not
    measured).

    Args:
        stage: ``"val"`` reads validation accuracies (``"test"`` reads ``test/acc_task_<k>``).
        filename: CSV file name inside the run directory (written when the trainer has a logger); ``None``
            disables the file.
        max_printed_tasks: print the full matrix only up to this many tasks.
        random_init_row: measure the random-init row before training (needed for forward transfer).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[TaskAccuracyTable()], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        stage: str = "val",
        filename: str | None = TASK_ACCURACY_FILE,
        max_printed_tasks: int = 12,
        random_init_row: bool = True,
    ):
        super().__init__()
        self.stage = check_choice("TaskAccuracyTable", "stage", stage, ("val", "test"))
        self.filename = filename
        self.max_printed_tasks = check_positive_int("TaskAccuracyTable", "max_printed_tasks", max_printed_tasks)
        if not isinstance(random_init_row, bool):
            raise PlasticityConfigError(
                f"TaskAccuracyTable.random_init_row={random_init_row!r} is invalid; expected true or false"
            )
        self.random_init_row = random_init_row
        self.num_tasks: int | None = None
        self.rows: dict[int, list[float]] = {}
        self.random_init: list[float] | None = None  # accuracy on each task before any training (NaN: not measured)
        self._latest: tuple[int, list[float]] | None = None
        self.partial: tuple[int, list[float]] | None = None  # the unfinished task when fit stopped mid-task
        self._before_validation: dict[str, Any] = {}

    @override
    def state_identity(self) -> dict[str, Any]:
        return {"stage": self.stage}

    # ------------------------------------------------------------------ collecting
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # only a fresh fit: a resumed one has the row in its state (or started without it)
        if not self.random_init_row or self.random_init is not None or trainer.global_step > 0:
            return
        context = get_task_context(trainer)
        if context is None or self.stage != "val":
            return
        self.random_init = evaluate_per_task(trainer, pl_module, pl_module, context.num_tasks)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # callback_metrics keeps every key ever logged: remember the objects held now, so that a task this
        # validation does not evaluate (eval_on: current) is not read as measured from an earlier value
        self._before_validation = dict(trainer.callback_metrics)

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
            key = per_task_accuracy_key(self.stage, k)
            value = metrics.get(key)
            fresh = value is not None and value is not self._before_validation.get(key)
            values.append(float(value) if fresh else math.nan)
        self._before_validation = {}
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
                self._keep_partial()
            else:
                self._finish_task(trainer, task)
        directory = run_directory(trainer)  # broadcasts: every rank asks, never only rank 0 (it would hang)
        if not (self.rows or self.partial) or not trainer.is_global_zero:
            return
        self._print_matrix()
        self._print_plasticity(trainer, directory)
        # no logger (or fast_dev_run's dummy one) means no run directory to write into
        if trainer.loggers and not trainer.fast_dev_run:
            path = self._write_csv(directory)
            if path is not None:
                rank_zero_info(f"Task accuracy matrix saved to {path}")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a preempted (SIGTERM) or crashed fit keeps what it measured; only rank 0 writes, without a collective
        # call (the other ranks may be gone)
        if self._latest is not None and self._latest[0] not in self.rows:
            self._keep_partial()
        if trainer.is_global_zero and trainer.loggers and not trainer.fast_dev_run and (self.rows or self.partial):
            path = self._write_csv(run_directory(trainer, broadcast=False))
            if path is not None:
                rank_zero_info(f"Fit stopped ({type(exception).__name__}): task accuracy matrix so far saved to {path}")

    def _keep_partial(self) -> None:
        task, values = self._latest
        self.partial = (task, list(values))
        if math.isfinite(values[task]):
            rank_zero_info(f"Task {task} stopped before its end: accuracy on it so far {values[task]:.4f}")

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
        summary.update(self.transfer())
        metrics = {f"continual/{name}": value for name, value in summary.items() if not math.isnan(value)}
        metrics[FINISHED_TASK_KEY] = float(task)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ results
    def summary(self) -> dict[str, float]:
        """:func:`~plasticity_lightning.metrics.accuracy_matrix_summary` of the finished rows.

        ``new_task_acc``, ``avg_seen_acc`` and ``avg_forgetting`` (NaN when validation did not evaluate the cells they
        need, e.g. ``eval_on: current``).
        """
        return accuracy_matrix_summary(self.rows)

    def transfer(self) -> dict[str, float]:
        """Backward and forward transfer of the finished rows.

        :func:`~plasticity_lightning.metrics.continual.transfer_summary` of the finished rows and the random-init row:
        ``bwt``, ``fwt_next``, ``fwt_all`` (NaN when the cells they need were not measured).
        """
        return transfer_summary(self.rows, self.random_init)

    def measured(self) -> str:
        """What the finished rows hold: every seen task, or only each task right after it was learned."""
        return COVERAGE_TEXT[matrix_coverage(self.rows)]

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
                table.add_row(f"{t}" if complete else f"{t}*", "" if math.isnan(row[t]) else f"{row[t]:.3f}")
        console = Console()
        console.print(table)
        if self.partial is not None:
            console.print("* training stopped before this task's end", highlight=False)
        summary = self.summary()
        if summary:
            summary.update(self.transfer())
            console.print(
                "  ".join(f"{name}={value:.4f}" for name, value in summary.items() if not math.isnan(value))
                + f"  (measured: {self.measured()})",
                highlight=False,
            )

    def _print_plasticity(self, trainer: pl.Trainer, directory: Path) -> None:
        """First tasks against last tasks: new-task accuracy and every plasticity monitor's measures."""
        from rich.console import Console
        from rich.table import Table

        # the tasks this fit reached (a stream cut short is summarised over what it trained on)
        num_tasks = max([*self.rows, *([self.partial[0]] if self.partial else [])], default=-1) + 1
        if num_tasks < 2:
            return  # one task: nothing to set the first tasks against
        window = summary_window(num_tasks)
        diagonal = [self.rows[t][t] if t in self.rows else math.nan for t in range(num_tasks)]
        lines: list[tuple[str, tuple[float, float]]] = [("new-task accuracy", first_and_last(diagonal, window))]
        for callback in trainer.callbacks:
            if not isinstance(callback, PlasticityMonitor) or not callback.history:
                continue
            tasks = [entry.get("task") for entry in callback.history]
            for name in _summary_measures(callback.history):
                values = [float(entry.get(name, math.nan)) for entry in callback.history]
                series = per_task_series(tasks, values, num_tasks)
                lines.append((callback.key(name), first_and_last(series, window)))
        if len(lines) == 1 and all(math.isnan(v) for v in lines[0][1]):
            return
        table = Table(title=f"Plasticity: first {window} tasks against the last {window}")
        for column in ("measure", "first", "last"):
            table.add_column(column, justify="left" if column == "measure" else "right")
        for name, (first, last) in lines:
            table.add_row(name, *("–" if math.isnan(v) else f"{v:.4g}" for v in (first, last)))
        console = Console()
        console.print(table)
        if trainer.loggers and not trainer.fast_dev_run:
            console.print(f"See it: plasticity report {directory}", highlight=False)

    def _write_csv(self, directory: Path) -> Path | None:
        if self.filename is None:
            return None
        rows = self._table_rows()
        num_tasks = self.num_tasks or (max(t for t, _, _ in rows) + 1)
        lines = [["after_task", "complete", *(f"acc_task_{k}" for k in range(num_tasks))]]
        for t, row, complete in rows:
            lines.append([t, int(complete), *("" if math.isnan(v) else f"{v:.6f}" for v in row)])
        path = write_csv_atomic(directory / self.filename, lines)
        write_text_atomic(path.with_suffix(".json"), json.dumps(self._companion(), indent=2) + "\n")
        return path

    def _companion(self) -> dict[str, Any]:
        """What ``task_accuracy.json`` holds: the summaries of the finished rows and the random-init row."""

        def finite(value: float) -> float | None:  # JSON has no NaN: null means "not measured"
            return float(value) if math.isfinite(value) else None

        return {
            "stage": self.stage,
            "finished_tasks": sorted(self.rows),
            "measured": self.measured() if self.rows else COVERAGE_TEXT["none"],
            "summary": {name: finite(value) for name, value in (self.summary() or {}).items()},
            "transfer": {name: finite(value) for name, value in self.transfer().items()},
            "random_init": None if self.random_init is None else [finite(v) for v in self.random_init],
        }

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "num_tasks": self.num_tasks,
            "rows": dict(self.rows),
            "latest": self._latest,
            "random_init": self.random_init,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.num_tasks = state_dict.get("num_tasks")
        self.rows = {int(k): list(v) for k, v in state_dict.get("rows", {}).items()}
        latest = state_dict.get("latest")
        self._latest = (int(latest[0]), list(latest[1])) if latest is not None else None
        random_init = state_dict.get("random_init")
        self.random_init = None if random_init is None else [float(v) for v in random_init]


@torch.no_grad()
def evaluate_per_task(
    trainer: pl.Trainer, pl_module: pl.LightningModule, model: torch.nn.Module, num_tasks: int
) -> list[float] | None:
    """Accuracy of ``model`` on each task of the trainer's validation data.

    Accuracy of ``model`` on each task of the trainer's validation data (NaN where a task has no rows), as the
    validation loop would see it: the same batches (``limit_val_batches`` included), transformed for the task by the
    datamodule, with the current task's class mask; reduced across DDP ranks by torchmetrics. ``model`` is ``pl_module``
    itself or a network that takes the same inputs. ``None`` when there is no validation data or its batches carry no
    task ids. The global RNG is left as it was, so training that follows is unchanged.
    """
    if trainer.val_dataloaders is None:  # Lightning sets them up before fit starts when validation runs
        return None
    was_training = trainer.training
    if was_training:
        trainer.validating = True  # the datamodule transforms batches for evaluation, as Lightning's own setup does
    modes = {module: module.training for module in model.modules()}
    try:
        loaders = trainer.val_dataloaders
        loaders = list(loaders) if isinstance(loaders, (list, tuple)) else [loaders] if loaders is not None else []
        limits = list(trainer.num_val_batches) if trainer.num_val_batches else []
        metric = PerTaskAccuracy(num_tasks).to(pl_module.device)
        model.eval()
        with isolate_rng():
            for index, loader in enumerate(loaders):
                limit = limits[index] if index < len(limits) else float("inf")
                for batch_idx, batch in enumerate(loader):
                    if batch_idx >= limit:
                        break
                    batch = pl_module._apply_batch_transfer_handler(batch, pl_module.device, dataloader_idx=index)
                    x, y, task_ids = supervised_batch(batch, owner="evaluate_per_task")
                    if task_ids is None:
                        return None
                    out = model(x)
                    context = get_task_context(trainer)
                    if context is not None and context.class_mask is not None and out.ndim == 2:
                        out = out.masked_fill(~context.class_mask.to(out.device), float("-inf"))
                    metric.update(out, y, task_ids)
        if not metric.update_called:
            return None
        return [float(v) for v in metric.compute().reshape(-1)]
    finally:
        for module, mode in modes.items():
            module.train(mode)
        if was_training:
            trainer.training = True


def _discard(*args: Any, **kwargs: Any) -> None:
    """Stands in for the fresh copy's ``log``: its values must not reach the trainer's loggers."""


class FromScratchBaseline(TaskAwareCallback):
    """A network trained from scratch on each new task beside the continual one, and the plasticity gap.

    Dohare et al. (2024) compare a continually trained network with one retrained from scratch: a network that has
    lost plasticity learns a new task worse than a fresh one. When a selected task starts (every
    ``every_n_tasks``-th, task 0 included) this callback makes a fresh copy of the LightningModule — every parameter
    drawn anew from ``seed + task`` as the model initialises itself (:func:`~plasticity_lightning.policies.fresh_copy`)
    — with a fresh optimizer (and LR schedulers) from the copy's own ``configure_optimizers``, and trains it on the
    same batches as the continual network, one optimizer step per training batch, through the module's own
    ``training_step`` (its ``self.log`` calls are discarded). At each validation during the task it measures the copy
    on the task's validation rows; when the task ends it logs ``continual/from_scratch_acc`` and
    ``continual/plasticity_gap`` = from-scratch accuracy − the continual network's accuracy on the task
    (``val/acc_task_<t>`` from the same validation), with ``continual/task``. A positive gap is plasticity lost.

    Cost: about one more training run per selected task (a forward and backward pass of the copy per batch, plus a
    pass over the validation data per validation); ``every_n_tasks: k`` divides it by k. The copy's steps run with
    the global RNG isolated (seeded from ``seed`` and the step), so the continual network trains exactly as without
    the callback. DDP: the copy starts alike on every rank and its gradients are averaged across ranks before each
    step, so ranks stay identical. Resume: the copy's weights and optimizer state are in the checkpoint.

    Args:
        every_n_tasks: train a fresh copy on every k-th task (0, k, 2k, ...); at least 1.
        seed: base seed of the fresh copies' initialisation and of their steps' random draws (dropout).
        verbose: log a line per finished task.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[FromScratchBaseline(every_n_tasks=2)], logger=False)
    """

    def __init__(self, every_n_tasks: int = 1, seed: int = 0, verbose: bool = True) -> None:
        super().__init__()
        self.every_n_tasks = check_positive_int("FromScratchBaseline", "every_n_tasks", every_n_tasks)
        self.seed = check_positive_int("FromScratchBaseline", "seed", seed, allow_zero=True)
        self.verbose = verbose
        self.records: dict[int, dict[str, float]] = {}  # task -> from_scratch_acc, continual_acc, plasticity_gap
        self.fresh: pl.LightningModule | None = None
        self.fresh_task: int | None = None
        self.fresh_steps = 0
        self._optimizer: torch.optim.Optimizer | None = None
        self._schedulers: list[Any] = []
        self._latest: tuple[int, float, float] | None = None  # task, from-scratch acc, continual acc
        self._pending: dict[str, Any] | None = None  # the copy's state from a checkpoint, loaded at train start
        self._before_validation: dict[str, Any] = {}

    @override
    def state_identity(self) -> dict[str, Any]:
        return {"every_n_tasks": self.every_n_tasks, "seed": self.seed}

    # ------------------------------------------------------------------ the fresh copy
    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task: int) -> None:
        from lightning.pytorch.core.optimizer import _configure_optimizers, _configure_schedulers_automatic_opt

        fresh = fresh_copy(pl_module, seed=self.seed + task)
        fresh.log = fresh.log_dict = _discard  # type: ignore[method-assign]
        fresh.trainer = trainer  # the task context (class masks) comes through the trainer, as for the original
        optimizers, schedulers, monitor = _configure_optimizers(fresh.configure_optimizers())
        if len(optimizers) != 1:
            raise PlasticityConfigError(
                f"FromScratchBaseline: {type(pl_module).__name__}.configure_optimizers returns {len(optimizers)} "
                "optimizers; the from-scratch copy is trained with exactly one"
            )
        self._schedulers = [
            config
            for config in _configure_schedulers_automatic_opt(schedulers, monitor)
            if not config.reduce_on_plateau  # needs a monitored value the copy never logs
        ]
        self.fresh, self.fresh_task, self.fresh_steps, self._optimizer = fresh, task, 0, optimizers[0]

    def _release(self) -> None:
        self.fresh, self.fresh_task, self._optimizer, self._schedulers = None, None, None, []

    def _train_step(self, trainer: pl.Trainer, batch: Any, batch_idx: int) -> None:
        fresh, optimizer = self.fresh, self._optimizer
        with isolate_rng():
            torch.manual_seed(self.seed * 1_000_003 + trainer.global_step)
            fresh.train()
            output = fresh.training_step(batch, batch_idx)
            loss = output.get("loss") if isinstance(output, Mapping) else output
            if loss is None:
                return
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        grads = [p.grad for p in fresh.parameters() if p.grad is not None]
        if trainer.world_size > 1 and grads:  # every rank steps with the mean gradient: the copies stay identical
            flat = trainer.strategy.reduce(torch.cat([g.flatten() for g in grads]), reduce_op="mean")
            for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
                grad.copy_(part.view_as(grad))
        optimizer.step()
        self.fresh_steps += 1
        self._step_schedulers("step", self.fresh_steps)

    def _step_schedulers(self, interval: str, count: int) -> None:
        for config in self._schedulers:
            if config.interval == interval and count % config.frequency == 0:
                config.scheduler.step()

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not pl_module.automatic_optimization:
            raise PlasticityConfigError(
                f"FromScratchBaseline: {type(pl_module).__name__} uses manual optimization; the from-scratch copy is "
                "trained through training_step's returned loss, which needs automatic optimization"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending is not None:  # resumed mid-task: rebuild the copy, then load what it had learned
            pending, self._pending = self._pending, None
            self._start(trainer, pl_module, pending["task"])
            self.fresh.load_state_dict(pending["weights"])
            self._optimizer.load_state_dict(pending["optimizer"])
            for config, state in zip(self._schedulers, pending["schedulers"], strict=False):
                config.scheduler.load_state_dict(state)
            self.fresh_steps = pending["steps"]

    @override
    def on_task_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: TaskContext, previous_task: int | None
    ) -> None:
        if previous_task is not None:
            self._finish(trainer, previous_task)
        self._release()
        if context.task_id % self.every_n_tasks == 0:
            self._start(trainer, pl_module, context.task_id)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.fresh is not None:
            self._train_step(trainer, batch, batch_idx)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.fresh is not None:
            self._step_schedulers("epoch", trainer.current_epoch + 1)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._before_validation = dict(trainer.callback_metrics)  # see TaskAccuracyTable: only fresh values count

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit" or self.fresh is None:
            return
        context = get_task_context(trainer)
        if context is None or context.task_id != self.fresh_task:
            return
        task = context.task_id
        accuracies = evaluate_per_task(trainer, pl_module, self.fresh, context.num_tasks)
        key = per_task_accuracy_key("val", task)
        value = trainer.callback_metrics.get(key)
        continual = float(value) if value is not None and value is not self._before_validation.get(key) else math.nan
        self._latest = (task, accuracies[task] if accuracies else math.nan, continual)
        self._before_validation = {}

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._latest is not None and not stopped_mid_task(trainer):
            self._finish(trainer, self._latest[0])
        if not stopped_mid_task(trainer):
            self._release()

    def _finish(self, trainer: pl.Trainer, task: int) -> None:
        if self._latest is None or self._latest[0] != task or task in self.records:
            return
        _, scratch, continual = self._latest
        gap = scratch - continual
        self.records[task] = {"from_scratch_acc": scratch, "continual_acc": continual, "plasticity_gap": gap}
        if self.verbose:
            rank_zero_info(
                f"Task {task}: from scratch {scratch:.4f}, continual {continual:.4f}, plasticity gap {gap:+.4f}"
            )
        metrics = {
            name: value
            for name, value in ((FROM_SCRATCH_ACCURACY_KEY, scratch), (PLASTICITY_GAP_KEY, gap))
            if math.isfinite(value)
        }
        if metrics:
            log_scalars(trainer, metrics, row_extra={FINISHED_TASK_KEY: float(task)})

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = {
            **super().state_dict(),
            "records": {task: dict(record) for task, record in self.records.items()},
            "latest": self._latest,
            "fresh": None,
        }
        if self.fresh is not None:
            state["fresh"] = {
                "task": self.fresh_task,
                "steps": self.fresh_steps,
                "weights": {name: t.detach().clone() for name, t in self.fresh.state_dict().items()},
                "optimizer": self._optimizer.state_dict(),
                "schedulers": [config.scheduler.state_dict() for config in self._schedulers],
            }
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.records = {int(task): dict(record) for task, record in state_dict.get("records", {}).items()}
        latest = state_dict.get("latest")
        self._latest = None if latest is None else (int(latest[0]), float(latest[1]), float(latest[2]))
        self._pending = state_dict.get("fresh")


# the per-layer measures worth a first-against-last line at the end of a fit (the rest are in the report)
_SUMMARY_MEASURES = ("effective_rank", "srank", "redo_dormant_fraction", "low_activity_fraction", "dead_fraction")


def _summary_measures(history: list[dict[str, Any]]) -> list[str]:
    names = dict.fromkeys(name for entry in history for name in entry)
    return [name for name in names if name.rsplit("/", 1)[-1] in _SUMMARY_MEASURES]


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

    @override
    def state_identity(self) -> dict[str, Any]:
        return {"monitor": self.monitor, "mode": self.mode}

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
