"""Plasticity injection (Nikishin et al. 2023) as a Lightning callback.

An adapter over :class:`plasticity_lightning.policies.PlasticityInjection`.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from plasticity_lightning.callbacks.interventions.base import ScheduledIntervention
from plasticity_lightning.policies import injection as policy


class PlasticityInjection(ScheduledIntervention):
    """Inject plasticity into the head when a new task starts and/or every n steps (Nikishin et al. 2023).

    At each injection the head's function so far is frozen and a fresh head minus a frozen copy of it is added, so the
    outputs just before and just after are equal while the trainable head starts again from a fresh init (its
    optimizer state dropped). The algorithm is :class:`plasticity_lightning.policies.PlasticityInjection`'s: the
    trainable parameters stay the same tensors (no parameter is added or frozen mid-fit, so DDP is unaffected), the
    frozen copies are added by a forward hook on the head and kept in this callback's checkpoint state (a resumed fit
    computes the same function), and the fresh heads come from a generator seeded alike on every rank. Each injection
    costs two more forward passes of the head per forward pass; ``merge=True`` (a ``Linear`` or ``Conv`` head) folds
    them after the next optimizer step into one frozen head, one extra pass in all (see the policy). Logged:
    ``injection/injections``.

    Args:
        layer: module name of the head (any module with parameters); ``None``: the model's ``output_layer()``.
        on_task_change: inject when a new task starts (not before the first).
        every_n_steps: also inject every n optimizer steps (``None``: never).
        merge: fold the frozen terms into one frozen head after the optimizer step that follows each injection
            (a constant cost per step; the output is unchanged at the injection and moves by float round-off at the
            fold).
        seed: seed of the fresh heads.
        prefix: first part of logged keys.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[PlasticityInjection(layer="head")])
    """

    policy: policy.PlasticityInjection
    count = "injections"

    def __init__(
        self,
        layer: str | None = None,
        on_task_change: bool = True,
        every_n_steps: int | None = None,
        merge: bool = False,
        seed: int = 0,
        prefix: str = "injection",
    ) -> None:
        injection = policy.PlasticityInjection(
            layer=layer, every_n_steps=every_n_steps, merge=merge, seed=seed, prefix=prefix
        )
        super().__init__(
            injection, on_task_change=on_task_change, every_n_steps=every_n_steps, seed=seed, prefix=prefix
        )
        self._injected_at = -1  # global step of the last injection: its terms are folded after the next step

    layer = property(lambda self: self.policy.layer)
    every_n_steps = property(lambda self: self.policy.every_n_steps)
    merge = property(lambda self: self.policy.merge)
    injections = property(lambda self: self.policy.injections)

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "layer": self.layer}

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if self.policy.frozen and trainer.global_step > self._injected_at:  # an optimizer step since the injection
            self.policy.fold()
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().apply(trainer, pl_module)
        self._injected_at = trainer.global_step

    def inject(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Inject now (:meth:`apply`)."""
        self.apply(trainer, pl_module)
