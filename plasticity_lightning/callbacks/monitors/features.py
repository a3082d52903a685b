"""Feature, update and gradient monitors.

Feature norm and variance with saturation-aware active units, weight change per update, and gradient-based dormancy
(GraMa).

Add any of them to a Trainer, or all of them with ``--config configs/callbacks/feature_monitors.yaml``::

    trainer = Trainer(callbacks=[FeatureMonitor(), WeightChangeMonitor(every_n_steps=50),
                                 GradientDormancyMonitor(every_n_steps=50)])
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from plasticity_lightning.callbacks.monitors.base import PlasticityMonitor
from plasticity_lightning.callbacks.monitors.weights import _selected_weights
from plasticity_lightning.core.errors import PlasticityConfigError, check_choice, check_fraction, check_positive_float
from plasticity_lightning.metrics.activity import ACTIVITY_CHOICES
from plasticity_lightning.metrics.features import GradientDormancy, weight_change
from plasticity_lightning.policies.measurement import activity_rule, feature_values
from plasticity_lightning.probes import resolve_layers, unit_axes, units_first
from plasticity_lightning.probes.capture import INPUT_SUFFIX
from plasticity_lightning.surgery import hidden_unit_layers

_AUTO = "auto"


def _require_step_cadence(owner: str, every_n_steps: int | None, what: str) -> None:
    if every_n_steps is None:
        raise PlasticityConfigError(
            f"{owner}.every_n_steps=None is invalid; {what} exist only around an optimizer step, so it needs a "
            "positive step interval"
        )


class FeatureMonitor(PlasticityMonitor):
    """Feature norm, feature variance and active units of each hidden layer on the probe, and over all layers.

    Logs ``plasticity/<layer>/feature_norm`` (mean ‖h‖ per sample), ``feature_variance`` (mean over units of the
    variance over the probe), ``active_fraction`` (share of active entries: Plasticine's FAU) and
    ``inactive_fraction`` (share of units active on fewer than ``max_active`` of the probe positions), plus
    ``all/inactive_fraction`` over every monitored unit. With ``active="auto"`` a tanh or sigmoid layer's saturated
    outputs (|h| > 0.99; h < 0.01 or h > 0.99) count as inactive and any other layer's zeros do; see
    :func:`~plasticity_lightning.metrics.active_share`. Growing feature norms and saturated units are what Lyle et
    al. (2023) and Plasticine report beside dormant units.

    Args:
        active: ``"auto"`` (per layer, from its module type), or one of ``nonzero``, ``positive``, ``tanh``,
            ``sigmoid`` for every layer.
        max_active: activity share below which a unit counts as inactive.
        **kwargs: :class:`PlasticityMonitor` arguments (layers, cadence, probe).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[FeatureMonitor(every_n_epochs=1)])
    """

    def __init__(self, active: str = _AUTO, max_active: float = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.active = check_choice("FeatureMonitor", "active", active, (_AUTO, *ACTIVITY_CHOICES))
        self.max_active = check_fraction("FeatureMonitor", "max_active", max_active, high_open=False)

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "active": self.active, "max_active": self.max_active}

    @override
    def needs_model_output(self, model_output: Any) -> bool:
        return False

    def rule(self, name: str) -> str:
        """What counts as active in layer ``name``."""
        if self.active != _AUTO:
            return self.active
        module = self.layers.get(name)
        return "nonzero" if module is None or name.endswith(INPUT_SUFFIX) else activity_rule(module)

    @override
    def measure(self, trainer, pl_module, outputs, model_output) -> dict[str, float]:
        # a layer with NaN/inf outputs: the base class logs its values (and all/) as NaN
        return feature_values(outputs, {name: self.rule(name) for name in outputs}, self.max_active)


class WeightChangeMonitor(PlasticityMonitor):
    """Weight change of one update, per layer: ‖θ_t − θ_{t−1}‖ of the n-th, 2n-th, ... optimizer step.

    The weights (parameters with two or more dimensions, named after their module, or ``layers``) are copied just
    before the measured optimizer step and compared just after it, so the value is that step's update whatever the
    optimizer (momentum, Adam, weight decay) and whatever an intervention did between steps. Logs
    ``plasticity/<layer>/weight_change`` and ``relative_weight_change`` (÷ ‖θ_{t−1}‖), and ``all/...`` over every
    selected weight, at the step count after the update. Updates that shrink towards zero as plasticity fades, or
    that stay large while the loss stalls, are both readable here (Plasticine's "weight difference").

    Args:
        every_n_steps: measure every n optimizer steps (the copy costs one set of the selected weights, then).
        **kwargs: :class:`PlasticityMonitor` arguments (``layers`` selects weight layers by module name; it
            measures at its steps only, never at task starts, epoch ends or the end of training).
    """

    uses_probe = False

    def __init__(self, every_n_steps: int = 50, **kwargs: Any) -> None:
        _require_step_cadence("WeightChangeMonitor", every_n_steps, "updates")
        super().__init__(every_n_steps=every_n_steps, **kwargs)
        self._before: dict[str, torch.Tensor] = {}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _selected_weights(self, pl_module)  # unknown layer names fail now

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass  # an update is measured at its step, not at epoch ends, task starts or the end of training

    @override
    def on_task_start(self, trainer, pl_module, context, previous_task) -> None:
        pass

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        pass

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.cadence.due(trainer.global_step + 1):  # taken in on_train_batch_end, after the update
            self._before = {n: w.detach().clone() for n, w in _selected_weights(self, pl_module).items()}

    @override
    def measure(self, trainer, pl_module, outputs, model_output) -> dict[str, float]:
        before, self._before = self._before, {}
        if not before:
            return {}
        weights = _selected_weights(self, pl_module)
        values: dict[str, float] = {}
        for name, w in weights.items():
            self.check_finite(trainer, name, w, "weights")
            values[f"{name}/weight_change"] = float(weight_change(w, before[name]))
            values[f"{name}/relative_weight_change"] = float(weight_change(w, before[name], relative=True))
        values["all/weight_change"] = float(weight_change(list(weights.values()), list(before.values())))
        values["all/relative_weight_change"] = float(
            weight_change(list(weights.values()), list(before.values()), relative=True)
        )
        return values


class GradientDormancyMonitor(PlasticityMonitor):
    """GraMa (Liu et al. 2025, "Measure gradients, not activations!").

    Units whose share of the loss gradient has fallen to (almost) nothing, read from the real training gradients of
    every n-th optimizer step.

    For each hidden layer, the gradient of the loss with respect to the layer's input (``at="input"``: for an
    activation module, the pre-activation — what reaches the unit's incoming weights, so a dead ReLU or a saturated
    tanh unit gets 0) or output is summed per unit, in absolute value, over the batches of the measured step, and
    scored as ReDo scores activations: s_i = E|g_i| / (mean_k E|g_k| + 1e-9). Logs
    ``plasticity/<layer>/grama_dormant_fraction`` (s_i ≤ τ) and ``all/grama_dormant_fraction``. Under DDP the sums
    are reduced across ranks first (:class:`~plasticity_lightning.metrics.GradientDormancy`), so every rank logs
    the same value. The hooks that read gradients are on the model only during the measured step's batches.

    Args:
        tau: GraMa's threshold (ReDo's 0.025 by default; 0 counts units no gradient reaches).
        at: ``"input"`` or ``"output"`` of each monitored layer (a ``"name:input"`` layer reads that input).
        every_n_steps: measure every n optimizer steps.
        **kwargs: :class:`PlasticityMonitor` arguments (``layers``: names as for the other monitors; it measures at
            its steps only, never at task starts, epoch ends or the end of training).
    """

    uses_probe = False  # it reads the training batches' gradients, not a probe

    def __init__(
        self, tau: float = 0.025, at: Literal["input", "output"] = "input", every_n_steps: int = 50, **kwargs: Any
    ) -> None:
        _require_step_cadence("GradientDormancyMonitor", every_n_steps, "gradients")
        super().__init__(every_n_steps=every_n_steps, **kwargs)
        self.tau = check_positive_float("GradientDormancyMonitor", "tau", tau, allow_zero=True)
        self.at = check_choice("GradientDormancyMonitor", "at", at, ("input", "output"))
        self.metrics: dict[str, GradientDormancy] = {}
        self._handles: list[Any] = []

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "tau": self.tau, "at": self.at}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.layers = resolve_layers(pl_module, self.layer_names, discover=hidden_unit_layers)
        self.unit_axes = unit_axes(pl_module, self.layers)
        self.metrics = {}

    @override
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pass  # gradients are read at the measured steps only

    @override
    def on_task_start(self, trainer, pl_module, context, previous_task) -> None:
        pass

    @override
    def on_train_end(self, trainer, pl_module) -> None:
        self._remove_taps()

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx) -> None:
        if not self._handles and self.cadence.due(trainer.global_step + 1):
            self._handles = [self._tap(name, module) for name, module in self.layers.items()]

    def _tap(self, name: str, module: nn.Module) -> Any:
        def read(tensor: Any) -> None:
            if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
                tensor.register_hook(lambda grad: self._update(name, grad))

        if name.endswith(INPUT_SUFFIX):
            return module.register_forward_pre_hook(lambda _m, args: read(args[0] if args else None))
        if self.at == "input":
            return module.register_forward_hook(lambda _m, args, _out: read(args[0] if args else None))
        return module.register_forward_hook(lambda _m, _args, out: read(out))

    def _update(self, name: str, grad: torch.Tensor) -> None:
        grad = units_first(grad, *self.unit_axes.get(name, (0, None)))
        metric = self.metrics.get(name)
        if metric is None:
            metric = self.metrics[name] = GradientDormancy(num_units=grad.shape[1], tau=self.tau).to(grad.device)
        metric.update(grad)

    def _remove_taps(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self._remove_taps()  # this step's gradients are all in

    @override
    def measure(self, trainer, pl_module, outputs, model_output) -> dict[str, float]:
        self._remove_taps()  # a step whose training_step returned None never reached the optimizer
        values: dict[str, float] = {}
        units = dormant = 0.0
        for name, metric in self.metrics.items():
            if metric.positions == 0:  # no gradient reached it at this step (every rank skips it alike)
                continue
            result = metric.compute()  # reduced across DDP ranks
            metric.reset()
            fraction = float(result["dormant_fraction"])
            values[f"{name}/grama_dormant_fraction"] = fraction
            units += result["scores"].numel()
            dormant += fraction * result["scores"].numel()
        if units:
            values["all/grama_dormant_fraction"] = dormant / units  # NaN if a layer's gradients were not finite
        for name in [n for n, v in values.items() if v != v and not n.startswith("all/")]:
            self.mark_nonfinite(trainer, name.rsplit("/", 1)[0], "gradients")
        return values
