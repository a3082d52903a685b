"""Changing a model in place: producer → consumer topology, unit re-initialisation, optimizer-state resets,
Σ-orthogonal weights for replaced units, and attention-head gates, re-initialisation and removal. Pure torch; the
callbacks decide when and which."""

from plasticity_lightning.surgery.heads import (
    HeadGates,
    HeadReviver,
    attention_modules,
    head_attention_entropy,
    head_importance,
    head_weight_norms,
    normalize_importance,
    prune_heads_,
    reinit_heads,
)
from plasticity_lightning.surgery.sigma import InputCovariance, activation_energy_share, sigma_orthogonal_rows
from plasticity_lightning.surgery.topology import UnitPair, find_unit_pairs
from plasticity_lightning.surgery.units import (
    incoming_magnitude,
    outgoing_magnitude,
    reinit_units,
    reset_optimizer_state,
    unit_columns,
    unit_magnitudes,
    unit_statistics,
)

__all__ = [
    "HeadGates",
    "HeadReviver",
    "InputCovariance",
    "UnitPair",
    "activation_energy_share",
    "attention_modules",
    "find_unit_pairs",
    "head_attention_entropy",
    "head_importance",
    "head_weight_norms",
    "incoming_magnitude",
    "normalize_importance",
    "outgoing_magnitude",
    "prune_heads_",
    "reinit_heads",
    "reinit_units",
    "reset_optimizer_state",
    "sigma_orthogonal_rows",
    "unit_columns",
    "unit_magnitudes",
    "unit_statistics",
]
