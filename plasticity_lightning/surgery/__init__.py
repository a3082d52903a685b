"""Changing a model in place: producer → consumer topology (registered per-block pairing rules, then traces), unit
re-initialisation, optimizer-state resets, Σ-orthogonal weights for replaced units, and attention-head gates,
re-initialisation and removal. Pure torch; the callbacks decide when and which."""

from plasticity_lightning.surgery.heads import (
    HeadGates,
    HeadLayout,
    HeadReviver,
    attention_layouts,
    attention_modules,
    head_attention_entropy,
    head_importance,
    head_weight_norms,
    normalize_importance,
    prune_heads_,
    reinit_heads,
)
from plasticity_lightning.surgery.rules import (
    DEFAULT_RULES,
    PairingRule,
    pairing_rules,
    register_pairing_rule,
    unregister_pairing_rule,
)
from plasticity_lightning.surgery.sigma import InputCovariance, activation_energy_share, sigma_orthogonal_rows
from plasticity_lightning.surgery.topology import (
    UnitPair,
    UnitPairing,
    discover_unit_pairs,
    find_unit_pairs,
    hidden_unit_layers,
    pair_units,
)
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
    "DEFAULT_RULES",
    "HeadGates",
    "HeadLayout",
    "HeadReviver",
    "InputCovariance",
    "PairingRule",
    "UnitPair",
    "UnitPairing",
    "activation_energy_share",
    "attention_layouts",
    "attention_modules",
    "discover_unit_pairs",
    "find_unit_pairs",
    "head_attention_entropy",
    "head_importance",
    "head_weight_norms",
    "hidden_unit_layers",
    "incoming_magnitude",
    "normalize_importance",
    "outgoing_magnitude",
    "pair_units",
    "pairing_rules",
    "prune_heads_",
    "register_pairing_rule",
    "reinit_heads",
    "reinit_units",
    "reset_optimizer_state",
    "sigma_orthogonal_rows",
    "unit_columns",
    "unit_magnitudes",
    "unit_statistics",
    "unregister_pairing_rule",
]
