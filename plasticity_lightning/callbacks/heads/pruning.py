"""Iterative head pruning by importance (Michel et al. 2019).

The Lightning adapter over :class:`~plasticity_lightning.policies.heads.IterativeHeadPruner` (cadence, DDP averaging,
logging, checkpoints).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from plasticity_lightning.callbacks.heads.importance import (
    HeadImportance,
    SkipsNonFinite,
    find_head_importance,
    fitting,
)
from plasticity_lightning.callbacks.interventions.base import Intervention
from plasticity_lightning.core.errors import PlasticityConfigError, check_positive_int
from plasticity_lightning.policies.heads.pruning import IterativeHeadPruner
from plasticity_lightning.policies.heads.selection import NonFiniteScores


class HeadPruning(SkipsNonFinite, Intervention):
    """Iterative head pruning by importance (Michel et al.).

    After every ``every_n_validations``-th validation of the fit (not of ``trainer.validate``), gate off the
    ``fraction`` of all heads with the lowest importance — never a layer's last head — until ``max_fraction`` is pruned
    or validation perplexity exceeds the first measured one by more than ``tolerance`` (relative); the step that broke
    the tolerance is undone and pruning stops.

    Importance and gates come from a :class:`HeadImportance` callback on the same trainer (add it before this
    one). Decisions use DDP-averaged importance and the perplexity averaged across ranks, so every rank prunes the
    same heads. Undoing a step turns back on exactly the heads that step pruned. The mask, baseline, validation
    count and history are in ``state_dict``. A step whose perplexity or importance is NaN/inf is skipped (no head
    pruned, the baseline not set), counted in ``heads/skipped_nonfinite``; the first one warns.

    Args:
        fraction: share of all heads pruned per step (Michel et al.: 0.1).
        max_fraction: stop after this share of heads is pruned.
        tolerance: allowed relative rise of the monitored perplexity over the first value.
        every_n_validations: pruning cadence in validation runs.
        monitor: the perplexity key in ``trainer.callback_metrics``.
        prefix: first part of every logged key.
    """

    def __init__(
        self,
        fraction: float = 0.1,
        max_fraction: float = 0.5,
        tolerance: float = 0.05,
        every_n_validations: int = 1,
        monitor: str = "val/perplexity",
        prefix: str = "heads",
    ) -> None:
        super().__init__(prefix=prefix)
        self.pruner = IterativeHeadPruner(fraction, max_fraction, tolerance, owner="HeadPruning")
        pruner = self.pruner
        self.fraction, self.max_fraction, self.tolerance = pruner.fraction, pruner.max_fraction, pruner.tolerance
        self.every_n_validations = check_positive_int("HeadPruning", "every_n_validations", every_n_validations)
        if not isinstance(monitor, str) or not monitor:
            raise PlasticityConfigError(f"HeadPruning.monitor={monitor!r} is invalid; expected a logged metric name")
        self.monitor = monitor
        self.mask: torch.Tensor | None = None
        self.validations = 0
        self.history: list[dict[str, Any]] = []
        self._importance: HeadImportance | None = None

    @override
    def settings(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "max_fraction": self.max_fraction, "monitor": self.monitor}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # resumed: HeadImportance restores the gates, this callback its schedule
        self._importance = find_head_importance(trainer, "HeadPruning")

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not fitting(trainer) or self.stopped or self._importance is None:
            return
        self.validations += 1
        if self.validations % self.every_n_validations:
            return
        perplexity = self._perplexity(trainer, pl_module)
        if not math.isfinite(perplexity):  # neither a baseline nor a reason to undo
            self.skip_nonfinite(trainer, self.monitor)
            return
        gates = self._importance.gates
        try:
            step = self.pruner.step(gates, perplexity, lambda: self._importance.current(trainer))
        except NonFiniteScores as skipped:
            self.skip_nonfinite(trainer, skipped.what)
            return
        if step.heads or step.reverted:
            self.mask = gates.mask
        importance = step.importance.tolist() if step.importance is not None else None
        self._record(trainer, perplexity, step.heads, reverted=step.reverted, importance=importance)

    def _perplexity(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """The monitored perplexity averaged across ranks: one logged without sync_dist would split the decision."""
        if self.monitor not in trainer.callback_metrics:
            raise PlasticityConfigError(
                f"HeadPruning.monitor={self.monitor!r} is not logged; logged: "
                f"{', '.join(sorted(trainer.callback_metrics))}"
            )
        value = trainer.callback_metrics[self.monitor].detach().float().to(pl_module.device)
        return float(self.reduce_mean(trainer, value))

    # the pruner's state, read and written under the names this callback's checkpoints have always used
    @property
    def baseline(self) -> float | None:
        return self.pruner.baseline

    @property
    def stopped(self) -> bool:
        return self.pruner.stopped

    @property
    def last_pruned(self) -> list[tuple[int, int]]:
        return self.pruner.last_pruned

    def _record(
        self, trainer: pl.Trainer, perplexity: float, heads: list, reverted: bool, importance: list | None = None
    ) -> None:
        pruned = int((self.mask == 0).sum()) if self.mask is not None else 0
        self.history.append(
            {
                "epoch": trainer.current_epoch,
                "perplexity": perplexity,
                "pruned": heads,
                "reverted": reverted,
                "importance": importance,
            }
        )
        self.log_values(trainer, {"pruned_heads": pruned, "pruning_perplexity": perplexity}, force=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "mask": self.mask,
            **self.pruner.state_dict(),
            "validations": self.validations,
            "history": list(self.history),
            "skipped_nonfinite": self.skipped_nonfinite,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.skipped_nonfinite = int(state_dict.get("skipped_nonfinite", 0))
        self.mask = state_dict.get("mask")
        self.pruner.load_state_dict(state_dict)
        self.validations = int(state_dict.get("validations", 0))
        self.history = list(state_dict.get("history", []))
