"""Changing a model in place: producer → consumer topology, unit re-initialisation, optimizer-state resets and
Σ-orthogonal weights for replaced units. Pure torch; the callbacks decide when and which."""

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
    "InputCovariance",
    "UnitPair",
    "activation_energy_share",
    "find_unit_pairs",
    "incoming_magnitude",
    "outgoing_magnitude",
    "reinit_units",
    "reset_optimizer_state",
    "sigma_orthogonal_rows",
    "unit_columns",
    "unit_magnitudes",
    "unit_statistics",
]
