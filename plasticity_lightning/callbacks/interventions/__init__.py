"""Interventions: callbacks that change the model or its training to keep plasticity.

Each is a thin Lightning adapter over an algorithm object in :mod:`plasticity_lightning.policies` (hooks, cadence,
DDP agreement, checkpoint state, logging). :class:`Intervention`, :class:`UnitIntervention` and
:class:`ScheduledIntervention` (whole-model policies applied at task changes and/or every n steps) are the bases.
"""

from plasticity_lightning.callbacks.interventions.adaptive_loss import AdaptiveLossWeights
from plasticity_lightning.callbacks.interventions.base import Intervention, ScheduledIntervention, UnitIntervention
from plasticity_lightning.callbacks.interventions.cbp import ContinualBackprop
from plasticity_lightning.callbacks.interventions.constraints import (
    JamesSteinShrinkage,
    OscillationDampener,
    ParameterConstraint,
    WeightPrecision,
)
from plasticity_lightning.callbacks.interventions.injection import PlasticityInjection
from plasticity_lightning.callbacks.interventions.normalize_project import NormalizeAndProject
from plasticity_lightning.callbacks.interventions.parseval import ParsevalRegularization
from plasticity_lightning.callbacks.interventions.redo import ReDo
from plasticity_lightning.callbacks.interventions.resets import HeadReset, L2Init, LayerReset, ShrinkAndPerturb
from plasticity_lightning.callbacks.interventions.stability import SoftmaxCollapseMonitor, SurgeCollapse

__all__ = [
    "AdaptiveLossWeights",
    "ContinualBackprop",
    "HeadReset",
    "Intervention",
    "JamesSteinShrinkage",
    "L2Init",
    "LayerReset",
    "NormalizeAndProject",
    "OscillationDampener",
    "ParameterConstraint",
    "ParsevalRegularization",
    "PlasticityInjection",
    "ReDo",
    "ScheduledIntervention",
    "ShrinkAndPerturb",
    "SoftmaxCollapseMonitor",
    "SurgeCollapse",
    "UnitIntervention",
    "WeightPrecision",
]
