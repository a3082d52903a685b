"""Iterative head pruning by importance (Michel et al. 2019), without a trainer.

Iterative head pruning by importance (Michel et al. 2019, "Are Sixteen Heads Really Better than One?"), without a
trainer: the perplexity baseline, the tolerance, the budget and the undo of the step that cost too much.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from plasticity_lightning.core.errors import check_fraction, check_positive_float
from plasticity_lightning.policies.heads.selection import lowest_heads
from plasticity_lightning.surgery.heads import HeadGates


@dataclass
class PruningStep:
    """What one :meth:`IterativeHeadPruner.step` did: the heads gated off, or the undo of the previous step.

    Attributes:
        heads: ``(layer, head)`` of every head gated off by this step (empty for an undo).
        reverted: whether this step undid the previous one.
        importance: the importance the step ranked by, ``[layers, heads]`` (``None`` when the step gated nothing off).
    """

    heads: list[tuple[int, int]] = field(default_factory=list)
    reverted: bool = False
    importance: torch.Tensor | None = None


class IterativeHeadPruner:
    """Gate off the least important heads step by step, within a perplexity tolerance.

    Gate off the ``fraction`` of all heads with the lowest importance per step (never a layer's last head), until
    ``max_fraction`` is pruned or the measured perplexity exceeds the first one by more than ``tolerance`` (relative);
    the step that broke the tolerance is undone and pruning stops.

    Works in any loop: call :meth:`step` after each evaluation with the gates, the perplexity and a function that
    returns the current importance (called only when heads are chosen). :class:`~plasticity_lightning.callbacks.
    HeadPruning` is its Lightning adapter (cadence, DDP averaging, logging, checkpoints).

    Args:
        fraction: share of all heads pruned per step (Michel et al.: 0.1).
        max_fraction: stop once this share of heads is pruned.
        tolerance: allowed relative rise of perplexity over the first measured value.
        owner: the name bad arguments are reported under.

    Example:
        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> gates = HeadGates(GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=50)))
        >>> pruner = IterativeHeadPruner(fraction=0.25, tolerance=0.1)
        >>> pruner.step(gates, 10.0, lambda: torch.tensor([[1.0, 3.0], [2.0, 4.0]])).heads
        [(0, 0)]
        >>> pruner.step(gates, 12.0, lambda: torch.ones(2, 2)).reverted, gates.mask.tolist(), pruner.stopped
        (True, [[1.0, 1.0], [1.0, 1.0]], True)
    """

    def __init__(
        self, fraction: float = 0.1, max_fraction: float = 0.5, tolerance: float = 0.05, owner: str = "HeadPruning"
    ) -> None:
        self.fraction = check_fraction(owner, "fraction", fraction, low_open=True)
        self.max_fraction = check_fraction(owner, "max_fraction", max_fraction, low_open=True)
        self.tolerance = check_positive_float(owner, "tolerance", tolerance, allow_zero=True)
        self.last_pruned: list[tuple[int, int]] = []
        self.baseline: float | None = None
        self.stopped = False

    def step(self, gates: HeadGates, perplexity: float, importance: Callable[[], torch.Tensor]) -> PruningStep:
        """One pruning decision at a finite ``perplexity``; raises ``NonFiniteScores`` for a NaN/inf importance."""
        if self.baseline is None:
            self.baseline = perplexity
        elif perplexity > self.baseline * (1 + self.tolerance):
            for layer, head in self.last_pruned:  # undo exactly the step that cost too much, and stop
                gates.set(layer, head, 1.0)
            self.stopped = True
            return PruningStep(reverted=True)
        alive = gates.mask > 0
        total = alive.numel()
        budget = int(self.max_fraction * total) - int((~alive).sum())
        count = min(max(1, round(self.fraction * total)), budget)
        scores = importance()
        heads = lowest_heads(scores, alive, count) if count > 0 else []
        if not heads:
            self.stopped = True
            return PruningStep()
        self.last_pruned = [(int(layer), int(head)) for layer, head in heads]
        for layer, head in heads:
            gates.set(layer, head, 0.0)
        return PruningStep(heads=heads, importance=scores)

    def state_dict(self) -> dict[str, Any]:
        return {"last_pruned": list(self.last_pruned), "baseline": self.baseline, "stopped": self.stopped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_pruned = [tuple(h) for h in state_dict.get("last_pruned", [])]
        self.baseline = state_dict.get("baseline")
        self.stopped = bool(state_dict.get("stopped", False))
