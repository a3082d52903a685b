"""The base of the library's callbacks.

Continual-task changes, the one place a checkpoint ``state_key`` is built, and the one logging helper
(:func:`log_scalars`) that monitors and interventions share.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from plasticity_lightning.core.tasks import TaskContext, get_task_context


class TaskAwareCallback(Callback):
    """Calls :meth:`on_task_start` when the trainer enters a new task (including the first one).

    The task comes from :func:`~plasticity_lightning.core.get_task_context` (the datamodule's schedule), checked
    at the start of every training batch, after the batch has been moved to the device and transformed for
    the task. Each instance tracks the last task it saw, in its ``state_dict``, so a resumed run does not
    fire a spurious task change. Runs without tasks never call :meth:`on_task_start`.

    Subclasses that override ``on_train_batch_start`` must call ``super().on_train_batch_start(...)``.

    :attr:`state_key`, the key of the callback's state in a checkpoint, is built once from :meth:`state_identity`
    (Lightning reads it around every hook call, for the profiler's names).
    """

    def __init__(self) -> None:
        super().__init__()
        self.current_task: int | None = None

    def state_identity(self) -> dict[str, Any]:
        """What tells two instances of one class apart in a checkpoint (their settings).

        The parts of :attr:`state_key`. Changing it orphans the state in existing checkpoints. Empty: the class name
        alone, as Lightning's default.
        """
        return {}

    @property
    def state_key(self) -> str:
        key = self.__dict__.get("_state_key")
        if key is None:
            identity = self.state_identity()
            key = self._generate_state_key(**identity) if identity else super().state_key
            self._state_key = key
        return key

    def on_task_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, context: TaskContext, previous_task: int | None
    ) -> None:
        """Called once per task, before its first training batch. ``previous_task`` is ``None`` for the first."""

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        context = get_task_context(trainer)
        if context is None or context.task_id == self.current_task:
            return
        previous, self.current_task = self.current_task, context.task_id
        self.on_task_start(trainer, pl_module, context, previous)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"current_task": self.current_task}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.current_task = state_dict.get("current_task")


def log_scalars(trainer: pl.Trainer, metrics: dict[str, float], row_extra: dict[str, float] | None = None) -> None:
    """Log ``metrics`` to every logger and into ``trainer.callback_metrics``.

    Send ``metrics`` to every logger at the trainer's global step (``row_extra``, e.g. the task id, only in the logged
    row) and into ``trainer.callback_metrics``, so they reach checkpoint monitors and early stopping even with
    ``logger=False``.
    """
    row = {**metrics, **row_extra} if row_extra else metrics
    for logger in trainer.loggers:
        logger.log_metrics(row, step=trainer.global_step)
    trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})
