"""ReDo: recycle τ-dormant units (Sokar et al., ICML 2023), for any training loop."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from plasticity_lightning.core.errors import PlasticityConfigError, check_positive_float, check_positive_int
from plasticity_lightning.metrics.activity import _redo_scores, mean_abs_activation
from plasticity_lightning.policies.base import UnitPolicy, as_optimizers
from plasticity_lightning.policies.cadence import StepCadence
from plasticity_lightning.probes import capture_outputs, default_forward
from plasticity_lightning.surgery import reinit_units, unit_statistics


class ReDo(UnitPolicy):
    """Re-initialise the units whose ReDo score is at most ``tau``, every ``every_n_steps`` optimizer steps.

    The score of unit i is s_i = E|h_i| / (mean_k E|h_k| + 1e-9) on a probe batch (eval mode, no_grad; conv
    channels pooled over batch × H × W), where h is what the consumer layer receives — the same units and the same
    function as :class:`~plasticity_lightning.callbacks.DormantUnitMonitor`'s ``redo_dormant_fraction``
    (:func:`~plasticity_lightning.metrics.redo_scores`). Dormant units get fresh incoming weights (the layer's own
    init, or ``init=...``; the paper's code uses xavier_uniform), bias 0, reset norm entries, zero outgoing weights
    and zeroed optimizer moments on exactly those slices (:func:`~plasticity_lightning.surgery.reinit_units`). The
    output layer is never recycled, and nor are units that enter a residual sum.

    In a hand-written loop (an RL agent with a replay buffer, say)::

        redo = ReDo(model, optimizer, every_n_steps=1000, tau=0.1)
        ...
        optimizer.step()
        redo.step(probe=lambda: buffer.sample(256))   # drawn only when recycling is due

    A layer whose probe activity holds a NaN or ±inf (a diverged network: one +inf activation would make every
    other unit's score 0, i.e. "dormant") is not recycled at that step; the step is counted in :attr:`skipped` and
    the first one warns. DDP: per-unit activity goes through :attr:`reduce_mean` before scoring, and new weights
    come from a generator seeded alike on every rank.

    Args:
        model: the network (``None``: bind later with :meth:`attach`).
        optimizer: its optimizer(s), whose state is cleared for recycled units.
        every_n_steps: recycle period in optimizer steps for :meth:`step` (the paper: 1000).
        tau: dormancy threshold (0.025 by default in the paper, 0.1 for Atari-100K; 0 recycles silent units only).
        probe: the probe batch, or a function returning one, used when :meth:`step` or :meth:`recycle` gets none.
        forward: ``forward(model, batch)`` for models whose input is not the batch's first element.
        layers: see :class:`~plasticity_lightning.policies.base.UnitPolicy`.
        pairs: see :class:`~plasticity_lightning.policies.base.UnitPolicy`.
        init: see :class:`~plasticity_lightning.policies.base.UnitPolicy`.
        gain: see :class:`~plasticity_lightning.policies.base.UnitPolicy`.
        seed: seed of the new weights.
        prefix: name of the values in reports.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> with torch.no_grad():
        ...     _ = net[0].bias.fill_(-100.0)  # every hidden unit silent
        >>> redo = ReDo(net, every_n_steps=1, tau=0.0, init="kaiming")
        >>> redo.step(probe=torch.rand(16, 4))
        {'0': 8}
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        *,
        every_n_steps: int = 1000,
        tau: float = 0.025,
        probe: Any = None,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        layers: Sequence[str] | None = None,
        pairs: Sequence[Sequence[Any]] | None = None,
        init: str = "auto",
        gain: float | None = None,
        seed: int = 0,
        prefix: str = "redo",
    ) -> None:
        super().__init__(layers=layers, pairs=pairs, init=init, gain=gain, seed=seed, prefix=prefix)
        owner = type(self).__name__
        self.cadence = StepCadence(check_positive_int(owner, "every_n_steps", every_n_steps))
        self.tau = check_positive_float(owner, "tau", tau, allow_zero=True)
        self.probe = probe
        self.forward = forward or default_forward
        self.model: nn.Module | None = None
        self.replaced: dict[str, int] = {}
        self.skipped: dict[str, int] = {}  # steps skipped per layer for non-finite activity
        self.steps = 0
        if model is not None:
            self.attach(model, optimizer)

    @property
    def every_n_steps(self) -> int:
        return self.cadence.every_n_steps  # type: ignore[return-value]

    def attach(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    ) -> None:
        """Bind to ``model``'s pairs (reported once); ``optimizer``: the optimizer(s) whose state is reset."""
        if optimizer is not None:
            self.optimizers = as_optimizers(optimizer)
        self.model = model
        self.bind(model)

    def step(self, probe: Any = None) -> dict[str, int] | None:
        """One optimizer step has been taken: recycle if it is the ``every_n_steps``-th.

        Call it after ``optimizer.step()``. ``probe``: the batch (or a function returning it) to score units on when
        due.

        Returns:
            The units recycled per producer when it recycled, else ``None``.
        """
        self.steps += 1
        if not self.cadence.take(self.steps):
            return None
        return self.recycle(probe, step=self.steps)

    @torch.no_grad()
    def recycle(self, probe: Any = None, *, step: int | None = None) -> dict[str, int]:
        """Measure on ``probe`` (else the one given at construction) and re-initialise dormant units now.

        Returns the count per producer.
        """
        if self.model is None:
            raise PlasticityConfigError("ReDo.recycle: no model; pass it to ReDo(model, ...) or call attach(model)")
        batch = self.probe if probe is None else probe
        batch = batch() if callable(batch) else batch
        if batch is None:
            raise PlasticityConfigError("ReDo.recycle: probe=None; pass a probe batch (or a function returning one)")
        consumers = {pair.producer: pair.consumer_module for pair in self.pairs}
        inputs, _ = capture_outputs(self.model, batch, consumers, forward=self.forward, inputs=True)
        counts = {}
        for pair in self.pairs:
            # E|h| averaged across ranks before scoring: with BatchNorm each rank's running statistics (and so its
            # eval-mode features) can differ until DDP re-broadcasts buffers at the next forward pass
            activity = self.reduce(mean_abs_activation(unit_statistics(inputs[pair.producer], pair)))
            if not bool(torch.isfinite(activity).all()):  # reduced first: every rank skips alike
                self.skipped[pair.producer] = self.skipped.get(pair.producer, 0) + 1
                self.warn_nonfinite(pair.producer, step)
                counts[pair.producer] = 0
                continue
            units = torch.nonzero(_redo_scores(activity) <= self.tau).flatten()
            scheme, gain = self.inits[pair.producer]
            reinit_units(pair, units, init=scheme, gain=gain, generator=self.generator, optimizers=self.optimizers)
            counts[pair.producer] = units.numel()
            self.replaced[pair.producer] = self.replaced.get(pair.producer, 0) + units.numel()
        return counts

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "replaced": dict(self.replaced),
            "skipped": dict(self.skipped),
            "steps": self.steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.replaced = dict(state_dict.get("replaced", {}))
        self.skipped = dict(state_dict.get("skipped", {}))
        self.steps = int(state_dict.get("steps", 0))
        self.cadence.mark(self.steps)
