"""Iterative head pruning by importance (Michel et al. 2019): a callback over the selection rule of
:func:`~plasticity_lightning.policies.heads.lowest_heads`, with the perplexity tolerance and the undo."""

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
from plasticity_lightning.core.errors import (
    PlasticityConfigError,
    check_fraction,
    check_positive_float,
    check_positive_int,
)
from plasticity_lightning.policies.heads.selection import NonFiniteScores, lowest_heads


class HeadPruning(SkipsNonFinite, Intervention):
    """Iterative head pruning by importance (Michel et al.): after every ``every_n_validations``-th validation of the
    fit (not of ``trainer.validate``), gate off
    the ``fraction`` of all heads with the lowest importance — never a layer's last head — until ``max_fraction``
    is pruned or validation perplexity exceeds the first measured one by more than ``tolerance`` (relative); the
    step that broke the tolerance is undone and pruning stops.

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
        self.fraction = check_fraction("HeadPruning", "fraction", fraction, low_open=True)
        self.max_fraction = check_fraction("HeadPruning", "max_fraction", max_fraction, low_open=True)
        self.tolerance = check_positive_float("HeadPruning", "tolerance", tolerance, allow_zero=True)
        self.every_n_validations = check_positive_int("HeadPruning", "every_n_validations", every_n_validations)
        if not isinstance(monitor, str) or not monitor:
            raise PlasticityConfigError(f"HeadPruning.monitor={monitor!r} is invalid; expected a logged metric name")
        self.monitor = monitor
        self.mask: torch.Tensor | None = None
        self.last_pruned: list[tuple[int, int]] = []
        self.validations = 0
        self.baseline: float | None = None
        self.stopped = False
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
        if self.monitor not in trainer.callback_metrics:
            raise PlasticityConfigError(
                f"HeadPruning.monitor={self.monitor!r} is not logged; logged: "
                f"{', '.join(sorted(trainer.callback_metrics))}"
            )
        # averaged across ranks: a value logged without sync_dist would let ranks decide differently
        value = trainer.callback_metrics[self.monitor].detach().float().to(pl_module.device)
        perplexity = float(self.reduce_mean(trainer, value))
        if not math.isfinite(perplexity):  # neither a baseline nor a reason to undo
            self.skip_nonfinite(trainer, self.monitor)
            return
        gates = self._importance.gates
        if self.baseline is None:
            self.baseline = perplexity
        elif perplexity > self.baseline * (1 + self.tolerance):
            for layer, head in self.last_pruned:  # undo exactly the step that cost too much, and stop
                gates.set(layer, head, 1.0)
            self.mask, self.stopped = gates.mask, True
            self._record(trainer, perplexity, [], reverted=True)
            return
        alive = gates.mask > 0
        total = alive.numel()
        budget = int(self.max_fraction * total) - int((~alive).sum())
        count = min(max(1, round(self.fraction * total)), budget)
        importance = self._importance.current(trainer)
        try:
            heads = lowest_heads(importance, alive, count) if count > 0 else []
        except NonFiniteScores as skipped:
            self.skip_nonfinite(trainer, skipped.what)
            return
        if not heads:
            self.stopped = True
            self._record(trainer, perplexity, [], reverted=False)
            return
        self.last_pruned = [(int(layer), int(head)) for layer, head in heads]
        for layer, head in heads:
            gates.set(layer, head, 0.0)
        self.mask = gates.mask
        self._record(trainer, perplexity, heads, reverted=False, importance=importance.tolist())

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
            "last_pruned": list(self.last_pruned),
            "validations": self.validations,
            "baseline": self.baseline,
            "stopped": self.stopped,
            "history": list(self.history),
            "skipped_nonfinite": self.skipped_nonfinite,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.skipped_nonfinite = int(state_dict.get("skipped_nonfinite", 0))
        self.mask = state_dict.get("mask")
        self.last_pruned = [tuple(h) for h in state_dict.get("last_pruned", [])]
        self.validations = int(state_dict.get("validations", 0))
        self.baseline = state_dict.get("baseline")
        self.stopped = bool(state_dict.get("stopped", False))
        self.history = list(state_dict.get("history", []))
