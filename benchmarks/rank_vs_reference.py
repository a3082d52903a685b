"""The library's rank measures side by side with Dohare et al.'s and with an exact computation.

The reference is ``compute_matrix_rank_summaries`` from ``lop/utils/miscellaneous.py`` of
https://github.com/shibhansh/loss-of-plasticity (not part of this project: pass a checkout's root with
``--reference``), called as their permuted-MNIST script calls it (``use_scipy=True``: SciPy's ``gesvd`` on the
feature matrix as it is, float32). It returns their ``rank`` (non-zero σ), effective rank, ``approximate_rank``
(99% of Σσ²) and ``abs_approximate_rank`` (99% of Σσ, which is srank with δ = 0.01, and what their CIFAR and RL
code call "stable rank").

"Exact" is a separate float64 computation: NumPy's SVD of the same float32 matrix converted to float64, then the
definitions written out in NumPy. It follows the library's documented conventions where the definitions leave a
choice: 0 for an all-zero matrix (the reference gives 1, from a 0/0), and rank at NumPy's ``matrix_rank``
tolerance for float32 input, max(n, d)·eps₃₂·σ₁ (the reference counts non-zero σ). So it checks the library's
numerics, and a reference value off it on those two points is a convention difference, not an error.

The matrices are float32, as layer features are, and have spectra of known shape: flat (Gaussian), geometric,
power law, exactly low rank, ReLU features with dead units, wide (n < d), rank one, the geometric one scaled to
1e20 and 1e-25 (σ² leaves float32's range), and all zeros.

    python benchmarks/rank_vs_reference.py --reference ../loss-of-plasticity
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch
from _reference import load_reference_rank_measures

from plasticity_lightning.metrics import approximate_rank, effective_rank, numerical_rank, srank

MEASURES = ("effective_rank", "approximate_rank", "srank", "rank")


def matrices() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)

    def with_spectrum(n: int, d: int, s: np.ndarray) -> np.ndarray:
        u, _ = np.linalg.qr(rng.normal(size=(n, len(s))))
        v, _ = np.linalg.qr(rng.normal(size=(d, len(s))))
        return (u * s) @ v.T

    k = np.arange(300)
    geometric = with_spectrum(1000, 300, 0.95**k)
    relu = np.maximum(rng.normal(size=(1024, 64)) @ rng.normal(size=(64, 256)), 0.0)
    relu[:, rng.choice(256, 80, replace=False)] = 0.0  # dead units
    found = {
        "gaussian 2000x500": rng.normal(size=(2000, 500)),
        "geometric 0.95^k 1000x300": geometric,
        "power law k^-1.5 1000x300": with_spectrum(1000, 300, (k + 1.0) ** -1.5),
        "rank 20 of 1000x200": with_spectrum(1000, 200, np.linspace(1, 0.1, 20)),
        "ReLU, 80 of 256 dead 1024x256": relu,
        "wide 100x400": rng.normal(size=(100, 400)),
        "rank one 500x100": np.outer(rng.normal(size=500), rng.normal(size=100)),
        "geometric x 1e20": geometric * 1e20,
        "geometric x 1e-25": geometric * 1e-25,
        "all zeros 100x50": np.zeros((100, 50)),
    }
    return {name: m.astype(np.float32) for name, m in found.items()}


def exact(m: np.ndarray) -> dict[str, float]:
    """The definitions in float64 NumPy on a float64 SVD of the matrix."""
    s = np.linalg.svd(m.astype(np.float64), compute_uv=False)
    if s.max() == 0:
        return dict.fromkeys(MEASURES, 0.0)
    s = s / s[0]  # no measure depends on scale; keeps σ² in range
    p = s[s > 0] / s.sum()
    energy = np.cumsum(s**2) / np.sum(s**2)
    mass = np.cumsum(s) / s.sum()
    return {
        "effective_rank": float(np.exp(-(p * np.log(p)).sum())),
        "approximate_rank": float(np.searchsorted(energy, 0.99 - 1e-12) + 1),
        "srank": float(np.searchsorted(mass, 0.99 - 1e-12) + 1),
        "rank": float((s > max(m.shape) * np.finfo(np.float32).eps).sum()),
    }


def library(m: np.ndarray) -> dict[str, float]:
    x = torch.from_numpy(m)
    return {
        "effective_rank": float(effective_rank(x)),
        "approximate_rank": float(approximate_rank(x, threshold=0.99)),
        "srank": float(srank(x, delta=0.01)),
        "rank": float(numerical_rank(x)),
    }


def reference(misc, m: np.ndarray) -> dict[str, float]:
    try:
        rank, erank, approx, abs_approx = misc.compute_matrix_rank_summaries(
            torch.from_numpy(m), prop=0.99, use_scipy=True
        )
    except Exception as err:  # the reference has no guard for degenerate input
        return dict.fromkeys(MEASURES, f"{type(err).__name__}")
    return {
        "effective_rank": float(erank),
        "approximate_rank": float(approx),
        "srank": float(abs_approx),
        "rank": float(rank),
    }


def _close(value: float, truth: float) -> bool:
    return abs(value - truth) <= 1e-6 * max(1.0, abs(truth))  # False for NaN


def _show(value: float | str, truth: float) -> str:
    if isinstance(value, str):
        return f"{value:>12}"
    return f"{value:11.4f}{' ' if _close(value, truth) else '*'}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Rank measures: library vs Dohare et al.'s code vs exact.")
    parser.add_argument("--reference", required=True, help="root of a shibhansh/loss-of-plasticity checkout")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    misc = load_reference_rank_measures(args.reference)
    print("value per measure: exact | library | reference   (* = differs from exact by more than 1e-6 relative)")
    worst = dict.fromkeys(MEASURES, 0.0)
    misses = {who: dict.fromkeys(MEASURES, 0) for who in ("library", "reference")}
    cases = matrices()
    for name, m in cases.items():
        truth, ours, theirs = exact(m), library(m), reference(misc, m)
        print(name)
        for measure in MEASURES:
            target = truth[measure]
            print(f"    {measure:<17} {target:11.4f} |{_show(ours[measure], target)}|{_show(theirs[measure], target)}")
            worst[measure] = max(worst[measure], abs(ours[measure] - target) / max(1.0, abs(target)))
            for who, value in (("library", ours[measure]), ("reference", theirs[measure])):
                misses[who][measure] += isinstance(value, str) or not _close(value, target)
    print(
        "largest relative difference of the library from exact: "
        + ", ".join(f"{measure} {error:.1e}" for measure, error in worst.items())
    )
    for who, counts in misses.items():
        print(
            f"{who}: values off exact by more than 1e-6, of {len(cases)} matrices: "
            + ", ".join(f"{measure} {count}" for measure, count in counts.items())
        )
    print("(the all-zero matrix and rank differ by convention: see the docstring)")


if __name__ == "__main__":
    main()
