"""Base class for callbacks that react to continual-task changes."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
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
    """

    def __init__(self) -> None:
        super().__init__()
        self.current_task: int | None = None

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
