"""ReDo: recycle τ-dormant units (Sokar et al., ICML 2023)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from plasticity_lightning.callbacks.intervention import UnitIntervention
from plasticity_lightning.core.errors import check_choice, check_positive_float, check_positive_int
from plasticity_lightning.metrics.activity import _redo_scores, mean_abs_activation
from plasticity_lightning.probes import ProbeSet, capture_outputs, default_forward
from plasticity_lightning.surgery import reinit_units, unit_statistics


class ReDo(UnitIntervention):
    """Every ``every_n_steps`` optimizer steps, re-initialise the units whose ReDo score is at most ``tau``.

    The score of unit i is s_i = E|h_i| / (mean_k E|h_k| + 1e-9) on a fixed probe batch (eval mode, no_grad; conv
    channels pooled over batch × H × W), where h is what the consumer layer receives — the same units as
    :class:`~plasticity_lightning.callbacks.DormantUnitMonitor`'s ``redo_dormant_fraction`` and the same function
    (:func:`~plasticity_lightning.metrics.redo_scores`). Dormant units get fresh incoming weights (the layer's own
    init, or ``init=...``; the paper's code uses xavier_uniform), bias 0, reset norm entries, zero outgoing weights
    and zeroed optimizer moments on exactly those slices (:func:`~plasticity_lightning.surgery.reinit_units`). The
    output layer is never recycled, and nor are units that enter a residual sum (see
    :mod:`plasticity_lightning.surgery.topology`).

    The probe is identical on every DDP rank, per-unit activity is averaged across ranks before scoring (BatchNorm
    running statistics may differ between ranks until DDP re-broadcasts them), and new weights come from a
    generator seeded alike on every rank: every rank recycles the same units with the same weights.

    A layer whose probe activity holds a NaN or ±inf (a diverged network: one +inf activation would make every
    other unit's score 0, i.e. "dormant") is not recycled at that step: the step is skipped for that layer,
    counted in ``redo/skipped_nonfinite`` (layer-steps skipped so far), and the first one warns.

    Args:
        every_n_steps: recycle period in optimizer steps (the paper: 1000).
        tau: dormancy threshold (0.025 by default in the paper, 0.1 for Atari-100K; 0 recycles silent units only).
        on_task_change: also recycle when a new task starts.
        probe_size: rows of the probe batch (the reference: 256).
        probe_source: draw the probe from the ``"train"`` or ``"val"`` dataset.
        forward: ``forward(model, batch)`` for models whose input is not the batch's first element.
        layers, pairs, init, gain, seed: see :class:`~plasticity_lightning.callbacks.intervention.UnitIntervention`.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[ReDo(every_n_steps=1000, tau=0.025)])
    """

    def __init__(
        self,
        every_n_steps: int = 1000,
        tau: float = 0.025,
        on_task_change: bool = False,
        probe_size: int = 256,
        probe_source: Literal["train", "val"] = "train",
        forward: Callable[[nn.Module, Any], Any] | None = None,
        layers: Sequence[str] | None = None,
        pairs: Sequence[Sequence[Any]] | None = None,
        init: str = "auto",
        gain: float | None = None,
        seed: int = 0,
        prefix: str = "redo",
    ) -> None:
        super().__init__(layers=layers, pairs=pairs, init=init, gain=gain, seed=seed, prefix=prefix)
        self.every_n_steps = check_positive_int("ReDo", "every_n_steps", every_n_steps)
        self.tau = check_positive_float("ReDo", "tau", tau, allow_zero=True)
        check_positive_int("ReDo", "probe_size", probe_size)
        check_choice("ReDo", "probe_source", probe_source, ("train", "val"))
        self.on_task_change = on_task_change
        self.probe = ProbeSet(size=probe_size, source=probe_source, seed=seed, owner="ReDo")
        self.forward = forward or default_forward
        self.replaced: dict[str, int] = {}
        self.skipped: dict[str, int] = {}  # steps skipped per layer for non-finite activity
        self._last_step: int | None = None
        self._probe_task: int | None = None

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "every_n_steps": self.every_n_steps, "tau": self.tau}

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        step = trainer.global_step
        if step == 0 or step == self._last_step or step % self.every_n_steps:
            return
        self._last_step = step
        self.recycle(trainer, pl_module)

    @override
    def on_task_start(self, trainer, pl_module, context, previous_task) -> None:
        if self.on_task_change and previous_task is not None:
            self.recycle(trainer, pl_module)

    def recycle(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int]:
        """Measure on the probe and re-initialise dormant units now; returns the count per producer."""
        if self.probe.batch is None or self._probe_task != self.current_task:
            self.probe.draw(trainer)
            self._probe_task = self.current_task
        consumers = {pair.producer: pair.consumer_module for pair in self.pairs}
        inputs, _ = capture_outputs(pl_module, self.probe.batch, consumers, forward=self.forward, inputs=True)
        counts = {}
        for pair in self.pairs:
            # E|h| averaged across ranks before scoring: with BatchNorm each rank's running statistics (and so its
            # eval-mode features) can differ until DDP re-broadcasts buffers at the next forward pass
            activity = self.reduce_mean(trainer, mean_abs_activation(unit_statistics(inputs[pair.producer], pair)))
            if not bool(torch.isfinite(activity).all()):  # reduced first: every rank skips alike
                self.skipped[pair.producer] = self.skipped.get(pair.producer, 0) + 1
                self.warn_nonfinite(pair.producer, trainer.global_step)
                counts[pair.producer] = 0
                continue
            scores = _redo_scores(activity)
            units = torch.nonzero(scores <= self.tau).flatten()
            scheme, gain = self.inits[pair.producer]
            reinit_units(
                pair, units, init=scheme, gain=gain, generator=self.generator, optimizers=self.optimizers(trainer)
            )
            counts[pair.producer] = units.numel()
            self.replaced[pair.producer] = self.replaced.get(pair.producer, 0) + units.numel()
        values = {f"{name}/recycled": count for name, count in counts.items()}
        values["recycled"] = sum(counts.values())
        values["recycled_total"] = sum(self.replaced.values())
        values["skipped_nonfinite"] = sum(self.skipped.values())
        self.log_values(trainer, values, force=True)
        return counts

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "replaced": dict(self.replaced),
            "skipped": dict(self.skipped),
            "last_step": self._last_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.replaced = dict(state_dict.get("replaced", {}))
        self.skipped = dict(state_dict.get("skipped", {}))
        self._last_step = state_dict.get("last_step")
