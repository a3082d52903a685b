"""Issue 26: metrics/statistics.py against hand computations (textbook formulas and exact small-sample values), at
its edges: one value, constant samples, NaN cells, a non-default confidence, unequal variances and sizes."""

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from plasticity_lightning.metrics.statistics import (
    cohens_d,
    confidence_interval,
    t_interval,
    welch_t_test,
    wilcoxon_p,
)


def _t_half(values, confidence=0.95):
    """Half-width of the Student-t interval by its formula: t_{(1+c)/2, n-1} · s / √n."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    return stats.t.ppf((1 + confidence) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n)


@pytest.mark.parametrize("confidence", [0.95, 0.8])
def test_confidence_interval_is_the_student_t_formula(confidence):
    values = [1.0, 2.0, 4.0, 7.0]
    low, high = confidence_interval(values, confidence)
    half = _t_half(values, confidence)
    assert low == pytest.approx(3.5 - half, rel=1e-12) and high == pytest.approx(3.5 + half, rel=1e-12)
    # two values: t_{0.975, 1} = 12.7062..., s = |a - b| / √2
    low, high = confidence_interval([1.0, 3.0])
    assert high - 2.0 == pytest.approx(12.706204736174707, rel=1e-9)  # s / √n = √2 / √2
    assert low == pytest.approx(4.0 - high, rel=1e-12)


def test_confidence_interval_of_one_value_is_that_value():
    assert confidence_interval([2.5]) == (2.5, 2.5)
    assert confidence_interval([2.5], confidence=0.5) == (2.5, 2.5)


def test_t_interval_ignores_nan_cells_along_either_axis():
    values = np.array([[1.0, 5.0, np.nan, np.nan], [3.0, np.nan, 2.0, np.nan], [8.0, 6.0, np.nan, np.nan]])
    mean, low, high, count = t_interval(values)
    np.testing.assert_array_equal(count, [3, 2, 1, 0])
    np.testing.assert_allclose(mean[:3], [4.0, 5.5, 2.0], rtol=1e-12)
    assert math.isnan(mean[3])
    for column, expected in ((0, [1.0, 3.0, 8.0]), (1, [5.0, 6.0])):
        half = _t_half(expected)
        assert low[column] == pytest.approx(np.mean(expected) - half, rel=1e-12)
        assert high[column] == pytest.approx(np.mean(expected) + half, rel=1e-12)
    assert np.isnan(low[2:]).all() and np.isnan(high[2:]).all()  # fewer than two values: no interval
    # the same table transposed, reduced along axis 1
    mean_t, low_t, high_t, count_t = t_interval(values.T, axis=1)
    np.testing.assert_array_equal(count_t, count)
    np.testing.assert_allclose(mean_t, mean, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(low_t, low, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(high_t, high, rtol=1e-12, equal_nan=True)


def test_t_interval_of_an_infinite_value_is_not_finite_and_warns_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # inf − inf and inf + (−inf) inside: the NaN they make is the answer, not something to warn about
        mean, low, high, count = t_interval(np.array([[np.inf, np.inf], [3.0, -np.inf]]))
    assert mean[0] == np.inf and np.isnan([low[0], high[0]]).all()  # a diverged run is never hidden
    assert np.isnan([mean[1], low[1], high[1]]).all()
    np.testing.assert_array_equal(count, [1, 0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # two finite values and an inf: the count is 2, so the interval is computed, from an infinite mean
        mean, low, high, count = t_interval(np.array([[1.0], [2.0], [np.inf]]))
    assert mean[0] == np.inf and not np.isfinite([low[0], high[0]]).any() and count[0] == 2


def test_t_interval_of_a_constant_column_has_zero_width():
    mean, low, high, count = t_interval(np.array([[2.0], [2.0], [2.0]]))
    assert (mean[0], low[0], high[0], count[0]) == (2.0, 2.0, 2.0, 3)


def test_cohens_d_is_the_difference_over_the_pooled_deviation():
    a, b = [1.0, 2.0, 6.0], [0.0, 1.0, 1.0, 2.0]
    pooled = math.sqrt((np.var(a, ddof=1) + np.var(b, ddof=1)) / 2)
    assert cohens_d(a, b) == pytest.approx((3.0 - 1.0) / pooled, rel=1e-12)
    assert cohens_d(b, a) == pytest.approx(-(3.0 - 1.0) / pooled, rel=1e-12)
    assert cohens_d([2.0, 2.0], [2.0, 2.0, 2.0]) == 0.0
    assert cohens_d([3.0, 3.0], [2.0, 2.0]) == math.inf
    assert cohens_d([1.0, 1.0], [2.0, 2.0]) == -math.inf
    assert math.isnan(cohens_d([1.0], [1.0, 2.0])) and math.isnan(cohens_d([1.0, 2.0], [1.0]))


def test_wilcoxon_p_of_paired_runs_is_the_exact_signed_rank_p():
    # five differences, all positive: the exact two-sided p is 2 / 2^5
    assert wilcoxon_p([2.0, 4.0, 6.0, 8.0, 10.0], [1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(0.0625)
    # differences 1, -2, 3, 4 (ranks 1, 2, 3, 4): W- = 2; P(W <= 2) = 3 / 16 of the 16 sign patterns, two-sided 0.375
    assert wilcoxon_p([1.0, 0.0, 3.0, 4.0], [0.0, 2.0, 0.0, 0.0]) == pytest.approx(0.375)
    assert wilcoxon_p([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]) == pytest.approx(0.25)  # three differences of 1: 2 / 2^3
    assert wilcoxon_p([1.0, 2.0], [0.0, 0.0]) == pytest.approx(0.5)  # two pairs are enough: 2 / 2^2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every pair equal: 1.0 without asking SciPy (which warns on zeros)
        assert wilcoxon_p([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]) == 1.0
    assert wilcoxon_p([1.0], [0.0]) is None and wilcoxon_p([], []) is None


def test_welch_t_test_is_welchs_formula_not_the_pooled_one():
    a, b = [1.0, 2.0, 3.0, 4.0, 10.0], [2.0, 2.5, 3.0]
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    p = 2 * stats.t.sf(abs(t), df)
    got_t, got_p = welch_t_test(a, b)
    assert got_t == pytest.approx(t, rel=1e-12) and got_p == pytest.approx(p, rel=1e-9)
    assert isinstance(got_t, float) and isinstance(got_p, float)
    pooled_p = stats.ttest_ind(a, b, equal_var=True).pvalue
    assert abs(got_p - pooled_p) > 0.01  # the two tests differ here: the pooled one would not pass
