"""Foundations shared by every layer: typed errors, argument checks and the continual-task protocol."""

from __future__ import annotations

from typing import TYPE_CHECKING

from plasticity_lightning.core.lazy import lazy_exports

if TYPE_CHECKING:
    from plasticity_lightning.core.errors import DataNotFoundError, PlasticityConfigError
    from plasticity_lightning.core.tasks import TaskContext, TaskProvider, get_task_context, per_task_accuracy_key

_EXPORTS = {
    "DataNotFoundError": "plasticity_lightning.core.errors",
    "PlasticityConfigError": "plasticity_lightning.core.errors",
    "TaskContext": "plasticity_lightning.core.tasks",
    "TaskProvider": "plasticity_lightning.core.tasks",
    "get_task_context": "plasticity_lightning.core.tasks",
    "per_task_accuracy_key": "plasticity_lightning.core.tasks",
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

__all__ = [
    "DataNotFoundError",
    "PlasticityConfigError",
    "TaskContext",
    "TaskProvider",
    "get_task_context",
    "per_task_accuracy_key",
]
