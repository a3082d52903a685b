"""Lightning callbacks: policies for *when* to measure or act on plasticity, usable with any LightningModule."""

from plasticity_lightning.callbacks.base import TaskAwareCallback
from plasticity_lightning.callbacks.continual import TaskAccuracyTable

__all__ = ["TaskAccuracyTable", "TaskAwareCallback"]
