"""Whole-parameter interventions as Lightning callbacks.

Shrink & Perturb, L2 toward the initial weights, output-head and layer resets: adapters over
:mod:`plasticity_lightning.policies.resets`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from typing_extensions import override

from plasticity_lightning.callbacks.interventions.base import Intervention, ScheduledIntervention
from plasticity_lightning.policies import resets as policy
from plasticity_lightning.policies.resets import fresh_layer  # noqa: F401  (re-exported for old imports)


class ShrinkAndPerturb(ScheduledIntervention):
    """Shrink & Perturb (Ash & Adams 2020): θ ← λ·θ + p·θ_fresh, when a new task starts and/or every n steps.

    The update is :class:`plasticity_lightning.policies.ShrinkAndPerturb`'s (``noise="fresh_init"``: the paper,
    λ = 0.4, p = 0.1; ``noise="gaussian"``: Dohare et al.'s continual variant θ ← λ·θ + N(0, p²) on every trainable
    parameter; ``noise="initial"``: Plasticine's θ ← λ·θ + p·θ₀ toward the weights the fit started from, kept in
    the checkpoint). This callback applies it when a new task starts (``on_task_change``, not before the first) and/or
    every ``every_n_steps`` optimizer steps (never at step 0, once per step), keeps the generator in the checkpoint
    (ranks stay identical: it is seeded alike on every rank) and logs ``shrink_perturb/applied``.

    Args:
        shrink: λ.
        perturb: p (the fresh-init or initial-weight mix) or σ (the Gaussian noise std).
        noise: ``"fresh_init"``, ``"gaussian"`` or ``"initial"``.
        on_task_change: apply when a new task starts (not before the first).
        every_n_steps: also apply every n optimizer steps (``None``: never).
        layers: module names to change (``None``: every Linear/Conv/norm layer, or every parameter with
            ``noise="gaussian"`` or ``"initial"``).
        seed: seed of the fresh values.
        prefix: first part of logged keys.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[ShrinkAndPerturb(shrink=0.4, perturb=0.1)])
    """

    policy: policy.ShrinkAndPerturb
    count = "applied"

    def __init__(
        self,
        shrink: float = 0.4,
        perturb: float = 0.1,
        noise: Literal["fresh_init", "gaussian", "initial"] = "fresh_init",
        on_task_change: bool = True,
        every_n_steps: int | None = None,
        layers: Sequence[str] | None = None,
        seed: int = 0,
        prefix: str = "shrink_perturb",
    ) -> None:
        snp = policy.ShrinkAndPerturb(
            shrink=shrink,
            perturb=perturb,
            noise=noise,
            every_n_steps=every_n_steps,
            layers=layers,
            seed=seed,
            prefix=prefix,
        )
        super().__init__(snp, on_task_change=on_task_change, every_n_steps=every_n_steps, seed=seed, prefix=prefix)

    shrink = property(lambda self: self.policy.shrink)
    perturb = property(lambda self: self.policy.perturb)
    noise = property(lambda self: self.policy.noise)
    every_n_steps = property(lambda self: self.policy.every_n_steps)
    layer_names = property(lambda self: self.policy.layer_names)
    applied = property(lambda self: self.policy.applied)

    @property
    @override
    def log_each_application(self) -> bool:
        return self.every_n_steps is None  # a step cadence logs at the trainer's log_every_n_steps

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "shrink": self.shrink, "perturb": self.perturb, "noise": self.noise}


class L2Init(Intervention):
    """L2 toward the initial parameters (Kumar, Marklund & Van Roy 2023): adds λ‖θ − θ₀‖² to the loss.

    :class:`plasticity_lightning.policies.L2Init` adds ``2λ(θ − θ₀)`` to the gradients; this callback calls it in
    ``on_before_optimizer_step`` (after DDP averaging and AMP unscaling, before gradient clipping), so the model's
    ``training_step`` is untouched. θ₀ is copied at the start of ``fit`` and kept in the checkpoint, so a resumed
    run pulls toward the same point. The penalty λ‖θ − θ₀‖² is logged as ``l2_init/penalty``.

    Args:
        weight: λ (the paper's sweep: 1e-2 … 1e-5).
        layers: module names whose parameters are regularised (``None``: every trainable parameter).
        prefix: first part of logged keys.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[L2Init(weight=1e-3)])
    """

    policy: policy.L2Init

    def __init__(self, weight: float = 1e-3, layers: Sequence[str] | None = None, prefix: str = "l2_init") -> None:
        super().__init__(prefix=prefix, policy=policy.L2Init(weight=weight, layers=layers, prefix=prefix))

    weight = property(lambda self: self.policy.weight)
    layer_names = property(lambda self: self.policy.layer_names)

    @property
    def initial(self):
        """θ₀, per parameter name."""
        return self.policy.initial

    @override
    def settings(self) -> dict[str, Any]:
        return {"weight": self.weight, "layers": self.layer_names}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.policy.attach(pl_module)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        penalty = self.policy.step(penalty=self.log_due(trainer))  # read back only when logging
        self.log_values(trainer, {"penalty": penalty or 0.0})


class HeadReset(ScheduledIntervention):
    """Re-initialise the output layer when a new task starts (Dohare et al.'s Continual-ImageNet protocol).

    The reset is :class:`plasticity_lightning.policies.HeadReset`'s (``mode="init"``: fresh weights as the model
    initialised the layer; ``mode="zero"``: weight and bias 0, the reference code's head reset; the layer's
    optimizer state cleared). The first task keeps its initial head. Logged: ``head_reset/resets``.

    Args:
        layer: module name of the head (``None``: the model's ``output_layer()``).
        mode: ``"init"`` or ``"zero"``.
        seed: seed of the fresh weights.
        prefix: first part of logged keys.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[HeadReset(mode="zero")])
    """

    policy: policy.HeadReset
    count = "resets"

    def __init__(
        self,
        layer: str | None = None,
        mode: Literal["init", "zero"] = "init",
        seed: int = 0,
        prefix: str = "head_reset",
    ) -> None:
        super().__init__(policy.HeadReset(layer=layer, mode=mode, seed=seed, prefix=prefix), seed=seed, prefix=prefix)

    layer = property(lambda self: self.policy.layer)
    mode = property(lambda self: self.policy.mode)
    resets = property(lambda self: self.policy.resets)

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "layer": self.layer, "mode": self.mode}

    def reset(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reset the head now (:meth:`apply`)."""
        self.apply(trainer, pl_module)


class LayerReset(ScheduledIntervention):
    """Reset chosen layers, or the whole network, when a new task starts and/or every n steps (Nikishin et al. 2022).

    The reset is :class:`plasticity_lightning.policies.LayerReset`'s: every weight and normalisation layer inside
    each named module redrawn as the model initialised it, other parameterised modules through ``reset_parameters``,
    and the optimizer state of every reset parameter dropped (``reset_optimizer``). ``layers: null`` resets the whole
    network. The generator is seeded alike on every DDP rank and kept in the checkpoint, so ranks stay identical and
    a resumed fit draws what an uninterrupted one would. Logged: ``layer_reset/resets``.

    Args:
        layers: names of the modules to reset (any module; a block resets everything in it); ``None``: the whole
            network.
        on_task_change: reset when a new task starts (not before the first).
        every_n_steps: also reset every n optimizer steps (``None``: never).
        reset_optimizer: drop the optimizer state of the reset parameters.
        seed: seed of the fresh values.
        prefix: first part of logged keys.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[LayerReset(layers=["net.4", "net.6"])])
    """

    policy: policy.LayerReset
    count = "resets"

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        on_task_change: bool = True,
        every_n_steps: int | None = None,
        reset_optimizer: bool = True,
        seed: int = 0,
        prefix: str = "layer_reset",
    ) -> None:
        reset = policy.LayerReset(
            layers=layers, every_n_steps=every_n_steps, reset_optimizer=reset_optimizer, seed=seed, prefix=prefix
        )
        super().__init__(reset, on_task_change=on_task_change, every_n_steps=every_n_steps, seed=seed, prefix=prefix)

    layer_names = property(lambda self: self.policy.layer_names)
    every_n_steps = property(lambda self: self.policy.every_n_steps)
    reset_optimizer = property(lambda self: self.policy.reset_optimizer)
    resets = property(lambda self: self.policy.resets)

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "layers": self.layer_names, "reset_optimizer": self.reset_optimizer}

    def reset(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Reset the layers now (:meth:`apply`)."""
        self.apply(trainer, pl_module)
