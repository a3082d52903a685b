"""Neural Elements' 2-D toy sets: xor, moons, circles, spirals.

The generators follow Neural Elements' definitions (``src/datasets/toy.py``) *and* its order of random
draws from a NumPy ``RandomState(seed)``, so the same seed gives the same points as the original
code. Labels are 0/1 and the rows come out shuffled. Class sizes are ``n_samples // 2`` (xor: four
clusters of ``n_samples // 4``), so ``n_samples`` not divisible by 2 (4 for xor) yields slightly fewer rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from plasticity_lightning.core.errors import (
    check_choice,
    check_positive_float,
    check_positive_int,
    check_split_fractions,
)
from plasticity_lightning.data.base import IndexedTensorDataset, PlasticityDataModule

Arrays = tuple[np.ndarray, np.ndarray]


def make_xor(n_samples: int = 200, noise: float = 0.1, seed: int = 0) -> Arrays:
    """Four Gaussian clusters; class 0 around (−1, 1) and (1, −1), class 1 around (1, 1) and (−1, −1).

    Args:
        n_samples: the number of points, split evenly between the two classes (default 200).
        noise: standard deviation of the Gaussian noise, in the coordinates' units (default 0.1).
        seed: seed of the NumPy generator (default 0).

    Example::

        >>> X, y = make_xor(8, seed=0)
        >>> X.shape, sorted(y.tolist())
        ((8, 2), [0, 0, 0, 0, 1, 1, 1, 1])
    """
    rng = np.random.RandomState(seed)
    per_cluster = n_samples // 4
    centres = [(-1, 1), (1, -1), (1, 1), (-1, -1)]  # class 0, 0, 1, 1
    X = np.vstack([rng.randn(per_cluster, 2) * noise + np.array(c) for c in centres])
    y = np.repeat([0, 1], 2 * per_cluster)
    order = rng.permutation(len(y))
    return X[order], y[order]


def make_moons(n_samples: int = 200, noise: float = 0.1, seed: int = 0) -> Arrays:
    """Two interleaved half circles: (cos θ, sin θ) and (1 − cos θ, 0.5 − sin θ), θ evenly spaced on [0, π].

    Args:
        n_samples: the number of points, split evenly between the two classes (default 200).
        noise: standard deviation of the Gaussian noise, in the coordinates' units (default 0.1).
        seed: seed of the NumPy generator (default 0).
    """
    rng = np.random.RandomState(seed)
    per_class = n_samples // 2
    theta = np.linspace(0, np.pi, per_class)
    x0 = np.cos(theta) + rng.randn(per_class) * noise
    y0 = np.sin(theta) + rng.randn(per_class) * noise
    x1 = 1 - np.cos(theta) + rng.randn(per_class) * noise
    y1 = 0.5 - np.sin(theta) + rng.randn(per_class) * noise
    X = np.vstack([np.column_stack([x0, y0]), np.column_stack([x1, y1])])
    y = np.repeat([0, 1], per_class)
    order = rng.permutation(len(y))
    return X[order], y[order]


def make_circles(n_samples: int = 200, noise: float = 0.1, factor: float = 0.5, seed: int = 0) -> Arrays:
    """Two concentric circles: class 0 at radius 1, class 1 at radius ``factor``, noise on the radius.

    Args:
        n_samples: the number of points, split evenly between the two classes (default 200).
        noise: standard deviation of the Gaussian noise, in the coordinates' units (default 0.1). It perturbs the
            radius.
        factor: radius of class 1's circle relative to class 0's (default 0.5).
        seed: seed of the NumPy generator (default 0).
    """
    rng = np.random.RandomState(seed)
    per_class = n_samples // 2
    parts = []
    for radius in (1.0, factor):
        theta = rng.rand(per_class) * 2 * np.pi
        r = radius + rng.randn(per_class) * noise
        parts.append(np.column_stack([r * np.cos(theta), r * np.sin(theta)]))
    X = np.vstack(parts)
    y = np.repeat([0, 1], per_class)
    order = rng.permutation(len(y))
    return X[order], y[order]


def make_spirals(n_samples: int = 200, noise: float = 0.2, n_turns: float = 1.5, seed: int = 0) -> Arrays:
    """Two interleaved spirals: θ = √U·n_turns·2π, r = 2θ/(n_turns·2π); class 1 is class 0 rotated by π.

    Args:
        n_samples: the number of points, split evenly between the two classes (default 200).
        noise: standard deviation of the Gaussian noise, in the coordinates' units (default 0.2).
        n_turns: turns of each spiral (default 1.5).
        seed: seed of the NumPy generator (default 0).
    """
    rng = np.random.RandomState(seed)
    per_class = n_samples // 2
    parts = []
    for sign in (1.0, -1.0):
        theta = np.sqrt(rng.rand(per_class)) * n_turns * 2 * np.pi
        r = theta / (n_turns * 2 * np.pi) * 2
        x = sign * r * np.cos(theta) + rng.randn(per_class) * noise
        y = sign * r * np.sin(theta) + rng.randn(per_class) * noise
        parts.append(np.column_stack([x, y]))
    X = np.vstack(parts)
    y = np.repeat([0, 1], per_class)
    order = rng.permutation(len(y))
    return X[order], y[order]


#: name -> (generator, default noise)
TOY_DATASETS: dict[str, tuple[Callable[..., Arrays], float]] = {
    "xor": (make_xor, 0.1),
    "moons": (make_moons, 0.1),
    "circles": (make_circles, 0.1),
    "spirals": (make_spirals, 0.2),
}


def make_toy(name: str, n_samples: int = 200, noise: float | None = None, seed: int = 0, **extra: Any) -> Arrays:
    """Generate toy set ``name`` with Neural Elements' defaults (noise 0.1, spirals 0.2).

    Args:
        name: ``"xor"``, ``"moons"``, ``"circles"`` or ``"spirals"``.
        n_samples: the number of points, split evenly between the two classes (default 200).
        noise: noise level (default ``None``: the set's Neural Elements default).
        seed: seed of the NumPy generator (default 0).
        **extra: passed to the set's generator (``factor``, ``n_turns``).

    Example::

        >>> X, y = make_toy("spirals", n_samples=10, seed=1)
        >>> X.shape, X.dtype, y.dtype
        ((10, 2), dtype('float64'), dtype('int64'))
    """
    check_choice("make_toy", "name", name, TOY_DATASETS)
    generator, default_noise = TOY_DATASETS[name]
    return generator(n_samples=n_samples, noise=default_noise if noise is None else noise, seed=seed, **extra)


class ToyDataModule(PlasticityDataModule):
    """One of Neural Elements' 2-D binary toy sets, split into train/val/test.

    The rows come out of the generator shuffled; the last ``test_fraction`` of them form the test split and
    the ``val_fraction`` before those the validation split. Neural Elements itself trains and measures on all
    rows (phases 3–6) and, for generalisation (phase 7), re-permutes them and holds out 20%; our split of the
    already shuffled rows is equally random but not the same rows. Studies that need Neural Elements' exact
    protocol take the arrays from :func:`make_toy`.

    Args:
        dataset: ``xor``, ``moons``, ``circles`` or ``spirals``.
        n_samples: rows generated in total (before splitting).
        noise: Gaussian noise std; ``None`` = the dataset's default (0.1; spirals 0.2).
        factor: inner-circle radius (``circles`` only).
        n_turns: spiral turns (``spirals`` only).
        val_fraction: share of rows for validation.
        test_fraction: share of rows for testing.
        **kwargs: :class:`PlasticityDataModule` arguments (batch_size, schedule, seed, ...).

    Example::

        >>> dm = ToyDataModule("moons", n_samples=100, batch_size=16)
        >>> dm.setup("fit")
        >>> len(dm.splits["train"]), len(dm.splits["val"]), len(dm.splits["test"]), dm.input_shape, dm.num_classes
        (60, 20, 20, (2,), 2)
    """

    num_classes = 2
    input_shape = (2,)

    def __init__(
        self,
        dataset: str = "spirals",
        n_samples: int = 200,
        noise: float | None = None,
        factor: float = 0.5,
        n_turns: float = 1.5,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        self.dataset = check_choice(owner, "dataset", dataset, TOY_DATASETS)
        self.n_samples = check_positive_int(owner, "n_samples", n_samples)
        self.noise = None if noise is None else check_positive_float(owner, "noise", noise, allow_zero=True)
        self.factor = check_positive_float(owner, "factor", factor)
        self.n_turns = check_positive_float(owner, "n_turns", n_turns)
        self.val_fraction, self.test_fraction = check_split_fractions(owner, val_fraction, test_fraction)

    def load_splits(self) -> dict[str, IndexedTensorDataset]:
        extra = {"factor": self.factor} if self.dataset == "circles" else {}
        if self.dataset == "spirals":
            extra = {"n_turns": self.n_turns}
        X, y = make_toy(self.dataset, self.n_samples, self.noise, self.seed, **extra)
        inputs = torch.as_tensor(X, dtype=torch.float32)
        targets = torch.as_tensor(y, dtype=torch.long)
        n = len(targets)
        n_test = round(n * self.test_fraction)
        n_val = round(n * self.val_fraction)
        n_train = n - n_val - n_test
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
        return {name: IndexedTensorDataset(inputs[a:b], targets[a:b]) for name, (a, b) in bounds.items()}
