"""Parseval regularisation (Chung et al. 2024) as a Lightning callback.

An adapter over :class:`plasticity_lightning.policies.ParsevalRegularization`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from plasticity_lightning.callbacks.interventions.base import Intervention
from plasticity_lightning.policies.parseval import ParsevalRegularization as _Parseval


class ParsevalRegularization(Intervention):
    """Parseval regularisation (Chung et al. 2024): adds λ·Σ_l ‖W_l W_lᵀ − s·I‖²_F over the hidden layers to the loss.

    :class:`plasticity_lightning.policies.ParsevalRegularization` adds the penalty's gradient to the weights'
    gradients; this callback calls it in ``on_before_optimizer_step`` (after DDP averaging and AMP unscaling,
    before gradient clipping), so the model's ``training_step`` is untouched. The penalty λ·Σ‖WWᵀ − sI‖² is logged
    as ``parseval/penalty``. To put it in your own loss instead, use
    :func:`~plasticity_lightning.policies.parseval_penalty`.

    Args:
        weight: λ.
        scale: s, the target squared norm of each row.
        layers: module names whose weights are regularised (``None``: every Linear/Conv layer except the output
            layer, as in the paper).
        prefix: first part of logged keys.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[ParsevalRegularization(weight=1e-3)])
    """

    policy: _Parseval

    def __init__(
        self, weight: float = 1e-3, scale: float = 1.0, layers: Sequence[str] | None = None, prefix: str = "parseval"
    ) -> None:
        super().__init__(prefix=prefix, policy=_Parseval(weight=weight, scale=scale, layers=layers, prefix=prefix))

    weight = property(lambda self: self.policy.weight)
    scale = property(lambda self: self.policy.scale)
    layer_names = property(lambda self: self.policy.layer_names)

    @override
    def settings(self) -> dict[str, Any]:
        return {"weight": self.weight, "scale": self.scale, "layers": self.layer_names}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.policy.attach(pl_module)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        penalty = self.policy.step(penalty=self.log_due(trainer))  # read back only when logging
        if penalty is not None:
            self.log_values(trainer, {"penalty": penalty})
