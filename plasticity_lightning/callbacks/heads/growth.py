"""Head growth: reviving gated-off heads (fresh weights, gate ramp, learning-rate boost) chosen by a growth rule.

Callbacks over :class:`~plasticity_lightning.policies.heads.HeadReviver` and
:func:`~plasticity_lightning.policies.heads.choose_heads_to_grow`.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from typing_extensions import override

from plasticity_lightning.callbacks.heads.importance import (
    HeadImportance,
    SkipsNonFinite,
    find_head_importance,
    fitting,
    require_validation,
)
from plasticity_lightning.callbacks.interventions.base import Intervention
from plasticity_lightning.core.batches import token_ids
from plasticity_lightning.core.errors import PlasticityConfigError, check_choice, check_fraction, check_positive_int
from plasticity_lightning.policies.base import Policy
from plasticity_lightning.policies.heads.reviver import HeadReviver, ReviverSettings
from plasticity_lightning.policies.heads.selection import (
    GROWTH_CHOICES,
    NonFiniteScores,
    choose_heads_to_grow,
    share_count,
)
from plasticity_lightning.probes import ProbeSet
from plasticity_lightning.surgery.heads import HeadGates


class RevivingIntervention(SkipsNonFinite, Intervention):
    """Base of the callbacks that revive heads with a :class:`~plasticity_lightning.policies.heads.HeadReviver`.

    Its settings (:class:`~plasticity_lightning.policies.heads.ReviverSettings`, validated once at construction), its
    checkpointed state, the gate ramp set before every training batch and the learning-rate boost hooked onto the
    trainer's optimizers for the fit.
    """

    def __init__(self, *, reviver: ReviverSettings, seed: int, prefix: str, policy: Policy | None = None) -> None:
        super().__init__(seed=seed, prefix=prefix, policy=policy)
        if not isinstance(reviver, ReviverSettings):
            raise PlasticityConfigError(
                f"{type(self).__name__}.reviver={reviver!r} is invalid; expected a ReviverSettings"
            )
        # validated when it was built; re-owned so that the reviver's messages name this callback
        self.reviver_settings = reviver.with_owner(type(self).__name__)
        self.reviver: HeadReviver | None = None
        self._pending_reviver: dict[str, Any] | None = None

    def start_reviver(self, trainer: pl.Trainer, gates: HeadGates) -> None:
        """Bind a reviver to ``gates`` (resuming its checkpointed ramps) and hook it onto the optimizers."""
        self.reviver = HeadReviver(gates, self.reviver_settings)
        if self._pending_reviver is not None:
            self.reviver.load_state_dict(self._pending_reviver)
            self._pending_reviver = None
        self.reviver.attach(self.optimizers(trainer))

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.reviver is not None:
            self.reviver.detach()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        if self.reviver is not None:
            self.reviver.update(trainer.global_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        reviver = self.reviver.state_dict() if self.reviver is not None else self._pending_reviver
        return {**super().state_dict(), "reviver": reviver, "skipped_nonfinite": self.skipped_nonfinite}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._pending_reviver = state_dict.get("reviver")
        self.skipped_nonfinite = int(state_dict.get("skipped_nonfinite", 0))


class HeadGrowth(RevivingIntervention):
    """Revive gated-off heads after every ``every_n_validations``-th validation of the fit.

    ``fraction`` of the dead heads (at least one) get fresh Q/K/V weights and near-silent output rows, a gate that ramps
    from ``initial_gate`` to 1 over ``warmup_steps`` and a learning rate ``lr_multiplier``× the optimizer's that decays
    back over ``boost_steps`` (see :class:`~plasticity_lightning.policies.heads.HeadReviver` for why the boost is per
    slice, not a param group).

    Which heads (``choice``): ``"balanced"`` (layers with the fewest live heads first), ``"entropy_gap"`` (the dead
    heads whose attention is most focused, ln T − H on a fixed validation probe), ``"gradient"`` (the largest
    |∂L/∂ξ| at ξ = 0 — how much the loss would change if the head were switched on; needs
    ``HeadImportance(method="gradient")``), ``"random"``. Random draws come from the callback's seeded generator,
    so every DDP rank revives the same heads; the ramp, boost and history are in ``state_dict``. A growth step whose
    scores (entropy gap, gradient importance) are NaN/inf for a dead head is skipped, counted in
    ``heads/skipped_nonfinite``; the first one warns.

    Args:
        fraction: share of the dead heads revived per growth step.
        choice: one of ``balanced``, ``entropy_gap``, ``gradient``, ``random``.
        every_n_validations: growth cadence in validation runs (``None``: only when :meth:`grow` is called).
        reviver: how revived heads start and learn again (output scale, gate ramp, learning-rate boost):
            :class:`~plasticity_lightning.policies.heads.ReviverSettings`, by default its defaults (in a YAML:
            ``reviver: {warmup_steps: 50}``).
        probe_size: validation blocks on which the entropy gap is measured.
        seed: seed of the random choices and the fresh weights.
        prefix: first part of every logged key.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from plasticity_lightning.policies.heads import ReviverSettings
        >>> growth = HeadGrowth(choice="gradient", reviver=ReviverSettings(warmup_steps=50))
        >>> trainer = Trainer(callbacks=[HeadImportance(), growth])
    """

    def __init__(
        self,
        fraction: float = 0.5,
        choice: Literal["balanced", "entropy_gap", "gradient", "random"] = "balanced",
        every_n_validations: int | None = 1,
        reviver: ReviverSettings = ReviverSettings(),  # noqa: B008 (frozen: one shared default is safe)
        probe_size: int = 16,
        seed: int = 0,
        prefix: str = "heads",
    ) -> None:
        super().__init__(reviver=reviver, seed=seed, prefix=prefix)
        self.fraction = check_fraction("HeadGrowth", "fraction", fraction, low_open=True, high_open=False)
        self.choice = check_choice("HeadGrowth", "choice", choice, GROWTH_CHOICES)
        if every_n_validations is not None:
            check_positive_int("HeadGrowth", "every_n_validations", every_n_validations)
        self.every_n_validations = every_n_validations
        self.validations = 0
        self.probe = ProbeSet(size=probe_size, source="val", seed=seed, owner="HeadGrowth")
        self.history: list[dict[str, Any]] = []
        self._importance: HeadImportance | None = None

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "choice": self.choice, "fraction": self.fraction}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._importance = find_head_importance(trainer, "HeadGrowth")
        if self.choice == "entropy_gap":
            require_validation(trainer, pl_module, "HeadGrowth(choice='entropy_gap')")
        if self.choice == "gradient" and self._importance.method != "gradient":
            raise PlasticityConfigError(
                f"HeadGrowth(choice='gradient') needs HeadImportance(method='gradient'), got "
                f"method={self._importance.method!r}"
            )
        self.start_reviver(trainer, self._importance.gates)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not fitting(trainer) or self.every_n_validations is None:
            return
        self.validations += 1
        if self.validations % self.every_n_validations == 0:
            self.grow(trainer, pl_module)

    def choose(self, trainer: pl.Trainer, pl_module: pl.LightningModule, count: int) -> list[tuple[int, int]]:
        """The ``count`` dead heads ``choice`` picks."""
        return choose_heads_to_grow(
            self.choice,
            pl_module,
            self._gates(),
            count,
            importance=self._importance.current(trainer) if self.choice == "gradient" else None,
            input_ids=token_ids(self.probe.draw(trainer)) if self.choice == "entropy_gap" else None,
            generator=self.generator,
        )

    def grow(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, count: int | None = None
    ) -> list[tuple[int, int]]:
        """Revive ``count`` dead heads (default: ``fraction`` of them, at least one). Returns the heads revived."""
        dead = int((self._gates().mask == 0).sum())
        if count is None:
            count = share_count(self.fraction, dead)
        try:
            heads = self.choose(trainer, pl_module, count) if count > 0 else []
        except NonFiniteScores as skipped:
            self.skip_nonfinite(trainer, skipped.what)
            return []
        if heads:
            self.reviver.revive(
                heads, trainer.global_step, generator=self.generator, optimizers=self.optimizers(trainer)
            )
        self.history.append({"step": trainer.global_step, "epoch": trainer.current_epoch, "revived": heads})
        self.log_values(trainer, {"revived_heads": len(heads), "dead_heads": dead - len(heads)}, force=True)
        return heads

    def _gates(self) -> HeadGates:
        if self.reviver is None:
            raise RuntimeError("HeadGrowth acts on the gates that on_fit_start finds; fit first")
        return self.reviver.gates

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "history": list(self.history), "validations": self.validations}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = list(state_dict.get("history", []))
        self.validations = int(state_dict.get("validations", 0))
