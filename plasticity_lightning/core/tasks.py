"""The continual-task protocol that models, callbacks and data modules agree on.

A *task provider* (normally the datamodule, e.g. any :class:`~plasticity_lightning.data.PlasticityDataModule`
with a ``schedule``) answers "which task is the trainer on right now?" through ``task_context()``.
The answer is a pure function of the trainer's progress (epoch or optimizer step), so it is identical
on every DDP rank and after a resume without any extra state.

Callbacks and models never import the data layer; they call :func:`get_task_context`, which looks
for a provider on ``trainer.datamodule`` first and on the LightningModule second. A user's own
datamodule can take part by implementing ``task_context()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

# re-exported: models and callbacks import these here
from plasticity_lightning.core.rundir import ALL_TASKS_ACCURACY as ALL_TASKS_ACCURACY
from plasticity_lightning.core.rundir import CURRENT_TASK_ACCURACY as CURRENT_TASK_ACCURACY
from plasticity_lightning.core.rundir import SEEN_TASKS_ACCURACY as SEEN_TASKS_ACCURACY
from plasticity_lightning.core.rundir import TASK_ID_KEY as TASK_ID_KEY
from plasticity_lightning.core.rundir import per_task_accuracy_key as per_task_accuracy_key

if TYPE_CHECKING:
    import lightning.pytorch as pl


@dataclass(frozen=True)
class TaskContext:
    """Where a continual stream is.

    Attributes:
        task_id: index of the task being trained on now (0-based).
        num_tasks: number of tasks in the stream.
        class_mask: boolean mask over the model's output classes that may be predicted now (class-incremental
            streams), or ``None`` when every class is valid.
    """

    task_id: int
    num_tasks: int
    class_mask: torch.Tensor | None = None

    @property
    def seen_tasks(self) -> range:
        """Tasks trained on so far, including the current one."""
        return range(self.task_id + 1)


@runtime_checkable
class TaskProvider(Protocol):
    """Anything that can say which task the trainer is on (usually a datamodule)."""

    def task_context(self) -> TaskContext | None:
        """The current task, or ``None`` when the stream has no tasks (single-task training)."""
        ...


def get_task_context(trainer: pl.Trainer | None) -> TaskContext | None:
    """Ask the trainer's datamodule (then its LightningModule) for the current task.

    Returns ``None`` when neither provides tasks, i.e. ordinary single-task training.

    Args:
        trainer: the running trainer, or ``None``.

    Example::

        >>> get_task_context(None) is None
        True
    """
    if trainer is None:
        return None
    # Called by every task-aware callback on every batch: a plain attribute lookup, not a runtime Protocol check.
    for provider in (getattr(trainer, "datamodule", None), getattr(trainer, "lightning_module", None)):
        task_context = getattr(provider, "task_context", None)
        if callable(task_context):
            context = task_context()
            if context is not None:
                return context
    return None


def stopped_mid_task(trainer: pl.Trainer) -> bool:
    """Whether training stopped before the current task's scheduled end.

    Whether training stopped before the current task's scheduled end (``max_steps``, an interruption), as the trainer's
    datamodule reports it through ``task_completed()``; ``False`` when it cannot tell.

    Example::

        >>> stopped_mid_task(None)
        False
    """
    completed = getattr(getattr(trainer, "datamodule", None), "task_completed", None)
    return callable(completed) and completed() is False
