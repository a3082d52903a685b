"""Weight-initialisation schemes, by name.

The same function initialises a whole layer when a model is built and a few rows when a unit is
re-initialised later (continual backprop, ReDo, head growth), so "fresh weights from the initial
distribution" always means exactly the distribution the layer started from.

Schemes (``gain`` comes from the activation, see :func:`~plasticity_lightning.nn.activation_gain`):

===================  ==========================================  =====
scheme               weight distribution                         bias
===================  ==========================================  =====
``kaiming_uniform``  U(±gain·√(3/fan_in))                        0
``kaiming_normal``   N(0, gain²/fan_in)                          0
``kaiming_normal_fan_out``  N(0, gain²/fan_out) (torchvision's convs)  0
``xavier_uniform``   U(±gain·√(6/(fan_in+fan_out)))              0
``xavier_normal``    N(0, 2·gain²/(fan_in+fan_out))              0
``lecun_uniform``    U(±√(3/fan_in))                             0
``lecun_normal``     N(0, 1/fan_in)                              0
``default``          PyTorch's Linear/Conv default U(±1/√fan_in)  U(±1/√fan_in)
===================  ==========================================  =====

Aliases: ``kaiming`` = ``kaiming_uniform`` (Dohare et al.), ``xavier`` = ``xavier_uniform``,
``lecun`` = ``lecun_normal``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from plasticity_lightning.core.errors import check_choice

INIT_SCHEMES: tuple[str, ...] = (
    "kaiming_uniform",
    "kaiming_normal",
    "kaiming_normal_fan_out",
    "xavier_uniform",
    "xavier_normal",
    "lecun_uniform",
    "lecun_normal",
    "default",
)
_ALIASES = {"kaiming": "kaiming_uniform", "xavier": "xavier_uniform", "lecun": "lecun_normal"}


def resolve_init_scheme(name: str, *, owner: str = "", field: str = "init") -> str:
    """Canonical scheme name for ``name`` (aliases resolved), or a clear error.

    Args:
        name: an init scheme of :data:`INIT_SCHEMES` or an alias (``kaiming``, ``xavier``, ``lecun``).
        owner: the class or function named in an error message (default ``""``).
        field: the argument named in an error message (default ``"init"``).

    Example::

        >>> resolve_init_scheme("kaiming")
        'kaiming_uniform'
    """
    check_choice(owner, field, name, (*INIT_SCHEMES, *_ALIASES))
    return _ALIASES.get(name, name)


def _weight_distribution(scheme: str, fan_in: int, fan_out: int, gain: float) -> tuple[str, float]:
    """(``"uniform"``, bound) or (``"normal"``, std) for the weights of ``scheme``."""
    if scheme == "kaiming_uniform":
        return "uniform", gain * math.sqrt(3.0 / fan_in)
    if scheme == "kaiming_normal":
        return "normal", gain / math.sqrt(fan_in)
    if scheme == "kaiming_normal_fan_out":
        return "normal", gain / math.sqrt(fan_out)
    if scheme == "xavier_uniform":
        return "uniform", gain * math.sqrt(6.0 / (fan_in + fan_out))
    if scheme == "xavier_normal":
        return "normal", gain * math.sqrt(2.0 / (fan_in + fan_out))
    if scheme == "lecun_uniform":
        return "uniform", math.sqrt(3.0 / fan_in)
    if scheme == "lecun_normal":
        return "normal", 1.0 / math.sqrt(fan_in)
    if scheme == "default":
        return "uniform", 1.0 / math.sqrt(fan_in)
    raise AssertionError(f"unresolved init scheme {scheme!r}")  # resolve_init_scheme guards this


@torch.no_grad()
def sample_init_(
    tensor: torch.Tensor,
    scheme: str,
    *,
    fan_in: int,
    fan_out: int,
    gain: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill ``tensor`` in place with weights drawn from ``scheme`` for a layer with the given fans.

    ``tensor`` may be the whole weight or a slice of it (e.g. the incoming rows of replaced units);
    the fans are those of the full layer.

    Args:
        tensor: the tensor filled in place (the whole weight or a slice of it).
        scheme: an init scheme of :data:`INIT_SCHEMES` or an alias (``kaiming``, ``xavier``, ``lecun``).
        fan_in: the full layer's fan-in (inputs × kernel size).
        fan_out: the full layer's fan-out (outputs × kernel size).
        gain: the gain multiplying the scheme's standard deviation or bound (default 1.0; see
            :func:`~plasticity_lightning.nn.activation_gain`).
        generator: the random generator to draw from (default ``None``: torch's global generator).

    Example::

        >>> w = torch.empty(4, 3)
        >>> _ = sample_init_(w, "kaiming_uniform", fan_in=3, fan_out=4, gain=1.0)
        >>> bool(w.abs().max() <= 1.0)
        True
    """
    kind, scale = _weight_distribution(resolve_init_scheme(scheme), fan_in, fan_out, gain)
    if kind == "uniform":
        values = torch.rand(tensor.shape, generator=generator, device=_device(generator, tensor), dtype=tensor.dtype)
        values = values.mul_(2 * scale).sub_(scale)
    else:
        values = torch.randn(tensor.shape, generator=generator, device=_device(generator, tensor), dtype=tensor.dtype)
        values = values.mul_(scale)
    tensor.copy_(values)
    return tensor


def _device(generator: torch.Generator | None, tensor: torch.Tensor) -> torch.device:
    # A generator can only draw on its own device; copy_ moves the values where the tensor lives.
    return generator.device if generator is not None else tensor.device


def layer_fans(module: nn.Module) -> tuple[int, int]:
    """(fan_in, fan_out) of a Linear or Conv layer, following torch's convention."""
    return nn.init._calculate_fan_in_and_fan_out(module.weight)


@torch.no_grad()
def init_layer_(
    module: nn.Module,
    scheme: str,
    *,
    gain: float = 1.0,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Initialise a Linear/Conv layer's weight (and bias) in place according to ``scheme``.

    Args:
        module: a Linear or Conv layer.
        scheme: an init scheme of :data:`INIT_SCHEMES` or an alias (``kaiming``, ``xavier``, ``lecun``).
        gain: the gain multiplying the scheme's standard deviation or bound (default 1.0; see
            :func:`~plasticity_lightning.nn.activation_gain`).
        generator: the random generator to draw from (default ``None``: torch's global generator).

    Example::

        >>> layer = init_layer_(nn.Linear(8, 4), "kaiming", gain=2**0.5)
        >>> bool((layer.bias == 0).all())
        True
    """
    scheme = resolve_init_scheme(scheme)
    fan_in, fan_out = layer_fans(module)
    sample_init_(module.weight, scheme, fan_in=fan_in, fan_out=fan_out, gain=gain, generator=generator)
    bias = getattr(module, "bias", None)
    if bias is not None:
        if scheme == "default":
            bound = 1.0 / math.sqrt(fan_in)
            bias.copy_(torch.rand(bias.shape, generator=generator, device=_device(generator, bias)) * 2 * bound - bound)
        else:
            bias.zero_()
    return module
