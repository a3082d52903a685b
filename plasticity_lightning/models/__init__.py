"""LightningModules sharing one supervised base: MLP, ConvNet (Dohare et al.), ResNet-18 (CIFAR)."""

from plasticity_lightning.models.base import SupervisedModule
from plasticity_lightning.models.convnet import ConvNet
from plasticity_lightning.models.mlp import MLP, DenseBlock
from plasticity_lightning.models.resnet import CIFARBasicBlock, ResNet18

__all__ = ["MLP", "CIFARBasicBlock", "ConvNet", "DenseBlock", "ResNet18", "SupervisedModule"]
