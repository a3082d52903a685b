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
as an SVD on CPUs — except for :func:`numerical_rank`, whose small tolerances need the accuracy of an SVD.
All-zero rows and columns (dead units) are dropped first, which is exact. The Gram route resolves singular
values only down to √(k·eps)·σ₁ (≈ 1.5e-8·√k·σ₁); smaller ones are round-off and are set to 0. If the values
set to 0 could together hold more than 1e-9 of Σσ (a rank-deficient matrix, or a spectrum decaying over many
decades), ``method="auto"`` first bounds them from above, cheaply, if there are at most 16 of them: by Cauchy's
interlacing theorem the singular values of Φ·V, V the Gram matrix's eigenvectors of those smallest eigenvalues (an
n × z product; only those z vectors are computed), bound the z smallest singular values of Φ from above, however
inaccurate the vectors, and their sum is at most √z·‖Φ·V‖_F. Where there are more, or that bound is still more
than 1e-9 of Σσ, it recomputes them with an SVD, whose round-off floor is max(n, d)·eps·σ₁. Either way the result
agrees with an SVD-based computation to about 1e-9 relative, and exactly low-rank matrices still get exact ranks;
the bound spares the SVD (several times the Gram route's time on a 1024 × 256 probe) where features are exactly
rank-deficient, e.g. more always-active units than the input has dimensions.
"""

from __future__ import annotations

import math
from typing import Literal

import scipy.linalg
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

    Args:
        features: a layer's outputs: ``[N, D]``, ``[N, C, H, W]`` or ``[N, T, D]``.
        conv: how outputs of more than two axes become a matrix: ``"pool"`` (average over the extra axes; default),
            ``"positions"`` (every position is a sample) or ``"flatten"``.

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


class NonFiniteFeaturesError(ValueError):
    """The feature matrix holds NaN or infinite values, so no rank measure is defined."""


def _as_float64(features: torch.Tensor) -> torch.Tensor:
    if features.ndim != 2:
        raise ValueError(f"Expected a 2-D samples x units matrix, got shape {tuple(features.shape)}")
    return features.detach().to(torch.float64)


def _largest_magnitude(x: torch.Tensor) -> float:
    """max |x| in one fused pass and one read-back (NaN and ±inf propagate); raises on non-finite input."""
    low, high = torch.aminmax(x)
    largest = float(torch.maximum(-low, high))
    if not math.isfinite(largest):
        raise NonFiniteFeaturesError("Features contain NaN or infinite values; rank measures are undefined")
    return largest


def _times_power_of_two(x: torch.Tensor, exponent: int) -> torch.Tensor:
    """x·2^exponent, exact, in two factors so that neither overflows a Python float (|exponent| up to 2046)."""
    half = exponent // 2
    return x * math.ldexp(1.0, half) * math.ldexp(1.0, exponent - half)


# Entries within [2^-250, 2^250] keep Gram entries and eigenvalues normal in float64 (2^±500 times the sample
# count); beyond that the matrix is rescaled by a power of two, which is exact, so skipping it inside the range
# changes no bit of the result.
_SAFE_EXPONENT = 250

# Gram matrices at least this wide are filled in row blocks of their lower triangle only (what eigvalsh reads):
# about 5/8 of a full product's work.
_BLOCKED_GRAM_MIN = 512
_GRAM_BLOCKS = 4


def _lower_gram(a: torch.Tensor) -> torch.Tensor:
    """aᵀa for a tall ``[m, k]`` matrix; for large k only the lower triangle is computed (the rest is 0)."""
    k = a.shape[1]
    if k < _BLOCKED_GRAM_MIN:
        return a.T @ a
    gram = a.new_zeros(k, k)
    step = -(-k // _GRAM_BLOCKS)
    for start in range(0, k, step):
        stop = min(start + step, k)
        gram[start:stop, :stop] = a[:, start:stop].T @ a[:, :stop]
    return gram


def singular_values(features: torch.Tensor, method: Method = "auto") -> torch.Tensor:
    """Singular values of a samples × units matrix, float64, descending, length min(n, d).

    Args:
        features: ``[n, d]`` matrix (any float dtype; computed in float64).
        method: ``"svd"``; ``"gram"`` (eigenvalues of the smaller Gram matrix, singular values below
            √(k·eps)·σ₁ set to 0); or ``"auto"``: the Gram route unless the values it had to zero could hold
            more than 1e-9 of Σσ, then an SVD (so ``"auto"`` agrees with ``"svd"`` to ~1e-9 relative in every measure).

    Example::

        >>> singular_values(torch.diag(torch.tensor([3.0, 1.0, 2.0])))
        tensor([3., 2., 1.], dtype=torch.float64)
    """
    check_choice("singular_values", "method", method, ("auto", "gram", "svd"))
    x = _as_float64(features)
    size = min(x.shape)
    if x.numel() == 0:
        return x.new_zeros(0)
    largest = _largest_magnitude(x)
    if largest == 0:
        return x.new_zeros(size)
    # No measure depends on scale; a power-of-two rescale (exact) keeps σ² finite for inputs near 1e±300.
    exponent = math.frexp(largest)[1]
    exponent = exponent if abs(exponent) > _SAFE_EXPONENT else 0
    if exponent:
        x = _times_power_of_two(x, -exponent)
    # All-zero rows and columns (dead units, or samples on which every unit is silent) carry no singular value:
    # dropping them is exact, shrinks the decomposition (and may make the other side the smaller one), and keeps
    # the Gram route's round-off floor from touching genuine values.
    rows, columns = x.any(dim=1), x.any(dim=0)
    if not (rows.all() and columns.all()):
        x = x[rows][:, columns]
    if method == "svd":
        values = _svd_values(x, resolve=False)
    else:
        tall = x if x.shape[0] >= x.shape[1] else x.T
        gram = _lower_gram(tall)
        alive = gram.diagonal() > 0  # a column can still vanish here if its squares underflow
        if not alive.all():
            gram, tall = gram[alive][:, alive], tall[:, alive]
        values, zeroed, floor = _gram_singular_values(gram)
        tolerance = 1e-9 * values.sum()
        if (
            method == "auto"
            and zeroed * floor > tolerance
            and (zeroed > _BOUND_MAX_ZEROED or _zeroed_bound(tall, gram, zeroed) > tolerance)
        ):
            # The zeroed values might be genuine and matter: an SVD resolves them, down to its own round-off.
            values = _svd_values(x, resolve=True)
    values = torch.cat([values, values.new_zeros(size - values.numel())])
    return _times_power_of_two(values, exponent) if exponent else values


def _svd_values(x: torch.Tensor, resolve: bool) -> torch.Tensor:
    """σ by SVD of ``x`` (``resolve``: values below the SVD's round-off set to 0)."""
    values = torch.linalg.svdvals(x)
    if not resolve:
        return values
    resolution = max(x.shape) * torch.finfo(x.dtype).eps * values[0]
    return torch.where(values > resolution, values, torch.zeros_like(values))


# The interlacing bound is tried for at most this many zeroed values: MRRR finds a few eigenvectors in ~1 ms at
# k = 256, but a cluster of 63 took as long as the SVD itself.
_BOUND_MAX_ZEROED = 16


def _zeroed_bound(a: torch.Tensor, gram: torch.Tensor, zeroed: int) -> float:
    """An upper bound on the sum of the ``zeroed`` smallest singular values of ``a``.

    ``a`` is ``[m, k]``, ``gram`` = aᵀa (its lower triangle is read). The bound is √z·‖a·V‖_F ≥ Σ σ(a·V), V the
    eigenvectors of the Gram matrix's z = ``zeroed`` smallest eigenvalues. For any k × z matrix V with orthonormal
    columns, the j-th smallest singular value of a·V is at least the j-th smallest of a (Cauchy interlacing, on the
    compression VᵀaᵀaV), so the bound holds however accurate V is; computed V are orthonormal to round-off. Only
    those z eigenvectors are computed (LAPACK's MRRR, ``evr``).
    """
    _, vectors = scipy.linalg.eigh(
        gram.cpu().numpy(), lower=True, subset_by_index=[0, zeroed - 1], driver="evr", check_finite=False
    )
    return math.sqrt(zeroed) * float(torch.linalg.matrix_norm(a @ torch.from_numpy(vectors).to(a.device)))


def _gram_singular_values(gram: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """σ from a Gram matrix's eigenvalues with round-off set to 0; also how many were zeroed and below what floor.

    Eigenvalues of a k×k Gram matrix carry errors of about k·eps·λ₁, i.e. σ errors of √(k·eps)·σ₁; values below that
    are noise (a rank-1 matrix would otherwise get an effective rank of 1 + 2e-7). Only the lower triangle is read.
    """
    values = torch.linalg.eigvalsh(gram).clamp(min=0).sqrt().flip(0)
    if not values.numel():
        return values, 0, 0.0
    floor = float(values[0]) * math.sqrt(gram.shape[0] * torch.finfo(gram.dtype).eps)
    keep = values > floor
    return torch.where(keep, values, torch.zeros_like(values)), int((~keep).sum()), floor


def _resolve(features: torch.Tensor | None, sigma: torch.Tensor | None, method: Method) -> torch.Tensor:
    if (features is None) == (sigma is None):
        raise ValueError("Pass exactly one of `features` and `sigma`")
    if sigma is not None:
        sigma = sigma.detach().to(torch.float64).flatten()
        if not torch.isfinite(sigma).all() or (sigma < 0).any():
            raise ValueError("`sigma` must hold finite, non-negative singular values")
        return sigma.sort(descending=True).values
    return singular_values(features, method)


def _normalised(s: torch.Tensor) -> torch.Tensor | None:
    """σ / σ₁ (None when all zero): every ratio measure is computed on it, so σ² can neither over- nor underflow."""
    if s.numel() == 0 or s[0] == 0:
        return None
    return s / s[0]


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
    s = _normalised(_resolve(features, sigma, method))
    if s is None:
        return _zero()
    p = s / s.sum()
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

    Args:
        features: ``[n, d]`` samples × units matrix (:func:`feature_matrix` makes one from other shapes); pass it or
            ``sigma``.
        delta: the share of Σσ that may be left out (dimensionless; default 0.01, Kumar et al. 2021 and Dohare et al.
            2024).
        sigma: precomputed singular values (e.g. from :func:`singular_values`) instead of ``features``.
        method: how the singular values are computed: ``"auto"`` (default), ``"gram"`` or ``"svd"``; see
            :func:`singular_values`.

    Example::

        >>> srank(torch.diag(torch.tensor([10.0, 1.0, 0.05])), delta=0.01)
        tensor(2., dtype=torch.float64)
    """
    check_fraction("srank", "delta", delta, low_open=True)
    return _cumulative_rank(_normalised(_resolve(features, sigma, method)), 1 - delta)


def approximate_rank(
    features: torch.Tensor | None = None,
    *,
    threshold: float = 0.99,
    sigma: torch.Tensor | None = None,
    method: Method = "auto",
) -> torch.Tensor:
    """The fewest singular values holding a ``threshold`` share of the energy Σσ² (Dohare's ``approximate_rank``).

    approximate_rank = min{k : Σ_{i≤k} σ_i² / Σσ² ≥ threshold}. 0 for an all-zero matrix.

    Args:
        features: ``[n, d]`` samples × units matrix (:func:`feature_matrix` makes one from other shapes); pass it or
            ``sigma``.
        threshold: the share of the energy Σσ² to keep (dimensionless; default 0.99, Dohare et al. 2024).
        sigma: precomputed singular values (e.g. from :func:`singular_values`) instead of ``features``.
        method: how the singular values are computed: ``"auto"`` (default), ``"gram"`` or ``"svd"``; see
            :func:`singular_values`.

    Example::

        >>> approximate_rank(torch.diag(torch.tensor([10.0, 1.0, 0.05])), threshold=0.99)
        tensor(1., dtype=torch.float64)
    """
    check_fraction("approximate_rank", "threshold", threshold, low_open=True, high_open=False)
    s = _normalised(_resolve(features, sigma, method))
    return _cumulative_rank(None if s is None else s**2, threshold)


def _cumulative_rank(values: torch.Tensor | None, share: float) -> torch.Tensor:
    if values is None:
        return _zero()
    total = values.sum()
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
    (so a float32 matrix is judged at float32 precision even though σ is computed in float64), with two
    exceptions: integer and bool matrices are exact, so they use float64's eps; float16/bfloat16 use float32's,
    because ``max(n, d)·eps`` reaches 1 at a few hundred units in half precision and would call every matrix
    rank 0. Common
    alternatives: ``rtol=0, atol=0`` counts non-zero σ (Dohare's ``rank``); Lyle et al.'s feature rank counts
    σ(Φ/√n) > 0.01, i.e. ``atol=0.01·√n``. Singular values come from an SVD. 0 for an all-zero matrix.

    Args:
        features: ``[n, d]`` samples × units matrix (:func:`feature_matrix` makes one from other shapes); pass it or
            ``sigma``.
        atol: absolute tolerance, in the units of σ (default 0.0).
        rtol: tolerance relative to σ₁ (default ``None``: ``max(n, d)·eps`` of the input dtype, as above).
        sigma: precomputed singular values (e.g. from :func:`singular_values`) instead of ``features``.

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
        rtol = max(features.shape) * _rank_eps(features.dtype)
    s = _resolve(features, sigma, "svd")
    if s.numel() == 0 or s.max() == 0:
        return _zero()
    return (s > max(atol, rtol * float(s.max()))).sum().to(torch.float64)


def _rank_eps(dtype: torch.dtype) -> float:
    if not dtype.is_floating_point or dtype.is_complex:
        return torch.finfo(torch.float64).eps
    if torch.finfo(dtype).bits < 32:
        return torch.finfo(torch.float32).eps
    return torch.finfo(dtype).eps


def stable_rank(
    features: torch.Tensor | None = None, *, sigma: torch.Tensor | None = None, method: Method = "auto"
) -> torch.Tensor:
    """Rudelson–Vershynin stable rank ‖Φ‖_F² / ‖Φ‖₂² = Σσ² / σ₁² (continuous, between 1 and rank; 0 for all-zero).

    Args:
        features: ``[n, d]`` samples × units matrix (:func:`feature_matrix` makes one from other shapes); pass it or
            ``sigma``.
        sigma: precomputed singular values (e.g. from :func:`singular_values`) instead of ``features``.
        method: how the singular values are computed: ``"auto"`` (default), ``"gram"`` or ``"svd"``; see
            :func:`singular_values`.

    Example::

        >>> stable_rank(torch.diag(torch.tensor([2.0, 1.0])))
        tensor(1.2500, dtype=torch.float64)
    """
    s = _normalised(_resolve(features, sigma, method))
    return _zero() if s is None else (s**2).sum()


def rank_measures(
    features: torch.Tensor, *, delta: float = 0.01, threshold: float = 0.99, method: Method = "auto"
) -> dict[str, torch.Tensor]:
    """All spectrum-based measures from one decomposition (``numerical_rank`` excluded: it needs an SVD).

    Args:
        features: ``[n, d]`` samples × units matrix.
        delta: srank's δ, as in :func:`srank` (default 0.01).
        threshold: approximate rank's energy share, as in :func:`approximate_rank` (default 0.99).
        method: how the singular values are computed: ``"auto"`` (default), ``"gram"`` or ``"svd"``; see
            :func:`singular_values`.

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
    Subclasses turn the spectrum into one measure. Unlike the functional forms, the twin keeps the raw
    float64 Gram matrix (a running rescale could not be summed across processes), so entries must stay below
    about 1e150 in magnitude (and above 1e-150 to be resolved); it also always uses the Gram route's
    √(k·eps)·σ₁ round-off floor.

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
        if x.numel():
            _largest_magnitude(x)  # refuses NaN and infinities
        if x.shape[1] != self.num_units:
            raise ValueError(f"{type(self).__name__}(num_units={self.num_units}) got {x.shape[1]} units")
        self.gram += x.T @ x

    def spectrum(self) -> torch.Tensor:
        return _gram_singular_values(self.gram)[0]

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
    """Accumulating twin of :func:`srank`.

    Args:
        delta: the share of Σσ that may be left out (dimensionless; default 0.01, Kumar et al. 2021 and Dohare et al.
            2024).
    """

    def __init__(self, num_units: int, delta: float = 0.01, **kwargs) -> None:
        super().__init__(num_units, **kwargs)
        self.delta = check_fraction("SRank", "delta", delta, low_open=True)

    def compute(self) -> torch.Tensor:
        return srank(sigma=self.spectrum(), delta=self.delta)


class ApproximateRank(FeatureSpectrum):
    """Accumulating twin of :func:`approximate_rank`.

    Args:
        threshold: the share of the energy Σσ² to keep (dimensionless; default 0.99, Dohare et al. 2024).
    """

    def __init__(self, num_units: int, threshold: float = 0.99, **kwargs) -> None:
        super().__init__(num_units, **kwargs)
        self.threshold = check_fraction("ApproximateRank", "threshold", threshold, low_open=True, high_open=False)

    def compute(self) -> torch.Tensor:
        return approximate_rank(sigma=self.spectrum(), threshold=self.threshold)


class StableRank(FeatureSpectrum):
    """Accumulating twin of :func:`stable_rank`."""

    def compute(self) -> torch.Tensor:
        return stable_rank(sigma=self.spectrum())
