"""Rank measures against independent NumPy/SciPy computations, identities and degenerate inputs."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from plasticity_lightning.metrics import (
    ApproximateRank,
    EffectiveRank,
    SRank,
    StableRank,
    approximate_rank,
    effective_rank,
    feature_matrix,
    numerical_rank,
    rank_measures,
    singular_values,
    srank,
    stable_rank,
)


# ---- independent reference implementations (NumPy, from the definitions) -------------------------------------
def np_erank(s):
    s = s[s > 0]
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def np_cumulative_rank(values, share):
    cumulative = np.cumsum(values) / values.sum()
    return int(np.argmax(cumulative >= share - 1e-12) + 1)


def np_srank(s, delta=0.01):
    return np_cumulative_rank(np.sort(s)[::-1], 1 - delta)


def np_approximate_rank(s, threshold=0.99):
    return np_cumulative_rank(np.sort(s)[::-1] ** 2, threshold)


def np_stable_rank(a):
    return float(np.linalg.norm(a, "fro") ** 2 / np.linalg.norm(a, 2) ** 2)


def with_spectrum(n, d, spectrum, seed=0):
    """An n x d matrix whose singular values are exactly ``spectrum``."""
    rng = np.random.default_rng(seed)
    k = len(spectrum)
    u, _ = np.linalg.qr(rng.normal(size=(n, k)))
    v, _ = np.linalg.qr(rng.normal(size=(d, k)))
    return (u * np.asarray(spectrum)) @ v.T


SPECTRA = [
    np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.1]),
    np.geomspace(10, 1e-3, 20),
    np.concatenate([np.ones(8), np.full(8, 1e-2)]),
    np.linspace(1, 50, 30),
]


@pytest.mark.parametrize("spectrum", SPECTRA, ids=["few", "geometric", "two-level", "linear"])
@pytest.mark.parametrize(("n", "d"), [(200, 40), (30, 120)])
def test_measures_match_the_known_spectrum(spectrum, n, d):
    k = min(len(spectrum), n, d)
    spectrum = spectrum[:k]
    x = torch.tensor(with_spectrum(n, d, spectrum), dtype=torch.float32)
    assert effective_rank(x).item() == pytest.approx(np_erank(spectrum), rel=1e-4)
    assert srank(x).item() == np_srank(spectrum)
    assert approximate_rank(x).item() == np_approximate_rank(spectrum)
    assert stable_rank(x).item() == pytest.approx((spectrum**2).sum() / spectrum.max() ** 2, rel=1e-4)
    assert numerical_rank(x).item() == np.linalg.matrix_rank(x.numpy())


@pytest.mark.parametrize("seed", range(4))
def test_random_matrices_against_scipy(seed):
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(150, 60)) @ np.diag(rng.gamma(0.5, size=60))
    s = scipy.linalg.svdvals(a)
    x = torch.tensor(a)
    np.testing.assert_allclose(singular_values(x).numpy(), s, rtol=1e-8, atol=1e-10 * s.max())
    np.testing.assert_allclose(singular_values(x, method="svd").numpy(), s, rtol=1e-10)
    assert effective_rank(x).item() == pytest.approx(np_erank(s), rel=1e-10)
    assert srank(x, delta=0.05).item() == np_srank(s, 0.05)
    assert approximate_rank(x, threshold=0.9).item() == np_approximate_rank(s, 0.9)
    assert stable_rank(x).item() == pytest.approx(np_stable_rank(a), rel=1e-10)
    assert numerical_rank(x).item() == np.linalg.matrix_rank(a)


def test_identities():
    for n in (1, 5, 64):
        assert effective_rank(torch.eye(n)).item() == pytest.approx(n)
        assert srank(torch.eye(n)).item() == n - (n >= 100)  # 1 - δ of an equal spectrum needs all of it
        assert stable_rank(torch.eye(n)).item() == pytest.approx(n)
    rank_one = torch.outer(torch.randn(50, dtype=torch.float64), torch.randn(20, dtype=torch.float64))
    for measure in (effective_rank, srank, approximate_rank, stable_rank, numerical_rank):
        assert measure(rank_one).item() == pytest.approx(1.0, abs=1e-12)
    # in float32 the product is rank-1 only up to round-off (σ₂ ≈ 1e-7·σ₁)
    assert effective_rank(rank_one.float()).item() == pytest.approx(1.0, abs=1e-5)
    x = torch.randn(80, 30) @ torch.diag(torch.rand(30) * 3) @ torch.randn(30, 30)
    rank = numerical_rank(x).item()
    assert srank(x).item() <= rank and approximate_rank(x).item() <= rank
    assert 1 <= stable_rank(x).item() <= rank and 1 <= effective_rank(x).item() <= rank


def test_invariance_to_row_order_and_scale():
    x = torch.randn(100, 25, dtype=torch.float64) * torch.logspace(0, -3, 25, dtype=torch.float64)
    shuffled = x[torch.randperm(100)]
    for measure in (effective_rank, srank, approximate_rank, stable_rank):
        reference = measure(x).item()
        assert measure(shuffled).item() == pytest.approx(reference, rel=1e-9)
        assert measure(x * 1e4).item() == pytest.approx(reference, rel=1e-9)
        assert measure(x * 1e-6).item() == pytest.approx(reference, rel=1e-9)


def test_degenerate_inputs():
    zeros = torch.zeros(10, 4)
    for measure in (effective_rank, srank, approximate_rank, stable_rank, numerical_rank):
        assert measure(zeros).item() == 0.0
    for scale in (1e-30, 1e30):
        rank_one = torch.outer(torch.ones(8, dtype=torch.float64), torch.arange(1.0, 5.0, dtype=torch.float64)) * scale
        for measure in (effective_rank, srank, approximate_rank, stable_rank):
            value = measure(rank_one).item()
            assert np.isfinite(value) and value == pytest.approx(1.0)
    wide = torch.randn(3, 50)
    assert singular_values(wide).shape == (3,)
    assert effective_rank(wide).item() <= 3
    with pytest.raises(ValueError, match="NaN or infinite"):
        effective_rank(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="2-D samples x units"):
        effective_rank(torch.ones(2, 3, 4))


def test_numerical_rank_tolerance_conventions():
    x = torch.diag(torch.tensor([1.0, 1e-3, 1e-9], dtype=torch.float64))
    assert numerical_rank(x).item() == 3  # float64 eps * 3 is far below 1e-9
    assert numerical_rank(x.float()).item() == 2  # judged at float32 precision
    assert numerical_rank(x, rtol=0.0).item() == 3  # Dohare's count of non-zero values
    assert numerical_rank(x, rtol=0.0, atol=0.01).item() == 1


def test_gram_and_svd_routes_agree_on_the_measures():
    x = torch.randn(300, 80) * torch.logspace(0, -2, 80)
    gram = rank_measures(x, method="gram")
    svd = rank_measures(x, method="svd")
    for name in gram:
        assert gram[name].item() == pytest.approx(svd[name].item(), rel=1e-9), name


def test_feature_matrix_modes():
    h = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)
    assert torch.equal(feature_matrix(h), h.mean(dim=(2, 3)))
    positions = feature_matrix(h, "positions")
    assert positions.shape == (8, 3) and torch.equal(positions[0], h[0, :, 0, 0])
    assert feature_matrix(h, "flatten").shape == (2, 12)


@pytest.mark.parametrize(
    ("metric", "function"),
    [(EffectiveRank, effective_rank), (SRank, srank), (ApproximateRank, approximate_rank), (StableRank, stable_rank)],
)
def test_metric_twins_accumulate_the_full_matrix(metric, function):
    x = torch.randn(120, 16) * torch.logspace(0, -2, 16)
    m = metric(num_units=16)
    for chunk in x.split(25):
        m.update(chunk)
    assert m.compute().item() == pytest.approx(function(x).item(), rel=1e-9)


def _numpy_effective_rank(x: np.ndarray) -> float:
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("kind", ["geometric", "rank_deficient", "dead_units"])
def test_auto_route_agrees_with_an_svd_where_the_gram_floor_could_matter(kind):
    rng = np.random.default_rng(3)
    if kind == "geometric":  # a spectrum over twelve decades: many genuine values below the Gram floor
        u, _ = np.linalg.qr(rng.standard_normal((200, 120)))
        v, _ = np.linalg.qr(rng.standard_normal((120, 120)))
        x = u @ np.diag(np.logspace(0, -12, 120)) @ v.T
    elif kind == "rank_deficient":
        x = rng.standard_normal((150, 10)) @ rng.standard_normal((10, 90))
    else:
        x = rng.standard_normal((150, 90))
        x[:, ::3] = 0.0
    reference = _numpy_effective_rank(x)
    assert effective_rank(torch.from_numpy(x)).item() == pytest.approx(reference, rel=1e-9)
    if kind == "geometric":  # the pure Gram route drops the tail: this is what "auto" protects against
        assert abs(effective_rank(torch.from_numpy(x), method="gram").item() - reference) > 1e-9 * reference
    if kind == "dead_units":
        assert singular_values(torch.from_numpy(x)).shape == (90,)


def test_ratio_measures_survive_extreme_scales_of_precomputed_spectra():
    sigma = torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    for scale in (1e-200, 1e200):
        for measure in (effective_rank, srank, approximate_rank, stable_rank):
            assert measure(sigma=sigma * scale).item() == pytest.approx(measure(sigma=sigma).item(), rel=1e-12)
    # order does not matter, and nonsense spectra are refused
    assert stable_rank(sigma=sigma.flip(0)).item() == pytest.approx((sigma**2).sum().item() / 9.0)
    with pytest.raises(ValueError, match="non-negative"):
        effective_rank(sigma=torch.tensor([1.0, -1.0]))


def test_numerical_rank_default_tolerance_for_half_and_integer_inputs():
    eye = torch.eye(512)
    assert numerical_rank(eye.bfloat16()).item() == 512  # 512·eps(bf16) = 4 would call it rank 0
    assert numerical_rank(eye.half()).item() == 512
    assert numerical_rank(torch.diag(torch.tensor([1, 0, 3]))).item() == 2
    assert numerical_rank(torch.eye(3, dtype=torch.bool)).item() == 3


def test_wide_matrices_take_the_blocked_gram_route_and_match_scipy():
    # 520 units: wide enough for the lower-triangle blocked Gram product (only what eigvalsh reads is filled)
    rng = np.random.default_rng(7)
    a = rng.normal(size=(700, 520)) * np.geomspace(1, 1e-3, 520)
    a[:, 5] = 0.0  # a dead unit is dropped from the Gram matrix
    s = scipy.linalg.svdvals(a)
    np.testing.assert_allclose(singular_values(torch.from_numpy(a)).numpy(), s, rtol=1e-8, atol=1e-10 * s.max())
    assert effective_rank(torch.from_numpy(a)).item() == pytest.approx(np_erank(s), rel=1e-10)
    wide = torch.from_numpy(a.T.copy())  # n < d: the Gram matrix of the rows
    np.testing.assert_allclose(singular_values(wide).numpy(), s, rtol=1e-8, atol=1e-10 * s.max())


@pytest.mark.parametrize("scale", [1e-300, 1e-200, 1e-80, 1e80, 1e200, 2.0**1020])
def test_extreme_scales_are_rescaled_exactly(scale):
    x = torch.randn(60, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    reference = singular_values(x)
    np.testing.assert_allclose((singular_values(x * scale) / scale).numpy(), reference.numpy(), rtol=1e-12)
    assert effective_rank(x * scale).item() == pytest.approx(effective_rank(x).item(), rel=1e-12)


def test_entries_at_the_top_of_the_float64_range():
    x = torch.diag(torch.tensor([1e308, 5e307], dtype=torch.float64))  # max |x| >= 2^1023: exponent 1024
    np.testing.assert_allclose(singular_values(x).numpy(), [1e308, 5e307], rtol=1e-15)
    assert effective_rank(x).item() == pytest.approx(np_erank(np.array([2.0, 1.0])), rel=1e-12)


@pytest.mark.parametrize(("n", "d", "dead_rows", "dead_columns"), [(300, 500, 0, 420), (500, 200, 380, 0)])
def test_dead_rows_and_columns_are_dropped_before_the_smaller_side_is_chosen(
    n, d, dead_rows, dead_columns, monkeypatch
):
    # loss of plasticity in one matrix: after dropping the silent units (or samples) the other side is smaller,
    # so the Gram route stays exact without an SVD fallback
    rng = np.random.default_rng(2)
    a = rng.normal(size=(n, d))
    a[:dead_rows] = 0.0
    a[:, :dead_columns] = 0.0
    s = scipy.linalg.svdvals(a)
    x = torch.from_numpy(a)
    np.testing.assert_allclose(singular_values(x).numpy(), s, rtol=1e-8, atol=1e-10 * s.max())
    assert singular_values(x).shape == (min(n, d),)
    # the Gram matrix of the trimmed matrix has full rank: "auto" needs no SVD fallback
    import plasticity_lightning.metrics.rank as rank_module

    def no_svd(*args, **kwargs):
        raise AssertionError("fell back to an SVD")

    monkeypatch.setattr(rank_module, "_svd_values", no_svd)
    np.testing.assert_allclose(singular_values(x).numpy(), s, rtol=1e-8, atol=1e-10 * s.max())


def test_metric_twins_accept_an_empty_batch():
    metric = EffectiveRank(num_units=3)
    metric.update(torch.zeros(0, 3))
    metric.update(torch.eye(3))
    assert metric.compute().item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        metric.update(torch.tensor([[1.0, float("inf"), 0.0]]))


# ---- boundaries, ties, signs and arguments that mutation testing showed unguarded -----------------------------
from plasticity_lightning.metrics import FeatureSpectrum, NonFiniteFeaturesError  # noqa: E402


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_scale_comes_from_the_largest_magnitude_of_either_sign(sign):
    # all entries <= 0: the largest magnitude is -min, not max (which is 0 and once meant "all-zero")
    assert effective_rank(torch.tensor([[0.0, -1.0]]) * sign).item() == 1.0
    x = -torch.rand(40, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1e-260
    s = scipy.linalg.svdvals(x.numpy())
    np.testing.assert_allclose(singular_values(x * sign).numpy(), s, rtol=1e-10)
    assert effective_rank(x * sign).item() == pytest.approx(np_erank(s), rel=1e-10)
    undefined = r"^Features contain NaN or infinite values; rank measures are undefined$"
    for bad in (-math.inf, math.inf, math.nan):
        with pytest.raises(NonFiniteFeaturesError, match=undefined):
            effective_rank(torch.tensor([[1.0, bad]]) * sign)


def test_numerical_rank_counts_strictly_above_the_tolerance():
    # rtol = 0 (documented: Dohare's count of non-zero values): σ = 0 is not counted, σ = atol is not counted
    assert numerical_rank(torch.diag(torch.tensor([1.0, 0.0])), rtol=0.0).item() == 1
    assert numerical_rank(sigma=torch.tensor([1.0, 0.5, 0.25]), rtol=0.0, atol=0.5).item() == 1
    assert numerical_rank(sigma=torch.tensor([1.0, 0.5, 0.25]), rtol=0.5).item() == 1  # 0.5 = rtol·σ₁: out
    assert numerical_rank(sigma=torch.tensor([1.0, 0.5, 0.25]), rtol=0.25, atol=0.2).item() == 2  # max(atol, ·)
    assert numerical_rank(sigma=torch.tensor([1.0, 0.5, 0.25]), rtol=0.2, atol=0.3).item() == 2
    assert numerical_rank(sigma=torch.tensor([4.0, 1.0]), rtol=0.26).item() == 1  # tolerance scales with σ₁
    assert numerical_rank(sigma=torch.zeros(3), rtol=0.1).item() == 0
    assert numerical_rank(sigma=torch.zeros(0), rtol=0.1).item() == 0
    assert numerical_rank(torch.ones(2, 3)).dtype == torch.float64
    with pytest.raises(ValueError, match=r"^numerical_rank needs `rtol` when called with precomputed singular values$"):
        numerical_rank(sigma=torch.ones(2))
    with pytest.raises(ValueError, match=r"^Pass exactly one of `features` and `sigma`$"):
        numerical_rank()
    with pytest.raises(ValueError, match=r"^Pass exactly one of `features` and `sigma`$"):
        numerical_rank(torch.eye(2), sigma=torch.ones(2), rtol=0.1)


@pytest.mark.parametrize(("measure", "argument"), [(srank, "delta"), (approximate_rank, "threshold")])
def test_cumulative_ranks_on_their_threshold(measure, argument):
    # equal values: the first k of 4 hold exactly k/4 of the total, a tie with the threshold, which counts as reached
    sigma = torch.ones(4, dtype=torch.float64)
    for k in (1, 2, 3, 4):
        share = k / 4
        value = 1 - share if argument == "delta" else share
        if value == 0:  # δ = 0 is outside (0, 1)
            continue
        assert measure(sigma=sigma, **{argument: value}).item() == k
        # just above the tie needs one more value; the 1e-12 slack absorbs round-off only
        above = 1 - share - 1e-9 if argument == "delta" else share + 1e-9
        if above < 1:
            assert measure(sigma=sigma, **{argument: above}).item() == k + 1
    # the last cumulative share may round below 1: never more values than there are
    thirds = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert measure(sigma=thirds, **{argument: 1e-12 if argument == "delta" else 1.0}).item() == 3


def test_approximate_rank_squares_and_srank_does_not():
    sigma = torch.tensor([3.0, 1.0, 1.0], dtype=torch.float64)  # energy 9:1:1, magnitude 3:1:1
    assert approximate_rank(sigma=sigma, threshold=0.8).item() == 1  # 9/11 = 0.82
    assert srank(sigma=sigma, delta=0.2).item() == 2  # 3/5 = 0.6, 4/5 = 0.8
    assert stable_rank(sigma=sigma).item() == pytest.approx(11 / 9)
    assert effective_rank(sigma=torch.tensor([1.0, 1.0, 0.0])).item() == pytest.approx(2.0)  # 0·ln 0 = 0


@pytest.mark.parametrize(
    ("metric", "function", "kwargs"),
    [(SRank, srank, {"delta": 0.3}), (ApproximateRank, approximate_rank, {"threshold": 0.6})],
)
def test_metric_twins_pass_their_arguments_on(metric, function, kwargs):
    x = torch.randn(200, 12, generator=torch.Generator().manual_seed(1)) * torch.logspace(0, -1, 12)
    twin = metric(num_units=12, **kwargs)
    twin.update(x)
    assert twin.compute().item() == function(x, **kwargs).item()
    assert twin.compute().item() != function(x).item()  # the non-default argument changes the answer


def test_feature_spectrum_keeps_the_raw_gram_matrix_and_checks_its_input():
    x = torch.randn(30, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    metric = FeatureSpectrum(num_units=5)
    metric.update(x[:10])
    metric.update(x[10:])
    np.testing.assert_allclose(metric.gram.numpy(), (x.T @ x).numpy(), rtol=1e-12)
    np.testing.assert_allclose(metric.compute().numpy(), scipy.linalg.svdvals(x.numpy()), rtol=1e-6)
    with pytest.raises(ValueError, match=r"FeatureSpectrum\(num_units=5\) got 4 units"):
        metric.update(torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"EffectiveRank.num_units=0 is invalid; expected a positive integer"):
        EffectiveRank(num_units=0)
    with pytest.raises(ValueError, match=r"SRank.delta=0 is invalid; expected a number in \(0, 1\)"):
        SRank(num_units=2, delta=0)
    with pytest.raises(ValueError, match=r"ApproximateRank.threshold=1.5 is invalid; expected a number in \(0, 1\]"):
        ApproximateRank(num_units=2, threshold=1.5)
    with pytest.raises(ValueError, match=r"Expected a 2-D samples x units matrix, got shape \(2, 2, 2\)"):
        metric.update(torch.ones(2, 2, 2))


def test_singular_values_of_every_route_and_shape():
    x = torch.tensor([[3.0, 0.0], [0.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    for method in ("auto", "gram", "svd"):
        np.testing.assert_allclose(singular_values(x, method).numpy(), [4.0, 3.0], rtol=1e-12)
        np.testing.assert_allclose(singular_values(x.T, method).numpy(), [4.0, 3.0], rtol=1e-12)
    assert singular_values(torch.zeros(0, 3)).shape == (0,)
    assert singular_values(torch.zeros(4, 3)).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(
        ValueError, match=r"singular_values.method='qr' is not supported; choose one of: auto, gram, svd"
    ):
        singular_values(x, "qr")
    with pytest.raises(ValueError, match=r"Expected features with a samples axis and a units axis, got shape \(3,\)"):
        feature_matrix(torch.ones(3))
    with pytest.raises(
        ValueError, match=r"feature_matrix.conv='mean' is not supported; choose one of: pool, positions, flatten"
    ):
        feature_matrix(torch.ones(2, 3, 4), "mean")
    with pytest.raises(ValueError, match=r"^Pass exactly one of `features` and `sigma`$"):
        effective_rank()
    with pytest.raises(ValueError, match=r"^`sigma` must hold finite, non-negative singular values$"):
        stable_rank(sigma=torch.tensor([1.0, math.inf]))


def test_gram_columns_whose_squares_underflow_are_dropped(monkeypatch):
    # entries of 1e-170 next to ones: their squares underflow to 0 in the Gram matrix, where the column is dropped
    # (kept, its zero eigenvalue would look like a genuine value lost to round-off and force an SVD); every
    # singular value is still returned, 0 for the underflowed one
    import plasticity_lightning.metrics.rank as rank_module

    def no_svd(*args, **kwargs):
        raise AssertionError("fell back to an SVD")

    monkeypatch.setattr(rank_module, "_svd_values", no_svd)
    x = torch.zeros(6, 3, dtype=torch.float64)
    x[:3, 0], x[3:, 1], x[0, 2] = 1.0, 2.0, 1e-170
    sigma = singular_values(x)
    assert sigma.shape == (3,) and sigma[2].item() == 0.0
    np.testing.assert_allclose(sigma[:2].numpy(), [2 * math.sqrt(3), math.sqrt(3)], rtol=1e-12)
    assert effective_rank(x).item() == pytest.approx(np_erank(np.array([2.0, 1.0])), rel=1e-12)


def test_feature_matrix_passes_2d_through_and_pools_3d_outputs():
    x = torch.randn(4, 3)
    for mode in ("pool", "positions", "flatten"):
        assert feature_matrix(x, mode) is x
    seq = torch.arange(24.0).reshape(2, 3, 4)  # [N, units, positions]
    assert torch.equal(feature_matrix(seq), seq.mean(dim=2))
    assert torch.equal(feature_matrix(seq, "positions"), seq.transpose(1, 2).reshape(-1, 3))
    assert torch.equal(feature_matrix(seq, "flatten"), seq.reshape(2, 12))


def test_power_of_two_scaling_is_exact_over_its_documented_range():
    from plasticity_lightning.metrics.rank import _times_power_of_two

    # 2^2046 overflows a float: the scaling takes two factors that do not (each at most 2^1023)
    x = torch.tensor([2.0**-1000, 3 * 2.0**-1000], dtype=torch.float64)
    assert _times_power_of_two(x, 2000).tolist() == [2.0**1000, 3 * 2.0**1000]
    assert _times_power_of_two(torch.tensor([2.0**-1074], dtype=torch.float64), 2046).item() == 2.0**972
    y = torch.tensor([2.0**1000], dtype=torch.float64)
    assert _times_power_of_two(y, -2046).item() == 2.0**-1046  # a subnormal, still exact


def test_every_measure_is_float64_zero_on_an_all_zero_matrix():
    zeros = torch.zeros(5, 3, dtype=torch.float32)
    for measure in (effective_rank, srank, approximate_rank, stable_rank, numerical_rank):
        value = measure(zeros)
        assert value.item() == 0.0 and value.dtype == torch.float64, measure.__name__


def test_rank_measures_passes_its_arguments_and_names_every_measure():
    x = torch.randn(120, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x = x * torch.logspace(0, -1.5, 10, dtype=torch.float64)
    measures = rank_measures(x, delta=0.3, threshold=0.6)
    assert sorted(measures) == ["approximate_rank", "effective_rank", "srank", "stable_rank"]
    assert measures["srank"].item() == srank(x, delta=0.3).item() != srank(x).item()
    assert measures["approximate_rank"].item() == approximate_rank(x, threshold=0.6).item() != approximate_rank(x)
    assert measures["effective_rank"].item() == pytest.approx(effective_rank(x).item(), rel=1e-12)
    assert measures["stable_rank"].item() == pytest.approx(stable_rank(x).item(), rel=1e-12)
    assert rank_measures(x)["srank"].item() == srank(x).item()  # default method "auto"
    with pytest.raises(ValueError, match=r"singular_values.method='qr' is not supported"):
        rank_measures(x, method="qr")


def test_threshold_and_delta_bounds_name_the_function():
    with pytest.raises(ValueError, match=r"^approximate_rank.threshold=0 is invalid; expected a number in \(0, 1\]$"):
        approximate_rank(sigma=torch.ones(2), threshold=0)
    assert approximate_rank(sigma=torch.ones(2), threshold=1.0).item() == 2  # 1 is allowed
    with pytest.raises(ValueError, match=r"^srank.delta=1 is invalid; expected a number in \(0, 1\)$"):
        srank(sigma=torch.ones(2), delta=1)


@pytest.mark.parametrize(
    ("metric", "function", "kwargs"),
    [
        (EffectiveRank, effective_rank, {}),
        (SRank, srank, {"delta": 0.2}),
        (ApproximateRank, approximate_rank, {"threshold": 0.7}),
        (StableRank, stable_rank, {}),
    ],
)
def test_metric_twins_sum_their_gram_matrices_across_processes(metric, function, kwargs):
    # two ranks, simulated through torchmetrics' own sync (the gather returns both ranks' states); the twin's
    # keyword arguments (here the sync function) reach torchmetrics
    x = torch.randn(60, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x = x * torch.logspace(0, -1, 6, dtype=torch.float64)
    other = metric(num_units=6, **kwargs)
    other.update(x[1:])
    states = iter([other.gram])
    rank = metric(
        num_units=6,
        dist_sync_fn=lambda tensor, group=None: [tensor, next(states)],
        distributed_available_fn=lambda: True,
        **kwargs,
    )
    rank.update(x[:1])  # one row alone is rank 1 by every measure: only the other rank's rows make the answer
    assert rank.compute().item() == pytest.approx(function(x, **kwargs).item(), rel=1e-9)
    assert function(x[:1], **kwargs).item() == 1.0 != rank.compute().item()


def test_svd_values_are_exact_and_the_auto_route_resolves_round_off():
    # a rank-1 matrix: an SVD returns round-off (~1e-17) where the true singular values are 0; "auto" resolves it
    # (values at or below max(n, d)·eps·σ₁ are 0), "svd" returns what the SVD gives, unresolved
    u = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64) / 7
    v = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0], dtype=torch.float64) / 9
    rank_one = torch.outer(u, v)
    svd = scipy.linalg.svdvals(rank_one.numpy())
    assert (svd[1:] > 0).any()  # the premise: the SVD's own round-off
    np.testing.assert_array_equal(singular_values(rank_one, "svd").numpy(), torch.linalg.svdvals(rank_one).numpy())
    auto = singular_values(rank_one, "auto")
    assert auto[1:].tolist() == [0.0] * 4 and auto[0].item() == pytest.approx(svd[0], rel=1e-12)
    assert effective_rank(rank_one).item() == 1.0 and srank(rank_one).item() == 1.0
    import plasticity_lightning.metrics.rank as rank_module

    # on the SVD's resolution itself: diag(1, 2·eps) has σ₂ = max(n, d)·eps·σ₁ exactly, which counts as round-off
    eps = torch.finfo(torch.float64).eps
    tie = torch.diag(torch.tensor([1.0, 2 * eps], dtype=torch.float64))
    assert rank_module._svd_values(tie, resolve=True).tolist() == [1.0, 0.0]
    assert singular_values(tie, "svd").tolist() == [1.0, 2 * eps]
    # a value just above it is genuine
    above = torch.diag(torch.tensor([1.0, 4 * eps], dtype=torch.float64))
    assert rank_module._svd_values(above, resolve=True).tolist() == [1.0, 4 * eps]
    # "auto" needs no SVD for either: the interlacing bound (σ of x·v, v the Gram's eigenvector of the zeroed value)
    # shows σ₂ <= 1e-9·Σσ, so the Gram route's 0 is within its 1e-9 of the SVD's answer
    for x in (tie, above):
        assert singular_values(x, "auto").tolist() == [1.0, 0.0]


def test_gram_floor_tie_counts_as_round_off_in_the_functional_and_the_twin():
    # xᵀx = diag(1, 2^-51): σ₂ = √(2·eps)·σ₁, exactly the Gram route's floor √(k·eps)·σ₁ for k = 2
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0**-26], [0.0, 2.0**-26]], dtype=torch.float64)
    assert singular_values(x, "gram").tolist() == [1.0, 0.0]
    twin = EffectiveRank(num_units=2)
    twin.update(x)
    assert twin.spectrum().tolist() == [1.0, 0.0] and twin.compute().item() == 1.0
    # twice the floor's square is above it: kept, by the functional and the twin
    above = x * torch.tensor([1.0, 2.0**0.5], dtype=torch.float64)
    assert singular_values(above, "gram")[1].item() == pytest.approx(2.0**-25, rel=1e-12)
    twin = EffectiveRank(num_units=2)
    twin.update(above)
    assert twin.spectrum()[1].item() == pytest.approx(2.0**-25, rel=1e-12)


def test_precomputed_spectra_are_computed_in_float64():
    sigma = torch.tensor([1.0, 0.3, 1e-4], dtype=torch.float32)
    exact = sigma.double()
    for measure, kwargs in [(effective_rank, {}), (stable_rank, {}), (srank, {"delta": 0.1})]:
        value = measure(sigma=sigma, **kwargs)
        assert value.dtype == torch.float64 and value.item() == measure(sigma=exact, **kwargs).item(), measure
    value = approximate_rank(sigma=sigma, threshold=0.5)
    assert value.dtype == torch.float64 and value.item() == 1.0
    # float32 would round 1 + 1e-8 to 1: the float64 computation keeps the second value's share
    tiny = torch.tensor([1.0, 1e-4], dtype=torch.float32)
    assert stable_rank(sigma=tiny).item() == pytest.approx(1 + float(tiny[1]) ** 2, rel=1e-15) != 1.0


def test_cumulative_rank_slack_is_a_tie_that_counts_as_reached():
    # threshold 0.5 + 1e-12: the slack takes it back to exactly 0.5, the first of two equal energies
    assert 0.5 + 1e-12 - 1e-12 == 0.5  # the premise, in float64
    assert approximate_rank(sigma=torch.ones(2), threshold=0.5 + 1e-12).item() == 1.0
    assert srank(sigma=torch.ones(2), delta=0.5 - 1e-12).item() == 1.0
    assert approximate_rank(sigma=torch.ones(2), threshold=0.5 + 3e-12).item() == 2.0


def test_metric_twins_take_torchmetrics_keyword_arguments():
    for metric, kwargs in [(SRank, {"delta": 0.3}), (ApproximateRank, {"threshold": 0.6}), (EffectiveRank, {})]:
        twin = metric(num_units=3, compute_with_cache=False, sync_on_compute=False, **kwargs)
        assert twin.compute_with_cache is False and twin.sync_on_compute is False, metric


def test_auto_keeps_the_gram_route_when_the_zeroed_values_cannot_matter(monkeypatch):
    # 299 unit singular values and one of 1e-12: the Gram route zeroes that one (below its floor √(k·eps) ≈ 2.6e-7),
    # and 1 value × the floor is still below 1e-9 of Σσ ≈ 3e-7, so "auto" keeps the Gram answer (no SVD); an SVD
    # would have resolved 1e-12
    import plasticity_lightning.metrics.rank as rank_module

    k = 300
    q, _ = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    sigma = torch.ones(k, dtype=torch.float64)
    sigma[-1] = 1e-12
    x = q * sigma
    floor = math.sqrt(k * torch.finfo(torch.float64).eps)
    assert floor < 1e-9 * sigma.sum().item()  # the premise
    assert singular_values(x, "svd")[-1].item() == pytest.approx(1e-12, rel=1e-3)

    def no_svd(*args, **kwargs):
        raise AssertionError("fell back to an SVD")

    monkeypatch.setattr(rank_module, "_svd_values", no_svd)
    auto = singular_values(x)
    assert auto[-1].item() == 0.0 and auto[:-1].numpy() == pytest.approx(np.ones(k - 1), rel=1e-12)


def test_exactly_rank_deficient_features_need_no_svd(monkeypatch):
    # ReLU features with more always-active units than input dimensions: those 12 units span at most 9 dimensions,
    # so the 40×40 Gram matrix has exact (round-off) zeros that the old criterion (zeroed × floor > 1e-9·Σσ) sent to
    # an SVD; the interlacing bound shows they hold < 1e-9 of Σσ, and every measure still agrees with SciPy's SVD
    import plasticity_lightning.metrics.rank as rank_module

    rng = np.random.default_rng(5)
    inputs = rng.standard_normal((500, 8))
    weights = rng.standard_normal((8, 40))
    bias = np.where(np.arange(40) < 12, 100.0, 0.0)  # 12 units always active (affine in 8 inputs), 28 ReLU units
    x = np.maximum(inputs @ weights + bias, 0.0)
    s = scipy.linalg.svdvals(x)
    assert (s > 1e-6 * s[0]).sum() < 40  # the premise: exactly rank-deficient
    gram_values, zeroed, floor = rank_module._gram_singular_values(torch.from_numpy(x.T @ x))
    assert zeroed * floor > 1e-9 * gram_values.sum().item()  # what used to trigger the SVD
    assert 0 < zeroed <= rank_module._BOUND_MAX_ZEROED  # few enough to bound

    def no_svd(*args, **kwargs):
        raise AssertionError("fell back to an SVD")

    monkeypatch.setattr(rank_module, "_svd_values", no_svd)
    features = torch.from_numpy(x)
    p = s / s.sum()
    p = p[p > 0]
    expected = {
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "stable_rank": float((s**2).sum() / s[0] ** 2),
    }
    measures = rank_measures(features)
    for name, value in expected.items():
        assert measures[name].item() == pytest.approx(value, rel=1e-9), name
    assert measures["srank"].item() == float(np.searchsorted(np.cumsum(s) / s.sum(), 0.99) + 1)
    assert measures["approximate_rank"].item() == float(np.searchsorted(np.cumsum(s**2) / (s**2).sum(), 0.99) + 1)


def test_many_zeroed_values_go_straight_to_the_svd(monkeypatch):
    # 60 exact zeros: more than the bound is tried for (a cluster that large costs MRRR as much as the SVD)
    import plasticity_lightning.metrics.rank as rank_module

    rng = np.random.default_rng(6)
    x = rng.standard_normal((200, 20)) @ rng.standard_normal((20, 80))

    def no_bound(*args, **kwargs):
        raise AssertionError("tried the interlacing bound")

    monkeypatch.setattr(rank_module, "_zeroed_bound", no_bound)
    s = scipy.linalg.svdvals(x)
    np.testing.assert_allclose(singular_values(torch.from_numpy(x))[:20].numpy(), s[:20], rtol=1e-9)
    assert singular_values(torch.from_numpy(x))[20:].tolist() == [0.0] * 60  # the SVD's resolution
