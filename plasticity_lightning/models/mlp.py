"""Fully connected network with any depth/width profile, activation, init and optional skips."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from plasticity_lightning.core.errors import check_choice, check_fraction, check_positive_ints
from plasticity_lightning.models.base import SupervisedModule
from plasticity_lightning.nn import activation_gain, build_activation, init_layer_, resolve_init_scheme, width_factor

NORMS = ("layer",)


class DenseBlock(nn.Module):
    """``dropout(act(norm(linear(x))))``, plus ``x`` when ``skip`` is on and the widths match (Neural Elements' rule).

    The skip is added after the activation, so ``act``'s output is the block's units and the block's
    output is ``units + x``. Without dropout the block holds no dropout module; without ``norm`` no norm module
    (``norm="layer"``: a ``LayerNorm`` over the block's units, before the activation, as in Lyle et al. 2024).

    Args:
        in_features: inputs per sample.
        out_features: the block's units.
        activation: an activation name of :data:`~plasticity_lightning.nn.ACTIVATIONS`.
        bias: whether the linear layer has a bias.
        skip: add the input to the output when the widths match (Neural Elements' skip connections).
        dropout: dropout probability after the activation (default 0.0: no dropout module).
        norm: ``"layer"`` for a LayerNorm before the activation, or ``None`` (default).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation: str,
        *,
        bias: bool,
        skip: bool,
        dropout: float = 0.0,
        norm: str | None = None,
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=bias)
        self.norm = nn.LayerNorm(out_features) if norm == "layer" else None
        self.act = build_activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.skip = skip and in_features == out_features * width_factor(activation)  # CReLU: 2 outputs per unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.linear(x)
        units = self.act(h if self.norm is None else self.norm(h))
        if self.dropout is not None:
            units = self.dropout(units)
        return units + x if self.skip else units


class MLP(SupervisedModule):
    """Multi-layer perceptron for classification or regression.

    ``hidden_sizes`` covers depth and width at once: ``[100, 100]`` (2×100), ``[32, 8, 32]`` (bottleneck),
    ``[256, 128, 64]`` (pyramid), ``[]`` (linear model).

    Args:
        input_dim: number of input features after flattening; ``None`` = read from the datamodule's ``input_shape``.
        num_outputs: classes (classification) or targets (regression); ``None`` = read from the datamodule.
        hidden_sizes: width of each hidden layer, input side first. Every entry must be a positive integer.
        activation: one of relu, leaky_relu, tanh, sigmoid, gelu, silu, swish, sine, elu, selu, softplus, linear,
            crelu (two outputs per unit, relu(x) and relu(−x): each next layer reads twice its units, Abbas et al.
            2023).
        skip_connections: add each hidden layer's input to its output where the two widths are equal.
        init: weight init of every layer: kaiming (= kaiming_uniform), kaiming_normal, xavier (= xavier_uniform),
            xavier_normal, lecun (= lecun_normal), lecun_uniform or default (PyTorch's). Named schemes zero the
            biases and use the activation's gain; the output layer uses gain 1.
        bias: give linear layers a bias.
        flatten: flatten inputs of any shape (e.g. images) to ``[batch, input_dim]``.
        dropout: dropout probability after each hidden activation (0 = none).
        norm: ``"layer"``: a LayerNorm between each hidden linear layer and its activation (Lyle et al. 2024's
            normalised networks; pair it with :class:`~plasticity_lightning.callbacks.NormalizeAndProject`);
            ``None``: none.
        **kwargs: :class:`~plasticity_lightning.models.SupervisedModule` arguments (task, loss, optimizer, ...).

    Example::

        >>> model = MLP(input_dim=4, num_outputs=3, hidden_sizes=[8, 8], activation="tanh")
        >>> model(torch.randn(5, 4)).shape
        torch.Size([5, 3])
        >>> [name for name, _ in model.hidden_layers()]
        ['hidden.0.act', 'hidden.1.act']
    """

    inferred_sizes = ("input_dim", "num_outputs")

    def __init__(
        self,
        input_dim: int | None = None,
        num_outputs: int | None = None,
        hidden_sizes: Sequence[int] = (100, 100),
        activation: str = "relu",
        skip_connections: bool = False,
        init: str = "kaiming",
        bias: bool = True,
        flatten: bool = True,
        dropout: float = 0.0,
        norm: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dropout = check_fraction(owner, "dropout", dropout, high_open=True)
        self.norm = None if norm is None else check_choice(owner, "norm", norm, NORMS)
        self._check_sizes(input_dim=input_dim, num_outputs=num_outputs)
        self.hidden_sizes = check_positive_ints(owner, "hidden_sizes", hidden_sizes)
        build_activation(activation, owner=owner)  # validates the name early
        self.activation = activation
        self.skip_connections = skip_connections
        self.init = resolve_init_scheme(init, owner=owner)
        self.bias = bias
        self.flatten = nn.Flatten(start_dim=1) if flatten else nn.Identity()
        self.hidden = nn.ModuleList()
        self.head: nn.Linear | None = None
        self._maybe_build()

    @property
    def input_dim(self) -> int | None:
        return self.hparams["input_dim"]

    @property
    def num_outputs(self) -> int:
        return self.hparams["num_outputs"]

    def infer_sizes(self, datamodule: Any) -> dict[str, Any]:
        outputs = self.labels_of(datamodule) if self.task == "classification" else datamodule.num_targets
        return {"input_dim": math.prod(datamodule.input_shape), "num_outputs": outputs}

    def build(self) -> None:
        # each layer reads what the previous activation gives: width_factor (CReLU: 2) outputs per unit
        inputs = [self.input_dim, *(width * width_factor(self.activation) for width in self.hidden_sizes)]
        gain = activation_gain(self.activation)
        self.hidden = nn.ModuleList(
            DenseBlock(
                w_in,
                w_out,
                self.activation,
                bias=self.bias,
                skip=self.skip_connections,
                dropout=self.dropout,
                norm=self.norm,
            )
            for w_in, w_out in zip(inputs[:-1], self.hidden_sizes, strict=True)
        )
        for block in self.hidden:
            init_layer_(block.linear, self.init, gain=gain)
        self.head = init_layer_(nn.Linear(inputs[-1], self.num_outputs, bias=self.bias), self.init, gain=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._require_built()
        h = self.flatten(x)
        for block in self.hidden:
            h = block(h)
        return self.head(h)

    def hidden_layers(self) -> list[tuple[str, nn.Module]]:
        return [(f"hidden.{i}.act", block.act) for i, block in enumerate(self.hidden)]

    def output_layer(self) -> tuple[str, nn.Module]:
        return "head", self.head

    def layer_init(self, name: str) -> tuple[str, float]:
        return self.init, 1.0 if name == "head" else activation_gain(self.activation)
