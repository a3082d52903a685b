"""Representation monitors: rank, dormant/low-activity units and activation entropy of hidden layers.

Add any of them to a Trainer, or all of them with ``--config configs/callbacks/monitors.yaml``::

    trainer = Trainer(callbacks=[RankMonitor(), DormantUnitMonitor(), EntropyMonitor(), WeightMonitor(),
                                 GradientFlowMonitor()])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from typing_extensions import override

from plasticity_lightning.callbacks.monitors.base import PlasticityMonitor
from plasticity_lightning.core.errors import PlasticityConfigError, check_choice, check_fraction, check_positive_float
from plasticity_lightning.metrics.activity import ACTIVITY_CHOICES, Activity
from plasticity_lightning.policies.measurement import (
    RANK_MEASURES,
    activity_values,
    entropy_values,
    prediction_logits,
    rank_values,
)


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
    def needs_model_output(self, model_output: Any) -> bool:
        return False

    @override
    def measure(self, trainer, pl_module, outputs, model_output) -> dict[str, float]:
        values, spectra, broken = rank_values(outputs, self.measures, self.delta, self.threshold, self.conv)
        for name in broken:  # pooling can overflow finite outputs: not only the base class's check of the outputs
            self.mark_nonfinite(trainer, name, "features")
        for name, sigma in spectra.items():
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
        active: what counts as active for ``low_activity_fraction``: ``"nonzero"`` (h ≠ 0, Dohare's CIFAR code),
            ``"positive"`` (h > 0, their RL code), or ``"tanh"``/``"sigmoid"`` (not saturated: saturated units count
            as inactive; :class:`FeatureMonitor` picks the rule per layer).
        **kwargs: :class:`PlasticityMonitor` arguments.
    """

    def __init__(
        self,
        tau: float = 0.025,
        dead_threshold: float = 0.0,
        max_active: float = 0.01,
        active: Activity = "nonzero",
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
    def needs_model_output(self, model_output: Any) -> bool:
        return False

    @override
    def measure(self, trainer, pl_module, outputs, model_output) -> dict[str, float]:
        values, rows, shares = activity_values(outputs, self.tau, self.dead_threshold, self.max_active, self.active)
        for name, share in shares.items():
            self.log_histogram(trainer, f"{name}/active_share", share)
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
    def needs_model_output(self, model_output: Any) -> bool:
        return self.predictions and prediction_logits(model_output) is not None

    @override
    def measure(self, trainer, pl_module, outputs, model_output) -> dict[str, float]:
        values, logits = entropy_values(outputs, model_output, self.predictions, self.activations)
        if logits is not None:
            self.check_finite(trainer, "predictions", logits, "logits")  # a -inf logit would give a clean 0
        return values
