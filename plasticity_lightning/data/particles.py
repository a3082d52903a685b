"""A charged particle in a uniform magnetic field: neural-network-lab-python's regression benchmark.

Each particle starts at ``(x, y)`` with velocity ``(v_x, v_y)``, mass ``m`` and charge ``q`` in a field ``B``
perpendicular to the plane, and moves for a time ``t``. With ``ω = qB/m`` and ``φ = ωt`` the velocity rotates by
``φ`` (cyclotron motion) and the position follows the circle::

    v_x' = v_x cos φ − v_y sin φ                 v_y' = v_x sin φ + v_y cos φ
    x'   = x + (v_x sin φ + v_y (cos φ − 1)) / ω  y'   = y + (v_y sin φ + v_x (1 − cos φ)) / ω

and a neutral particle (or ``|qB/m| ≤ 1e-10``) moves in a straight line. The six targets are the final velocity
and position, the kinetic energy ``½ m |v'|²`` and the displacement ``|r' − r|`` (the seed calls it the trajectory
length). Inputs are the 8 raw quantities and, with ``features="all"``, 15 derived ones (speed, radius, momenta,
``p·r``, ``qB``, ``|q|``, ``ω``, ``φ``, ``sin φ``, ``cos φ``, ``|q|B|v|``, ``tB``, ``t²``).

Sampling ranges follow the seed's ``particle_generation_config.json``. The rows are drawn from NumPy's
``default_rng(seed)``, not from the seed's global ``np.random.seed(42)`` stream, so the same seed does not give
the seed's exact particles. ``noise`` adds the earlier seed version's relative Gaussian noise
(``N(0, noise·|value|)``) to the final velocity and position before the energy and displacement are computed.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from sklearn.preprocessing import StandardScaler

from plasticity_lightning.core.errors import (
    PlasticityConfigError,
    check_choice,
    check_positive_float,
    check_positive_int,
    check_split_fractions,
)
from plasticity_lightning.data.base import IndexedTensorDataset, PlasticityDataModule

RAW_FEATURES = (
    "mass",
    "initial_velocity_x",
    "initial_velocity_y",
    "initial_position_x",
    "initial_position_y",
    "charge",
    "magnetic_field_strength",
    "simulation_time",
)
DERIVED_FEATURES = (
    "speed",
    "radius",
    "momentum_x",
    "momentum_y",
    "momentum",
    "momentum_dot_position",
    "charge_field",
    "abs_charge",
    "angular_frequency",
    "phase",
    "sin_phase",
    "cos_phase",
    "magnetic_force",
    "time_field",
    "time_squared",
)
TARGETS = (
    "final_velocity_x",
    "final_velocity_y",
    "final_position_x",
    "final_position_y",
    "kinetic_energy",
    "trajectory_length",
)

#: the seed's sampling ranges (uniform), charge drawn from {-1, 0, 1}
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "mass": (0.1, 10.0),
    "velocity": (-5.0, 5.0),
    "position": (-10.0, 10.0),
    "magnetic_field_strength": (0.1, 2.0),
    "simulation_time": (1.0, 10.0),
}

_LINEAR_LIMIT = 1e-10  # |qB/m| at or below this: straight-line motion (the seed's threshold)


def cyclotron_motion(
    mass: np.ndarray,
    charge: np.ndarray,
    field: np.ndarray,
    time: np.ndarray,
    velocity: np.ndarray,
    position: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Final ``(velocity, position)`` (each ``[N, 2]``) after time ``time`` in a perpendicular field ``field``.

    Args:
        mass: mass per particle, ``[N]``, > 0.
        charge: charge per particle, ``[N]``.
        field: magnetic field strength per particle, ``[N]``.
        time: simulated time per particle, ``[N]``.
        velocity: initial velocity ``[N, 2]``.
        position: initial position ``[N, 2]``.

    Example::

        >>> v, r = cyclotron_motion(np.array([1.0]), np.array([1.0]), np.array([1.0]), np.array([np.pi]),
        ...                         np.array([[1.0, 0.0]]), np.array([[0.0, 0.0]]))
        >>> np.round(v, 6).tolist(), np.round(r, 6).tolist()  # half a turn of a unit circle
        ([[-1.0, 0.0]], [[0.0, 2.0]])
    """
    omega = charge * field / mass
    linear = np.abs(omega) <= _LINEAR_LIMIT
    safe_omega = np.where(linear, 1.0, omega)
    phi = omega * time
    cos, sin = np.cos(phi), np.sin(phi)
    vx, vy = velocity[:, 0], velocity[:, 1]
    turned_v = np.stack([vx * cos - vy * sin, vx * sin + vy * cos], axis=1)
    turned_r = position + np.stack([vx * sin + vy * (cos - 1), vy * sin + vx * (1 - cos)], axis=1) / safe_omega[:, None]
    straight_r = position + velocity * time[:, None]
    final_v = np.where(linear[:, None], velocity, turned_v)
    final_r = np.where(linear[:, None], straight_r, turned_r)
    return final_v, final_r


def generate_particles(
    n_particles: int = 2000,
    seed: int = 42,
    noise: float = 0.0,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> dict[str, np.ndarray]:
    """Simulate ``n_particles`` particles.

    Returns float64 columns named as in ``RAW_FEATURES``, ``DERIVED_FEATURES`` and ``TARGETS``.

    Args:
        n_particles: how many particles (default 2000).
        seed: seed of the NumPy generator (default 42, the seed's).
        noise: relative Gaussian noise on the final velocity and position (default 0.0: exact physics).
        ranges: uniform sampling ranges that replace :data:`DEFAULT_RANGES`' (default ``None``: the seed's).

    Example::

        >>> columns = generate_particles(5, seed=0)
        >>> len(columns), columns["kinetic_energy"].shape
        (29, (5,))
    """
    check_positive_int("generate_particles", "n_particles", n_particles)
    check_positive_float("generate_particles", "noise", noise, allow_zero=True)
    bounds = {**DEFAULT_RANGES, **(ranges or {})}
    for name, (low, high) in bounds.items():
        if name not in DEFAULT_RANGES or not low <= high:
            raise PlasticityConfigError(
                f"generate_particles.ranges[{name!r}]=({low}, {high}) is invalid; expected low <= high for one of "
                f"{', '.join(DEFAULT_RANGES)}"
            )
    if bounds["mass"][0] <= 0:
        raise PlasticityConfigError(
            f"generate_particles.ranges['mass']={bounds['mass']} is invalid; masses must be > 0"
        )
    rng = np.random.default_rng(seed)
    n = n_particles
    mass = rng.uniform(*bounds["mass"], n)
    velocity = rng.uniform(*bounds["velocity"], (n, 2))
    position = rng.uniform(*bounds["position"], (n, 2))
    charge = rng.choice([-1.0, 0.0, 1.0], n)
    field = rng.uniform(*bounds["magnetic_field_strength"], n)
    time = rng.uniform(*bounds["simulation_time"], n)

    final_v, final_r = cyclotron_motion(mass, charge, field, time, velocity, position)
    if noise > 0:
        final_v = final_v + rng.normal(0.0, 1.0, final_v.shape) * noise * np.abs(final_v)
        final_r = final_r + rng.normal(0.0, 1.0, final_r.shape) * noise * np.abs(final_r)

    omega = charge * field / mass
    phase = omega * time
    speed = np.linalg.norm(velocity, axis=1)
    momentum = mass[:, None] * velocity
    return {
        "mass": mass,
        "initial_velocity_x": velocity[:, 0],
        "initial_velocity_y": velocity[:, 1],
        "initial_position_x": position[:, 0],
        "initial_position_y": position[:, 1],
        "charge": charge,
        "magnetic_field_strength": field,
        "simulation_time": time,
        "speed": speed,
        "radius": np.linalg.norm(position, axis=1),
        "momentum_x": momentum[:, 0],
        "momentum_y": momentum[:, 1],
        "momentum": np.linalg.norm(momentum, axis=1),
        "momentum_dot_position": (momentum * position).sum(axis=1),
        "charge_field": charge * field,
        "abs_charge": np.abs(charge),
        "angular_frequency": omega,
        "phase": phase,
        "sin_phase": np.sin(phase),
        "cos_phase": np.cos(phase),
        "magnetic_force": np.abs(charge) * field * speed,
        "time_field": time * field,
        "time_squared": time**2,
        "final_velocity_x": final_v[:, 0],
        "final_velocity_y": final_v[:, 1],
        "final_position_x": final_r[:, 0],
        "final_position_y": final_r[:, 1],
        "kinetic_energy": 0.5 * mass * (final_v**2).sum(axis=1),
        "trajectory_length": np.linalg.norm(final_r - position, axis=1),
    }


def _unscale(scaler: StandardScaler, values: torch.Tensor) -> torch.Tensor:
    """``values · scale + mean`` of a fitted scikit-learn ``StandardScaler``, on tensors of any device and dtype."""
    return values * torch.as_tensor(scaler.scale_).to(values) + torch.as_tensor(scaler.mean_).to(values)


class ParticleDataModule(PlasticityDataModule):
    """Regression on simulated charged particles (:func:`generate_particles`): 6 targets from 8 or 23 features.

    Rows are split like the seed (``test_fraction`` of all rows, then ``val_fraction`` of the rest), in an order
    shuffled with ``seed``. Features and targets are standardised with statistics of the training split only;
    :meth:`inverse_transform_targets` maps predictions back to physical units.

    Args:
        n_particles: particles simulated (the seed uses 2000; its ``main.py`` 5000).
        features: ``"all"`` (8 raw + 15 derived) or ``"raw"`` (the 8 inputs only).
        noise: relative Gaussian noise on the final velocity and position (0 = exact physics).
        val_fraction: share of the non-test rows used for validation.
        test_fraction: share of all rows used for testing.
        standardize: standardise features and targets (train statistics).
        **kwargs: :class:`PlasticityDataModule` arguments (batch_size, seed, ...). ``seed`` seeds the simulation
            and the split.
        batch_size: rows per training batch.

    Example::

        >>> dm = ParticleDataModule(n_particles=100, batch_size=16)
        >>> dm.setup("fit")
        >>> len(dm.splits["train"]), len(dm.splits["val"]), len(dm.splits["test"]), dm.input_shape, dm.num_targets
        (64, 16, 20, (23,), 6)
    """

    num_targets = len(TARGETS)

    def __init__(
        self,
        n_particles: int = 2000,
        features: Literal["all", "raw"] = "all",
        noise: float = 0.0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.2,
        standardize: bool = True,
        batch_size: int = 128,
        **kwargs: Any,
    ) -> None:
        super().__init__(batch_size=batch_size, **kwargs)
        owner = type(self).__name__
        self.n_particles = check_positive_int(owner, "n_particles", n_particles)
        self.features = check_choice(owner, "features", features, ("all", "raw"))
        self.noise = check_positive_float(owner, "noise", noise, allow_zero=True)
        self.val_fraction, self.test_fraction = check_split_fractions(owner, val_fraction, test_fraction)
        self.standardize = standardize
        self.feature_names = list(RAW_FEATURES) + (list(DERIVED_FEATURES) if features == "all" else [])
        self.target_names = list(TARGETS)
        self.input_shape = (len(self.feature_names),)
        self.feature_scaler: StandardScaler | None = None
        self.target_scaler: StandardScaler | None = None

    def split_sizes(self) -> dict[str, int]:
        n_test = round(self.n_particles * self.test_fraction)
        n_val = round((self.n_particles - n_test) * self.val_fraction)
        sizes = {"train": self.n_particles - n_test - n_val, "val": n_val, "test": n_test}
        if min(sizes.values()) < 1:
            raise PlasticityConfigError(
                f"{type(self).__name__}.n_particles={self.n_particles} is too small for val_fraction="
                f"{self.val_fraction} and test_fraction={self.test_fraction}: splits would be {sizes}"
            )
        return sizes

    def load_splits(self) -> dict[str, IndexedTensorDataset]:
        sizes = self.split_sizes()
        columns = generate_particles(self.n_particles, seed=self.seed, noise=self.noise)
        inputs = torch.as_tensor(np.stack([columns[n] for n in self.feature_names], axis=1), dtype=torch.float32)
        targets = torch.as_tensor(np.stack([columns[n] for n in self.target_names], axis=1), dtype=torch.float32)
        order = torch.randperm(self.n_particles, generator=torch.Generator().manual_seed(self.seed))
        inputs, targets = inputs[order], targets[order]
        test_end, val_end = sizes["test"], sizes["test"] + sizes["val"]
        parts = {"test": slice(0, test_end), "val": slice(test_end, val_end), "train": slice(val_end, None)}
        if self.standardize:  # scikit-learn's StandardScaler, fitted on the training rows only
            self.feature_scaler = StandardScaler().fit(inputs[parts["train"]].double().numpy())
            self.target_scaler = StandardScaler().fit(targets[parts["train"]].double().numpy())
            inputs = torch.as_tensor(self.feature_scaler.transform(inputs.double().numpy()), dtype=torch.float32)
            targets = torch.as_tensor(self.target_scaler.transform(targets.double().numpy()), dtype=torch.float32)
        return {name: IndexedTensorDataset(inputs[part], targets[part]) for name, part in parts.items()}

    def inverse_transform_targets(self, values: torch.Tensor) -> torch.Tensor:
        """Targets (or predictions) in physical units; identity without standardisation."""
        if self.target_scaler is None:
            if self.standardize:
                raise RuntimeError(f"{type(self).__name__}: call setup() before inverse_transform_targets")
            return values
        return _unscale(self.target_scaler, values)

    def inverse_transform_features(self, values: torch.Tensor) -> torch.Tensor:
        """Features in physical units; identity without standardisation."""
        if self.feature_scaler is None:
            if self.standardize:
                raise RuntimeError(f"{type(self).__name__}: call setup() before inverse_transform_features")
            return values
        return _unscale(self.feature_scaler, values)
