import numpy as np
import pytest

from plasticity_lightning import PlasticityConfigError, ToyDataModule, make_toy
from plasticity_lightning.data import make_circles, make_moons, make_spirals, make_xor


# Neural Elements' generators, restated from their definitions with NumPy's global RandomState (as the original
# code seeds it), to check that ours draw the same points for the same seed.
def reference(name, n, noise, seed, factor=0.5, n_turns=1.5):
    np.random.seed(seed)
    if name == "xor":
        k = n // 4
        parts = [np.random.randn(k, 2) * noise + np.array(c) for c in ([-1, 1], [1, -1], [1, 1], [-1, -1])]
        X, y = np.vstack(parts), np.hstack([np.zeros(2 * k), np.ones(2 * k)])
    elif name == "moons":
        k = n // 2
        t = np.linspace(0, np.pi, k)
        X0 = np.column_stack([np.cos(t) + np.random.randn(k) * noise, np.sin(t) + np.random.randn(k) * noise])
        X1 = np.column_stack([1 - np.cos(t) + np.random.randn(k) * noise, 0.5 - np.sin(t) + np.random.randn(k) * noise])
        X, y = np.vstack([X0, X1]), np.hstack([np.zeros(k), np.ones(k)])
    elif name == "circles":
        k = n // 2
        t0 = np.random.rand(k) * 2 * np.pi
        r0 = 1 + np.random.randn(k) * noise
        t1 = np.random.rand(k) * 2 * np.pi
        r1 = factor + np.random.randn(k) * noise
        X = np.vstack(
            [np.column_stack([r0 * np.cos(t0), r0 * np.sin(t0)]), np.column_stack([r1 * np.cos(t1), r1 * np.sin(t1)])]
        )
        y = np.hstack([np.zeros(k), np.ones(k)])
    else:
        k = n // 2
        parts = []
        for sign in (1, -1):
            t = np.sqrt(np.random.rand(k)) * n_turns * 2 * np.pi
            r = t / (n_turns * 2 * np.pi) * 2
            parts.append(
                np.column_stack(
                    [
                        sign * r * np.cos(t) + np.random.randn(k) * noise,
                        sign * r * np.sin(t) + np.random.randn(k) * noise,
                    ]
                )
            )
        X, y = np.vstack(parts), np.hstack([np.zeros(k), np.ones(k)])
    order = np.random.permutation(len(y))
    return X[order], y[order].astype(int)


@pytest.mark.parametrize(("name", "noise"), [("xor", 0.1), ("moons", 0.1), ("circles", 0.1), ("spirals", 0.2)])
@pytest.mark.parametrize("seed", [0, 7])
def test_same_points_as_neural_elements(name, noise, seed):
    X, y = make_toy(name, n_samples=200, seed=seed)  # default noise per dataset
    X_ref, y_ref = reference(name, 200, noise, seed)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(X, X_ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["xor", "moons", "circles", "spirals"])
def test_balanced_shuffled_and_deterministic(name):
    X, y = make_toy(name, n_samples=400, seed=3)
    assert X.shape == (400, 2) and set(np.unique(y)) == {0, 1}
    assert (y == 0).sum() == (y == 1).sum() == 200
    assert np.abs(np.diff(y)).sum() > 0  # labels interleave: the rows are shuffled
    X2, _y2 = make_toy(name, n_samples=400, seed=3)
    np.testing.assert_array_equal(X, X2)
    X3, _ = make_toy(name, n_samples=400, seed=4)
    assert not np.allclose(X, X3)


def test_noise_free_geometry():
    X, y = make_circles(200, noise=0.0, factor=0.3, seed=0)
    radius = np.linalg.norm(X, axis=1)
    np.testing.assert_allclose(radius[y == 0], 1.0)
    np.testing.assert_allclose(radius[y == 1], 0.3)

    X, y = make_moons(100, noise=0.0, seed=0)
    upper, lower = X[y == 0], X[y == 1]
    np.testing.assert_allclose(np.linalg.norm(upper, axis=1), 1.0)
    np.testing.assert_allclose(np.linalg.norm(lower - np.array([1.0, 0.5]), axis=1), 1.0)

    X, y = make_spirals(100, noise=0.0, n_turns=1.5, seed=0)
    r = np.linalg.norm(X, axis=1)
    theta = r / 2 * (1.5 * 2 * np.pi)  # r = 2θ / (n_turns·2π)
    class0 = X[y == 0]
    np.testing.assert_allclose(class0[:, 0], r[y == 0] * np.cos(theta[y == 0]), atol=1e-9)
    np.testing.assert_allclose(X[y == 1][:, 1], -r[y == 1] * np.sin(theta[y == 1]), atol=1e-9)

    X, y = make_xor(40, noise=0.0, seed=0)
    assert set(map(tuple, X[y == 0])) == {(-1.0, 1.0), (1.0, -1.0)}
    assert set(map(tuple, X[y == 1])) == {(1.0, 1.0), (-1.0, -1.0)}


def test_xor_uses_four_equal_clusters():
    _X, y = make_xor(10, seed=0)  # 10 // 4 = 2 points per cluster, as in Neural Elements
    assert len(y) == 8


def test_datamodule_splits_are_disjoint_and_cover_the_rows():
    dm = ToyDataModule("xor", n_samples=200, val_fraction=0.1, test_fraction=0.25, seed=5)
    dm.setup("fit")
    sizes = {name: len(split) for name, split in dm.splits.items()}
    assert sizes == {"train": 130, "val": 20, "test": 50}
    rows = np.vstack([dm.splits[name].inputs.numpy() for name in ("train", "val", "test")])
    X, _ = make_xor(200, seed=5)
    np.testing.assert_allclose(rows, X.astype(np.float32))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dataset": "swiss_roll"}, r"ToyDataModule.dataset='swiss_roll' is not supported; choose one of: xor, moons"),
        ({"n_samples": -5}, r"ToyDataModule.n_samples=-5 is invalid; expected a positive integer"),
        ({"noise": -0.1}, r"ToyDataModule.noise=-0.1 is invalid"),
        ({"val_fraction": 0.6, "test_fraction": 0.5}, r"leaves no training rows"),
        ({"batch_size": 0}, r"ToyDataModule.batch_size=0 is invalid"),
    ],
)
def test_bad_toy_arguments(kwargs, message):
    with pytest.raises(PlasticityConfigError, match=message):
        ToyDataModule(**kwargs)
