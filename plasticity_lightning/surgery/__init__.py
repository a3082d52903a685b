"""Changing a model in place.

Producer → consumer topology (registered per-block pairing rules, then traces), unit re-initialisation, optimizer-state
resets, Σ-orthogonal weights for replaced units, and attention-head gates, re-initialisation and removal. Pure torch;
the callbacks decide when and which.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from plasticity_lightning.core.lazy import lazy_exports

if TYPE_CHECKING:
    from plasticity_lightning.surgery.heads import (
        HeadGates,
        HeadLayout,
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
        FusedRows,
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

_EXPORTS = {
    "DEFAULT_RULES": "plasticity_lightning.surgery.rules",
    "FusedRows": "plasticity_lightning.surgery.topology",
    "HeadGates": "plasticity_lightning.surgery.heads",
    "HeadLayout": "plasticity_lightning.surgery.heads",
    "InputCovariance": "plasticity_lightning.surgery.sigma",
    "PairingRule": "plasticity_lightning.surgery.rules",
    "UnitPair": "plasticity_lightning.surgery.topology",
    "UnitPairing": "plasticity_lightning.surgery.topology",
    "activation_energy_share": "plasticity_lightning.surgery.sigma",
    "attention_layouts": "plasticity_lightning.surgery.heads",
    "attention_modules": "plasticity_lightning.surgery.heads",
    "discover_unit_pairs": "plasticity_lightning.surgery.topology",
    "find_unit_pairs": "plasticity_lightning.surgery.topology",
    "head_attention_entropy": "plasticity_lightning.surgery.heads",
    "head_importance": "plasticity_lightning.surgery.heads",
    "head_weight_norms": "plasticity_lightning.surgery.heads",
    "hidden_unit_layers": "plasticity_lightning.surgery.topology",
    "incoming_magnitude": "plasticity_lightning.surgery.units",
    "normalize_importance": "plasticity_lightning.surgery.heads",
    "outgoing_magnitude": "plasticity_lightning.surgery.units",
    "pair_units": "plasticity_lightning.surgery.topology",
    "pairing_rules": "plasticity_lightning.surgery.rules",
    "prune_heads_": "plasticity_lightning.surgery.heads",
    "register_pairing_rule": "plasticity_lightning.surgery.rules",
    "reinit_heads": "plasticity_lightning.surgery.heads",
    "reinit_units": "plasticity_lightning.surgery.units",
    "reset_optimizer_state": "plasticity_lightning.surgery.units",
    "sigma_orthogonal_rows": "plasticity_lightning.surgery.sigma",
    "unit_columns": "plasticity_lightning.surgery.units",
    "unit_magnitudes": "plasticity_lightning.surgery.units",
    "unit_statistics": "plasticity_lightning.surgery.units",
    "unregister_pairing_rule": "plasticity_lightning.surgery.rules",
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

__all__ = [
    "DEFAULT_RULES",
    "FusedRows",
    "HeadGates",
    "HeadLayout",
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
