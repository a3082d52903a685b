"""Lightning callbacks: policies for *when* to measure or act on plasticity, usable with any LightningModule.

Monitors (measure): :class:`RankMonitor`, :class:`DormantUnitMonitor`, :class:`EntropyMonitor`,
:class:`WeightMonitor`, :class:`GradientFlowMonitor`, :class:`FeatureMonitor`, :class:`WeightChangeMonitor`,
:class:`GradientDormancyMonitor` (GraMa), :class:`LearningDynamics`, :class:`TaskAccuracyTable`;
for language models :class:`AttentionEntropyMonitor`, :class:`DegenerationMonitor`, :class:`HeadImportance`.
Interventions (act): :class:`ContinualBackprop` (and RR-CBP), :class:`ReDo`, :class:`ShrinkAndPerturb`,
:class:`L2Init`, :class:`HeadReset`, :class:`LayerReset`, :class:`PlasticityInjection`,
:class:`RestoreBestPerTask` (Dohare's per-task early stopping); on attention
heads :class:`HeadPruning`, :class:`HeadGrowth`, :class:`PlasticityCycle`; numerical stability
:class:`SoftmaxCollapseMonitor`, :class:`SurgeCollapse`; weight constraints :class:`WeightPrecision`,
:class:`OscillationDampener`, :class:`JamesSteinShrinkage`, :class:`NormalizeAndProject`,
:class:`ParsevalRegularization` and the adaptive regression loss's
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
    NormalizeAndProject,
    OscillationDampener,
    ParameterConstraint,
    ParsevalRegularization,
    PlasticityInjection,
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
    FeatureMonitor,
    GradientDormancyMonitor,
    GradientFlowMonitor,
    LearningDynamics,
    MonitorCollection,
    PlasticityMonitor,
    RankMonitor,
    WeightChangeMonitor,
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
    "FeatureMonitor",
    "FromScratchBaseline",
    "GradientDormancyMonitor",
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
    "NormalizeAndProject",
    "OscillationDampener",
    "ParameterConstraint",
    "ParsevalRegularization",
    "PlasticityCycle",
    "PlasticityInjection",
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
    "WeightChangeMonitor",
    "WeightMonitor",
    "WeightPrecision",
]
