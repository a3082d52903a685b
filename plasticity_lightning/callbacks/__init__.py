"""Lightning callbacks: policies for *when* to measure or act on plasticity, usable with any LightningModule.

Monitors (measure): :class:`RankMonitor`, :class:`DormantUnitMonitor`, :class:`EntropyMonitor`,
:class:`WeightMonitor`, :class:`GradientFlowMonitor`, :class:`LearningDynamics`, :class:`TaskAccuracyTable`.
Base classes: :class:`PlasticityMonitor` (cadence, probe, logging), :class:`TaskAwareCallback` (task changes).
"""

from plasticity_lightning.callbacks.base import TaskAwareCallback
from plasticity_lightning.callbacks.continual import TaskAccuracyTable
from plasticity_lightning.callbacks.dynamics import LearningDynamics
from plasticity_lightning.callbacks.monitor import PlasticityMonitor
from plasticity_lightning.callbacks.monitors import (
    DormantUnitMonitor,
    EntropyMonitor,
    GradientFlowMonitor,
    RankMonitor,
    WeightMonitor,
)

__all__ = [
    "DormantUnitMonitor",
    "EntropyMonitor",
    "GradientFlowMonitor",
    "LearningDynamics",
    "PlasticityMonitor",
    "RankMonitor",
    "TaskAccuracyTable",
    "TaskAwareCallback",
    "WeightMonitor",
]
