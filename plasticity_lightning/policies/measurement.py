"""One measurement entry point: a model and a probe batch → every monitor's measures in one dict.

The monitors (:mod:`plasticity_lightning.callbacks.monitors`) compute their values with the functions here, so a
hand-written loop that calls :func:`measure` gets exactly what a Lightning run logs (without the ``plasticity/``
prefix)::

    values = measure(model, probe_batch)          # {"0/effective_rank": ..., "all/dead_fraction": ..., ...}

The conventions are the monitors': features on the probe in eval mode under ``no_grad`` (train mode restored),
units on the axis the layer type says, and a layer whose outputs (or weights) hold NaN/inf gets NaN for every one
of its values and for the pooled ``all/`` values — never a healthy-looking number.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from plasticity_lightning.core.errors import PlasticityConfigError, check_choice
from plasticity_lightning.metrics.activity import Activity, active_share, activity_statistics, low_activity_mask
from plasticity_lightning.metrics.entropy import activation_entropy, prediction_entropy
from plasticity_lightning.metrics.features import feature_norm, feature_variance
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
from plasticity_lightning.metrics.weights import distance_from_init, layer_weights, mean_abs_weight
from plasticity_lightning.metrics.weights import weight_norm as tensor_norm
from plasticity_lightning.probes import capture_outputs, default_forward, resolve_layers, unit_axes, units_first
from plasticity_lightning.surgery import hidden_unit_layers

RANK_MEASURES = ("effective_rank", "srank", "approximate_rank", "stable_rank", "numerical_rank")
ACTIVITY_MEASURES = ("redo_dormant_fraction", "dead_fraction", "low_activity_fraction")
FAMILIES = ("rank", "activity", "entropy", "weights", "features")
DEFAULT_FAMILIES = ("rank", "activity", "entropy", "weights")


def rank_values(
    outputs: Mapping[str, torch.Tensor],
    measures: Sequence[str] = ("effective_rank", "srank", "approximate_rank", "stable_rank"),
    delta: float = 0.01,
    threshold: float = 0.99,
    conv: Literal["pool", "positions", "flatten"] = "pool",
) -> tuple[dict[str, float], dict[str, torch.Tensor], list[str]]:
    """Rank measures of each layer's features (``[samples, units, ...]``).

    (values keyed ``"<layer>/<measure>"``, singular values per layer, layers whose features were not finite — their
    values are NaN).
    """
    values: dict[str, float] = {}
    spectra: dict[str, torch.Tensor] = {}
    broken: list[str] = []
    for name, output in outputs.items():
        features = feature_matrix(output, conv)
        try:
            sigma = singular_values(features)
        except NonFiniteFeaturesError:
            # A diverged run must still report (NaN says what happened) rather than crash. Pooling can overflow
            # finite outputs, so this is not only the check of the outputs.
            broken.append(name)
            values.update({f"{name}/{measure}": math.nan for measure in measures})
            continue
        compute = {
            "effective_rank": lambda s=sigma: effective_rank(sigma=s),
            "srank": lambda s=sigma: srank(sigma=s, delta=delta),
            "approximate_rank": lambda s=sigma: approximate_rank(sigma=s, threshold=threshold),
            "stable_rank": lambda s=sigma: stable_rank(sigma=s),
            "numerical_rank": lambda f=features: numerical_rank(f),
        }
        for measure in measures:
            values[f"{name}/{measure}"] = float(compute[measure]())
        spectra[name] = sigma
    return values, spectra, broken


def activity_values(
    outputs: Mapping[str, torch.Tensor],
    tau: float = 0.025,
    dead_threshold: float = 0.0,
    max_active: float = 0.01,
    active: Activity = "nonzero",
) -> tuple[dict[str, float], list[list[Any]], dict[str, torch.Tensor]]:
    """Dormant and dead unit shares per layer and over all units pooled (``all/``).

    (values, one table row per layer ``[layer, units, redo_dormant, dead, low_activity]``, per-unit active share per
    layer).
    """
    values: dict[str, float] = {}
    counts = torch.zeros(4, dtype=torch.float64)  # units, redo-dormant, dead, low-activity
    rows: list[list[Any]] = []
    shares: dict[str, torch.Tensor] = {}
    for name, output in outputs.items():
        stats = activity_statistics(output, active)
        masks = stats.masks(tau, dead_threshold, max_active)
        flags = torch.stack([masks["redo_dormant"], masks["dead"], masks["low_activity"]]).to(torch.float64).cpu()
        if bool(stats.finite):
            fractions = flags.mean(dim=1)
        else:  # the metrics' convention: a layer with a NaN/inf activation has NaN shares (and so has "all")
            fractions = torch.full((3,), math.nan, dtype=torch.float64)
            flags = flags + math.nan
        counts += torch.cat([torch.tensor([float(flags.shape[1])]), flags.sum(dim=1)])
        for measure, fraction in zip(ACTIVITY_MEASURES, fractions.tolist(), strict=True):
            values[f"{name}/{measure}"] = fraction
        rows.append([name, flags.shape[1], *fractions.tolist()])
        shares[name] = stats.active_share
    if counts[0] > 0:
        for i, measure in enumerate(ACTIVITY_MEASURES, start=1):
            values[f"all/{measure}"] = float(counts[i] / counts[0])
    return values, rows, shares


def activity_rule(module: nn.Module) -> Activity:
    """What counts as active in a layer's outputs.

    ``"tanh"``/``"sigmoid"`` (not saturated) for those activation modules, else ``"nonzero"``.

    Example::

        >>> activity_rule(nn.Tanh()), activity_rule(nn.Sigmoid()), activity_rule(nn.ReLU())
        ('tanh', 'sigmoid', 'nonzero')
    """
    if isinstance(module, nn.Tanh):
        return "tanh"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    return "nonzero"


def feature_values(
    outputs: Mapping[str, torch.Tensor], rules: Mapping[str, Activity], max_active: float = 0.01
) -> dict[str, float]:
    """:class:`~plasticity_lightning.callbacks.FeatureMonitor`'s values of each layer's features.

    :class:`~plasticity_lightning.callbacks.FeatureMonitor`'s values of each layer's features (``[samples, units,
    ...]``): ``feature_norm``, ``feature_variance``, ``active_fraction`` and ``inactive_fraction`` (units active on
    fewer than ``max_active`` of the positions, by the layer's rule in ``rules``), plus ``all/inactive_fraction``.
    """
    values: dict[str, float] = {}
    units = inactive = 0.0
    for name, output in outputs.items():
        rule = rules.get(name, "nonzero")
        mask = low_activity_mask(output, max_active, rule)
        values[f"{name}/feature_norm"] = float(feature_norm(output))
        values[f"{name}/feature_variance"] = float(feature_variance(output))
        values[f"{name}/active_fraction"] = float(active_share(output, rule).mean())
        values[f"{name}/inactive_fraction"] = float(mask.to(torch.float64).mean())
        units += mask.numel()
        inactive += float(mask.sum())
    if units:
        values["all/inactive_fraction"] = inactive / units
    return values


def entropy_values(
    outputs: Mapping[str, torch.Tensor], model_output: Any, predictions: bool = True, activations: bool = True
) -> tuple[dict[str, float], torch.Tensor | None]:
    """Activation entropy per layer and the prediction entropy of ``[N, C]`` logits.

    (values, the logits used or ``None`` — check them for NaN/inf: a -inf logit would give a clean 0).
    """
    values: dict[str, float] = {}
    if activations:
        for name, output in outputs.items():
            values[f"{name}/activation_entropy"] = float(activation_entropy(output))
    logits = prediction_logits(model_output) if predictions else None
    if logits is not None:
        values["predictions/prediction_entropy"] = float(prediction_entropy(logits))
    return values, logits


def prediction_logits(model_output: Any) -> torch.Tensor | None:
    """The ``[N, C]`` logits (C > 1) whose prediction entropy is measured, or ``None``.

    One output column has no distribution to measure (a binary logit or a regression), and sequence outputs are not
    ``[N, C]``.
    """
    logits = model_output[0] if isinstance(model_output, (tuple, list)) else model_output
    if isinstance(logits, torch.Tensor) and logits.ndim == 2 and logits.shape[1] > 1:
        return logits
    return None


def weight_values(
    weights: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor] | None = None
) -> dict[str, float]:
    """Per-layer mean |w|, norm and (with ``initial``) distance from the initial weights, plus their totals."""
    values: dict[str, float] = {}
    for name, w in weights.items():
        values[f"{name}/mean_abs_weight"] = float(mean_abs_weight(w))
        values[f"{name}/weight_norm"] = float(tensor_norm(w))
        if initial and name in initial:
            values[f"{name}/distance_from_init"] = float(distance_from_init(w, initial[name]))
    values["all/mean_abs_weight"] = float(mean_abs_weight(weights.values()))
    values["all/weight_norm"] = float(tensor_norm(weights.values()))
    if initial:
        shared = [name for name in weights if name in initial]
        values["all/distance_from_init"] = float(
            distance_from_init([weights[n] for n in shared], [initial[n] for n in shared])
        )
    return values


def nan_where_nonfinite(values: dict[str, float], broken: Iterable[str]) -> dict[str, float]:
    """``values`` with every value of a ``broken`` name set to NaN.

    ``values`` with every ``"<name>/…"`` value of a ``broken`` name, and every pooled ``"all/…"`` value (which includes
    it), set to NaN: a diverged layer must not read as a healthy one.
    """
    broken = tuple(f"{name}/" for name in broken)
    if not broken:
        return values
    prefixes = (*broken, "all/")
    return {key: math.nan if key.startswith(prefixes) else value for key, value in values.items()}


def measure(
    model: nn.Module,
    batch: Any,
    *,
    layers: Sequence[str] | None = None,
    families: Sequence[str] = DEFAULT_FAMILIES,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    unit_dim: int | None = None,
    initial: Mapping[str, torch.Tensor] | None = None,
    rank_measures: Sequence[str] = ("effective_rank", "srank", "approximate_rank", "stable_rank"),
    delta: float = 0.01,
    threshold: float = 0.99,
    conv: Literal["pool", "positions", "flatten"] = "pool",
    tau: float = 0.025,
    dead_threshold: float = 0.0,
    max_active: float = 0.01,
    active: Activity = "nonzero",
) -> dict[str, float]:
    """Every monitor's measures of ``model`` on ``batch``, in one dict.

    Every monitor's measures of ``model`` on ``batch``, in one dict keyed as the monitors log them (without the
    ``plasticity/`` prefix).

    The hidden layers are found as the monitors find them (the model's ``hidden_layers()``, else its activation
    modules, recurrent layers and the inputs of layers that consume hidden units), or named with ``layers``
    (``"<name>:input"`` reads what a module receives). One forward pass on ``batch`` in eval mode under
    ``no_grad`` serves every family; the model's train/eval flags are restored.

    Args:
        model: any ``nn.Module``.
        batch: the probe batch (a tensor, a tuple whose first element is the input, or see ``forward``).
        layers: layers to read (``None``: discovered).
        families: any of ``"rank"`` (:class:`~plasticity_lightning.callbacks.RankMonitor`), ``"activity"``
            (:class:`~plasticity_lightning.callbacks.DormantUnitMonitor`), ``"entropy"``
            (:class:`~plasticity_lightning.callbacks.EntropyMonitor`), ``"weights"``
            (:class:`~plasticity_lightning.callbacks.WeightMonitor`; every weight with two or more dimensions) and
            ``"features"`` (:class:`~plasticity_lightning.callbacks.FeatureMonitor` with ``active="auto"``; not in
            the default).
        forward: ``forward(model, batch)`` for models whose input is not the batch's first element.
        unit_dim: the axis of every layer's output that holds units (``None``: from each layer's type).
        initial: initial weights per weight-layer name, for ``distance_from_init``.
        rank_measures: :class:`~plasticity_lightning.callbacks.RankMonitor`'s settings.
        delta: :class:`~plasticity_lightning.callbacks.RankMonitor`'s settings.
        threshold: :class:`~plasticity_lightning.callbacks.RankMonitor`'s settings.
        conv: :class:`~plasticity_lightning.callbacks.RankMonitor`'s settings.
        tau: :class:`~plasticity_lightning.callbacks.DormantUnitMonitor`'s.
        dead_threshold: :class:`~plasticity_lightning.callbacks.DormantUnitMonitor`'s.
        max_active: :class:`~plasticity_lightning.callbacks.DormantUnitMonitor`'s.
        active: :class:`~plasticity_lightning.callbacks.DormantUnitMonitor`'s.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> values = measure(net, torch.randn(64, 4))
        >>> sorted(k for k in values if k.startswith("1/"))[:3]
        ['1/activation_entropy', '1/approximate_rank', '1/dead_fraction']
    """
    if isinstance(families, str) or not families:
        raise PlasticityConfigError(f"measure.families={families!r} is invalid; expected a list drawn from {FAMILIES}")
    for family in families:
        check_choice("measure", "families", family, FAMILIES)
    for name in rank_measures:
        check_choice("measure", "rank_measures", name, RANK_MEASURES)
    values: dict[str, float] = {}
    # each family NaNs what it found non-finite, as each monitor does for its own values
    if {"rank", "activity", "entropy", "features"} & set(families):
        found = resolve_layers(model, None if layers is None else list(layers), discover=hidden_unit_layers)
        axes = unit_axes(model, found)
        outputs, model_output = capture_outputs(model, batch, found, forward=forward or default_forward)
        default = None if unit_dim is None else (0, unit_dim)
        outputs = {k: units_first(v, *(default or axes.get(k, (0, None)))) for k, v in outputs.items()}
        broken = {name for name, output in outputs.items() if not bool(torch.isfinite(output).all())}
        if "rank" in families:
            rank, _, rank_broken = rank_values(outputs, rank_measures, delta, threshold, conv)
            values.update(nan_where_nonfinite(rank, broken | set(rank_broken)))
        if "activity" in families:
            activity = activity_values(outputs, tau, dead_threshold, max_active, active)[0]
            values.update(nan_where_nonfinite(activity, broken))
        if "features" in families:
            rules = {name: "nonzero" if name.endswith(":input") else activity_rule(m) for name, m in found.items()}
            values.update(nan_where_nonfinite(feature_values(outputs, rules, max_active), broken))
        if "entropy" in families:
            entropy, logits = entropy_values(outputs, model_output)
            nonfinite_logits = logits is not None and not bool(torch.isfinite(logits).all())
            values.update(nan_where_nonfinite(entropy, broken | ({"predictions"} if nonfinite_logits else set())))
    if "weights" in families:
        weights = layer_weights(model)
        broken = {name for name, w in weights.items() if not bool(torch.isfinite(w).all())}
        values.update(nan_where_nonfinite(weight_values(weights, initial), broken))
    return values
