"""Pure tensor metrics (no Lightning): functional form plus a torchmetrics ``Metric`` twin."""

from plasticity_lightning.metrics.continual import PerTaskAccuracy, per_task_accuracy

__all__ = ["PerTaskAccuracy", "per_task_accuracy"]
