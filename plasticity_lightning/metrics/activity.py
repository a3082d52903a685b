"""Unit activity: ReDo's τ-dormant units, dead units and Dohare et al.'s low-activity ("dormant") units.

A *unit* is a column of a ``[N, D]`` layer output or a channel of a ``[N, C, ...]`` convolution/sequence
output; statistics pool over every axis but the unit axis (batch × H × W for convolutions), as ReDo and
Dohare et al. do.

=============================  =========================================================================
function                       a unit counts when
=============================  =========================================================================
:func:`redo_dormant_mask`      s_i = E|h_i| / (mean_k E|h_k| + 1e-9) ≤ τ  (Sokar et al. 2023; τ = 0 default,
                               0.025 / 0.1 in the paper's runs)
:func:`dead_unit_mask`         max |h_i| ≤ threshold over the probe (never active; threshold 0 = exactly 0)
:func:`low_activity_mask`      share of probe positions with h_i ≠ 0 (or h_i > 0) is below ``max_active``
                               (0.01): Dohare et al.'s CIFAR "dormant" units
=============================  =========================================================================

What counts as *active* (``active``): h ≠ 0, h > 0, or — for tanh and sigmoid layers — an output that is not
saturated (:func:`active_share`); :func:`active_fraction` is Plasticine's share of active entries.

The ``*_fraction`` functions return the share of units counted. :class:`UnitActivity` accumulates the
per-unit sums over batches (and processes) and returns all three fractions.

Non-finite activations (NaN, ±inf) — the convention, the same in every function and in :class:`UnitActivity`:

* a unit with a non-finite activation anywhere on the probe is **never counted** as dormant, dead or of low
  activity (its output is broken, not silent). Its ReDo score is NaN;
* if any unit of a layer is non-finite, **every** ReDo score of the layer is NaN: the normaliser mean_k E|h_k| is
  infinite or NaN, so s_i = E|h_i| / mean would be 0 for every finite unit and one +inf activation would make the
  whole layer look dormant;
* every **share** (``*_fraction``) of a layer with a non-finite activation is **NaN**, never a number: a share
  computed over the finite units only would report a diverged network as a healthy 0.0 (or, for ReDo, as
  98% dormant). The per-unit masks stay usable for inspection.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torchmetrics import Metric

from plasticity_lightning.core.errors import check_choice, check_fraction, check_positive_float, check_positive_int

REDO_EPS = 1e-9  # ReDo's guard against an all-zero layer


def unit_view(outputs: torch.Tensor) -> torch.Tensor:
    """``[positions, units]`` view: units on the last axis, every other axis pooled into positions.

    Args:
        outputs: one layer's outputs on the probe, ``[N, units]`` or ``[N, C, ...]`` (channels are the units; every
            other axis is pooled into positions).

    Example::

        >>> unit_view(torch.zeros(2, 3, 4, 5)).shape
        torch.Size([40, 3])
    """
    if outputs.ndim < 2:
        raise ValueError(f"Expected layer outputs [N, units, ...], got shape {tuple(outputs.shape)}")
    if outputs.ndim == 2:
        return outputs
    return outputs.movedim(1, -1).reshape(-1, outputs.shape[1])


def mean_abs_activation(outputs: torch.Tensor) -> torch.Tensor:
    """E|h_i| per unit, over batch (× spatial positions), float64.

    Args:
        outputs: one layer's outputs on the probe, ``[N, units]`` or ``[N, C, ...]`` (channels are the units; every
            other axis is pooled into positions).
    """
    return unit_view(outputs).detach().abs().to(torch.float64).mean(dim=0)


def redo_scores(outputs: torch.Tensor) -> torch.Tensor:
    """ReDo's normalised activity score s_i = E|h_i| / (mean_k E|h_k| + 1e-9); all NaN if any unit is non-finite.

    Args:
        outputs: one layer's outputs on the probe, ``[N, units]`` or ``[N, C, ...]`` (channels are the units; every
            other axis is pooled into positions).

    Example::

        >>> redo_scores(torch.tensor([[1.0, 0.0, 2.0], [1.0, 0.0, 0.0]]))
        tensor([1.5000, 0.0000, 1.5000], dtype=torch.float64)
    """
    return _redo_scores(mean_abs_activation(outputs))


def _redo_scores(activity: torch.Tensor) -> torch.Tensor:
    mean = activity.mean()
    # a non-finite unit makes the normaliser meaningless: every score is undefined (see the module's convention)
    return torch.where(torch.isfinite(mean), activity / (mean + REDO_EPS), torch.nan)


def _redo_dormant(mean_abs: torch.Tensor, tau: float) -> torch.Tensor:
    return _redo_scores(mean_abs) <= tau


def _dead(max_abs: torch.Tensor, threshold: float) -> torch.Tensor:
    return max_abs <= threshold


def _low_activity(share: torch.Tensor, max_active: float) -> torch.Tensor:
    return share < max_active


def _share(mask: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """Share of units in ``mask``, NaN when the layer holds a non-finite activation (``finite`` False)."""
    return torch.where(finite, mask.to(torch.float64).mean(), torch.nan)


def _finite_units(mean_abs: torch.Tensor) -> torch.Tensor:
    """Units whose every activation is finite: E|h| sums |h| in float64, so it is finite exactly when they are."""
    return torch.isfinite(mean_abs)


def redo_dormant_mask(outputs: torch.Tensor, tau: float = 0.0) -> torch.Tensor:
    """Units with ReDo score s_i ≤ τ (``τ = 0``: exactly silent units); none in a layer with a non-finite unit.

    Args:
        outputs: one layer's outputs on the probe, ``[N, units]`` or ``[N, C, ...]`` (channels are the units; every
            other axis is pooled into positions).
        tau: ReDo's threshold on the normalised score s_i (dimensionless; default 0.0 counts exactly silent units; Sokar
            et al. 2023 use 0.025 and 0.1 for Atari).
    """
    check_positive_float("redo_dormant_mask", "tau", tau, allow_zero=True)
    return _redo_dormant(mean_abs_activation(outputs), tau)


def redo_dormant_fraction(outputs: torch.Tensor, tau: float = 0.0) -> torch.Tensor:
    """Share of τ-dormant units (ReDo); NaN when any activation is non-finite (see the module's convention).

    Args:
        outputs: one layer's outputs on the probe, ``[N, units]`` or ``[N, C, ...]`` (channels are the units; every
            other axis is pooled into positions).
        tau: ReDo's threshold on the normalised score s_i (dimensionless; default 0.0 counts exactly silent units; Sokar
            et al. 2023 use 0.025 and 0.1 for Atari).

    Example::

        >>> redo_dormant_fraction(torch.tensor([[1.0, 0.0, 2.0, 0.01]]), tau=0.025)
        tensor(0.5000, dtype=torch.float64)
        >>> redo_dormant_fraction(torch.tensor([[1.0, 0.0, float("inf")]]), tau=0.025)
        tensor(nan, dtype=torch.float64)
    """
    check_positive_float("redo_dormant_fraction", "tau", tau, allow_zero=True)
    mean_abs = mean_abs_activation(outputs)
    return _share(_redo_dormant(mean_abs, tau), _finite_units(mean_abs).all())


def dead_unit_mask(outputs: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Units whose |h| never exceeds ``threshold`` on the probe (0: exactly zero everywhere, Dohare's dead units).

    A unit with a NaN or infinite activation is not dead.

    Args:
        outputs: one layer's outputs on the probe, ``[N, units]`` or ``[N, C, ...]`` (channels are the units; every
            other axis is pooled into positions).
        threshold: the largest |h| a dead unit may reach anywhere on the probe (activation units; default 0.0: exactly
            zero).
    """
    check_positive_float("dead_unit_mask", "threshold", threshold, allow_zero=True)
    # amax propagates NaN, and NaN ≤ threshold is false: a NaN unit is not dead, like an infinite one
    return _dead(unit_view(outputs).detach().abs().amax(dim=0), threshold)


def dead_unit_fraction(outputs: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Share of dead units; NaN when any activation is non-finite.

    Args:
        outputs: one layer's outputs on the probe, ``[N, units]`` or ``[N, C, ...]`` (channels are the units; every
            other axis is pooled into positions).
        threshold: the largest |h| a dead unit may reach anywhere on the probe (activation units; default 0.0: exactly
            zero).

    Example::

        >>> dead_unit_fraction(torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
        tensor(0.5000, dtype=torch.float64)
    """
    mask = dead_unit_mask(outputs, threshold)
    return _share(mask, _finite_units(mean_abs_activation(outputs)).all())


Activity = Literal["nonzero", "positive", "tanh", "sigmoid"]
ACTIVITY_CHOICES = ("nonzero", "positive", "tanh", "sigmoid")
#: how close to its bound a tanh or sigmoid output counts as saturated (Plasticine's and Neural Elements' 0.01)
SATURATION_MARGIN = 0.01


def _is_active(view: torch.Tensor, active: Activity) -> torch.Tensor:
    if active == "nonzero":
        return view != 0
    if active == "positive":
        return view > 0
    if active == "tanh":  # saturated at ±1: |h| > 0.99 is inactive
        return view.abs() <= 1 - SATURATION_MARGIN
    # sigmoid, saturated at 0 or 1: h < 0.01 or h > 0.99 is inactive
    return (view >= SATURATION_MARGIN) & (view <= 1 - SATURATION_MARGIN)


def active_share(outputs: torch.Tensor, active: Activity = "nonzero") -> torch.Tensor:
    """Per unit, the share of probe positions where the unit is active (Dohare et al.'s unit activity).

    ``active="nonzero"`` counts h ≠ 0 (Dohare et al.'s CIFAR code: the fraction of non-zero activations);
    ``"positive"`` counts h > 0 (their RL code). The two agree after ReLU; they differ for activations with
    negative outputs (leaky ReLU, ELU, tanh). ``"tanh"`` and ``"sigmoid"`` count a *saturated* output as inactive
    (Plasticine's active-unit rule): tanh is active where |h| ≤ 0.99, sigmoid where 0.01 ≤ h ≤ 0.99
    (:data:`SATURATION_MARGIN`). A saturated unit passes almost no gradient, so it has stopped learning although
    it is not zero.

    Args:
        outputs: one layer's outputs on the probe, ``[N, units]`` or ``[N, C, ...]`` (channels are the units; every
            other axis is pooled into positions).
        active: what counts as active: ``"nonzero"`` (h ≠ 0, Dohare et al.'s CIFAR code; default), ``"positive"`` (h >
            0, their RL code), ``"tanh"`` or ``"sigmoid"`` (not saturated, Plasticine's rule).
    """
    check_choice("active_share", "active", active, ACTIVITY_CHOICES)
    return _is_active(unit_view(outputs).detach(), active).to(torch.float64).mean(dim=0)


def low_activity_mask(outputs: torch.Tensor, max_active: float = 0.01, active: Activity = "nonzero") -> torch.Tensor:
    """Units active on fewer than ``max_active`` of the probe positions (Dohare et al.'s dormant units).

    A unit with a NaN or infinite activation is not counted (with ``active="positive"`` NaN > 0 is false, so it
    would otherwise read as inactive).

    Args:
        outputs: one layer's outputs on the probe, ``[N, units]`` or ``[N, C, ...]`` (channels are the units; every
            other axis is pooled into positions).
        max_active: the share of probe positions (0-1) below which a unit counts as of low activity (default 0.01,
            Dohare et al. 2024).
        active: what counts as active: ``"nonzero"`` (h ≠ 0, Dohare et al.'s CIFAR code; default), ``"positive"`` (h >
            0, their RL code), ``"tanh"`` or ``"sigmoid"`` (not saturated, Plasticine's rule).
    """
    check_fraction("low_activity_mask", "max_active", max_active, high_open=False)
    finite = _finite_units(mean_abs_activation(outputs))
    return _low_activity(active_share(outputs, active), max_active) & finite


def active_fraction(outputs: torch.Tensor, active: Activity = "nonzero") -> torch.Tensor:
    """Share of (position, unit) entries that are active.

    Plasticine's *fraction of active units* (FAU); NaN when any activation is non-finite. With ``active="tanh"`` or
    ``"sigmoid"`` saturated outputs count as inactive.

    Args:
        outputs: one layer's outputs on the probe, ``[N, units]`` or ``[N, C, ...]`` (channels are the units; every
            other axis is pooled into positions).
        active: what counts as active: ``"nonzero"`` (h ≠ 0, Dohare et al.'s CIFAR code; default), ``"positive"`` (h >
            0, their RL code), ``"tanh"`` or ``"sigmoid"`` (not saturated, Plasticine's rule).

    Example::

        >>> active_fraction(torch.tensor([[0.5, 0.995], [-1.0, 0.0]]), active="tanh")
        tensor(0.5000, dtype=torch.float64)
    """
    share = active_share(outputs, active).mean()
    return torch.where(_finite_units(mean_abs_activation(outputs)).all(), share, torch.nan)


def low_activity_fraction(
    outputs: torch.Tensor, max_active: float = 0.01, active: Activity = "nonzero"
) -> torch.Tensor:
    """Share of units active on fewer than ``max_active`` of the inputs.

    Args:
        outputs: one layer's outputs on the probe, ``[N, units]`` or ``[N, C, ...]`` (channels are the units; every
            other axis is pooled into positions).
        max_active: the share of probe positions (0-1) below which a unit counts as of low activity (default 0.01,
            Dohare et al. 2024).
        active: what counts as active: ``"nonzero"`` (h ≠ 0, Dohare et al.'s CIFAR code; default), ``"positive"`` (h >
            0, their RL code), ``"tanh"`` or ``"sigmoid"`` (not saturated, Plasticine's rule).

    Example::

        >>> h = torch.zeros(200, 2)
        >>> h[0, 0] = 1.0  # unit 0 active on 0.5% of inputs, unit 1 on 50%
        >>> h[:100, 1] = 1.0
        >>> low_activity_fraction(h)
        tensor(0.5000, dtype=torch.float64)
    """
    mask = low_activity_mask(outputs, max_active, active)
    return _share(mask, _finite_units(mean_abs_activation(outputs)).all())


class ActivityStatistics(NamedTuple):
    """Per-unit statistics of layer outputs over the probe positions, float64."""

    #: E|h_i|
    mean_abs: torch.Tensor
    #: max |h_i|
    max_abs: torch.Tensor
    #: share of positions where unit i is active (see :func:`active_share`)
    active_share: torch.Tensor

    @property
    def finite(self) -> torch.Tensor:
        """Whether every activation of the layer was finite (a 0-d bool tensor, on the statistics' device)."""
        return _finite_units(self.mean_abs).all()

    def masks(self, tau: float = 0.0, dead_threshold: float = 0.0, max_active: float = 0.01) -> dict[str, torch.Tensor]:
        """The three unit counts' masks: ``redo_dormant`` (score ≤ τ), ``dead`` and ``low_activity``.

        A unit with a non-finite activation is in none of them (see the module's convention).
        """
        return {
            "redo_dormant": _redo_dormant(self.mean_abs, tau),
            "dead": _dead(self.max_abs, dead_threshold),
            "low_activity": _low_activity(self.active_share, max_active) & _finite_units(self.mean_abs),
        }

    def fractions(
        self, tau: float = 0.0, dead_threshold: float = 0.0, max_active: float = 0.01
    ) -> dict[str, torch.Tensor]:
        """The shares of the three :meth:`masks`, each NaN when the layer holds a non-finite activation."""
        finite = self.finite
        return {name: _share(mask, finite) for name, mask in self.masks(tau, dead_threshold, max_active).items()}


def _activity_sums(view: torch.Tensor, active: Activity) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Σ|h|, max|h| and the active count per unit of a ``[positions, units]`` view, float64, reading |h| once."""
    magnitude = view.abs()
    return (
        magnitude.sum(dim=0, dtype=torch.float64),
        magnitude.amax(dim=0).to(torch.float64),
        _is_active(view, active).sum(dim=0, dtype=torch.float64),
    )


def activity_statistics(outputs: torch.Tensor, active: Activity = "nonzero") -> ActivityStatistics:
    """Every per-unit statistic the unit counts need, in one pass over the outputs.

    Args:
        outputs: one layer's outputs on the probe, ``[N, units]`` or ``[N, C, ...]`` (channels are the units; every
            other axis is pooled into positions).
        active: what counts as active: ``"nonzero"`` (h ≠ 0, Dohare et al.'s CIFAR code; default), ``"positive"`` (h >
            0, their RL code), ``"tanh"`` or ``"sigmoid"`` (not saturated, Plasticine's rule).

    Example::

        >>> stats = activity_statistics(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
        >>> stats.mean_abs.tolist(), stats.active_share.tolist(), stats.masks(tau=0.1)["dead"].tolist()
        ([2.0, 0.0], [1.0, 0.0], [False, True])
    """
    check_choice("activity_statistics", "active", active, ACTIVITY_CHOICES)
    view = unit_view(outputs).detach()
    if view.shape[0] == 0:
        raise ValueError("activity_statistics needs at least one position (got an empty batch)")
    abs_sum, abs_max, active_count = _activity_sums(view, active)
    return ActivityStatistics(abs_sum / view.shape[0], abs_max, active_count / view.shape[0])


class UnitActivity(Metric):
    """Accumulates per-unit activity over batches (and DDP processes) and reports all three unit counts.

    ``compute()`` returns a dict with ``redo_dormant_fraction``, ``dead_fraction``, ``low_activity_fraction`` and
    the per-unit ``redo_scores`` and ``active_share`` vectors.

    Args:
        num_units: units (columns or channels) of the layer.
        tau: ReDo threshold.
        dead_threshold: |h| at or below which a unit counts as never active.
        max_active: Dohare's activity share below which a unit counts as dormant.
        active: what counts as active, ``"nonzero"`` (h ≠ 0), ``"positive"`` (h > 0), ``"tanh"`` or ``"sigmoid"``
            (not saturated); see :func:`active_share`.

    Example::

        >>> metric = UnitActivity(num_units=2, tau=0.1)
        >>> metric.update(torch.tensor([[1.0, 0.0], [3.0, 0.0]]))
        >>> {k: round(float(v), 3) for k, v in metric.compute().items() if k.endswith("fraction")}
        {'redo_dormant_fraction': 0.5, 'dead_fraction': 0.5, 'low_activity_fraction': 0.5}
    """

    is_differentiable = False
    full_state_update = False

    abs_sum: torch.Tensor
    active_count: torch.Tensor
    abs_max: torch.Tensor
    positions: torch.Tensor

    def __init__(
        self,
        num_units: int,
        tau: float = 0.0,
        dead_threshold: float = 0.0,
        max_active: float = 0.01,
        active: Activity = "nonzero",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.num_units = check_positive_int("UnitActivity", "num_units", num_units)
        self.tau = check_positive_float("UnitActivity", "tau", tau, allow_zero=True)
        self.dead_threshold = check_positive_float("UnitActivity", "dead_threshold", dead_threshold, allow_zero=True)
        self.max_active = check_fraction("UnitActivity", "max_active", max_active, high_open=False)
        self.active = check_choice("UnitActivity", "active", active, ACTIVITY_CHOICES)
        zeros = torch.zeros(num_units, dtype=torch.float64)
        self.add_state("abs_sum", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("active_count", default=zeros.clone(), dist_reduce_fx="sum")
        self.add_state("abs_max", default=zeros.clone(), dist_reduce_fx="max")
        self.add_state("positions", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, outputs: torch.Tensor) -> None:
        view = unit_view(outputs).detach()
        if view.shape[1] != self.num_units:
            raise ValueError(f"UnitActivity(num_units={self.num_units}) got outputs with {view.shape[1]} units")
        if view.shape[0] == 0:
            return  # an empty batch adds nothing (and amax of nothing would raise)
        abs_sum, abs_max, active_count = _activity_sums(view, self.active)
        self.abs_sum += abs_sum
        self.active_count += active_count
        self.abs_max = torch.maximum(self.abs_max, abs_max)
        self.positions += view.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        if self.positions == 0:
            raise ValueError("UnitActivity.compute() called before any non-empty update")
        stats = ActivityStatistics(self.abs_sum / self.positions, self.abs_max, self.active_count / self.positions)
        fractions = stats.fractions(self.tau, self.dead_threshold, self.max_active)
        return {
            **{f"{name}_fraction": fraction for name, fraction in fractions.items()},
            "redo_scores": _redo_scores(stats.mean_abs),
            "active_share": stats.active_share,
        }
