"""Lightning callbacks: policies for *when* to measure or act on plasticity, usable with any LightningModule.

Monitors (measure): :class:`RankMonitor`, :class:`DormantUnitMonitor`, :class:`EntropyMonitor`,
:class:`WeightMonitor`, :class:`GradientFlowMonitor`, :class:`LearningDynamics`, :class:`TaskAccuracyTable`;
for language models :class:`AttentionEntropyMonitor`, :class:`DegenerationMonitor`, :class:`HeadImportance`.
Interventions (act): :class:`ContinualBackprop` (and RR-CBP), :class:`ReDo`, :class:`ShrinkAndPerturb`,
:class:`L2Init`, :class:`HeadReset`, :class:`RestoreBestPerTask` (Dohare's per-task early stopping); on attention
heads :class:`HeadPruning`, :class:`HeadGrowth`, :class:`PlasticityCycle`; numerical stability
:class:`SoftmaxCollapseMonitor`, :class:`SurgeCollapse`; weight constraints :class:`WeightPrecision`,
:class:`OscillationDampener`, :class:`JamesSteinShrinkage` and the adaptive regression loss's
:class:`AdaptiveLossWeights`. Reporting: :class:`EpochTimer`, :class:`SavePredictions`.
Folders: ``monitors/``, ``interventions/``, ``heads/``; modules ``continual``, ``reporting``, ``task_aware``.
Base classes: :class:`PlasticityMonitor` (cadence, probe, logging), :class:`TaskAwareCallback` (task changes),
:class:`Intervention` / :class:`UnitIntervention` (rank-agreeing RNG, strategy checks, unit pairs).
"""

from plasticity_lightning.callbacks.continual import FromScratchBaseline, RestoreBestPerTask, TaskAccuracyTable
from plasticity_lightning.callbacks.heads import (
    AttentionEntropyMonitor,
    DegenerationMonitor,
    HeadGrowth,
    HeadImportance,
    HeadPruning,
    PlasticityCycle,
)
from plasticity_lightning.callbacks.interventions import (
    AdaptiveLossWeights,
    ContinualBackprop,
    HeadReset,
    Intervention,
    JamesSteinShrinkage,
    L2Init,
    LayerReset,
    OscillationDampener,
    ParameterConstraint,
    ReDo,
    ShrinkAndPerturb,
    SoftmaxCollapseMonitor,
    SurgeCollapse,
    UnitIntervention,
    WeightPrecision,
)
from plasticity_lightning.callbacks.monitors import (
    DormantUnitMonitor,
    EntropyMonitor,
    GradientFlowMonitor,
    LearningDynamics,
    MonitorCollection,
    PlasticityMonitor,
    RankMonitor,
    WeightMonitor,
)
from plasticity_lightning.callbacks.reporting import EpochTimer, SavePredictions, SaveRunConfig
from plasticity_lightning.callbacks.task_aware import TaskAwareCallback

__all__ = [
    "AdaptiveLossWeights",
    "AttentionEntropyMonitor",
    "ContinualBackprop",
    "DegenerationMonitor",
    "DormantUnitMonitor",
    "EntropyMonitor",
    "EpochTimer",
    "FromScratchBaseline",
    "GradientFlowMonitor",
    "HeadGrowth",
    "HeadImportance",
    "HeadPruning",
    "HeadReset",
    "Intervention",
    "JamesSteinShrinkage",
    "L2Init",
    "LayerReset",
    "LearningDynamics",
    "MonitorCollection",
    "OscillationDampener",
    "ParameterConstraint",
    "PlasticityCycle",
    "PlasticityMonitor",
    "RankMonitor",
    "ReDo",
    "RestoreBestPerTask",
    "SavePredictions",
    "SaveRunConfig",
    "ShrinkAndPerturb",
    "SoftmaxCollapseMonitor",
    "SurgeCollapse",
    "TaskAccuracyTable",
    "TaskAwareCallback",
    "UnitIntervention",
    "WeightMonitor",
    "WeightPrecision",
]
