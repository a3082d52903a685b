"""Attention-head callbacks for language models: head importance, attention entropy and degeneration monitors,
head pruning and growth, and the :class:`PlasticityCycle` that combines them.
"""

from plasticity_lightning.callbacks.heads.cycle import PlasticityCycle
from plasticity_lightning.callbacks.heads.importance import (
    AttentionEntropyMonitor,
    DegenerationMonitor,
    HeadGrowth,
    HeadImportance,
    HeadPruning,
)

__all__ = [
    "AttentionEntropyMonitor",
    "DegenerationMonitor",
    "HeadGrowth",
    "HeadImportance",
    "HeadPruning",
    "PlasticityCycle",
]
