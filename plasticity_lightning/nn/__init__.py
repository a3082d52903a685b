"""Building blocks shared by models and model surgery: activations by name and weight-init schemes."""

from plasticity_lightning.nn.activations import (
    ACTIVATIONS,
    CReLU,
    Sine,
    activation_gain,
    build_activation,
    width_factor,
)
from plasticity_lightning.nn.init import INIT_SCHEMES, init_layer_, resolve_init_scheme, sample_init_

__all__ = [
    "ACTIVATIONS",
    "INIT_SCHEMES",
    "CReLU",
    "Sine",
    "activation_gain",
    "build_activation",
    "init_layer_",
    "resolve_init_scheme",
    "sample_init_",
    "width_factor",
]
