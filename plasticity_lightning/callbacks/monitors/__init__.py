"""Monitors: callbacks that measure plasticity on a cadence and log it (they never change the model).

:class:`PlasticityMonitor` is the base (cadence, probe batch, logging); the representation monitors read hidden
layers' features, the weight monitors read parameters and gradients, :class:`LearningDynamics` summarises a run.
Monitors next to each other in a trainer's callbacks join one :class:`MonitorCollection` (one set of hook calls,
one probe pass).
"""

from plasticity_lightning.callbacks.monitors.base import PlasticityMonitor
from plasticity_lightning.callbacks.monitors.collection import MonitorCollection
from plasticity_lightning.callbacks.monitors.dynamics import LearningDynamics
from plasticity_lightning.callbacks.monitors.features import (
    FeatureMonitor,
    GradientDormancyMonitor,
    WeightChangeMonitor,
)
from plasticity_lightning.callbacks.monitors.representation import DormantUnitMonitor, EntropyMonitor, RankMonitor
from plasticity_lightning.callbacks.monitors.weights import GradientFlowMonitor, WeightMonitor

__all__ = [
    "DormantUnitMonitor",
    "EntropyMonitor",
    "FeatureMonitor",
    "GradientDormancyMonitor",
    "GradientFlowMonitor",
    "LearningDynamics",
    "MonitorCollection",
    "PlasticityMonitor",
    "RankMonitor",
    "WeightChangeMonitor",
    "WeightMonitor",
]
