"""Feature norm and variance, weight change per update, and gradient-based dormancy (GraMa).

The measures Plasticine and Lyle et al. (2023, "Understanding plasticity in neural networks") track beside ranks
and dormant units:

=================================  ===================================================================================
function (torchmetrics twin)       value
=================================  ===================================================================================
:func:`feature_norm`               mean over samples of ‖h_n‖₂, a sample's whole output (every unit and position) as
(:class:`FeatureStatistics`)       one vector — Plasticine's ``compute_feature_norm``
:func:`feature_variance`           mean over units of the (population) variance of h_i over the probe positions (the
(:class:`FeatureStatistics`)       batch × H × W of a convolution, as for the unit counts). Plasticine's own draft
                                   took the variance across the features of one sample instead; a unit whose output
                                   no longer varies over inputs carries no information, which is what this measures
:func:`weight_change`              ‖θ_t − θ_{t−1}‖₂ of one update, per layer (Plasticine's weight difference, without
(:class:`WeightChange`)            its division by √#params)
:func:`grama_scores`,              GraMa (Liu et al. 2025, "Measure gradients, not activations!"): ReDo's score on the
:func:`grama_dormant_fraction`     gradient of the loss with respect to each unit's output,
(:class:`GradientDormancy`)        s_i = E|∂L/∂h_i| / (mean_k E|∂L/∂h_k| + 1e-9); a unit with s_i ≤ τ has stopped
                                   learning, whatever its activation
=================================  ===================================================================================

Saturation-aware active units (tanh and sigmoid outputs at their bounds count as inactive) are the
``active="tanh"``/``"sigmoid"`` modes of :mod:`plasticity_lightning.metrics.activity`.

Non-finite inputs give NaN, never a number that looks healthy.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torchmetrics import Metric

from plasticity_lightning.core.errors import check_positive_float, check_positive_int
from plasticity_lightning.metrics.activity import _redo_scores, mean_abs_activation, unit_view
from plasticity_lightning.metrics.weights import distance_from_init


def _samples(outputs: torch.Tensor) -> torch.Tensor:
    """``[N, everything else]`` float64 view: one row per sample."""
    if outputs.ndim < 2:
        raise ValueError(f"Expected layer outputs [N, units, ...], got shape {tuple(outputs.shape)}")
    return outputs.detach().flatten(1).to(torch.float64)  # reshape(N, -1) cannot infer -1 when N is 0


def _nan_unless_finite(value: torch.Tensor, finite: torch.Tensor | bool) -> torch.Tensor:
    return torch.where(torch.as_tensor(finite, device=value.device), value, torch.nan)


def feature_norm(outputs: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the L2 norm of each sample's output; NaN when any output is non-finite.

    Args:
        outputs: one layer's outputs on the probe, ``[N, units]`` or ``[N, C, ...]`` (channels are the units).

    Example::

        >>> feature_norm(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor(3., dtype=torch.float64)
    """
    rows = _samples(outputs)
    if rows.shape[0] == 0:
        raise ValueError("feature_norm needs at least one sample (got an empty batch)")
    return _nan_unless_finite(torch.linalg.vector_norm(rows, dim=1).mean(), torch.isfinite(rows).all())


def feature_variance(outputs: torch.Tensor) -> torch.Tensor:
    """Mean over units of each unit's population variance over the probe positions.

    NaN when any output is non-finite.

    Args:
        outputs: one layer's outputs on the probe, ``[N, units]`` or ``[N, C, ...]`` (channels are the units).

    Example::

        >>> feature_variance(torch.tensor([[1.0, 5.0], [3.0, 5.0]]))  # unit 0 varies (variance 1), unit 1 does not
        tensor(0.5000, dtype=torch.float64)
    """
    view = unit_view(outputs).detach().to(torch.float64)
    if view.shape[0] == 0:
        raise ValueError("feature_variance needs at least one position (got an empty batch)")
    return _nan_unless_finite(view.var(dim=0, unbiased=False).mean(), torch.isfinite(view).all())


class FeatureStatistics(Metric):
    """Feature norm and feature variance accumulated over batches (and DDP processes).

    ``compute()`` returns ``{"feature_norm": ..., "feature_variance": ...}``, equal to :func:`feature_norm` and
    :func:`feature_variance` of all the batches concatenated. Sums are kept in float64; the variance is
    E[h²] − E[h]² per unit (clamped at 0).

    Args:
        num_units: units (columns or channels) of the layer.
        **kwargs: torchmetrics ``Metric`` arguments (``dist_sync_fn``, ``sync_on_compute``, ...).

    Example::

        >>> metric = FeatureStatistics(num_units=2)
        >>> metric.update(torch.tensor([[3.0, 4.0]]))
        >>> metric.update(torch.tensor([[1.0, 4.0]]))
        >>> {k: round(float(v), 4) for k, v in metric.compute().items()}
        {'feature_norm': 4.5616, 'feature_variance': 0.5}
    """

    is_differentiable = False
    full_state_update = False

    norm_sum: torch.Tensor
    samples: torch.Tensor
    unit_sum: torch.Tensor
    unit_square_sum: torch.Tensor
    positions: torch.Tensor

    def __init__(self, num_units: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_units = check_positive_int("FeatureStatistics", "num_units", num_units)
        zero = torch.tensor(0.0, dtype=torch.float64)
        self.add_state("norm_sum", default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("samples", default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("unit_sum", default=torch.zeros(num_units, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("unit_square_sum", default=torch.zeros(num_units, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("positions", default=zero.clone(), dist_reduce_fx="sum")

    def update(self, outputs: torch.Tensor) -> None:
        view = unit_view(outputs).detach().to(torch.float64)
        if view.shape[1] != self.num_units:
            raise ValueError(f"FeatureStatistics(num_units={self.num_units}) got outputs with {view.shape[1]} units")
        rows = _samples(outputs)
        self.norm_sum += torch.linalg.vector_norm(rows, dim=1).sum()
        self.samples += rows.shape[0]
        self.unit_sum += view.sum(dim=0)
        self.unit_square_sum += view.pow(2).sum(dim=0)
        self.positions += view.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        if self.samples == 0:
            raise ValueError("FeatureStatistics.compute() called before any non-empty update")
        mean = self.unit_sum / self.positions
        variance = (self.unit_square_sum / self.positions - mean.pow(2)).clamp(min=0)
        # inf - inf is NaN already; +inf sums (a diverged layer) must not pass as a large healthy number either
        finite = torch.isfinite(self.unit_square_sum).all() & torch.isfinite(self.norm_sum)
        return {
            "feature_norm": _nan_unless_finite(self.norm_sum / self.samples, finite),
            "feature_variance": _nan_unless_finite(variance.mean(), finite),
        }


def weight_change(
    current: torch.Tensor | Iterable[torch.Tensor],
    previous: torch.Tensor | Iterable[torch.Tensor],
    *,
    relative: bool = False,
) -> torch.Tensor:
    """‖θ_t − θ_{t−1}‖₂ over every element of one update (÷ ‖θ_{t−1}‖₂ with ``relative``).

    The same distance as :func:`~plasticity_lightning.metrics.distance_from_init`, taken from the weights before
    the update instead of the initial ones.

    Args:
        current: the weights after the update: a tensor or an iterable of tensors.
        previous: the weights before it, in the same order and shapes.
        relative: divide by ‖θ_{t−1}‖₂ (default False: the absolute distance, in weight units).

    Example::

        >>> weight_change(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 0.0]), relative=True)
        tensor(2., dtype=torch.float64)
    """
    return distance_from_init(current, previous, relative=relative)


class WeightChange(Metric):
    """Weight change per update accumulated over updates (and processes).

    ``compute()`` returns ``{"mean": mean ‖Δθ‖ per update, "max": the largest, "updates": how many}``.

    Args:
        **kwargs: torchmetrics ``Metric`` arguments (``dist_sync_fn``, ``sync_on_compute``, ...).

    Example::

        >>> metric = WeightChange()
        >>> metric.update(torch.tensor([3.0, 4.0]), torch.zeros(2))
        >>> metric.update(torch.tensor([3.0, 5.0]), torch.tensor([3.0, 4.0]))
        >>> {k: float(v) for k, v in metric.compute().items()}
        {'mean': 3.0, 'max': 5.0, 'updates': 2.0}
    """

    is_differentiable = False
    full_state_update = False

    total: torch.Tensor
    largest: torch.Tensor
    updates: torch.Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        zero = torch.tensor(0.0, dtype=torch.float64)
        self.add_state("total", default=zero.clone(), dist_reduce_fx="sum")
        self.add_state("largest", default=zero.clone(), dist_reduce_fx="max")
        self.add_state("updates", default=zero.clone(), dist_reduce_fx="sum")

    def update(
        self, current: torch.Tensor | Iterable[torch.Tensor], previous: torch.Tensor | Iterable[torch.Tensor]
    ) -> None:
        change = weight_change(current, previous).to(self.total.device)
        self.total += change
        # NaN must survive the max (torch.maximum propagates it)
        self.largest = torch.maximum(self.largest, change)
        self.updates += 1

    def compute(self) -> dict[str, torch.Tensor]:
        if self.updates == 0:
            raise ValueError("WeightChange.compute() called before any update")
        return {"mean": self.total / self.updates, "max": self.largest, "updates": self.updates}


def grama_scores(gradients: torch.Tensor) -> torch.Tensor:
    """GraMa scores: ReDo's normalised score on |∂L/∂h| per unit (pooled over batch × positions).

    All NaN when any gradient is non-finite.

    Args:
        gradients: the loss gradient at each unit's pre-activation, ∂L/∂z, shaped like the layer's outputs ``[N,
            units]`` or ``[N, C, ...]``.

    Example::

        >>> grama_scores(torch.tensor([[1.0, 0.0, -2.0], [-1.0, 0.0, 0.0]]))
        tensor([1.5000, 0.0000, 1.5000], dtype=torch.float64)
    """
    return _redo_scores(mean_abs_activation(gradients))


def grama_dormant_fraction(gradients: torch.Tensor, tau: float = 0.0) -> torch.Tensor:
    """Share of units whose GraMa score is at or below ``tau`` (0: no gradient at all reaches them).

    NaN when any gradient is non-finite.

    Args:
        gradients: the loss gradient at each unit's pre-activation, ∂L/∂z, shaped like the layer's outputs ``[N,
            units]`` or ``[N, C, ...]``.
        tau: threshold on the normalised GraMa score (dimensionless; default 0.0: units no gradient reaches; Liu et al.
            2025).

    Example::

        >>> grama_dormant_fraction(torch.tensor([[1.0, 0.0, -2.0, 0.01]]), tau=0.025)
        tensor(0.5000, dtype=torch.float64)
    """
    check_positive_float("grama_dormant_fraction", "tau", tau, allow_zero=True)
    scores = grama_scores(gradients)
    return _nan_unless_finite((scores <= tau).to(torch.float64).mean(), torch.isfinite(scores).all())


class GradientDormancy(Metric):
    """GraMa over several batches (and processes).

    Accumulates Σ|∂L/∂h_i| per unit; ``compute()`` returns ``{"dormant_fraction": ..., "scores": per-unit GraMa
    scores}``.

    Args:
        num_units: units of the layer.
        tau: GraMa's threshold.
        **kwargs: torchmetrics ``Metric`` arguments (``dist_sync_fn``, ``sync_on_compute``, ...).

    Example::

        >>> metric = GradientDormancy(num_units=2, tau=0.1)
        >>> metric.update(torch.tensor([[1.0, 0.0]]))
        >>> metric.update(torch.tensor([[-3.0, 0.0]]))
        >>> float(metric.compute()["dormant_fraction"])
        0.5
    """

    is_differentiable = False
    full_state_update = False

    abs_sum: torch.Tensor
    positions: torch.Tensor

    def __init__(self, num_units: int, tau: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_units = check_positive_int("GradientDormancy", "num_units", num_units)
        self.tau = check_positive_float("GradientDormancy", "tau", tau, allow_zero=True)
        self.add_state("abs_sum", default=torch.zeros(num_units, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("positions", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, gradients: torch.Tensor) -> None:
        view = unit_view(gradients).detach()
        if view.shape[1] != self.num_units:
            raise ValueError(f"GradientDormancy(num_units={self.num_units}) got gradients with {view.shape[1]} units")
        self.abs_sum += view.abs().sum(dim=0, dtype=torch.float64).to(self.abs_sum.device)
        self.positions += view.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        if self.positions == 0:
            raise ValueError("GradientDormancy.compute() called before any non-empty update")
        scores = _redo_scores(self.abs_sum / self.positions)
        dormant = (scores <= self.tau).to(torch.float64).mean()
        return {"dormant_fraction": _nan_unless_finite(dormant, torch.isfinite(scores).all()), "scores": scores}


__all__ = [
    "FeatureStatistics",
    "GradientDormancy",
    "WeightChange",
    "feature_norm",
    "feature_variance",
    "grama_dormant_fraction",
    "grama_scores",
    "weight_change",
]
