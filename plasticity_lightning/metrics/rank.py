"""Rank measures of a feature matrix Φ (samples × units).

Five measures that the literature mixes up under similar names, each named for what it computes
(σ₁ ≥ σ₂ ≥ … are the singular values of Φ):

=========================  ==========================================  ===========================================
function                   definition                                  used by
=========================  ==========================================  ===========================================
:func:`effective_rank`     exp(H(p)), p_k = σ_k / Σσ (Roy & Vetterli)   Dohare et al. (all layers), Plasticine
:func:`srank`              min k: Σ_{i≤k} σ_i / Σσ ≥ 1 − δ (Kumar)     what Dohare's CIFAR/RL code and Plasticine
                                                                       call "stable rank"
:func:`approximate_rank`   min k: Σ_{i≤k} σ_i² / Σσ² ≥ threshold       Dohare's permuted-MNIST ``approximate_rank``
:func:`numerical_rank`     #{σ_i > max(atol, rtol·σ₁)}                 matrix rank with an explicit tolerance
:func:`stable_rank`        ‖Φ‖_F² / ‖Φ‖₂² = Σσ² / σ₁²                  Rudelson–Vershynin (continuous, ≤ rank)
=========================  ==========================================  ===========================================

Conventions (tested):

* Everything is computed in float64, whatever the input dtype.
* An all-zero matrix (Σσ = 0) has every rank equal to **0**.
* A rank-1 matrix has effective rank 1, srank 1, approximate rank 1, stable rank 1 — for any scale,
  including 1e-30 and 1e30 (the matrix is rescaled by its largest absolute entry first, which changes
  no measure but keeps σ² from under- or overflowing).
* n < d is fine: only the min(n, d) non-trivial singular values exist.
* Non-finite inputs raise ``ValueError`` rather than return NaN.

Singular values come from the eigenvalues of the smaller Gram matrix (ΦᵀΦ or ΦΦᵀ, k×k) — about twice as fast
as an SVD on CPUs — except for :func:`numerical_rank`, whose small tolerances need the accuracy of an SVD. The
Gram route resolves singular values only down to √(k·eps)·σ₁ (≈ 1.5e-8·√k·σ₁); smaller ones are round-off and are
set to 0, so exactly low-rank matrices get exact ranks. Genuine singular values that small would add at most
about 2e-6 each to an effective rank.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torchmetrics import Metric

from plasticity_lightning.core.errors import check_choice, check_fraction, check_positive_int

Method = Literal["auto", "gram", "svd"]


def feature_matrix(features: torch.Tensor, conv: Literal["pool", "positions", "flatten"] = "pool") -> torch.Tensor:
    """A 2-D samples × units matrix from layer outputs.

    ``[N, D]`` passes through. Higher-rank outputs (``[N, C, H, W]`` convolutions, ``[N, T, D]`` sequences)
    keep their first axis as samples and their second as units (conv channels) with ``conv="pool"``
    (average over the remaining axes), treat every position as a sample with ``conv="positions"``
    (``[N·H·W, C]``), or flatten everything after the sample axis with ``conv="flatten"``.

    Example::

        >>> feature_matrix(torch.ones(2, 3, 4, 4)).shape, feature_matrix(torch.ones(2, 3, 4, 4), "positions").shape
        (torch.Size([2, 3]), torch.Size([32, 3]))
    """
    check_choice("feature_matrix", "conv", conv, ("pool", "positions", "flatten"))
    if features.ndim == 2:
        return features
    if features.ndim < 2:
        raise ValueError(f"Expected features with a samples axis and a units axis, got shape {tuple(features.shape)}")
    if conv == "flatten":
        return features.flatten(1)
    if conv == "pool":
        return features.flatten(2).mean(dim=2)
    return features.flatten(2).transpose(1, 2).reshape(-1, features.shape[1])


def _as_float64(features: torch.Tensor) -> torch.Tensor:
    if features.ndim != 2:
        raise ValueError(f"Expected a 2-D samples x units matrix, got shape {tuple(features.shape)}")
    x = features.detach().to(torch.float64)
    if not torch.isfinite(x).all():
        raise ValueError("Features contain NaN or infinite values; rank measures are undefined")
    return x


def singular_values(features: torch.Tensor, method: Method = "auto") -> torch.Tensor:
    """Singular values of a samples × units matrix, float64, descending, length min(n, d).

    Args:
        features: ``[n, d]`` matrix (any float dtype; computed in float64).
        method: ``"gram"`` (eigenvalues of the smaller Gram matrix), ``"svd"``, or ``"auto"`` (= ``"gram"``).

    Example::

        >>> singular_values(torch.diag(torch.tensor([3.0, 1.0, 2.0])))
        tensor([3., 2., 1.], dtype=torch.float64)
    """
    check_choice("singular_values", "method", method, ("auto", "gram", "svd"))
    x = _as_float64(features)
    if x.numel() == 0:
        return x.new_zeros(0)
    scale = x.abs().max()
    if scale == 0:
        return x.new_zeros(min(x.shape))
    x = x / scale  # no measure depends on scale; this keeps σ² finite for 1e±30 inputs
    if method == "svd":
        values = torch.linalg.svdvals(x)
    else:
        gram = x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T
        values = _gram_singular_values(gram)
    return values * scale


def _gram_singular_values(gram: torch.Tensor) -> torch.Tensor:
    """σ from a Gram matrix's eigenvalues, with round-off below the route's resolution set to exactly 0.

    Eigenvalues of a k×k Gram matrix carry errors of about k·eps·λ₁, i.e. σ errors of √(k·eps)·σ₁; values below that
    are noise (a rank-1 matrix would otherwise get an effective rank of 1 + 2e-7).
    """
    values = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().flip(0)
    if values.numel():
        floor = values[0] * math.sqrt(gram.shape[0] * torch.finfo(gram.dtype).eps)
        values = torch.where(values > floor, values, torch.zeros_like(values))
    return values


def _resolve(features: torch.Tensor | None, sigma: torch.Tensor | None, method: Method) -> torch.Tensor:
    if (features is None) == (sigma is None):
        raise ValueError("Pass exactly one of `features` and `sigma`")
    return singular_values(features, method) if sigma is None else sigma.detach().to(torch.float64)


def _zero() -> torch.Tensor:
    return torch.tensor(0.0, dtype=torch.float64)


def effective_rank(
    features: torch.Tensor | None = None, *, sigma: torch.Tensor | None = None, method: Method = "auto"
) -> torch.Tensor:
    """Roy & Vetterli's effective rank: exp of the entropy of the normalised singular values.

    erank = exp(−Σ_k p_k ln p_k), p_k = σ_k / Σσ, with 0·ln 0 = 0. Range [1, min(n, d)]; 0 for an all-zero matrix.

    Args:
        features: ``[n, d]`` samples × units matrix, or
        sigma: precomputed singular values (e.g. from :func:`singular_values`).
        method: see :func:`singular_values`.

    Example::

        >>> effective_rank(torch.eye(4))
        tensor(4., dtype=torch.float64)
    """
    s = _resolve(features, sigma, method)
    total = s.sum()
    if total <= 0:
        return _zero()
    p = s / total
    return torch.exp(-torch.special.xlogy(p, p).sum())


def srank(
    features: torch.Tensor | None = None,
    *,
    delta: float = 0.01,
    sigma: torch.Tensor | None = None,
    method: Method = "auto",
) -> torch.Tensor:
    """Kumar et al.'s srank_δ: the fewest singular values holding a 1 − δ share of Σσ.

    srank = min{k : Σ_{i≤k} σ_i / Σσ ≥ 1 − δ}. This is the "stable rank" of Dohare et al.'s CIFAR/RL code and of
    Plasticine (``np.sum(cumsum(σ)/Σσ < 0.99) + 1``), not :func:`stable_rank`. 0 for an all-zero matrix.

    Example::

        >>> srank(torch.diag(torch.tensor([10.0, 1.0, 0.05])), delta=0.01)
        tensor(2., dtype=torch.float64)
    """
    check_fraction("srank", "delta", delta, low_open=True)
    return _cumulative_rank(_resolve(features, sigma, method), 1 - delta)


def approximate_rank(
    features: torch.Tensor | None = None,
    *,
    threshold: float = 0.99,
    sigma: torch.Tensor | None = None,
    method: Method = "auto",
) -> torch.Tensor:
    """The fewest singular values holding a ``threshold`` share of the energy Σσ² (Dohare's ``approximate_rank``).

    approximate_rank = min{k : Σ_{i≤k} σ_i² / Σσ² ≥ threshold}. 0 for an all-zero matrix.

    Example::

        >>> approximate_rank(torch.diag(torch.tensor([10.0, 1.0, 0.05])), threshold=0.99)
        tensor(1., dtype=torch.float64)
    """
    check_fraction("approximate_rank", "threshold", threshold, low_open=True, high_open=False)
    return _cumulative_rank(_resolve(features, sigma, method) ** 2, threshold)


def _cumulative_rank(values: torch.Tensor, share: float) -> torch.Tensor:
    total = values.sum()
    if total <= 0:
        return _zero()
    fractions = values.cumsum(0) / total
    # Round-off can leave the last cumulative share a hair below 1: never count past the last value.
    k = int((fractions < share - 1e-12).sum()) + 1
    return torch.tensor(float(min(k, len(values))), dtype=torch.float64)


def numerical_rank(
    features: torch.Tensor | None = None,
    *,
    atol: float = 0.0,
    rtol: float | None = None,
    sigma: torch.Tensor | None = None,
) -> torch.Tensor:
    """Number of singular values above a tolerance: #{σ_i > max(atol, rtol·σ₁)}.

    The default ``rtol`` is NumPy's and torch's ``matrix_rank`` convention, ``max(n, d)·eps`` of the input dtype
    (so a float32 matrix is judged at float32 precision even though σ is computed in float64). Common
    alternatives: ``rtol=0, atol=0`` counts non-zero σ (Dohare's ``rank``); Lyle et al.'s feature rank counts
    σ(Φ/√n) > 0.01, i.e. ``atol=0.01·√n``. Singular values come from an SVD. 0 for an all-zero matrix.

    Example::

        >>> numerical_rank(torch.diag(torch.tensor([1.0, 1e-3, 1e-9])))
        tensor(2., dtype=torch.float64)
        >>> numerical_rank(torch.diag(torch.tensor([1.0, 1e-3, 1e-9])), rtol=1e-2)
        tensor(1., dtype=torch.float64)
    """
    if features is None and sigma is None:
        raise ValueError("Pass exactly one of `features` and `sigma`")
    if rtol is None:
        if features is None:
            raise ValueError("numerical_rank needs `rtol` when called with precomputed singular values")
        eps = torch.finfo(features.dtype if features.is_floating_point() else torch.float32).eps
        rtol = max(features.shape) * eps
    s = _resolve(features, sigma, "svd")
    if s.numel() == 0 or s.max() == 0:
        return _zero()
    return (s > max(atol, rtol * float(s.max()))).sum().to(torch.float64)


def stable_rank(
    features: torch.Tensor | None = None, *, sigma: torch.Tensor | None = None, method: Method = "auto"
) -> torch.Tensor:
    """Rudelson–Vershynin stable rank ‖Φ‖_F² / ‖Φ‖₂² = Σσ² / σ₁² (continuous, between 1 and rank; 0 for all-zero).

    Example::

        >>> stable_rank(torch.diag(torch.tensor([2.0, 1.0])))
        tensor(1.2500, dtype=torch.float64)
    """
    s = _resolve(features, sigma, method)
    if s.numel() == 0 or s.max() == 0:
        return _zero()
    return (s**2).sum() / s.max() ** 2


def rank_measures(
    features: torch.Tensor, *, delta: float = 0.01, threshold: float = 0.99, method: Method = "auto"
) -> dict[str, torch.Tensor]:
    """All spectrum-based measures from one decomposition (``numerical_rank`` excluded: it needs an SVD).

    Example::

        >>> sorted(rank_measures(torch.eye(3)))
        ['approximate_rank', 'effective_rank', 'srank', 'stable_rank']
    """
    sigma = singular_values(features, method)
    return {
        "effective_rank": effective_rank(sigma=sigma),
        "srank": srank(sigma=sigma, delta=delta),
        "approximate_rank": approximate_rank(sigma=sigma, threshold=threshold),
        "stable_rank": stable_rank(sigma=sigma),
    }


class FeatureSpectrum(Metric):
    """Accumulates the Gram matrix ΦᵀΦ of feature batches (summed across processes); ``compute()`` → σ.

    The singular values of the stacked batches are the square roots of the eigenvalues of the summed Gram
    matrix, so accumulating over batches or DDP processes gives exactly the spectrum of the full matrix.
    Subclasses turn the spectrum into one measure.

    Args:
        num_units: feature dimension d.
    """

    is_differentiable = False
    full_state_update = False
    gram: torch.Tensor

    def __init__(self, num_units: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_units = check_positive_int(type(self).__name__, "num_units", num_units)
        self.add_state("gram", default=torch.zeros(num_units, num_units, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, features: torch.Tensor) -> None:
        x = _as_float64(features)
        if x.shape[1] != self.num_units:
            raise ValueError(f"{type(self).__name__}(num_units={self.num_units}) got {x.shape[1]} units")
        self.gram += x.T @ x

    def spectrum(self) -> torch.Tensor:
        return _gram_singular_values(self.gram)

    def compute(self) -> torch.Tensor:
        return self.spectrum()


class EffectiveRank(FeatureSpectrum):
    """Accumulating twin of :func:`effective_rank`.

    Example::

        >>> metric = EffectiveRank(num_units=3)
        >>> metric.update(torch.eye(3)[:2])
        >>> metric.update(torch.eye(3)[2:])
        >>> metric.compute()
        tensor(3.0000, dtype=torch.float64)
    """

    def compute(self) -> torch.Tensor:
        return effective_rank(sigma=self.spectrum())


class SRank(FeatureSpectrum):
    """Accumulating twin of :func:`srank`."""

    def __init__(self, num_units: int, delta: float = 0.01, **kwargs) -> None:
        super().__init__(num_units, **kwargs)
        self.delta = check_fraction("SRank", "delta", delta, low_open=True)

    def compute(self) -> torch.Tensor:
        return srank(sigma=self.spectrum(), delta=self.delta)


class ApproximateRank(FeatureSpectrum):
    """Accumulating twin of :func:`approximate_rank`."""

    def __init__(self, num_units: int, threshold: float = 0.99, **kwargs) -> None:
        super().__init__(num_units, **kwargs)
        self.threshold = check_fraction("ApproximateRank", "threshold", threshold, low_open=True, high_open=False)

    def compute(self) -> torch.Tensor:
        return approximate_rank(sigma=self.spectrum(), threshold=self.threshold)


class StableRank(FeatureSpectrum):
    """Accumulating twin of :func:`stable_rank`."""

    def compute(self) -> torch.Tensor:
        return stable_rank(sigma=self.spectrum())
