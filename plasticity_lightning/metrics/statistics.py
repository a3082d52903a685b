"""The statistics of the library's reports, in one place.

Student-t intervals of a mean (one sample, or many along an axis ignoring NaN), Cohen's d, the Wilcoxon signed-rank test
of paired runs and Welch's t-test. Used by ``plasticity report --compare`` (:mod:`plasticity_lightning.reports`) and the
study reports (:mod:`plasticity_lightning.studies`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np


def confidence_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval for the mean (a single value: the value itself).

    Example::

        >>> [round(v, 4) for v in confidence_interval([1.0, 2.0, 3.0])]
        [-0.4841, 4.4841]
    """
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean
    quantile = float(stats.t.ppf((1 + confidence) / 2, len(values) - 1))
    half = quantile * statistics.stdev(values) / math.sqrt(len(values))
    return mean - half, mean + half


def t_interval(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mean, lower and upper bound of the 95% Student-t interval over ``axis`` ignoring NaN, and the count.

    The bounds are NaN below two values.

    Example::

        >>> mean, low, high, n = t_interval(np.array([[1.0], [2.0], [3.0]]))
        >>> float(mean[0]), round(float(high[0] - mean[0]), 4), int(n[0])
        (2.0, 2.4841, 3)
    """
    from scipy import stats

    count = np.isfinite(values).sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(count > 0, np.nansum(values, axis=axis) / np.maximum(count, 1), np.nan)
        deviations = np.where(np.isfinite(values), values - np.expand_dims(mean, axis), 0.0)
        variance = (deviations**2).sum(axis=axis) / np.maximum(count - 1, 1)
        half = stats.t.ppf(0.975, np.maximum(count - 1, 1)) * np.sqrt(variance / np.maximum(count, 1))
        half = np.where(count >= 2, half, np.nan)
        # an infinite mean gives inf − inf here: NaN bounds are the answer, not something to warn about
        low, high = mean - half, mean + half
    return mean, low, high, count


def cohens_d(values: Sequence[float], reference: Sequence[float]) -> float:
    """Cohen's d of ``values`` against ``reference`` with the pooled (equal-weight) standard deviation.

    0 when both samples are constant and equal; ±inf when constant and different; NaN when either sample has fewer
    than two values (no spread to compare against).

    Args:
        values: one variant's values (e.g. one per seed).
        reference: the reference variant's values (another sample; need not be paired).

    Example::

        >>> round(cohens_d([2.0, 3.0, 4.0], [1.0, 2.0, 3.0]), 4)
        1.0
    """
    if len(values) < 2 or len(reference) < 2:
        return math.nan
    difference = statistics.fmean(values) - statistics.fmean(reference)
    variances = [statistics.variance(v) for v in (values, reference)]
    pooled = math.sqrt(sum(variances) / 2)
    if pooled == 0:
        return 0.0 if difference == 0 else math.copysign(math.inf, difference)
    return difference / pooled


def wilcoxon_p(values: Sequence[float], reference: Sequence[float]) -> float | None:
    """Two-sided Wilcoxon signed-rank p-value of paired samples (1.0 when every difference is 0; None below 2 pairs).

    Args:
        values: one variant's values, paired with ``reference`` by position (e.g. by seed).
        reference: the reference variant's values, as many as ``values``.
    """
    from scipy import stats

    differences = np.asarray(values, dtype=float) - np.asarray(reference, dtype=float)
    if len(differences) < 2:
        return None
    if np.all(differences == 0):
        return 1.0
    return float(stats.wilcoxon(differences).pvalue)


def welch_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Welch's two-sided t-test of two independent samples (unequal variances): ``(t, p)``.

    Example::

        >>> t, p = welch_t_test([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
        >>> round(t, 4), round(p, 4)
        (-3.6742, 0.0213)
    """
    from scipy import stats

    t, p = stats.ttest_ind(a, b, equal_var=False)
    return float(t), float(p)
