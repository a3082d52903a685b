"""plasticity_lightning: measure and maintain the plasticity of neural networks in PyTorch Lightning.

The public API is re-exported here::

    from plasticity_lightning import MLP, DigitsDataModule, PermutedInputs, TaskAccuracyTable
"""

from importlib.metadata import PackageNotFoundError, version

from plasticity_lightning.callbacks import (
    AttentionEntropyMonitor,
    ContinualBackprop,
    DegenerationMonitor,
    DormantUnitMonitor,
    EntropyMonitor,
    GradientFlowMonitor,
    HeadGrowth,
    HeadImportance,
    HeadPruning,
    HeadReset,
    L2Init,
    LearningDynamics,
    PlasticityCycle,
    PlasticityMonitor,
    RankMonitor,
    ReDo,
    ShrinkAndPerturb,
    SoftmaxCollapseMonitor,
    SurgeCollapse,
    TaskAccuracyTable,
    TaskAwareCallback,
    WeightMonitor,
)
from plasticity_lightning.core import (
    DataNotFoundError,
    PlasticityConfigError,
    TaskContext,
    TaskProvider,
    get_task_context,
    per_task_accuracy_key,
)
from plasticity_lightning.data import (
    BinaryGaussianDataModule,
    CIFAR10DataModule,
    CIFAR100DataModule,
    ClassIncremental,
    DigitsDataModule,
    FashionMNISTDataModule,
    IndexedTensorDataset,
    LabelShuffle,
    MNISTDataModule,
    ModularArithmeticDataModule,
    PermutedInputs,
    PlasticityDataModule,
    SparseParityDataModule,
    TaskSchedule,
    TextDataModule,
    ToyDataModule,
    make_toy,
)
from plasticity_lightning.losses import build_loss, register_loss
from plasticity_lightning.metrics import (
    PerTaskAccuracy,
    approximate_rank,
    dynamics_summary,
    effective_rank,
    numerical_rank,
    per_task_accuracy,
    srank,
    stable_rank,
)
from plasticity_lightning.models import MLP, CausalLM, ConvNet, ResNet18, SupervisedModule
from plasticity_lightning.nn import Sine, activation_gain, build_activation, init_layer_, sample_init_
from plasticity_lightning.probes import ProbeSet, capture_outputs
from plasticity_lightning.surgery import UnitPair, find_unit_pairs, reinit_units

try:
    __version__ = version("plasticity-lightning")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"

__all__ = [
    "MLP",
    "AttentionEntropyMonitor",
    "BinaryGaussianDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "CausalLM",
    "ClassIncremental",
    "ContinualBackprop",
    "ConvNet",
    "DataNotFoundError",
    "DegenerationMonitor",
    "DigitsDataModule",
    "DormantUnitMonitor",
    "EntropyMonitor",
    "FashionMNISTDataModule",
    "GradientFlowMonitor",
    "HeadGrowth",
    "HeadImportance",
    "HeadPruning",
    "HeadReset",
    "IndexedTensorDataset",
    "L2Init",
    "LabelShuffle",
    "LearningDynamics",
    "MNISTDataModule",
    "ModularArithmeticDataModule",
    "PerTaskAccuracy",
    "PermutedInputs",
    "PlasticityConfigError",
    "PlasticityCycle",
    "PlasticityDataModule",
    "PlasticityMonitor",
    "ProbeSet",
    "RankMonitor",
    "ReDo",
    "ResNet18",
    "ShrinkAndPerturb",
    "Sine",
    "SoftmaxCollapseMonitor",
    "SparseParityDataModule",
    "SupervisedModule",
    "SurgeCollapse",
    "TaskAccuracyTable",
    "TaskAwareCallback",
    "TaskContext",
    "TaskProvider",
    "TaskSchedule",
    "TextDataModule",
    "ToyDataModule",
    "UnitPair",
    "WeightMonitor",
    "__version__",
    "activation_gain",
    "approximate_rank",
    "build_activation",
    "build_loss",
    "capture_outputs",
    "dynamics_summary",
    "effective_rank",
    "find_unit_pairs",
    "get_task_context",
    "init_layer_",
    "make_toy",
    "numerical_rank",
    "per_task_accuracy",
    "per_task_accuracy_key",
    "register_loss",
    "reinit_units",
    "sample_init_",
    "srank",
    "stable_rank",
]
