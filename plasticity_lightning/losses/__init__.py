"""Losses by name, so a YAML recipe can say ``loss: cross_entropy`` or pass any ``nn.Module``.

Besides torch's losses: ``stablemax_cross_entropy`` (:class:`StableMaxCrossEntropy`, in float64),
``cross_entropy_float64`` (softmax cross-entropy in float64) and, for regression, ``adaptive_r2_based``,
``adaptive_loss_based``, ``adaptive_combined`` and ``adaptive_physics_aware`` (:class:`AdaptiveRegressionLoss`).
More can be added with :func:`register_loss`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from plasticity_lightning.core.errors import PlasticityConfigError, check_choice

_LOSSES: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "cross_entropy": (nn.CrossEntropyLoss, "classification"),
    "mse": (nn.MSELoss, "regression"),
    "mae": (nn.L1Loss, "regression"),
    "huber": (nn.HuberLoss, "regression"),
    "smooth_l1": (nn.SmoothL1Loss, "regression"),
}

DEFAULT_LOSS = {"classification": "cross_entropy", "regression": "mse"}


def register_loss(name: str, factory: Callable[[], nn.Module], task: str) -> None:
    """Make ``factory`` available to every model as ``loss: <name>`` for ``task`` (classification/regression).

    Args:
        name: the name recipes and models use (``loss: <name>``).
        factory: called without arguments, returns a fresh loss module.
        task: ``"classification"`` or ``"regression"``.
    """
    check_choice("register_loss", "task", task, DEFAULT_LOSS)
    _LOSSES[name] = (factory, task)


def available_losses(task: str | None = None) -> list[str]:
    """Names usable as ``loss`` (for one task, or all).

    Args:
        task: ``"classification"`` or ``"regression"`` (default ``None``: every task).
    """
    return [name for name, (_, kind) in _LOSSES.items() if task is None or kind == task]


def build_loss(spec: str | nn.Module | None, task: str, *, owner: str = "") -> nn.Module:
    """An ``nn.Module`` loss from a name, an instance, or ``None`` (the task's default).

    Args:
        spec: a registered name (see :func:`available_losses`), a loss module (used as is) or ``None`` (the task's
            default loss).
        task: ``"classification"`` or ``"regression"``.
        owner: the model named in an error message (default ``""``).

    Example::

        >>> build_loss(None, "classification")
        CrossEntropyLoss()
    """
    if spec is None:
        spec = DEFAULT_LOSS[task]
    if isinstance(spec, nn.Module):
        return spec
    if not isinstance(spec, str):
        raise PlasticityConfigError(f"{owner}.loss={spec!r} is invalid; expected a loss name or an nn.Module")
    check_choice(owner, "loss", spec, available_losses(task))
    return _LOSSES[spec][0]()


from plasticity_lightning.losses.adaptive import STRATEGIES as ADAPTIVE_STRATEGIES  # noqa: E402
from plasticity_lightning.losses.adaptive import (  # noqa: E402
    AdaptiveRegressionLoss,
    adaptive_loss_weights,
    sine_weights,
)
from plasticity_lightning.losses.stablemax import (  # noqa: E402  (registers after the registry exists)
    PrecisionCrossEntropy,
    StableMaxCrossEntropy,
    log_stablemax,
    stablemax,
    stablemax_s,
)

register_loss("stablemax_cross_entropy", StableMaxCrossEntropy, "classification")
register_loss("cross_entropy_float64", lambda: PrecisionCrossEntropy("float64"), "classification")
for _strategy in ADAPTIVE_STRATEGIES:  # loss: adaptive_r2_based, adaptive_physics_aware, ...
    register_loss(f"adaptive_{_strategy}", lambda strategy=_strategy: AdaptiveRegressionLoss(strategy), "regression")

__all__ = [
    "ADAPTIVE_STRATEGIES",
    "DEFAULT_LOSS",
    "AdaptiveRegressionLoss",
    "PrecisionCrossEntropy",
    "StableMaxCrossEntropy",
    "adaptive_loss_weights",
    "available_losses",
    "build_loss",
    "log_stablemax",
    "register_loss",
    "sine_weights",
    "stablemax",
    "stablemax_s",
]
