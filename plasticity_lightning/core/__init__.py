"""Foundations shared by every layer: typed errors, argument checks and the continual-task protocol."""

from plasticity_lightning.core.errors import DataNotFoundError, PlasticityConfigError
from plasticity_lightning.core.tasks import TaskContext, TaskProvider, get_task_context, per_task_accuracy_key

__all__ = [
    "DataNotFoundError",
    "PlasticityConfigError",
    "TaskContext",
    "TaskProvider",
    "get_task_context",
    "per_task_accuracy_key",
]
