"""Attention-head callbacks for language models.

Head importance, attention entropy and degeneration monitors, head pruning and growth, and the :class:`PlasticityCycle`
that combines them. Adapters over :mod:`plasticity_lightning.policies.heads` (the algorithms, usable in any training
loop).
"""

from plasticity_lightning.callbacks.heads.cycle import PlasticityCycle
from plasticity_lightning.callbacks.heads.growth import HeadGrowth
from plasticity_lightning.callbacks.heads.importance import HeadImportance
from plasticity_lightning.callbacks.heads.monitors import AttentionEntropyMonitor, DegenerationMonitor
from plasticity_lightning.callbacks.heads.pruning import HeadPruning

__all__ = [
    "AttentionEntropyMonitor",
    "DegenerationMonitor",
    "HeadGrowth",
    "HeadImportance",
    "HeadPruning",
    "PlasticityCycle",
]
