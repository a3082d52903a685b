"""Σ-orthogonal incoming weights for replaced units (RR-CBP, "rank-restoring" continual backprop).

Given Σ, the (uncentred) covariance of a layer's inputs, a unit with incoming weights w has pre-activation energy
‖w‖²_Σ = wᵀΣw = E[(wᵀx)²], and two units are Σ-orthogonal when w₁ᵀΣw₂ = 0, i.e. their pre-activations are
uncorrelated on the data. RR-CBP draws a replaced unit's weights Σ-orthogonal to the kept units' rows, so the new
unit adds a direction the layer does not yet represent, and scales it to unit Σ-norm (or to an energy target).

Reference: DorDorHome/architectural_and_learning_on_loss_landscape on GitHub, ``rank_restoring/`` and
``rr_gnt2_fc.py``. Deviations, chosen for a library:

* Σ is a bias-corrected EMA updated on **every** training step (the reference starts its EMA at 0 without bias
  correction and updates it only on steps where the layer replaces units, so early Σ are shrunk toward 0).
* The new unit's bias is 0 and its outgoing weights are exactly 0 (as in CBP; the reference centres the bias on the
  batch and "micro-seeds" the outgoing column with 1e-4 noise, which changes the network's output).
* The energy budget keeps the per-unit target and the reserve rule; the optional λ⋆ refinement is not implemented.
* The projector's ridge is 1e-10·tr(VᵀΣV)/k (the reference: 1e-6) and the projection is applied twice, so new rows
  are Σ-orthogonal to round-off rather than to ~1e-6.
"""

from __future__ import annotations

import torch

from plasticity_lightning.core.errors import PlasticityConfigError

# χ₀(φ) = E[φ(z)²] / E[z²] for z ~ N(0, 1): the share of pre-activation energy an activation passes on.
_CHI0 = {"ReLU": 0.5, "GELU": 0.5, "SELU": 0.5, "SiLU": 0.5, "Tanh": 1.0, "Sigmoid": 1.0, "Identity": 1.0}


def activation_energy_share(activation: torch.nn.Module | None) -> float:
    """χ₀ of an activation module (1 for none or an unknown one; (1 + α²)/2 for leaky ReLU).

    Args:
        activation: the activation module between producer and consumer, or ``None``.
    """
    if activation is None:
        return 1.0
    if isinstance(activation, torch.nn.LeakyReLU):
        return (1 + activation.negative_slope**2) / 2
    return _CHI0.get(type(activation).__name__, 1.0)


class InputCovariance:
    """Bias-corrected EMA of a layer's uncentred input covariance E[x xᵀ] (float64).

    Args:
        dim: input features of the layer.
        beta: EMA decay.
    """

    def __init__(self, dim: int, beta: float = 0.99) -> None:
        self.beta = beta
        self.ema = torch.zeros(dim, dim, dtype=torch.float64)
        self.steps = 0

    @torch.no_grad()
    def update(self, inputs: torch.Tensor) -> None:
        """Fold in a batch of inputs ``[m, dim]``."""
        x = inputs.detach().to(torch.float64).reshape(-1, self.ema.shape[0])
        self.update_moment(x.T @ x / max(x.shape[0], 1))

    @torch.no_grad()
    def update_moment(self, moment: torch.Tensor) -> None:
        """Fold in a batch's second moment ``xᵀx / m`` (e.g. already averaged across DDP ranks)."""
        self.ema = self.ema.to(moment.device)
        self.ema.mul_(self.beta).add_(moment.to(torch.float64), alpha=1 - self.beta)
        self.steps += 1

    def covariance(self, ridge: float = 1e-4) -> torch.Tensor:
        if self.steps == 0:
            raise PlasticityConfigError("InputCovariance: no inputs seen yet")
        sigma = self.ema / (1 - self.beta**self.steps)
        sigma = (sigma + sigma.T) / 2
        return sigma + ridge * torch.eye(len(sigma), dtype=sigma.dtype, device=sigma.device)

    def state_dict(self) -> dict:
        return {"ema": self.ema.cpu(), "steps": self.steps, "beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.ema = state["ema"].to(torch.float64)
        self.steps = int(state["steps"])
        self.beta = float(state["beta"])


@torch.no_grad()
def sigma_orthogonal_rows(
    kept: torch.Tensor,
    sigma: torch.Tensor,
    count: int,
    *,
    generator: torch.Generator | None = None,
    energy_share: float | None = None,
    max_trials: int = 4,
) -> torch.Tensor:
    """``count`` new incoming rows, each Σ-orthogonal to ``kept`` rows and to each other.

    Args:
        kept: ``[k, d]`` incoming weights of the units that stay.
        sigma: ``[d, d]`` input covariance (positive definite: add a ridge).
        count: rows to draw.
        generator: source of the random directions.
        energy_share: ``None``: unit Σ-norm (‖w‖_Σ = 1). Otherwise the activation's χ₀, and rows are scaled by the
            energy budget: target q = (tr Σ / d) / χ₀ per unit; while the layer's total Σ-energy stays below
            units·q, each new row gets min(q, reserve / rows left), past it min(q, 10⁻²·λ_min(Σ)).
        max_trials: random draws tried per row before taking the direction the kept rows cover least.

    Returns:
        ``[count, d]`` float64 rows.

    Example::

        >>> sigma = torch.diag(torch.tensor([4.0, 1.0, 1.0], dtype=torch.float64))
        >>> kept = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64)
        >>> w = sigma_orthogonal_rows(kept, sigma, 2, generator=torch.Generator().manual_seed(0))
        >>> torch.allclose(w @ sigma @ kept.T, torch.zeros(2, 1, dtype=torch.float64), atol=1e-9)
        True
        >>> torch.allclose(w @ sigma @ w.T, torch.eye(2, dtype=torch.float64), atol=1e-9)
        True
    """
    d = sigma.shape[0]
    sigma = sigma.to(torch.float64).cpu()
    # zero rows span nothing
    basis = [row for row in kept.to(torch.float64).cpu().reshape(-1, d) if row.abs().max() > 0]
    eigenvalues, eigenvectors = torch.linalg.eigh(sigma)
    eigenvalues = eigenvalues.clamp(min=1e-12)
    root = eigenvectors @ torch.diag(eigenvalues.sqrt()) @ eigenvectors.T
    inverse_root = eigenvectors @ torch.diag(eigenvalues.rsqrt()) @ eigenvectors.T
    units = len(basis) + count
    target = float(torch.trace(sigma)) / d / energy_share if energy_share else None
    used = sum(float(v @ sigma @ v) for v in basis)
    rows = []
    for i in range(count):
        w = _project_out(basis, sigma, generator, d, max_trials, root, inverse_root)
        norm = torch.sqrt(w @ sigma @ w)
        w = w / norm
        if target is not None:
            reserve = max(units * target - used, 0.0)
            q = min(target, reserve / (count - i)) if reserve > 0 else min(target, 1e-2 * float(eigenvalues[0]))
            w = w * q**0.5
            used += q
        basis.append(w)
        rows.append(w)
    return torch.stack(rows)


def _project_out(basis, sigma, generator, d, max_trials, root, inverse_root) -> torch.Tensor:
    """A direction Σ-orthogonal to ``basis``: a projected random draw, else the least-covered direction."""
    V = torch.stack(basis, dim=1) if basis else None

    def project(u: torch.Tensor) -> torch.Tensor:
        if V is None:
            return u
        gram = V.T @ sigma @ V
        ridge = 1e-10 * float(torch.trace(gram)) / gram.shape[0]
        gram = gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype)
        for _ in range(2):  # project twice: the second pass removes what round-off left of the first
            u = u - V @ torch.linalg.solve(gram, V.T @ (sigma @ u))
        return u

    for _ in range(max_trials):
        u = torch.randn(d, generator=generator, dtype=torch.float64)
        w = project(u)
        if torch.sqrt(w @ sigma @ w) > 1e-8:
            return w
    # Kept units span (almost) everything: take the direction they cover least, in whitened coordinates.
    whitened = root @ (V @ V.T if V is not None else torch.zeros(d, d, dtype=torch.float64)) @ root
    _, vectors = torch.linalg.eigh(whitened)
    w = project(inverse_root @ vectors[:, 0])
    if torch.sqrt(w @ sigma @ w) <= 1e-12:
        w = inverse_root @ vectors[:, 0]
    return w
