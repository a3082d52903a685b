"""ResNet-18, CIFAR variant (3×3 stride-1 stem, no max-pool), built on torchvision's ``ResNet``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.models.base import SupervisedModule


class CIFARBasicBlock(BasicBlock):
    """torchvision's ``BasicBlock`` with its one shared ReLU split into two modules.

    ``act1`` outputs the block's inner units (replaceable: they feed only ``conv2``); ``act2`` outputs the
    block's result after the residual sum. torchvision applies one ``relu`` module twice, which makes a
    forward hook on it fire twice per block; two modules give each a name callbacks can address.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        del self.relu
        self.act1 = nn.ReLU()
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        units = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(units)) + identity)


class ResNet18(SupervisedModule):
    """ResNet-18 for small images, as used for class-incremental CIFAR-100 by Dohare et al.

    The stem is a 3×3 stride-1 convolution without max-pooling (32×32 inputs keep their resolution
    into ``layer1``); the rest is torchvision's ResNet-18 with :class:`CIFARBasicBlock` blocks. Convolutions
    have no bias, as in torchvision (each is followed by BatchNorm, whose shift makes a bias redundant);
    Dohare et al.'s variant keeps conv biases, which changes the parameter count but not the function class.

    Hidden layers (17, as in the reference analysis): the stem activation and, per block, ``act1``
    (inner units) and ``act2`` (block output).

    Args:
        num_classes: output classes; ``None`` = read from the datamodule.
        in_channels: input channels; ``None`` = read from the datamodule's ``input_shape``.
        cifar_stem: ``True`` for the 3×3 stride-1 stem without max-pool; ``False`` keeps torchvision's
            7×7 stride-2 stem and max-pool (for larger images).
        zero_init_residual: zero-initialise each block's last BN weight (torchvision's option).
        **kwargs: :class:`~plasticity_lightning.models.SupervisedModule` arguments.

    Example::

        >>> model = ResNet18(num_classes=100, in_channels=3)
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 100])
        >>> len(model.hidden_layers())
        17
    """

    inferred_sizes = ("num_classes", "in_channels")
    classification_only = True

    def __init__(
        self,
        num_classes: int | None = None,
        in_channels: int | None = None,
        cifar_stem: bool = True,
        zero_init_residual: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._check_sizes(num_classes=num_classes, in_channels=in_channels)
        self.cifar_stem = cifar_stem
        self.zero_init_residual = zero_init_residual
        self.net: ResNet | None = None
        self._maybe_build()

    @property
    def num_outputs(self) -> int:
        return self.hparams["num_classes"]

    def infer_sizes(self, datamodule: Any) -> dict[str, Any]:
        shape = tuple(datamodule.input_shape)
        if len(shape) != 3:
            raise PlasticityConfigError(
                f"ResNet18 needs image inputs (C, H, W); {type(datamodule).__name__}.input_shape={shape}"
            )
        return {"num_classes": self.labels_of(datamodule), "in_channels": shape[0]}

    def build(self) -> None:
        net = ResNet(
            CIFARBasicBlock, [2, 2, 2, 2], num_classes=self.num_outputs, zero_init_residual=self.zero_init_residual
        )
        in_channels = self.hparams["in_channels"]
        if self.cifar_stem:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        # torchvision's own scheme for its convolutions
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._require_built()
        return self.net(x)

    def hidden_layers(self) -> list[tuple[str, nn.Module]]:
        layers: list[tuple[str, nn.Module]] = [("net.relu", self.net.relu)]
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            for i, block in enumerate(getattr(self.net, stage)):
                layers += [(f"net.{stage}.{i}.act1", block.act1), (f"net.{stage}.{i}.act2", block.act2)]
        return layers

    def output_layer(self) -> tuple[str, nn.Module]:
        return "net.fc", self.net.fc

    def layer_init(self, name: str) -> tuple[str, float]:
        # torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu") for every conv, PyTorch's default for fc
        if name == "net.fc":
            return "default", 1.0
        return "kaiming_normal_fan_out", 2**0.5
