"""Weight constraints applied between optimizer steps: precision limits, oscillation damping, James-Stein shrinkage.

The constraints themselves are trainer-free (:mod:`plasticity_lightning.policies.constraints`); these callbacks
apply them every ``every_n_epochs`` epochs (at the end of the training epoch, as the seed's ``constraint_interval``)
and/or every ``every_n_steps`` optimizer steps, and log what they report. The rewrite is a deterministic function of
the parameters and the constraint's history, so DDP ranks, which hold identical parameters, stay identical without
communication; the history is saved in checkpoints so a resumed run continues exactly. The epoch cadence acts after
the epoch's last training batch, so the epoch's validation and checkpoint see the constrained weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from plasticity_lightning.callbacks.interventions.base import Intervention
from plasticity_lightning.core.errors import PlasticityConfigError, check_positive_int
from plasticity_lightning.policies import constraints as policy


class ParameterConstraint(Intervention):
    """Base of the weight-constraint callbacks: when a trainer-free constraint acts, its checkpoint and its logging.

    A subclass builds its :class:`~plasticity_lightning.policies.constraints.ParameterConstraint` (which parameters,
    how they are rewritten, the per-parameter history) and passes it as ``policy``; this class applies it on the
    epoch and step cadences and logs ``<prefix>/changed_fraction`` and the constraint's own values.

    Args:
        every_n_epochs: apply after the last training batch of every n-th epoch (``None``: never).
        every_n_steps: apply after every n-th optimizer step (``None``: never).
        prefix: first part of logged keys.
        policy: the trainer-free constraint.
    """

    policy: policy.ParameterConstraint

    def __init__(
        self,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        prefix: str = "constraint",
        *,
        policy: policy.ParameterConstraint,
    ) -> None:
        owner = type(self).__name__
        for field, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if value is not None:
                check_positive_int(owner, field, value)
        super().__init__(seed=0, prefix=prefix, policy=policy, every_n_steps=every_n_steps)
        if every_n_epochs is None and every_n_steps is None:
            raise PlasticityConfigError(f"{owner}: every_n_epochs=None and every_n_steps=None never apply; set one")
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self._applied_epoch: int | None = None

    patterns = property(lambda self: self.policy.patterns)
    history = property(lambda self: self.policy.history)
    applications = property(lambda self: self.policy.applications)
    _selected = property(lambda self: self.policy.selected)

    @override
    def settings(self) -> dict[str, Any]:
        return {"every_n_epochs": self.every_n_epochs, "every_n_steps": self.every_n_steps, "parameters": self.patterns}

    def select(self, pl_module: torch.nn.Module) -> list[str]:
        """Names of the parameters this constraint rewrites (checked: patterns must match, dtypes must fit)."""
        return self.policy.select(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.policy.attach(pl_module)

    # ------------------------------------------------------------------ cadence
    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # the shared step rule: never at step 0, once per step (gradient accumulation ends several batches on one)
        by_step = self.cadence.due(step)
        # The epoch cadence acts after the epoch's last batch, not in on_train_epoch_end: validation and the
        # checkpoint saved after it (ModelCheckpoint saves on validation end) must see the constrained weights, or a
        # resumed run would lose the application.
        by_epoch = self.every_n_epochs is not None and trainer.is_last_batch and self._epoch_due(trainer)
        if by_step or by_epoch:
            self.cadence.mark(step)
            if by_epoch:
                self._applied_epoch = trainer.current_epoch
            self.apply(trainer, pl_module)

    def _epoch_due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch
        return (epoch + 1) % self.every_n_epochs == 0 and self._applied_epoch != epoch

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # An epoch cut short (max_steps, a Timer, early stopping mid-epoch) never reaches its last batch: apply here
        # so the final weights are constrained.
        if self.every_n_epochs is not None and self._epoch_due(trainer):
            self._applied_epoch = trainer.current_epoch
            self.apply(trainer, pl_module)

    # ------------------------------------------------------------------ applying
    def apply(self, trainer: pl.Trainer | None, pl_module: torch.nn.Module) -> dict[str, float]:
        """Constrain every selected parameter now; returns (and logs) the share of elements changed."""
        values = self.policy.apply(pl_module)
        if trainer is not None:
            self.log_values(trainer, values, force=True)
        return values

    def extra_log(self) -> dict[str, float]:
        """The constraint's own values after the last application."""
        return self.policy.extra_log()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "applied_epoch": self._applied_epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._applied_epoch = state_dict.get("applied_epoch")


class WeightPrecision(ParameterConstraint):
    """Limit the binary precision of float32 weights.

    :class:`plasticity_lightning.policies.WeightPrecision` applied on the epoch and/or step cadence.

    ``mode="mantissa"`` rounds each mantissa to ``bits`` bits (0–23), half to even; ``mode="ieee_bits"`` is
    neural-network-lab-python's ``BinaryWeightConstraintMax`` bit for bit (``bits`` 0–32).
    ``max_additional_bits`` is the seed's ``BinaryWeightConstraintChanges``: each element may use at most that many
    more bits than at the previous application (every parameter keeps its own record); see the policy for details.

    Args:
        bits: precision limit (see ``mode``), or ``None`` for the change limit alone.
        mode: ``"mantissa"`` or ``"ieee_bits"``.
        max_additional_bits: change limit per application, or ``None``.
        every_n_epochs: see :class:`ParameterConstraint`.
        every_n_steps: see :class:`ParameterConstraint`.
        parameters: parameter names or glob patterns (``"hidden.*.linear.weight"``) to constrain; ``None``: every
            parameter, as the seed does.
        prefix: see :class:`ParameterConstraint`.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[WeightPrecision(bits=8, every_n_epochs=10)])
    """

    def __init__(
        self,
        bits: int | None = 16,
        mode: Literal["mantissa", "ieee_bits"] = "mantissa",
        max_additional_bits: int | None = None,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        parameters: Sequence[str] | None = None,
        prefix: str = "weight_precision",
    ) -> None:
        constraint = policy.WeightPrecision(
            bits=bits, mode=mode, max_additional_bits=max_additional_bits, parameters=parameters, prefix=prefix
        )
        super().__init__(every_n_epochs, every_n_steps, prefix, policy=constraint)

    bits = property(lambda self: self.policy.bits)
    mode = property(lambda self: self.policy.mode)
    max_additional_bits = property(lambda self: self.policy.max_additional_bits)

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "bits": self.bits, "mode": self.mode, "added": self.max_additional_bits}


class OscillationDampener(ParameterConstraint):
    """Damp elements that oscillate (a strict local extremum over the last three applications).

    :class:`plasticity_lightning.policies.OscillationDampener` applied on the epoch and/or step cadence.

    ``mode="lowest_bit"`` clears the lowest set bit of a firing element (neural-network-lab-python's
    ``OscillationDampener``), ``"adaptive"`` clears more bits the further the weight is from the parameter's running
    mean (``AdaptiveOscillationDampener``), ``"shrink"`` moves it toward the mean of its three values. By default it
    acts on 1-dimensional parameters (biases), as the seed does. Logs ``fired_fraction``.

    Args:
        mode: ``"lowest_bit"``, ``"adaptive"`` or ``"shrink"``.
        strength: share of the distance to the local mean removed by ``"shrink"`` (0 < strength ≤ 1).
        every_n_epochs: see :class:`ParameterConstraint`.
        every_n_steps: see :class:`ParameterConstraint`.
        parameters: parameter names or glob patterns; ``None``: every bias.
        prefix: see :class:`ParameterConstraint`.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[OscillationDampener(mode="shrink", every_n_steps=10)])
    """

    def __init__(
        self,
        mode: Literal["lowest_bit", "adaptive", "shrink"] = "lowest_bit",
        strength: float = 0.5,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        parameters: Sequence[str] | None = None,
        prefix: str = "oscillation_dampener",
    ) -> None:
        constraint = policy.OscillationDampener(mode=mode, strength=strength, parameters=parameters, prefix=prefix)
        super().__init__(every_n_epochs, every_n_steps, prefix, policy=constraint)

    mode = property(lambda self: self.policy.mode)
    strength = property(lambda self: self.policy.strength)
    _fired = property(lambda self: self.policy.fired)

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "mode": self.mode, "strength": self.strength}


class JamesSteinShrinkage(ParameterConstraint):
    """James-Stein shrinkage of each tensor toward 0.

    ``w ← (1 − λ)w`` with ``λ = clip((p − 2)·σ²/‖w‖², 0, max_shrinkage)``:
    :class:`plasticity_lightning.policies.JamesSteinShrinkage` applied on the epoch and/or step cadence.

    neural-network-lab-python applies it as a Keras kernel constraint after every optimizer step, to kernels (weights
    with ≥ 2 dims, the default selection here), with ``σ² = 1``. Logs ``mean_shrinkage``, the mean λ.

    Args:
        variance: σ², the noise variance the estimator assumes.
        max_shrinkage: upper clip of λ (0 < max_shrinkage < 1).
        every_n_epochs: see :class:`ParameterConstraint`. The seed's cadence is
            ``every_n_epochs=None, every_n_steps=1``.
        every_n_steps: see :class:`ParameterConstraint`.
        parameters: parameter names or glob patterns; ``None``: every weight with ≥ 2 dims.
        prefix: see :class:`ParameterConstraint`.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[JamesSteinShrinkage(variance=1e-4, every_n_epochs=1)])
    """

    def __init__(
        self,
        variance: float = 1.0,
        max_shrinkage: float = 0.99,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        parameters: Sequence[str] | None = None,
        prefix: str = "james_stein",
    ) -> None:
        constraint = policy.JamesSteinShrinkage(
            variance=variance, max_shrinkage=max_shrinkage, parameters=parameters, prefix=prefix
        )
        super().__init__(every_n_epochs, every_n_steps, prefix, policy=constraint)

    variance = property(lambda self: self.policy.variance)
    max_shrinkage = property(lambda self: self.policy.max_shrinkage)

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "variance": self.variance, "max_shrinkage": self.max_shrinkage}
