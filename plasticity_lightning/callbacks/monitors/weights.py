"""Weight and gradient monitors: per-layer magnitudes, distance from init, gradient flow.

Add any of them to a Trainer, or all of them with ``--config configs/callbacks/monitors.yaml``::

    trainer = Trainer(callbacks=[RankMonitor(), DormantUnitMonitor(), EntropyMonitor(), WeightMonitor(),
                                 GradientFlowMonitor()])
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from plasticity_lightning.callbacks.monitors.base import PlasticityMonitor
from plasticity_lightning.core.errors import PlasticityConfigError, check_positive_float
from plasticity_lightning.metrics.weights import gradient_stats, layer_weights
from plasticity_lightning.policies.measurement import (
    weight_values,
)


def _selected_weights(monitor: PlasticityMonitor, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
    """The weight layers a parameter-reading monitor covers (all, or its ``layers``; unknown names are an error)."""
    weights = layer_weights(pl_module)
    if monitor.layer_names is None:
        return weights
    missing = [name for name in monitor.layer_names if name not in weights]
    if missing:
        raise PlasticityConfigError(
            f"{type(monitor).__name__}.layers: {missing[0]!r} has no weight with two or more dimensions; choose among "
            f"{', '.join(list(weights)[:12])}"
        )
    return {name: weights[name] for name in monitor.layer_names}


class WeightMonitor(PlasticityMonitor):
    """Per-layer mean |w|, norm and distance from the initial weights, plus their totals.

    Weights are the parameters with two or more dimensions (Linear/Conv), named after their module. The initial
    weights are copied at the start of ``fit`` (kept in the checkpoint, so distances survive a resume).
    Dohare et al. report the average weight magnitude growing under plain backprop as plasticity fades.

    Args:
        distance: track ‖θ − θ₀‖ (costs one copy of the weights).
        **kwargs: :class:`PlasticityMonitor` cadence arguments (``layers`` selects weight layers by module name).
    """

    uses_probe = False

    def __init__(self, distance: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.distance = distance
        self.initial: dict[str, torch.Tensor] = {}

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "distance": self.distance}

    def _weights(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        return _selected_weights(self, pl_module)

    @override
    def on_fit_start(self, trainer, pl_module) -> None:
        weights = self._weights(pl_module)
        if self.distance and not self.initial:  # a resumed run keeps the weights it started from
            self.initial = {name: w.detach().clone().cpu() for name, w in weights.items()}

    @override
    def measure(self, trainer, pl_module, outputs, model_output) -> dict[str, float]:
        weights = self._weights(pl_module)
        for name, w in weights.items():
            self.check_finite(trainer, name, w, "weights")
        return weight_values(weights, self.initial if self.distance else None)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial": dict(self.initial)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.initial = dict(state_dict.get("initial", {}))


class GradientFlowMonitor(PlasticityMonitor):
    """Per-layer gradient norms, with a warning when gradients vanish or explode.

    Per-layer gradient norms every ``every_n_steps`` optimizer steps, with a one-time warning when gradients vanish or
    explode.

    The gradients of the n-th, 2n-th, ... optimizer step are read (:class:`~plasticity_lightning.policies.StepCadence`,
    the rule every periodic action of the library follows), logged at the step count before that update
    (``trainer.global_step``: n - 1, 2n - 1, ...).

    Reads gradients in ``on_before_optimizer_step`` (after DDP has averaged them and mixed precision has
    unscaled them) for the weights with two or more dimensions. Logs ``plasticity/<layer>/grad_norm`` and
    ``plasticity/grad/{global_norm,mean_abs,max_abs}``, where mean_abs is the mean over layers of mean |g| and
    max_abs the largest |g| (Neural Elements' ``mean_grad``/``max_grad``). Warns once when mean_abs falls below
    ``vanishing`` or max_abs exceeds ``exploding`` or is not finite (Neural Elements' thresholds).

    Args:
        every_n_steps: measure every n optimizer steps.
        vanishing: mean |g| below this warns.
        exploding: max |g| above this (or non-finite) warns.
        **kwargs: :class:`PlasticityMonitor` arguments (``layers`` selects weight layers by module name).
    """

    uses_probe = False

    def __init__(self, every_n_steps: int = 50, vanishing: float = 1e-6, exploding: float = 100.0, **kwargs: Any):
        kwargs.setdefault("on_task_change", False)  # gradients exist only around an optimizer step
        kwargs.setdefault("at_train_end", False)
        if every_n_steps is None:
            raise PlasticityConfigError(
                "GradientFlowMonitor.every_n_steps=None is invalid; gradients exist only around an optimizer step, "
                "so it needs a positive step interval"
            )
        super().__init__(every_n_steps=every_n_steps, **kwargs)
        self.vanishing = check_positive_float("GradientFlowMonitor", "vanishing", vanishing)
        self.exploding = check_positive_float("GradientFlowMonitor", "exploding", exploding)
        self._warned: set[str] = set()
        self._latest: dict[str, float] = {}

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "vanishing": self.vanishing, "exploding": self.exploding}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _selected_weights(self, pl_module)  # unknown layer names fail now, not at the first measured step

    @override
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pass  # gradients are read before the optimizer step, not after the batch

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        # the gradients of optimizer step global_step + 1: the n-th, 2n-th, ... step's (the interventions' rule)
        if self.cadence.take(trainer.global_step + 1):
            self.run(trainer, pl_module, reason="step")

    @override
    def measure(self, trainer, pl_module, outputs, model_output) -> dict[str, float]:
        stats = gradient_stats(_selected_weights(self, pl_module))
        if not stats["layer_grad_norms"]:
            return {}
        values = {f"{name}/grad_norm": norm for name, norm in stats["layer_grad_norms"].items()}
        # a float64 norm is finite exactly when the layer's gradient is: no second read of the gradients
        for name, norm in stats["layer_grad_norms"].items():
            if not math.isfinite(norm):
                self.mark_nonfinite(trainer, name, "gradients")
                self._nonfinite.add("grad")  # the pooled grad/* values include that layer
        values.update(
            {
                "grad/global_norm": stats["global_norm"],
                "grad/mean_abs": stats["mean_grad"],
                "grad/max_abs": stats["max_grad"],
            }
        )
        if stats["mean_grad"] < self.vanishing:
            self.warn_once(
                f"GradientFlowMonitor: gradients are vanishing at step {trainer.global_step} "
                f"(mean |g| = {stats['mean_grad']:.3g} < {self.vanishing:g})",
                self._warned,
                "vanishing",
            )
        if not math.isfinite(stats["max_grad"]) or stats["max_grad"] > self.exploding:
            self.warn_once(
                f"GradientFlowMonitor: gradients are exploding at step {trainer.global_step} "
                f"(max |g| = {stats['max_grad']:.3g} > {self.exploding:g})",
                self._warned,
                "exploding",
            )
        return values
