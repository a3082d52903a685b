"""LightningDataModules and continual task schedules.

LightningDataModules (toy 2-D, digits, torchvision image sets, text, algorithmic tasks, charged particles, Dohare et
al.'s slowly-changing regression) and continual task schedules.
"""

from plasticity_lightning.data.algorithmic import (
    BinaryGaussianDataModule,
    ModularArithmeticDataModule,
    SparseParityDataModule,
)
from plasticity_lightning.data.base import IndexedTensorDataset, PlasticityDataModule
from plasticity_lightning.data.continual import (
    ClassIncremental,
    GrowingData,
    LabelShuffle,
    PermutedInputs,
    TaskSchedule,
)
from plasticity_lightning.data.particles import ParticleDataModule, cyclotron_motion, generate_particles
from plasticity_lightning.data.slowly_changing import SlowlyChangingRegression, SlowlyChangingRegressionDataModule
from plasticity_lightning.data.text import TextDataModule, TextParts, load_tokenizer, token_ids
from plasticity_lightning.data.toy import (
    TOY_DATASETS,
    ToyDataModule,
    make_circles,
    make_moons,
    make_spirals,
    make_toy,
    make_xor,
)
from plasticity_lightning.data.vision import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DigitsDataModule,
    FashionMNISTDataModule,
    ImageDataModule,
    MNISTDataModule,
    TorchvisionDataModule,
)

__all__ = [
    "TOY_DATASETS",
    "BinaryGaussianDataModule",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "ClassIncremental",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "GrowingData",
    "ImageDataModule",
    "IndexedTensorDataset",
    "LabelShuffle",
    "MNISTDataModule",
    "ModularArithmeticDataModule",
    "ParticleDataModule",
    "PermutedInputs",
    "PlasticityDataModule",
    "SlowlyChangingRegression",
    "SlowlyChangingRegressionDataModule",
    "SparseParityDataModule",
    "TaskSchedule",
    "TextDataModule",
    "TextParts",
    "TorchvisionDataModule",
    "ToyDataModule",
    "cyclotron_motion",
    "generate_particles",
    "load_tokenizer",
    "make_circles",
    "make_moons",
    "make_spirals",
    "make_toy",
    "make_xor",
    "token_ids",
]
