"""The plasticity monitors: one callback per family of measures, each usable on any LightningModule.

Add any of them to a Trainer, or all of them with ``--config configs/callbacks/monitors.yaml``::

    trainer = Trainer(callbacks=[RankMonitor(), DormantUnitMonitor(), EntropyMonitor(), WeightMonitor(),
                                 GradientFlowMonitor()])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from plasticity_lightning.callbacks.monitor import PlasticityMonitor
from plasticity_lightning.core.errors import PlasticityConfigError, check_choice, check_fraction, check_positive_float
from plasticity_lightning.metrics.activity import ACTIVITY_CHOICES, activity_statistics
from plasticity_lightning.metrics.entropy import activation_entropy, prediction_entropy
from plasticity_lightning.metrics.rank import (
    NonFiniteFeaturesError,
    approximate_rank,
    effective_rank,
    feature_matrix,
    numerical_rank,
    singular_values,
    srank,
    stable_rank,
)
from plasticity_lightning.metrics.weights import distance_from_init, gradient_stats, layer_weights, mean_abs_weight
from plasticity_lightning.metrics.weights import weight_norm as tensor_norm

RANK_MEASURES = ("effective_rank", "srank", "approximate_rank", "stable_rank", "numerical_rank")
_ACTIVITY_MEASURES = ("redo_dormant_fraction", "dead_fraction", "low_activity_fraction")


class RankMonitor(PlasticityMonitor):
    """Rank of each hidden layer's features on the probe: ``plasticity/<layer>/<measure>``.

    Falling effective rank / srank across tasks is one of the clearest signs of lost plasticity (Dohare et al.
    2024). Convolution outputs are pooled over space (``conv="pool"``: units = channels) unless asked otherwise.

    Args:
        measures: any of effective_rank, srank, approximate_rank, stable_rank, numerical_rank (see
            :mod:`plasticity_lightning.metrics.rank` for definitions).
        delta: srank's δ.
        threshold: approximate_rank's energy share.
        conv: ``"pool"``, ``"positions"`` or ``"flatten"`` (see :func:`~plasticity_lightning.metrics.feature_matrix`).
        **kwargs: :class:`PlasticityMonitor` arguments (layers, cadence, probe).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[RankMonitor(measures=["effective_rank", "srank"], every_n_epochs=1)])
    """

    def __init__(
        self,
        measures: Sequence[str] = ("effective_rank", "srank", "approximate_rank", "stable_rank"),
        delta: float = 0.01,
        threshold: float = 0.99,
        conv: Literal["pool", "positions", "flatten"] = "pool",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if isinstance(measures, str) or not measures:
            raise PlasticityConfigError(
                f"RankMonitor.measures={measures!r} is invalid; expected a non-empty list drawn from "
                f"{list(RANK_MEASURES)}"
            )
        for name in measures:
            check_choice("RankMonitor", "measures", name, RANK_MEASURES)
        self.measures = list(measures)
        self.delta = check_fraction("RankMonitor", "delta", delta, low_open=True)
        self.threshold = check_fraction("RankMonitor", "threshold", threshold, low_open=True, high_open=False)
        self.conv = check_choice("RankMonitor", "conv", conv, ("pool", "positions", "flatten"))

    @override
    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "measures": self.measures,
            "delta": self.delta,
            "threshold": self.threshold,
            "conv": self.conv,
        }

    @override
    def measure(self, trainer, pl_module, outputs, model_output) -> dict[str, float]:
        values: dict[str, float] = {}
        for name, output in outputs.items():
            features = feature_matrix(output, self.conv)
            try:
                sigma = singular_values(features)
            except NonFiniteFeaturesError:
                # A diverged run must still log (NaN says what happened) rather than crash the monitor. Pooling
                # can overflow finite outputs, so this is not only the base class's check of the outputs.
                self.mark_nonfinite(trainer, name, "features")
                values.update({f"{name}/{measure}": math.nan for measure in self.measures})
                continue
            compute = {
                "effective_rank": lambda s=sigma: effective_rank(sigma=s),
                "srank": lambda s=sigma: srank(sigma=s, delta=self.delta),
                "approximate_rank": lambda s=sigma: approximate_rank(sigma=s, threshold=self.threshold),
                "stable_rank": lambda s=sigma: stable_rank(sigma=s),
                "numerical_rank": lambda f=features: numerical_rank(f),
            }
            for measure in self.measures:
                values[f"{name}/{measure}"] = float(compute[measure]())
            self.log_histogram(trainer, f"{name}/singular_values", sigma)
        return values


class DormantUnitMonitor(PlasticityMonitor):
    """Dormant and dead units per layer and over all monitored units.

    Logs, for each layer and for ``all`` (units of every monitored layer pooled, as Dohare et al. report it):
    ``redo_dormant_fraction`` (ReDo score ≤ τ), ``dead_fraction`` (never active on the probe) and
    ``low_activity_fraction`` (active on fewer than ``max_active`` of the probe positions: Dohare et al.'s
    "dormant"). W&B/TensorBoard also get a histogram of each layer's per-unit activity share.

    Args:
        tau: ReDo's threshold (0.025 in the paper's default runs, 0.1 for Atari-100K; 0 counts silent units).
        dead_threshold: |h| at or below which a unit counts as never active.
        max_active: activity share below which a unit counts as dormant (Dohare: 0.01).
        active: what counts as active for ``low_activity_fraction``: ``"nonzero"`` (h ≠ 0, Dohare's CIFAR code)
            or ``"positive"`` (h > 0, their RL code).
        **kwargs: :class:`PlasticityMonitor` arguments.
    """

    def __init__(
        self,
        tau: float = 0.025,
        dead_threshold: float = 0.0,
        max_active: float = 0.01,
        active: Literal["nonzero", "positive"] = "nonzero",
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.tau = check_positive_float("DormantUnitMonitor", "tau", tau, allow_zero=True)
        self.dead_threshold = check_positive_float(
            "DormantUnitMonitor", "dead_threshold", dead_threshold, allow_zero=True
        )
        self.max_active = check_fraction("DormantUnitMonitor", "max_active", max_active, high_open=False)
        self.active = check_choice("DormantUnitMonitor", "active", active, ACTIVITY_CHOICES)

    @override
    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "tau": self.tau,
            "dead_threshold": self.dead_threshold,
            "max_active": self.max_active,
            "active": self.active,
        }

    @override
    def measure(self, trainer, pl_module, outputs, model_output) -> dict[str, float]:
        values: dict[str, float] = {}
        counts = torch.zeros(4, dtype=torch.float64)  # units, redo-dormant, dead, low-activity
        rows = []
        for name, output in outputs.items():
            stats = activity_statistics(output, self.active)
            masks = stats.masks(self.tau, self.dead_threshold, self.max_active)
            flags = torch.stack([masks["redo_dormant"], masks["dead"], masks["low_activity"]]).to(torch.float64).cpu()
            if bool(stats.finite):
                fractions = flags.mean(dim=1)
            else:  # the metrics' convention: a layer with a NaN/inf activation has NaN shares (and so has "all")
                fractions = torch.full((3,), math.nan, dtype=torch.float64)
                flags = flags + math.nan
            counts += torch.cat([torch.tensor([float(flags.shape[1])]), flags.sum(dim=1)])
            for measure, fraction in zip(_ACTIVITY_MEASURES, fractions.tolist(), strict=True):
                values[f"{name}/{measure}"] = fraction
            rows.append([name, flags.shape[1], *fractions.tolist()])
            self.log_histogram(trainer, f"{name}/active_share", stats.active_share)
        if counts[0] > 0:
            for i, measure in enumerate(_ACTIVITY_MEASURES, start=1):
                values[f"all/{measure}"] = float(counts[i] / counts[0])
        self.log_table(trainer, "dormant_units", ["layer", "units", "redo_dormant", "dead", "low_activity"], rows)
        return values


class EntropyMonitor(PlasticityMonitor):
    """Prediction entropy of the model's outputs and StabilAI's activation entropy of each layer, on the probe.

    Collapsing prediction entropy signals over-confidence (e.g. before softmax collapse); collapsing activation
    entropy is SurgeCollapseNet's trigger. Attention entropy per head is available as
    :func:`~plasticity_lightning.metrics.attention_entropy` for models that return attention probabilities.

    Args:
        predictions: log ``predictions/prediction_entropy`` when the model returns ``[N, C]`` logits.
        activations: log ``<layer>/activation_entropy``.
        **kwargs: :class:`PlasticityMonitor` arguments.
    """

    def __init__(self, predictions: bool = True, activations: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.predictions = predictions
        self.activations = activations

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "predictions": self.predictions, "activations": self.activations}

    @override
    def measure(self, trainer, pl_module, outputs, model_output) -> dict[str, float]:
        values: dict[str, float] = {}
        if self.activations:
            for name, output in outputs.items():
                values[f"{name}/activation_entropy"] = float(activation_entropy(output))
        logits = model_output[0] if isinstance(model_output, (tuple, list)) else model_output
        # One output column has no distribution to measure (binary logit or regression).
        if self.predictions and isinstance(logits, torch.Tensor) and logits.ndim == 2 and logits.shape[1] > 1:
            self.check_finite(trainer, "predictions", logits, "logits")  # a -inf logit would give a clean 0
            values["predictions/prediction_entropy"] = float(prediction_entropy(logits))
        return values


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
        values: dict[str, float] = {}
        for name, w in weights.items():
            self.check_finite(trainer, name, w, "weights")
            values[f"{name}/mean_abs_weight"] = float(mean_abs_weight(w))
            values[f"{name}/weight_norm"] = float(tensor_norm(w))
            if self.distance and name in self.initial:
                values[f"{name}/distance_from_init"] = float(distance_from_init(w, self.initial[name]))
        values["all/mean_abs_weight"] = float(mean_abs_weight(weights.values()))
        values["all/weight_norm"] = float(tensor_norm(weights.values()))
        if self.distance and self.initial:
            shared = [name for name in weights if name in self.initial]
            values["all/distance_from_init"] = float(
                distance_from_init([weights[n] for n in shared], [self.initial[n] for n in shared])
            )
        return values

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial": dict(self.initial)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.initial = dict(state_dict.get("initial", {}))


class GradientFlowMonitor(PlasticityMonitor):
    """Per-layer gradient norms every ``every_n_steps`` optimizer steps, with a one-time warning when gradients
    vanish or explode.

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
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
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
