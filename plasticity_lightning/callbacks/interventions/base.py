"""Shared machinery of the interventions: strategy checks, the policy they adapt, cadence, checkpoint state, logging.

The algorithms live in :mod:`plasticity_lightning.policies` as plain objects; an intervention callback decides
*when* they act (:class:`~plasticity_lightning.policies.StepCadence`, task changes), hands them the trainer's
optimizers and DDP averaging, keeps their state in the checkpoint and logs what they report.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, XLAStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from plasticity_lightning.callbacks.task_aware import TaskAwareCallback, log_scalars
from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.policies.base import Policy, UnitPolicy
from plasticity_lightning.policies.cadence import StepCadence
from plasticity_lightning.surgery import UnitPair


class Intervention(TaskAwareCallback):
    """Base of the callbacks that change the model during training.

    It owns what every intervention needs to be correct under DDP and on resume:

    * :attr:`policy`, the trainer-free object that holds the algorithm's state and its random source: a CPU
      ``torch.Generator`` seeded with ``seed`` — the same on every rank, so every random choice (which units, which
      new weights) is identical across processes without communication — whose state is saved in the checkpoint,
      so a resumed run draws what the uninterrupted run would have drawn; large draws on an accelerator use
      :meth:`generator_on`, a generator of that device with the same guarantees;
    * :attr:`cadence`, the shared step rule (never at step 0, once per step; its last step is checkpointed);
    * a check in ``setup`` that the strategy keeps full parameters on every rank (single device or DDP);
    * the optimizers whose state is reset for touched parameters, and averaging across ranks (:meth:`connect`);
    * logging through every logger and ``trainer.callback_metrics``, at the trainer's ``log_every_n_steps``.

    Args:
        seed: seed of the intervention's own random draws.
        prefix: first part of every logged key.
        policy: the algorithm (``None``: a bare :class:`~plasticity_lightning.policies.Policy`, i.e. just the
            random source, for interventions whose algorithm still lives in the callback).
        every_n_steps: period of :attr:`cadence` (``None``: no step cadence).
    """

    def __init__(
        self,
        seed: int = 0,
        prefix: str = "intervention",
        policy: Policy | None = None,
        every_n_steps: int | None = None,
    ) -> None:
        super().__init__()
        if policy is None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise PlasticityConfigError(f"{type(self).__name__}.seed={seed!r} is invalid; expected an integer")
            policy = Policy(seed=seed, prefix=prefix)
        self.policy = policy
        self.policy.owner = type(self).__name__
        self.policy.announce = rank_zero_info
        self.policy.warn = rank_zero_warn
        self.seed = seed
        self.prefix = prefix
        self.cadence = StepCadence(every_n_steps)

    def require_a_trigger(self, on_task_change: bool, every_n_steps: int | None) -> None:
        """Refuse a task-or-step intervention configured to never act (the one check its adapters share)."""
        if not on_task_change and every_n_steps is None:
            raise PlasticityConfigError(
                f"{type(self).__name__}: on_task_change=False with every_n_steps=None never applies; set one of them"
            )

    @property
    def generator(self) -> torch.Generator:
        """The policy's CPU generator."""
        return self.policy.generator

    @property
    def _last_step(self) -> int | None:
        """The optimizer step acted on last (or the step the fit started from)."""
        return self.cadence.last_step

    @_last_step.setter
    def _last_step(self, step: int | None) -> None:
        self.cadence.last_step = step

    @override
    def state_identity(self) -> dict[str, Any]:
        return {"prefix": self.prefix, **self.settings()}

    def settings(self) -> dict[str, Any]:
        """Arguments that distinguish two instances (part of :attr:`state_key`)."""
        return {"seed": self.seed}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        # DeepSpeed and XLA derive from DDPStrategy but shard or copy parameters: in-place surgery would be undone
        supported = isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(
            strategy, (DeepSpeedStrategy, XLAStrategy)
        )
        if stage == "fit" and not supported:
            raise PlasticityConfigError(
                f"{type(self).__name__} changes parameters in place and needs every rank to hold the full model; "
                f"strategy {type(trainer.strategy).__name__} is not supported (use a single device, 'ddp' or "
                "'ddp_spawn')"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A new fit starts at step 0 (also the second fit of one instance); a resumed one at its checkpoint's step,
        # where, with gradient accumulation, its first batches end again and must not act a second time.
        self.cadence.mark(trainer.global_step)

    def connect(self, trainer: pl.Trainer | None) -> Policy:
        """Hand the policy the trainer's optimizers and, under DDP, the strategy's averaging; returns the policy."""
        self.policy.optimizers = self.optimizers(trainer)
        if trainer is not None and trainer.world_size > 1:
            self.policy.reduce_mean = lambda tensor: trainer.strategy.reduce(tensor, reduce_op="mean")
        else:
            self.policy.reduce_mean = None
        return self.policy

    def generator_on(self, device: torch.device | str) -> torch.Generator:
        """The random source for draws made on ``device`` (see :meth:`Policy.generator_on`)."""
        return self.policy.generator_on(device)

    @staticmethod
    def optimizers(trainer: pl.Trainer | None) -> list[torch.optim.Optimizer]:
        return list(trainer.optimizers) if trainer is not None else []

    @staticmethod
    def reduce_mean(trainer: pl.Trainer | None, tensor: torch.Tensor) -> torch.Tensor:
        """Average across DDP ranks (identity on one process), so every rank takes the same decisions."""
        if trainer is None or trainer.world_size == 1:
            return tensor
        return trainer.strategy.reduce(tensor, reduce_op="mean")

    @staticmethod
    def log_due(trainer: pl.Trainer) -> bool:
        """Whether :meth:`log_values` logs at this step without ``force`` (every ``log_every_n_steps`` steps)."""
        return trainer.global_step % max(trainer.log_every_n_steps, 1) == 0

    def warn_nonfinite(self, name: str, step: int | None) -> None:
        """Warn, once per ``name``, that a step was skipped because ``name``'s statistics were NaN/inf."""
        self.policy.warn_nonfinite(name, step)

    def log_values(self, trainer: pl.Trainer, values: dict[str, float], *, force: bool = False) -> None:
        """Log ``values`` under ``prefix/`` every ``log_every_n_steps`` optimizer steps (always with ``force``)."""
        if not values or not (force or self.log_due(trainer)):
            return
        log_scalars(trainer, {f"{self.prefix}/{name}": float(value) for name, value in values.items()})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.policy.state_dict(), "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.policy.load_state_dict(state_dict)
        self._last_step = state_dict.get("last_step")


class UnitIntervention(Intervention):
    """An intervention on hidden units, adapting a :class:`~plasticity_lightning.policies.base.UnitPolicy`.

    At the start of every fit the policy binds the producer → consumer pairs and reports them once, with the blocks
    it skipped (INFO, rank zero; also in :attr:`pairs`, :attr:`skipped_blocks` and :attr:`bound_layers`), and the
    init of each producer's new units with where it comes from (:attr:`inits`, :attr:`init_reasons`; a guessed init
    warns once). The arguments ``layers``, ``pairs``, ``init``, ``gain`` and ``seed`` of the subclasses are the
    policy's (see :class:`~plasticity_lightning.policies.base.UnitPolicy`).
    """

    policy: UnitPolicy

    @property
    def pairs(self) -> list[UnitPair]:
        return self.policy.pairs

    @property
    def skipped_blocks(self) -> dict[str, str]:
        return self.policy.skipped_blocks

    @property
    def inits(self) -> dict[str, tuple[str, float]]:
        return self.policy.inits

    @property
    def init_reasons(self) -> dict[str, str]:
        return self.policy.init_reasons

    @property
    def bound_layers(self) -> list[str]:
        return self.policy.bound_layers

    @property
    def layer_names(self) -> list[str] | None:
        return self.policy.layer_names

    @property
    def explicit_pairs(self) -> list[list[Any]] | None:
        return self.policy.explicit_pairs

    @property
    def init(self) -> str:
        return self.policy.init

    @property
    def gain(self) -> float | None:
        return self.policy.gain

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "layers": self.layer_names, "pairs": self.explicit_pairs}

    def bind(self, pl_module: pl.LightningModule) -> None:
        """Find the pairs on the (built) model and the init of each producer; log them once."""
        self.policy.bind(pl_module)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.connect(trainer)
        self.bind(pl_module)


class ScheduledIntervention(Intervention):
    """An intervention that applies its whole-model policy when a new task starts and/or every n steps.

    The shared adapter of :class:`~plasticity_lightning.policies.base.ScheduledPolicy`-like policies (Shrink &
    Perturb, LayerReset, PlasticityInjection, HeadReset): at the start of every fit it hands the policy the
    trainer's optimizers (:meth:`connect`) and the model (``policy.attach``); it applies the policy when a new task
    starts (``on_task_change``; never before the first task) and every ``every_n_steps`` optimizer steps
    (:attr:`cadence`: never at step 0, once per step); after each application it logs the policy's counter
    ``<prefix>/<count>``. The policy's state and the cadence's last step are the checkpoint (:class:`Intervention`).

    Args:
        policy: the algorithm, with ``attach(model)`` and ``apply(model)``.
        on_task_change: apply when a new task starts (not before the first).
        every_n_steps: also apply every n optimizer steps (``None``: never).
        seed: seed of the policy's random draws.
        prefix: first part of logged keys.
    """

    #: the policy's counter logged after each application, e.g. ``"resets"``
    count: str = "applied"

    def __init__(
        self, policy: Policy, *, on_task_change: bool = True, every_n_steps: int | None = None, seed: int, prefix: str
    ) -> None:
        super().__init__(seed=seed, prefix=prefix, policy=policy, every_n_steps=every_n_steps)
        self.require_a_trigger(on_task_change, every_n_steps)
        self.on_task_change = on_task_change

    @property
    def log_each_application(self) -> bool:
        """Whether every application is logged (else at the trainer's ``log_every_n_steps``)."""
        return True

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.connect(trainer)
        self.policy.attach(pl_module)

    @override
    def on_task_start(self, trainer, pl_module, context, previous_task) -> None:
        if self.on_task_change and previous_task is not None:
            self.apply(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        if self.cadence.take(trainer.global_step):
            self.apply(trainer, pl_module)

    def apply(self, trainer: pl.Trainer | None, pl_module: pl.LightningModule) -> None:
        """Apply the policy now, and log its counter."""
        self.connect(trainer)
        self.policy.apply(pl_module)
        if trainer is not None:
            self.log_values(trainer, {self.count: getattr(self.policy, self.count)}, force=self.log_each_application)
