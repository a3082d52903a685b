"""Activation functions by name.

One registry serves the models (which build activations from a YAML string) and the surgery layer
(which needs the same activation's init gain when it re-initialises a unit).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from plasticity_lightning.core.errors import check_choice

LEAKY_RELU_SLOPE = 0.01


class Sine(nn.Module):
    """``sin(w0 * x)``. With the default ``w0 = 1`` this is Neural Elements' plain ``sin(x)`` activation.

    Args:
        w0: frequency of the sine (SIREN uses 30 for its first layer).

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


class CReLU(nn.Module):
    """Concatenated ReLU (Shang et al. 2016), which Abbas et al. (2023) found to keep plasticity.

    Every unit x gives two outputs, ``relu(x)`` and ``relu(−x)``, so no unit is ever silent on all inputs and the width
    along ``dim`` doubles (:attr:`width_factor`; the next layer reads twice as many inputs).

    The two outputs of a unit are *adjacent* — ``[relu(x₀), relu(−x₀), relu(x₁), relu(−x₁), …]`` — rather than two
    concatenated halves: a fixed permutation of the next layer's inputs, so the same function class and, under an
    i.i.d. init, the same initial network. Each unit then owns consecutive inputs of the next layer, which is how
    unit surgery (CBP, ReDo) pairs it: one unit, two consumer columns (a conv channel: two input channels).

    Args:
        dim: the axis of the units: -1 after a ``Linear``, 1 after a ``Conv2d`` (channels).

    Example::

        >>> CReLU()(torch.tensor([[1.0, -2.0]]))
        tensor([[1., 0., 0., 2.]])
    """

    width_factor = 2

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.dim % x.dim()
        return torch.stack((F.relu(x), F.relu(-x)), dim=dim + 1).flatten(dim, dim + 1)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


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
    "crelu": CReLU,
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
    "crelu": math.sqrt(2.0),  # each of a unit's two outputs is a ReLU of it: ReLU's second moment per input
}


def build_activation(name: str, *, owner: str = "", field: str = "activation", unit_dim: int = -1) -> nn.Module:
    """Build a fresh activation module from its name (see :data:`ACTIVATIONS`).

    ``unit_dim``: the axis of the units for an activation that changes the width (:class:`CReLU`; 1 after a ``Conv2d``).

    Args:
        name: an activation name of :data:`ACTIVATIONS`.
        owner: the class or function named in an error message (default ``""``).
        field: the argument named in an error message (default ``"activation"``).
        unit_dim: the axis of the units (default -1; 1 after a ``Conv2d``).

    Example::

        >>> build_activation("swish"), build_activation("crelu", unit_dim=1)
        (SiLU(), CReLU(dim=1))
    """
    check_choice(owner, field, name, ACTIVATIONS)
    module = ACTIVATIONS[name]()
    if isinstance(module, CReLU):
        module.dim = unit_dim
    return module


def width_factor(name: str) -> int:
    """How many outputs the activation ``name`` gives per unit (:class:`CReLU`: 2; the others 1).

    The next layer reads ``width_factor × units`` inputs.

    Args:
        name: an activation name of :data:`ACTIVATIONS`.

    Example::

        >>> width_factor("crelu"), width_factor("relu")
        (2, 1)
    """
    check_choice("", "activation", name, ACTIVATIONS)
    return int(getattr(ACTIVATIONS[name](), "width_factor", 1))


def activation_gain(name: str) -> float:
    """Init gain recommended for ``name`` (used by Kaiming and Xavier schemes).

    Args:
        name: an activation name of :data:`ACTIVATIONS`.

    Example::

        >>> round(activation_gain("relu"), 4)
        1.4142
    """
    check_choice("", "activation", name, _GAINS)
    return _GAINS[name]


#: Every module class whose output is a layer's hidden units when a model names none: the registry's activations plus
#: the common torch ones it does not build by name. Monitors (probes) and unit surgery both find units through it.
ACTIVATION_MODULE_TYPES: tuple[type[nn.Module], ...] = tuple(
    {type(factory()) for factory in ACTIVATIONS.values()} - {nn.Identity}
    | {nn.ReLU6, nn.PReLU, nn.Mish, nn.Hardswish, nn.Hardtanh, nn.Softsign, nn.CELU, nn.RReLU}
)


# An activation *module* found in a user's model → torch's gain name (``nn.init.calculate_gain``), for the init of
# units that policies re-initialise. Like Dohare et al.'s code, ReLU-like units (GELU, SiLU/swish, ELU) take ReLU's.
# (Keyed by class name, not by the names above: the module may come from any library, e.g. HF's GELU variants.)
MODULE_GAIN_NAMES = {
    "ReLU": "relu",
    "GELU": "relu",
    "SiLU": "relu",
    "ELU": "relu",
    "LeakyReLU": "leaky_relu",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "SELU": "selu",
    "Identity": "linear",
    "CReLU": "relu",
}
_RELU_LIKE_WORDS = ("GELU", "SILU", "SWISH")


def gain_name_of(activation: nn.Module | None) -> str:
    """torch's gain name for an activation module.

    Unknown GELU/SiLU variants (HF's ``NewGELUActivation``, ``SiLUActivation``) are ReLU-like; none or an unknown kind:
    ``"linear"`` (gain 1).

    Example::

        >>> gain_name_of(nn.GELU()), gain_name_of(nn.Softplus()), gain_name_of(None)
        ('relu', 'linear', 'linear')
    """
    if activation is None:
        return "linear"
    kind = type(activation).__name__
    if kind in MODULE_GAIN_NAMES:
        return MODULE_GAIN_NAMES[kind]
    return "relu" if any(word in kind.upper() for word in _RELU_LIKE_WORDS) else "linear"


def is_known_activation(activation: nn.Module) -> bool:
    """Whether :func:`gain_name_of` knows ``activation``'s kind (else its gain 1 is a guess)."""
    kind = type(activation).__name__
    return kind in MODULE_GAIN_NAMES or any(word in kind.upper() for word in _RELU_LIKE_WORDS)
