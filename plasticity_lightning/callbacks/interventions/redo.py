"""ReDo (Sokar et al., ICML 2023) as a Lightning callback.

ReDo (Sokar et al., ICML 2023) as a Lightning callback, an adapter over :class:`plasticity_lightning.policies.ReDo`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from torch import nn
from typing_extensions import override

from plasticity_lightning.callbacks.interventions.base import UnitIntervention
from plasticity_lightning.core.errors import check_choice, check_positive_int
from plasticity_lightning.policies import redo as policy
from plasticity_lightning.probes import ProbeSet


class ReDo(UnitIntervention):
    """Every ``every_n_steps`` optimizer steps, re-initialise the units whose ReDo score is at most ``tau``.

    The scoring and re-initialisation are :class:`plasticity_lightning.policies.ReDo`'s. This callback decides when
    (every ``every_n_steps`` optimizer steps, never at step 0, and when a new task starts with ``on_task_change``),
    draws the probe batch from the trainer's dataloader (:class:`~plasticity_lightning.probes.ProbeSet`: identical
    on every DDP rank, redrawn for each task), averages per-unit activity across ranks through the strategy before
    scoring, keeps the counts and the generator in the checkpoint and logs ``redo/<layer>/recycled``,
    ``redo/recycled``, ``redo/recycled_total`` and ``redo/skipped_nonfinite`` (layer-steps skipped for NaN/inf
    activity) at every recycling.

    Args:
        every_n_steps: recycle period in optimizer steps (the paper: 1000).
        tau: dormancy threshold (0.025 by default in the paper, 0.1 for Atari-100K; 0 recycles silent units only).
        on_task_change: also recycle when a new task starts.
        probe_size: rows of the probe batch (the reference: 256).
        probe_source: draw the probe from the ``"train"`` or ``"val"`` dataset.
        forward: ``forward(model, batch)`` for models whose input is not the batch's first element.
        layers: see :class:`~plasticity_lightning.policies.base.UnitPolicy`.
        pairs: see :class:`~plasticity_lightning.policies.base.UnitPolicy`.
        init: see :class:`~plasticity_lightning.policies.base.UnitPolicy`.
        gain: see :class:`~plasticity_lightning.policies.base.UnitPolicy`.
        seed: see :class:`~plasticity_lightning.policies.base.UnitPolicy`.
        prefix: first part of logged keys.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[ReDo(every_n_steps=1000, tau=0.025)])
    """

    policy: policy.ReDo

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
        check_positive_int("ReDo", "every_n_steps", every_n_steps)
        check_positive_int("ReDo", "probe_size", probe_size)
        check_choice("ReDo", "probe_source", probe_source, ("train", "val"))
        redo = policy.ReDo(
            every_n_steps=every_n_steps,
            tau=tau,
            forward=forward,
            layers=layers,
            pairs=pairs,
            init=init,
            gain=gain,
            seed=seed,
            prefix=prefix,
        )
        super().__init__(seed=seed, prefix=prefix, policy=redo, every_n_steps=every_n_steps)
        self.on_task_change = on_task_change
        self.probe = ProbeSet(size=probe_size, source=probe_source, seed=seed, owner="ReDo")
        self._probe_task: int | None = None

    every_n_steps = property(lambda self: self.policy.every_n_steps)
    tau = property(lambda self: self.policy.tau)
    forward = property(lambda self: self.policy.forward)

    @property
    def replaced(self) -> dict[str, int]:
        """Units recycled so far, per producer."""
        return self.policy.replaced

    @property
    def skipped(self) -> dict[str, int]:
        """Recyclings skipped per producer for NaN/inf activity."""
        return self.policy.skipped

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "every_n_steps": self.every_n_steps, "tau": self.tau}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.connect(trainer)
        self.policy.attach(pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if self.cadence.take(trainer.global_step):
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
        self.connect(trainer)
        self.policy.model = pl_module
        counts = self.policy.recycle(self.probe.batch, step=trainer.global_step)
        values: dict[str, float] = {f"{name}/recycled": count for name, count in counts.items()}
        values["recycled"] = sum(counts.values())
        values["recycled_total"] = sum(self.replaced.values())
        values["skipped_nonfinite"] = sum(self.skipped.values())
        self.log_values(trainer, values, force=True)
        return counts
