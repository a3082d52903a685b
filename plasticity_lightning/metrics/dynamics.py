"""Learning-dynamics summary of a training history, with Neural Elements' definitions and thresholds.

A *history* is a mapping of equally long per-record sequences (one entry per recorded epoch):

==========================  ===============================================================================
key                         meaning
==========================  ===============================================================================
``epoch``                   epoch of each record (used to turn the convergence index into an epoch)
``loss``                    training loss
``accuracy``                training accuracy
``mean_grad``               mean over layers of mean |∂L/∂W_l|
``max_grad``                max over layers of max |∂L/∂W_l|
``layer_grad_norms``        per record, the list of ‖∂L/∂W_l‖_F
``mean_weight``             layer-averaged mean of the weights
``std_weight``              layer-averaged std of the weights
``layer_weight_norms``      per record, the list of ‖W_l‖_F
``val_accuracy``            held-out accuracy (for the generalisation gap)
==========================  ===============================================================================

Every key is optional; each part of the summary needs only its own keys. Definitions follow Neural Elements'
``src/analysis/dynamics.py``, including two of its quirks kept for comparability: the "late" gradient window
is the last ⌈n/4⌉ records while the "early" one is the first ⌊n/4⌋, and with fewer than 4 records the first
and last values stand in. One deliberate deviation: a non-finite final mean gradient is *not* labelled
vanishing (Neural Elements replaces it by 0 and so calls it vanishing); it is caught as exploding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the report reads this module's summaries without torch (tests/test_imports.py)
    import torch


@dataclass(frozen=True)
class DynamicsThresholds:
    """Neural Elements' thresholds (the defaults).

    Attributes:
        convergence_share: convergence is the first record reaching this share of the final accuracy (default 0.9).
        tail_share: stability is the std of the loss over this final share of the records (default 0.2).
        vanishing: a final mean |∂L/∂W| below this is ``vanishing_gradients`` (default 1e-6).
        exploding: a final max |∂L/∂W| above this, or non-finite, is ``exploding_gradients`` (default 100).
        slow_epochs: convergence later than this many epochs is ``slow_convergence`` (default 500).
        fast_epochs: convergence earlier than this many epochs is ``fast_convergence`` (default 100).
        unstable_std: a loss std (loss units) above this is ``unstable`` (default 0.1).
        stable_std: a loss std below this is ``stable`` (default 0.01).
        decay_ratio: a late/early mean-gradient ratio below this is ``gradient_decay`` (default 0.1).
        growth_ratio: a late/early mean-gradient ratio above this is ``gradient_growth`` (default 10).
    """

    convergence_share: float = 0.9  #: convergence = first record reaching this share of the final accuracy
    tail_share: float = 0.2  #: stability = std of the loss over this final share of the records
    vanishing: float = 1e-6  #: final mean |grad| below this: vanishing
    exploding: float = 100.0  #: final max |grad| above this (or non-finite): exploding
    slow_epochs: int = 500  #: convergence later than this: slow_convergence
    fast_epochs: int = 100  #: convergence earlier than this: fast_convergence
    unstable_std: float = 0.1  #: loss std above this: unstable
    stable_std: float = 0.01  #: loss std below this: stable
    decay_ratio: float = 0.1  #: late/early gradient below this: gradient_decay
    growth_ratio: float = 10.0  #: late/early gradient above this: gradient_growth


def _slope(values: Sequence[float]) -> float:
    return float(np.polyfit(np.arange(len(values)), np.asarray(values, dtype=float), 1)[0]) if len(values) > 1 else 0.0


def convergence_epoch(
    accuracy: Sequence[float], epochs: Sequence[int] | None = None, share: float = 0.9
) -> tuple[int, int]:
    """(epoch, index) of the first record whose accuracy reaches ``share`` × the final accuracy.

    Without ``epochs`` the index is returned as the epoch.

    Args:
        accuracy: the training accuracy of each record (0-1).
        epochs: the epoch of each record (default ``None``: the record's index stands for its epoch).
        share: the share of the final accuracy that counts as converged (default 0.9, Neural Elements).

    Example::

        >>> convergence_epoch([0.1, 0.5, 0.95, 1.0], epochs=[0, 10, 20, 30])
        (20, 2)
    """
    if len(accuracy) == 0:
        raise ValueError("convergence_epoch needs at least one accuracy record")
    target = share * accuracy[-1]
    index = next((i for i, acc in enumerate(accuracy) if acc >= target), len(accuracy) - 1)
    return (int(epochs[index]) if epochs is not None else index), index


def loss_convergence_epoch(
    loss: Sequence[float], epochs: Sequence[int] | None = None, share: float = 0.9
) -> tuple[int, int]:
    """(epoch, index) of the first record whose loss has made ``share`` of the run's total improvement.

    The improvement is measured from the first loss to the best (lowest) one: the first record with
    ``loss <= first - share·(first - best)``. The loss counterpart of :func:`convergence_epoch` (a run that never
    improves converges at its first record). Non-finite losses never count as converged.

    Args:
        loss: the training loss of each record.
        epochs: the epoch of each record (default ``None``: the record's index stands for its epoch).
        share: the share of the total improvement (first → best loss) that counts as converged (default 0.9).

    Example::

        >>> loss_convergence_epoch([1.0, 0.5, 0.15, 0.1, 0.12], epochs=[1, 2, 3, 4, 5])
        (3, 2)
    """
    finite = [v for v in loss if math.isfinite(v)]
    if not finite:
        raise ValueError("loss_convergence_epoch needs at least one finite loss record")
    first = next(v for v in loss if math.isfinite(v))
    target = first - share * (first - min(finite))
    index = next(i for i, v in enumerate(loss) if math.isfinite(v) and v <= target)
    return (int(epochs[index]) if epochs is not None else index), index


def loss_stability(loss: Sequence[float], tail_share: float = 0.2) -> dict[str, float]:
    """Standard deviation (not variance) of the loss over the final ``tail_share`` of records, plus endpoints.

    Args:
        loss: the training loss of each record.
        tail_share: the final share of the records whose loss std is taken (default 0.2, Neural Elements).

    Example::

        >>> loss_stability([1.0, 0.5, 0.3, 0.2, 0.2])["loss_improvement"]
        0.8
    """
    n = len(loss)
    tail = int((1 - tail_share) * n)
    if n == 0 or tail >= n:
        return {}
    return {
        "loss_stability": float(np.std(np.asarray(loss[tail:], dtype=float))),
        "loss_final": float(loss[-1]),
        "loss_initial": float(loss[0]),
        "loss_improvement": float(loss[0] - loss[-1]),
    }


def gradient_health(
    mean_grad: Sequence[float],
    max_grad: Sequence[float],
    layer_grad_norms: Sequence[Sequence[float]] | None = None,
    thresholds: DynamicsThresholds = DynamicsThresholds(),
) -> dict[str, Any]:
    """Gradient-flow health over training (Neural Elements' ``compute_gradient_health``).

    Args:
        mean_grad: per record, the mean over layers of mean |∂L/∂W_l|.
        max_grad: per record, the max over layers of max |∂L/∂W_l|.
        layer_grad_norms: per record, the list of ‖∂L/∂W_l‖_F (default ``None``: no per-layer part).
        thresholds: the labels' thresholds (default: Neural Elements', :class:`DynamicsThresholds`).
    """
    if len(mean_grad) == 0:
        return {}
    valid_mean = [g for g in mean_grad if math.isfinite(g)]
    valid_max = [g for g in max_grad if math.isfinite(g)]
    if not valid_mean:  # every record non-finite: the gradients blew up
        return {
            "mean_grad_overall": math.nan,
            "mean_grad_early": math.nan,
            "mean_grad_late": math.nan,
            "mean_grad_final": math.nan,
            "max_grad_overall": math.nan,
            "grad_trend_slope": 0.0,
            "vanishing": False,
            "exploding": True,
            "gradient_ratio": 0.0,
            "layer_health": [],
        }
    n = len(valid_mean)
    early = float(np.mean(valid_mean[: n // 4])) if n >= 4 else valid_mean[0]
    # Neural Elements' code slices `[-n//4:]`, which Python reads as the last ⌈n/4⌉ values (not ⌊n/4⌋ as its
    # description says); the two differ only when 4 does not divide n. We follow the code.
    late = float(np.mean(valid_mean[-n // 4 :])) if n >= 4 else valid_mean[-1]
    slope = _slope(mean_grad) if len(valid_mean) == len(mean_grad) else 0.0
    layer_health = []
    for layer, norms in enumerate(zip(*layer_grad_norms, strict=True) if layer_grad_norms else []):
        finite = [g for g in norms if math.isfinite(g)]
        if finite:
            layer_health.append(
                {
                    "layer": layer,
                    "mean": float(np.mean(finite)),
                    "std": float(np.std(finite)),
                    "final": float(finite[-1]),
                    "trend": _slope(finite),
                }
            )
    final_mean = mean_grad[-1]
    final_max = max_grad[-1] if len(max_grad) else math.inf
    return {
        "mean_grad_overall": float(np.mean(valid_mean)),
        "mean_grad_early": float(early),
        "mean_grad_late": float(late),
        "mean_grad_final": float(final_mean) if math.isfinite(final_mean) else math.nan,
        "max_grad_overall": float(np.max(valid_max)) if valid_max else math.nan,
        "grad_trend_slope": slope,
        "vanishing": bool(math.isfinite(final_mean) and final_mean < thresholds.vanishing),
        "exploding": bool(
            not math.isfinite(final_max) or final_max > thresholds.exploding or not math.isfinite(final_mean)
        ),
        "gradient_ratio": float(late / early) if early > 1e-10 else 0.0,
        "layer_health": layer_health,
    }


def weight_evolution(
    mean_weight: Sequence[float],
    std_weight: Sequence[float],
    layer_weight_norms: Sequence[Sequence[float]] | None = None,
) -> dict[str, Any]:
    """How the weights moved (Neural Elements' ``compute_weight_evolution``).

    Args:
        mean_weight: per record, the layer-averaged mean of the weights.
        std_weight: per record, the layer-averaged std of the weights.
        layer_weight_norms: per record, the list of ‖W_l‖_F (default ``None``: no per-layer part).
    """
    if len(mean_weight) == 0:
        return {}
    layers = []
    for layer, norms in enumerate(zip(*layer_weight_norms, strict=True) if layer_weight_norms else []):
        initial, final = float(norms[0]), float(norms[-1])
        layers.append(
            {
                "layer": layer,
                "initial": initial,
                "final": final,
                "change": final - initial,
                "change_pct": (final - initial) / initial * 100 if initial > 1e-10 else 0.0,
            }
        )
    return {
        "mean_weight_initial": float(mean_weight[0]),
        "mean_weight_final": float(mean_weight[-1]),
        "std_weight_initial": float(std_weight[0]),
        "std_weight_final": float(std_weight[-1]),
        "weight_growth": float(std_weight[-1] / std_weight[0]) if std_weight[0] > 1e-10 else 1.0,
        "layer_evolution": layers,
    }


def learning_curve(accuracy: Sequence[float]) -> dict[str, float]:
    """Shape of the accuracy curve: improvements over the first and last quarter, monotonicity, extremes.

    Args:
        accuracy: the training accuracy of each record (0-1).

    Example::

        >>> learning_curve([0.5, 0.6, 0.55, 0.9])["monotonicity"]
        0.6666666666666666
    """
    if len(accuracy) < 2:
        return {}
    acc = np.asarray(accuracy, dtype=float)
    early_end, late_start = len(acc) // 4, 3 * len(acc) // 4
    return {
        "initial_accuracy": float(acc[0]),
        "final_accuracy": float(acc[-1]),
        "total_improvement": float(acc[-1] - acc[0]),
        "early_improvement": float(acc[early_end] - acc[0]) if early_end > 0 else 0.0,
        "late_improvement": float(acc[-1] - acc[late_start]),
        "monotonicity": float(np.mean(np.diff(acc) > 0)),
        "max_accuracy": float(acc.max()),
        "min_accuracy": float(acc.min()),
    }


def generalization_gap(train_accuracy: float, test_accuracy: float) -> float:
    """Train minus held-out accuracy (Neural Elements' Phase 7 definition).

    Args:
        train_accuracy: final training accuracy (0-1).
        test_accuracy: final held-out accuracy (0-1).

    Example::

        >>> round(generalization_gap(0.98, 0.91), 4)
        0.07
    """
    return float(train_accuracy - test_accuracy)


def classify_training_pattern(
    summary: Mapping[str, Any],
    thresholds: DynamicsThresholds = DynamicsThresholds(),
) -> str:
    """Comma-separated labels.

    Any of vanishing/exploding_gradients, slow/fast_convergence, unstable/stable, gradient_decay/growth, or
    ``normal`` when none applies.

    Args:
        summary: a summary as :func:`dynamics_summary` returns it (the labels read its convergence, stability and
            gradient entries).
        thresholds: the labels' thresholds (default: Neural Elements', :class:`DynamicsThresholds`).

    Example::

        >>> classify_training_pattern({"convergence_epoch": 40, "loss_stability": 0.002})
        'fast_convergence,stable'
    """
    labels = []
    health = summary.get("gradient_health", {})
    if health.get("vanishing", False):
        labels.append("vanishing_gradients")
    if health.get("exploding", False):
        labels.append("exploding_gradients")
    convergence = summary.get("convergence_epoch", 0)
    if convergence > thresholds.slow_epochs:
        labels.append("slow_convergence")
    elif convergence < thresholds.fast_epochs:
        labels.append("fast_convergence")
    stability = summary.get("loss_stability", 0)
    if stability > thresholds.unstable_std:
        labels.append("unstable")
    elif stability < thresholds.stable_std:
        labels.append("stable")
    ratio = health.get("gradient_ratio", 1.0)
    if ratio < thresholds.decay_ratio:
        labels.append("gradient_decay")
    elif ratio > thresholds.growth_ratio:
        labels.append("gradient_growth")
    return ",".join(labels) or "normal"


def dynamics_summary(
    history: Mapping[str, Sequence[Any]],
    thresholds: DynamicsThresholds = DynamicsThresholds(),
) -> dict[str, Any]:
    """Every dynamics metric the history supports, plus the pattern label (``compute_dynamics_metrics``).

    Args:
        history: per-record sequences under the keys of the module's table (each optional).
        thresholds: the labels' thresholds (default: Neural Elements', :class:`DynamicsThresholds`).

    Example::

        >>> history = {"epoch": [0, 10, 20, 30], "loss": [1.0, 0.4, 0.2, 0.2], "accuracy": [0.5, 0.8, 0.9, 0.9]}
        >>> summary = dynamics_summary(history)
        >>> summary["convergence_epoch"], summary["pattern"]
        (20, 'fast_convergence,stable')
    """
    lengths = {key: len(values) for key, values in history.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"history sequences differ in length: {lengths}")
    summary: dict[str, Any] = {}
    accuracy = history.get("accuracy")
    if accuracy:
        epoch, index = convergence_epoch(accuracy, history.get("epoch"), thresholds.convergence_share)
        summary["convergence_epoch"], summary["convergence_index"] = epoch, index
    if history.get("loss"):
        summary.update(loss_stability(history["loss"], thresholds.tail_share))
    if history.get("mean_grad"):
        summary["gradient_health"] = gradient_health(
            history["mean_grad"], history.get("max_grad", []), history.get("layer_grad_norms"), thresholds
        )
    if history.get("mean_weight"):
        summary["weight_evolution"] = weight_evolution(
            history["mean_weight"], history["std_weight"], history.get("layer_weight_norms")
        )
    if accuracy and len(accuracy) > 1:
        summary["learning_curve"] = learning_curve(accuracy)
    if accuracy and history.get("val_accuracy"):
        summary["generalization_gap"] = generalization_gap(accuracy[-1], history["val_accuracy"][-1])
    summary["pattern"] = classify_training_pattern(summary, thresholds)
    summary["thresholds"] = asdict(thresholds)
    return summary


def dynamics_record(
    model: torch.nn.Module,
    epoch: int,
    logged: Mapping[str, Any] | None = None,
    gradients: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One history record of ``model`` at the end of an epoch, under the keys of the module's table.

    The record holds ``epoch``, the ``logged`` values as floats, the gradient statistics of the step to record
    (``mean_grad``, ``max_grad``, ``layer_grad_norms``) and the model's weight statistics (``mean_weight``,
    ``std_weight``, ``layer_weight_norms``), all from :mod:`~plasticity_lightning.metrics.weights`.

    Args:
        model: the model, after the epoch's last optimizer step.
        epoch: the epoch of the record.
        logged: the epoch's ``loss``, ``accuracy`` and/or ``val_accuracy`` (any scalar ``float()`` accepts), in
            the order they should appear in the record.
        gradients: :func:`~plasticity_lightning.metrics.weights.gradient_stats` of the step to record; ``None``
            takes them from the gradients on ``model``'s parameters, and leaves them out when there are none.

    Example::

        >>> import torch
        >>> import torch
        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[3.0, -4.0]]))
        >>> record = dynamics_record(model, epoch=4, logged={"loss": torch.tensor(0.5)})
        >>> record["epoch"], record["loss"], record["layer_weight_norms"], "mean_grad" in record
        (4, 0.5, [5.0], False)
        >>> model.weight.grad = torch.tensor([[1.0, -3.0]])
        >>> dynamics_record(model, epoch=4)["mean_grad"]
        2.0
    """
    # torch-using helpers, imported here so that importing this module stays torch-free
    from plasticity_lightning.metrics.weights import gradient_stats, layer_weights, weight_stats

    record: dict[str, Any] = {"epoch": epoch}
    record.update((name, float(value)) for name, value in (logged or {}).items())
    if gradients is None and any(p.grad is not None for p in model.parameters()):
        gradients = gradient_stats(layer_weights(model))
    if gradients is not None:
        record.update(
            mean_grad=gradients["mean_grad"],
            max_grad=gradients["max_grad"],
            layer_grad_norms=list(gradients["layer_grad_norms"].values()),
        )
    weights = weight_stats(layer_weights(model))
    record.update(
        mean_weight=weights["mean_weight"],
        std_weight=weights["std_weight"],
        layer_weight_norms=list(weights["layer_weight_norms"].values()),
    )
    return record
