"""Issue 26: the edges of metrics/features.py that test_toolbox_measures.py leaves open, each against numpy.

Conv outputs pooled per unit, the population (not sample) variance, the clamp of E[h²] − E[h]², the threshold tie of
GraMa, NaN through every output, the one-line errors, and every key the torchmetrics twins return."""

import math

import numpy as np
import pytest
import torch

from plasticity_lightning import PlasticityConfigError
from plasticity_lightning.metrics import (
    FeatureStatistics,
    GradientDormancy,
    WeightChange,
    feature_norm,
    feature_variance,
    grama_dormant_fraction,
    grama_scores,
    weight_change,
)


def _per_unit(h: np.ndarray) -> np.ndarray:
    """[positions, units]: the channel axis last, every other axis pooled (numpy's reading of a unit)."""
    return np.moveaxis(h, 1, -1).reshape(-1, h.shape[1])


def test_feature_norm_and_variance_of_2d_and_conv_outputs_are_numpys():
    h2 = np.array([[3.0, 4.0, 0.0], [1.0, 2.0, 2.0]])
    assert feature_norm(torch.tensor(h2)).item() == pytest.approx((5.0 + 3.0) / 2)
    # population variance (ddof 0): with ddof 1 unit 0 would give 2.0, not 1.0
    assert feature_variance(torch.tensor(h2)).item() == pytest.approx(h2.var(axis=0).mean())
    assert feature_variance(torch.tensor(h2)).item() == pytest.approx((1.0 + 1.0 + 1.0) / 3)
    rng = np.random.default_rng(0)
    h4 = rng.normal(size=(3, 2, 2, 3)) + np.array([0.0, 5.0])[None, :, None, None]
    t = torch.tensor(h4, dtype=torch.float32)
    assert feature_norm(t).item() == pytest.approx(np.linalg.norm(h4.reshape(3, -1), axis=1).mean(), rel=1e-6)
    assert feature_variance(t).item() == pytest.approx(_per_unit(h4).var(axis=0).mean(), rel=1e-6)
    assert feature_norm(t).dtype == feature_variance(t).dtype == torch.float64


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_a_single_non_finite_output_makes_both_measures_nan(bad):
    h = torch.ones(4, 3)
    h[2, 1] = bad
    assert feature_norm(h).isnan() and feature_variance(h).isnan()
    metric = FeatureStatistics(num_units=3)
    metric.update(torch.ones(2, 3))
    metric.update(h)
    result = metric.compute()
    assert sorted(result) == ["feature_norm", "feature_variance"]
    assert result["feature_norm"].isnan() and result["feature_variance"].isnan()


def test_empty_and_one_dimensional_outputs_are_refused_naming_the_shape():
    with pytest.raises(ValueError, match=r"^Expected layer outputs \[N, units, \.\.\.\], got shape \(3,\)$"):
        feature_norm(torch.ones(3))
    with pytest.raises(ValueError, match=r"^feature_norm needs at least one sample \(got an empty batch\)$"):
        feature_norm(torch.ones(0, 3))
    with pytest.raises(ValueError, match=r"^feature_variance needs at least one position \(got an empty batch\)$"):
        feature_variance(torch.ones(0, 3))
    with pytest.raises(PlasticityConfigError, match=r"FeatureStatistics\.num_units=0"):
        FeatureStatistics(num_units=0)
    metric = FeatureStatistics(num_units=3)
    with pytest.raises(ValueError, match=r"^FeatureStatistics\(num_units=3\) got outputs with 2 units$"):
        metric.update(torch.ones(4, 2))
    with pytest.raises(ValueError, match=r"FeatureStatistics\.compute\(\) called before any non-empty update"):
        metric.compute()


def test_feature_statistics_over_conv_batches_equals_the_functionals_of_all_of_them():
    rng = np.random.default_rng(1)
    batches = [rng.normal(size=(n, 2, 3, 2)) * 2.0 + 1.0 for n in (1, 4)]
    metric = FeatureStatistics(num_units=2)
    for b in batches:
        metric.update(torch.tensor(b, dtype=torch.float32))
    whole = np.concatenate(batches)
    result = metric.compute()
    assert result["feature_norm"].item() == pytest.approx(np.linalg.norm(whole.reshape(5, -1), axis=1).mean())
    assert result["feature_variance"].item() == pytest.approx(_per_unit(whole).var(axis=0).mean(), rel=1e-6)
    assert metric.samples.item() == 5 and metric.positions.item() == 5 * 3 * 2


def test_a_constant_unit_has_variance_zero_never_below_or_above():
    # E[h²] − E[h]² of a constant 0.1 rounds below zero in float64: the clamp keeps it at exactly 0
    h = torch.full((3, 1), 0.1, dtype=torch.float64)
    raw = (h.pow(2).sum() / 3 - (h.sum() / 3) ** 2).item()
    assert raw < 0  # the rounding the clamp is there for
    metric = FeatureStatistics(num_units=1)
    metric.update(h)
    result = metric.compute()
    assert result["feature_variance"].item() == 0.0
    assert result["feature_norm"].item() == pytest.approx(0.1)


def test_weight_change_max_keeps_nan_and_compute_needs_an_update():
    metric = WeightChange()
    with (
        pytest.warns(UserWarning, match="before the ``update``"),
        pytest.raises(ValueError, match=r"^WeightChange\.compute\(\) called before any update$"),
    ):
        metric.compute()
    metric.update(torch.tensor([0.0, 2.0]), torch.zeros(2))  # ‖Δ‖ = 2
    metric.update(torch.tensor([1.0]), torch.tensor([1.0]))  # ‖Δ‖ = 0: the max stays 2
    result = metric.compute()
    assert {k: v.item() for k, v in result.items()} == {"mean": 1.0, "max": 2.0, "updates": 2.0}
    metric.update(torch.tensor([math.nan]), torch.zeros(1))
    result = metric.compute()
    assert result["max"].isnan() and result["mean"].isnan() and result["updates"].item() == 3.0
    assert weight_change(torch.tensor([3.0, 4.0]), torch.zeros(2)).item() == 5.0
    assert weight_change(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]), relative=True).item() == 1.0


def test_grama_counts_a_score_equal_to_tau_as_dormant():
    # unit magnitudes 1, 3 and 0 (mean 4/3): scores 0.75, 2.25 and 0 (up to the 1e-9 in the denominator)
    g = torch.tensor([[1.0, -3.0, 0.0], [-1.0, 3.0, 0.0]])
    magnitude = np.array([1.0, 3.0, 0.0])
    scores = magnitude / (magnitude.mean() + 1e-9)
    np.testing.assert_allclose(grama_scores(g).numpy(), scores, rtol=1e-12)
    tau = float(grama_scores(g)[0])  # exactly unit 0's score
    assert grama_dormant_fraction(g, tau=tau).item() == pytest.approx(2 / 3)
    assert grama_dormant_fraction(g, tau=math.nextafter(tau, 0)).item() == pytest.approx(1 / 3)
    assert grama_dormant_fraction(g).item() == pytest.approx(1 / 3)  # tau 0: only the silent unit
    metric = GradientDormancy(num_units=3, tau=tau)
    metric.update(g)
    result = metric.compute()
    assert sorted(result) == ["dormant_fraction", "scores"]
    assert result["dormant_fraction"].item() == pytest.approx(2 / 3)
    np.testing.assert_allclose(result["scores"].numpy(), scores, rtol=1e-12)


def test_gradient_dormancy_pools_conv_positions_and_refuses_bad_input():
    rng = np.random.default_rng(2)
    g = rng.normal(size=(2, 3, 2, 2)) * np.array([1.0, 0.0, 4.0])[None, :, None, None]
    metric = GradientDormancy(num_units=3)
    metric.update(torch.tensor(g[:1], dtype=torch.float32))
    metric.update(torch.tensor(g[1:], dtype=torch.float32))
    magnitude = np.abs(_per_unit(g)).mean(axis=0)
    result = metric.compute()
    np.testing.assert_allclose(result["scores"].numpy(), magnitude / (magnitude.mean() + 1e-9), rtol=1e-6)
    assert result["dormant_fraction"].item() == pytest.approx(1 / 3)
    assert metric.positions.item() == 2 * 2 * 2
    metric.update(torch.full((1, 3), math.inf))
    result = metric.compute()
    assert result["dormant_fraction"].isnan() and result["scores"].isnan().all()
    with pytest.raises(ValueError, match=r"^GradientDormancy\(num_units=3\) got gradients with 4 units$"):
        metric.update(torch.ones(2, 4))
    with (
        pytest.warns(UserWarning, match="before the ``update``"),
        pytest.raises(ValueError, match=r"GradientDormancy\.compute\(\) called before any non-empty update"),
    ):
        GradientDormancy(num_units=2).compute()
    with pytest.raises(PlasticityConfigError, match=r"GradientDormancy\.tau=-0\.5"):
        GradientDormancy(num_units=2, tau=-0.5)
    with pytest.raises(PlasticityConfigError, match=r"grama_dormant_fraction\.tau=-1\.0"):
        grama_dormant_fraction(torch.ones(2, 2), tau=-1.0)
    assert GradientDormancy(num_units=2, tau=0.3).tau == 0.3
    assert grama_dormant_fraction(torch.tensor([[1.0, math.nan]])).isnan()
