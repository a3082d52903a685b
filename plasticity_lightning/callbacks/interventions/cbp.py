"""Continual Backprop (Dohare et al., Nature 2024) and RR-CBP as a Lightning callback.

An adapter over :class:`plasticity_lightning.policies.ContinualBackprop`, which holds the algorithm.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from plasticity_lightning.callbacks.interventions.base import UnitIntervention
from plasticity_lightning.policies import cbp as policy
from plasticity_lightning.policies.cbp import UTILITIES, _LayerState  # noqa: F401  (re-exported for old imports)
from plasticity_lightning.surgery import InputCovariance, UnitPair


class ContinualBackprop(UnitIntervention):
    """Continual Backprop: after every optimizer step, replace a small share of the least useful mature units.

    The algorithm, its arguments and its guarantees are those of
    :class:`plasticity_lightning.policies.ContinualBackprop` (utility, bias-corrected ranking, maturity, counting,
    re-initialisation, RR-CBP's Σ-orthogonal rows, skipping non-finite statistics). This callback decides when it
    acts and where its numbers go:

    * at the start of every fit the policy binds the model's pairs (logged once) and records the consumers'
      inputs in training forward passes; after every optimizer step
      (:class:`~plasticity_lightning.policies.StepCadence`: never at step 0, once per step, so gradient
      accumulation's micro-batches count as one batch) it steps;
    * DDP: per-unit statistics are averaged across ranks through the strategy before the utility update, and the
      policy's generator is seeded alike on every rank, so every rank replaces the same units with the same weights;
    * checkpoint: the policy's state (ages, utilities, f, accumulators, counts, Σ, the generator, the magnitude
      cache) and the last step acted on, under this callback's ``state_key``;
    * logging, every ``log_every_n_steps``: ``cbp/<layer>/replaced`` and ``cbp/replaced`` (totals so far) and
      ``cbp/skipped_nonfinite``. Under ``bf16-mixed`` the statistics are computed in float32.

    Args:
        replacement_rate: see :class:`plasticity_lightning.policies.ContinualBackprop`.
        maturity_threshold: see :class:`plasticity_lightning.policies.ContinualBackprop`.
        decay_rate: see :class:`plasticity_lightning.policies.ContinualBackprop`.
        utility: see :class:`plasticity_lightning.policies.ContinualBackprop`.
        accumulate: see :class:`plasticity_lightning.policies.ContinualBackprop`.
        count: see :class:`plasticity_lightning.policies.ContinualBackprop`.
        init: see :class:`plasticity_lightning.policies.ContinualBackprop`.
        gain: see :class:`plasticity_lightning.policies.ContinualBackprop`.
        sigma_decay: see :class:`plasticity_lightning.policies.ContinualBackprop`.
        sigma_ridge: see :class:`plasticity_lightning.policies.ContinualBackprop`.
        energy_budget: see :class:`plasticity_lightning.policies.ContinualBackprop`.
        magnitudes_every_n_steps: see :class:`plasticity_lightning.policies.ContinualBackprop`.
        window: see :class:`plasticity_lightning.policies.ContinualBackprop`.
        layers: see :class:`plasticity_lightning.policies.ContinualBackprop`.
        pairs: see :class:`plasticity_lightning.policies.ContinualBackprop`.
        seed: see :class:`plasticity_lightning.policies.ContinualBackprop`.
        prefix: first part of logged keys.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[ContinualBackprop(replacement_rate=1e-4, maturity_threshold=100)])
    """

    policy: policy.ContinualBackprop

    def __init__(
        self,
        replacement_rate: float = 1e-4,
        maturity_threshold: int = 100,
        decay_rate: float = 0.99,
        utility: Literal["contribution", "zero_contribution", "adaptable_contribution"] = "contribution",
        accumulate: bool = True,
        count: Literal["eligible", "width"] = "eligible",
        init: str = "auto",
        gain: float | None = None,
        sigma_decay: float = 0.99,
        sigma_ridge: float = 1e-4,
        energy_budget: bool = False,
        magnitudes_every_n_steps: int = 1,
        window: int = 1,
        layers: Sequence[str] | None = None,
        pairs: Sequence[Sequence[Any]] | None = None,
        seed: int = 0,
        prefix: str = "cbp",
    ) -> None:
        cbp = policy.ContinualBackprop(
            replacement_rate=replacement_rate,
            maturity_threshold=maturity_threshold,
            decay_rate=decay_rate,
            utility=utility,
            accumulate=accumulate,
            count=count,
            init=init,
            gain=gain,
            sigma_decay=sigma_decay,
            sigma_ridge=sigma_ridge,
            energy_budget=energy_budget,
            magnitudes_every_n_steps=magnitudes_every_n_steps,
            window=window,
            layers=layers,
            pairs=pairs,
            seed=seed,
            prefix=prefix,
        )
        super().__init__(seed=seed, prefix=prefix, policy=cbp, every_n_steps=1)

    # the policy's settings and statistics, read through the callback
    replacement_rate = property(lambda self: self.policy.replacement_rate)
    maturity_threshold = property(lambda self: self.policy.maturity_threshold)
    decay_rate = property(lambda self: self.policy.decay_rate)
    utility = property(lambda self: self.policy.utility)
    accumulate = property(lambda self: self.policy.accumulate)
    count = property(lambda self: self.policy.count)
    sigma_decay = property(lambda self: self.policy.sigma_decay)
    sigma_ridge = property(lambda self: self.policy.sigma_ridge)
    energy_budget = property(lambda self: self.policy.energy_budget)
    magnitudes_every_n_steps = property(lambda self: self.policy.magnitudes_every_n_steps)
    window = property(lambda self: self.policy.window)
    sigma_orthogonal = property(lambda self: self.policy.sigma_orthogonal)

    @property
    def states(self) -> dict[str, _LayerState]:
        """Per-producer statistics (ages, utility, mean activation, counts)."""
        return self.policy.states

    @property
    def covariances(self) -> dict[str, InputCovariance]:
        """Per-producer input covariance (RR-CBP)."""
        return self.policy.covariances

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **self.policy.settings()}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.connect(trainer)
        self.policy.attach(pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.policy.detach()
        self.policy.flush()  # window > 1: the states as the fit left them (the fit is over: nothing else changes)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.policy.detach()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if not self.cadence.take(trainer.global_step):
            return  # no optimizer step since the last call (gradient accumulation, or a skipped step)
        self.connect(trainer)
        replaced = self.policy.step(trainer.global_step)
        if not self.log_due(trainer):
            return
        logged: dict[str, float] = {f"{name}/replaced": count for name, count in replaced.items()}
        logged["replaced"] = sum(replaced.values())
        if self.states:  # read back only when logging
            logged["skipped_nonfinite"] = self.policy.skipped_nonfinite()
        self.log_values(trainer, logged)

    @torch.no_grad()
    def step(
        self,
        trainer: pl.Trainer | None,
        pair: UnitPair,
        features: list[torch.Tensor],
        inputs: list[torch.Tensor] | None = None,
        magnitudes: tuple[torch.Tensor, torch.Tensor | None] | None = None,
    ) -> torch.Tensor:
        """One CBP step for ``pair`` on the given consumer inputs.

        One CBP step for ``pair`` on the given consumer inputs (see
        :meth:`plasticity_lightning.policies.ContinualBackprop.step_pair`); returns the replaced unit indices.
        """
        self.connect(trainer)
        step = None if trainer is None else trainer.global_step
        return self.policy.step_pair(pair, features, inputs, magnitudes, step=step)
