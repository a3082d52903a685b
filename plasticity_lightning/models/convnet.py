"""The Continual-ImageNet ConvNet of Dohare et al. (Nature 2024), configurable in classes and input size."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from plasticity_lightning.core.errors import PlasticityConfigError, check_choice
from plasticity_lightning.models.base import SupervisedModule
from plasticity_lightning.nn import activation_gain, build_activation, init_layer_, resolve_init_scheme, width_factor

# (out_channels, kernel) of the three conv layers and widths of the two hidden fc layers, as in
# loss-of-plasticity `lop/nets/conv_net.py`.
_CONV_LAYERS = ((32, 5), (64, 3), (128, 3))
_FC_WIDTHS = (128, 128)


def _spatial_after_features(size: int) -> int:
    for _, kernel in _CONV_LAYERS:
        size = (size - kernel + 1) // 2  # valid conv, then 2x2 max-pool
    return size


class ConvNet(SupervisedModule):
    """Dohare et al.'s Continual-ImageNet network.

    ``conv 5×5 (32) → pool → conv 3×3 (64) → pool → conv 3×3 (128) → pool → fc 128 → fc 128 → fc classes``,
    each conv/fc followed by the activation, each pool 2×2 max. On 32×32 inputs the flattened conv output
    has 128·2·2 = 512 features, as in the paper.

    Hidden units are the channels after each pool (the tensors the reference code passes to its
    utility computation) and the two fc activations.

    Args:
        num_classes: output classes; ``None`` = read from the datamodule.
        in_channels: input channels; ``None`` = read from the datamodule's ``input_shape``.
        input_size: input height/width (square); ``None`` = read from the datamodule. Must be >= 30.
        activation: activation after every conv and hidden fc layer (see :class:`MLP` for names).
        init: weight init scheme (see :class:`MLP`); ``default`` (PyTorch's) matches the reference network.
        norm: ``"layer"``: normalise each layer's output over its units before the activation — ``GroupNorm(1, C)``
            (a LayerNorm over channels × height × width with a per-channel scale and shift) after each conv,
            ``LayerNorm`` after each hidden fc layer (Lyle et al. 2024); ``None``: none, as in the reference.
        **kwargs: :class:`~plasticity_lightning.models.SupervisedModule` arguments.

    Example::

        >>> model = ConvNet(num_classes=2, in_channels=3, input_size=32)
        >>> model(torch.randn(4, 3, 32, 32)).shape
        torch.Size([4, 2])
    """

    inferred_sizes = ("num_classes", "in_channels", "input_size")
    classification_only = True

    def __init__(
        self,
        num_classes: int | None = None,
        in_channels: int | None = None,
        input_size: int | None = None,
        activation: str = "relu",
        init: str = "default",
        norm: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.norm = None if norm is None else check_choice(owner, "norm", norm, ("layer",))
        self._check_sizes(num_classes=num_classes, in_channels=in_channels, input_size=input_size)
        if input_size is not None:
            self._check_input_size(input_size)
        build_activation(activation, owner=owner)
        self.activation = activation
        self.init = resolve_init_scheme(init, owner=owner)
        self.features = nn.Sequential()
        self.classifier = nn.Sequential()
        self.head: nn.Linear | None = None
        self._maybe_build()

    def _check_input_size(self, size: int) -> None:
        if _spatial_after_features(size) < 1:
            raise PlasticityConfigError(
                f"{type(self).__name__}.input_size={size} is too small: three conv+pool stages need inputs of "
                "at least 30x30 (pad or resize the images, or use MLP)"
            )

    @property
    def num_outputs(self) -> int:
        return self.hparams["num_classes"]

    def infer_sizes(self, datamodule: Any) -> dict[str, Any]:
        shape = tuple(datamodule.input_shape)
        if len(shape) != 3 or shape[1] != shape[2]:
            raise PlasticityConfigError(
                f"ConvNet needs square image inputs (C, H, W); {type(datamodule).__name__}.input_shape={shape}"
            )
        self._check_input_size(shape[1])
        return {"num_classes": self.labels_of(datamodule), "in_channels": shape[0], "input_size": shape[1]}

    def build(self) -> None:
        gain = activation_gain(self.activation)
        factor = width_factor(self.activation)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = self.hparams["in_channels"]
        for i, (out_channels, kernel) in enumerate(_CONV_LAYERS, start=1):
            layers[f"conv{i}"] = init_layer_(nn.Conv2d(channels, out_channels, kernel), self.init, gain=gain)
            if self.norm == "layer":
                layers[f"norm{i}"] = nn.GroupNorm(1, out_channels)
            layers[f"act{i}"] = build_activation(self.activation, unit_dim=1)
            layers[f"pool{i}"] = nn.MaxPool2d(2, 2)
            channels = out_channels * factor  # CReLU: two channels per unit
        self.features = nn.Sequential(layers)
        spatial = _spatial_after_features(self.hparams["input_size"])
        width = channels * spatial * spatial
        fc: OrderedDict[str, nn.Module] = OrderedDict({"flatten": nn.Flatten(start_dim=1)})
        for i, out_features in enumerate(_FC_WIDTHS, start=1):
            fc[f"fc{i}"] = init_layer_(nn.Linear(width, out_features), self.init, gain=gain)
            if self.norm == "layer":
                fc[f"norm{i}"] = nn.LayerNorm(out_features)
            fc[f"act{i}"] = build_activation(self.activation)
            width = out_features * factor
        self.classifier = nn.Sequential(fc)
        self.head = init_layer_(nn.Linear(width, self.num_outputs), self.init, gain=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._require_built()
        return self.head(self.classifier(self.features(x)))

    def hidden_layers(self) -> list[tuple[str, nn.Module]]:
        pools = [(f"features.pool{i}", self.features.get_submodule(f"pool{i}")) for i in range(1, 4)]
        acts = [(f"classifier.act{i}", self.classifier.get_submodule(f"act{i}")) for i in range(1, 3)]
        return pools + acts

    def output_layer(self) -> tuple[str, nn.Module]:
        return "head", self.head

    def layer_init(self, name: str) -> tuple[str, float]:
        return self.init, 1.0 if name == "head" else activation_gain(self.activation)
