"""Activation functions by name.

One registry serves the models (which build activations from a YAML string) and the surgery layer
(which needs the same activation's init gain when it re-initialises a unit).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from plasticity_lightning.core.errors import check_choice

LEAKY_RELU_SLOPE = 0.01


class Sine(nn.Module):
    """``sin(w0 * x)``. With the default ``w0 = 1`` this is Neural Elements' plain ``sin(x)`` activation.

    Example::

        >>> Sine()(torch.tensor([0.0, math.pi / 2]))
        tensor([0., 1.])
    """

    def __init__(self, w0: float = 1.0) -> None:
        super().__init__()
        self.w0 = w0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.w0 * x)

    def extra_repr(self) -> str:
        return f"w0={self.w0}"


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(LEAKY_RELU_SLOPE),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,  # swish(x) = x * sigmoid(x) = SiLU
    "sine": Sine,
    "elu": nn.ELU,
    "selu": nn.SELU,
    "softplus": nn.Softplus,
    "linear": nn.Identity,
}

# Gains for Kaiming/Xavier-style scaling. torch's ``calculate_gain`` covers relu, leaky_relu, tanh, sigmoid,
# selu and linear; ReLU-like smooth activations (gelu, silu, elu, softplus) use the ReLU gain, as Dohare et
# al.'s code does for swish and elu. SELU uses 1 (LeCun scaling keeps it self-normalising). Sine uses 1.
_GAINS: dict[str, float] = {
    "relu": math.sqrt(2.0),
    "leaky_relu": math.sqrt(2.0 / (1 + LEAKY_RELU_SLOPE**2)),
    "tanh": 5.0 / 3.0,
    "sigmoid": 1.0,
    "gelu": math.sqrt(2.0),
    "silu": math.sqrt(2.0),
    "swish": math.sqrt(2.0),
    "sine": 1.0,
    "elu": math.sqrt(2.0),
    "selu": 1.0,
    "softplus": math.sqrt(2.0),
    "linear": 1.0,
}


def build_activation(name: str, *, owner: str = "", field: str = "activation") -> nn.Module:
    """Build a fresh activation module from its name (see :data:`ACTIVATIONS`).

    Example::

        >>> build_activation("swish")
        SiLU()
    """
    check_choice(owner, field, name, ACTIVATIONS)
    return ACTIVATIONS[name]()


def activation_gain(name: str) -> float:
    """Init gain recommended for ``name`` (used by Kaiming and Xavier schemes).

    Example::

        >>> round(activation_gain("relu"), 4)
        1.4142
    """
    check_choice("", "activation", name, _GAINS)
    return _GAINS[name]
