"""Parseval regularisation (Chung et al. 2024): keep each weight matrix's rows orthogonal, for any training loop."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from plasticity_lightning.core.errors import PlasticityConfigError, check_positive_float
from plasticity_lightning.policies.base import Policy


def parseval_penalty(weights: torch.Tensor | Iterable[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """Σ_l ‖W_l W_lᵀ − s·I‖²_F, differentiable: add ``λ·parseval_penalty(...)`` to a loss.

    ``W_l`` is a weight with one row per output unit (a convolution's ``[out, in, k, k]`` kernel is flattened to
    ``[out, in·k·k]``), ``s`` the ``scale`` (1: rows orthonormal). The penalty is 0 exactly when every layer's rows
    are orthogonal with squared norm ``s``; a layer with more rows than columns cannot reach 0.

    Args:
        weights: one weight or several, each with one row per output unit.
        scale: the target squared row norm s (default 1.0: orthonormal rows; Chung et al. 2024).

    Example::

        >>> parseval_penalty(torch.eye(3))
        tensor(0.)
        >>> parseval_penalty(torch.tensor([[1.0, 1.0]]))  # (‖w‖² − 1)² = (2 − 1)²
        tensor(1.)
    """
    tensors = [weights] if isinstance(weights, torch.Tensor) else list(weights)
    total = None
    for weight in tensors:
        rows = weight.reshape(weight.shape[0], -1)
        gram = rows @ rows.T
        identity = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        term = (gram - scale * identity).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("parseval_penalty needs at least one weight")
    return total


def _output_layer(model: nn.Module) -> str | None:
    output = getattr(model, "output_layer", None)
    if callable(output):
        with torch.no_grad():
            found = output()
        if isinstance(found, tuple) and found and isinstance(found[0], str):
            return found[0]
    return None


class ParsevalRegularization(Policy):
    """Parseval regularisation (Chung et al. 2024, "Parseval regularization for continual reinforcement learning").

    Adds λ·Σ_l ‖W_l W_lᵀ − s·I‖²_F over the hidden layers' weights to the loss.

    Orthogonal rows keep a layer's singular values near 1, which keeps gradients and features well conditioned as
    tasks change. As in the paper, the output layer is left out. Implemented on the gradients (like
    :class:`~plasticity_lightning.policies.L2Init`): :meth:`step`, called after ``backward()`` and before
    ``optimizer.step()``, adds ∇ of the penalty (computed by autograd from :func:`parseval_penalty`) to every
    selected weight's gradient, so ``training_step`` is untouched and DDP ranks, which hold identical weights, add
    identical terms.

    Args:
        model: the network (``None``: give it to :meth:`attach`).
        weight: λ.
        scale: s, the target squared row norm.
        layers: module names whose weights are regularised (``None``: every Linear/Conv weight except the model's
            ``output_layer()``, or else except the last weight layer).
        prefix: name of the values in reports.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1))
        >>> with torch.no_grad():
        ...     _ = net[0].weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
        >>> net[0].weight.grad = torch.zeros(2, 2)
        >>> parseval = ParsevalRegularization(net, weight=0.5)
        >>> parseval.step()  # 0.5 · ‖[[2, 1], [1, 1]] − I‖² = 0.5 · 3
        1.5
        >>> net[0].weight.grad.tolist()  # 0.5 · 4 (WWᵀ − I) W
        [[2.0, 4.0], [2.0, 2.0]]
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        weight: float = 1e-3,
        scale: float = 1.0,
        layers: Sequence[str] | None = None,
        prefix: str = "parseval",
    ) -> None:
        super().__init__(prefix=prefix)
        owner = type(self).__name__
        self.weight = check_positive_float(owner, "weight", weight)
        self.scale = check_positive_float(owner, "scale", scale)
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise PlasticityConfigError(f"{owner}.layers={layers!r} is invalid; expected a list of module names")
        self.layer_names = None if layers is None else list(layers)
        self._bound: dict[str, nn.Parameter] = {}
        if model is not None:
            self.attach(model)

    def select(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """``{module name: weight}`` of the regularised layers."""
        weights = {
            name: module.weight
            for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.weight.requires_grad
        }
        if self.layer_names is not None:
            unknown = [name for name in self.layer_names if name not in weights]
            if unknown:
                raise PlasticityConfigError(
                    f"{self.owner}.layers: {unknown[0]!r} is not a Linear or Conv layer of {type(model).__name__}; "
                    f"choose among {', '.join(list(weights)[:12])}"
                )
            return {name: weights[name] for name in self.layer_names}
        head = _output_layer(model) or (list(weights)[-1] if weights else None)
        chosen = {name: w for name, w in weights.items() if name != head}
        if not chosen:
            raise PlasticityConfigError(
                f"{self.owner}: {type(model).__name__} has no Linear or Conv layer besides its output layer; name the "
                "layers with `layers`"
            )
        return chosen

    def attach(self, model: nn.Module) -> None:
        """Regularise ``model``'s selected weights (checked now)."""
        self._bound = self.select(model)
        self.report_binding(self._bound)

    @property
    def bound(self) -> Mapping[str, nn.Parameter]:
        """The regularised weights, by module name."""
        return self._bound

    def step(self, penalty: bool = True) -> float | None:
        """Add λ·∇ of the penalty to every bound weight's gradient.

        Returns λ·penalty (``None`` with ``penalty=False``, which saves a read-back).
        """
        if not self._bound:
            raise PlasticityConfigError(f"{self.owner}.step: no model; pass it to {self.owner}(model, ...)")
        weights = list(self._bound.values())
        with torch.enable_grad():
            leaves = [w.detach().requires_grad_(True) for w in weights]
            value = self.weight * parseval_penalty(leaves, self.scale)
            grads = torch.autograd.grad(value, leaves)
        with torch.no_grad():
            for w, g in zip(weights, grads, strict=True):
                if w.grad is None:
                    w.grad = g.to(w.dtype)
                else:
                    w.grad.add_(g.to(w.grad.dtype))
        return float(value.detach()) if penalty else None
