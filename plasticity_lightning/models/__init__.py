"""LightningModules: MLP, ConvNet (Dohare et al.), ResNet-18 (CIFAR) on one supervised base; CausalLM (GPT-2)."""

from plasticity_lightning.models.base import InjectedOptimizer, SupervisedModule
from plasticity_lightning.models.causal_lm import CausalLM
from plasticity_lightning.models.convnet import ConvNet
from plasticity_lightning.models.mlp import MLP, DenseBlock
from plasticity_lightning.models.resnet import CIFARBasicBlock, ResNet18

__all__ = [
    "MLP",
    "CIFARBasicBlock",
    "CausalLM",
    "ConvNet",
    "DenseBlock",
    "InjectedOptimizer",
    "ResNet18",
    "SupervisedModule",
]
