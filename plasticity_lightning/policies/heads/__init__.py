"""Attention-head policies for any training loop.

Head importance, which heads to prune and to revive, the reviver (fresh weights, gate ramp, learning-rate boost), the
prune → measure → grow → learn cycle's controller and what a cycle is judged on (perplexity, degeneration of seeded
generations, live heads). The tensor surgery they call (gates, re-initialisation, removal) is
:mod:`plasticity_lightning.surgery.heads`; the Lightning callbacks over them are
:mod:`plasticity_lightning.callbacks.heads`.
"""

from plasticity_lightning.policies.heads.cycle import CycleController, CycleSettings, updated_rating
from plasticity_lightning.policies.heads.importance import IMPORTANCE_METHODS, HeadImportanceScores
from plasticity_lightning.policies.heads.measures import continue_prompt, cycle_measures, score_generations
from plasticity_lightning.policies.heads.pruning import IterativeHeadPruner, PruningStep
from plasticity_lightning.policies.heads.reviver import CYCLE_REVIVER_SETTINGS, HeadReviver, ReviverSettings
from plasticity_lightning.policies.heads.selection import (
    GROWTH_CHOICES,
    GROWTH_SCORE,
    HEAD_SCORES,
    NonFiniteScores,
    choose_heads_to_grow,
    entropy_gap,
    head_scores,
    heads_to_grow,
    language_model,
    lowest_heads,
    require_finite_scores,
    share_count,
)

__all__ = [
    "CYCLE_REVIVER_SETTINGS",
    "GROWTH_CHOICES",
    "GROWTH_SCORE",
    "HEAD_SCORES",
    "IMPORTANCE_METHODS",
    "CycleController",
    "CycleSettings",
    "HeadImportanceScores",
    "HeadReviver",
    "IterativeHeadPruner",
    "NonFiniteScores",
    "PruningStep",
    "ReviverSettings",
    "choose_heads_to_grow",
    "continue_prompt",
    "cycle_measures",
    "entropy_gap",
    "head_scores",
    "heads_to_grow",
    "language_model",
    "lowest_heads",
    "require_finite_scores",
    "score_generations",
    "share_count",
    "updated_rating",
]
