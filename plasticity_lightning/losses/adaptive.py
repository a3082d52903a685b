"""Adaptive MSE/MAE regression loss (neural-network-lab-python's ``ml_utils.py``).

``loss = w_mse·MSE + w_mae·MAE``; the two weights are recomputed once per epoch from the epoch's validation R²
and loss by one of four strategies (:func:`adaptive_loss_weights`):

* ``r2_based``: ``w_mse = min(0.9, 0.2 + 0.7·R²)``, ``w_mae = max(0.1, 0.8 − 0.7·R²)`` — more MSE as the fit
  improves.
* ``loss_based``: the same with ``1 − clip(loss/2, 0, 1)`` in place of R².
* ``combined``: the mean of the two, renormalised to sum to 1.
* ``physics_aware`` (the seed's ``curve_fancy``): for the first four epochs the sine schedule
  ``w_i = (sin(e + 2πi/2) + 1)/2`` (L1-normalised; ``e`` = epochs recorded); then
  ``unit(signed_square(w_e − w_{e−1}))`` — negated when the loss fell — plus the sine weights; a zero MSE weight
  becomes ``max(0.05, 0.1·mean|w|)``; shifted to be non-negative and L1-normalised.

Deviation, documented: the seed appends the weights to its history on every *batch*, so its last two entries are
almost always equal and the adaptive term of ``physics_aware`` is 0; here the history has one entry per epoch, so
the term does what the seed's docstring says. Until the first update the weights are those of the seed's initial
state (R² 0.5, loss 1.0; the sine weights of epoch 0 for ``physics_aware``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from plasticity_lightning.core.errors import check_choice

Strategy = Literal["r2_based", "loss_based", "combined", "physics_aware"]
STRATEGIES = ("r2_based", "loss_based", "combined", "physics_aware")
_FANCY_AFTER = 4  # physics_aware adapts once more than (2 losses + 2) epochs are recorded


def _from_score(score: float) -> tuple[float, float]:
    return min(0.9, 0.2 + 0.7 * score), max(0.1, 0.8 - 0.7 * score)


def sine_weights(epoch: int, count: int = 2) -> list[float]:
    """The seed's exploration schedule: ``(sin(epoch + 2πi/count) + 1)/2``, L1-normalised.

    Args:
        epoch: the current epoch (the sine's phase: one radian per epoch).
        count: the number of weights (default 2: MSE and MAE).
    """
    raw = [(math.sin(epoch + 2 * math.pi * i / count) + 1) / 2 for i in range(count)]
    total = sum(abs(v) for v in raw)
    return [v / total for v in raw] if total > 0 else raw


def adaptive_loss_weights(
    strategy: Strategy,
    r2: float = 0.5,
    loss: float = 1.0,
    loss_history: Sequence[float] = (),
    weight_history: Sequence[Sequence[float]] = (),
) -> tuple[float, float]:
    """``(w_mse, w_mae)`` of ``strategy`` given the latest R², loss and histories.

    ``(w_mse, w_mae)`` of ``strategy`` given the latest R² and loss and, for ``physics_aware``, the per-epoch loss and
    weight histories (oldest first; ``loss_history`` includes the latest loss).

    Args:
        strategy: ``"r2_based"``, ``"loss_based"``, ``"combined"`` or ``"physics_aware"`` (the seed's four strategies).
        r2: the latest validation R² (default 0.5).
        loss: the latest loss, in the loss's units (default 1.0).
        loss_history: per-epoch losses, oldest first (``physics_aware`` only; default empty).
        weight_history: per-epoch ``(w_mse, w_mae)``, oldest first (``physics_aware`` only; default empty).

    Example::

        >>> [round(w, 4) for w in adaptive_loss_weights("r2_based", r2=0.8)]
        [0.76, 0.24]
        >>> [round(w, 4) for w in adaptive_loss_weights("combined", r2=0.8, loss=0.5)]
        [0.7425, 0.2575]
    """
    check_choice("adaptive_loss_weights", "strategy", strategy, STRATEGIES)
    if strategy == "r2_based":
        return _from_score(r2)
    if strategy == "loss_based":
        return _from_score(1 - min(1.0, max(0.0, loss / 2)))
    if strategy == "combined":
        a, b = adaptive_loss_weights("r2_based", r2, loss), adaptive_loss_weights("loss_based", r2, loss)
        w_mse, w_mae = (a[0] + b[0]) / 2, (a[1] + b[1]) / 2
        total = w_mse + w_mae
        return (w_mse / total, w_mae / total) if total > 0 else (0.5, 0.5)
    epoch = len(loss_history)
    sine = sine_weights(epoch)
    if epoch <= _FANCY_AFTER or len(weight_history) < 2:
        return sine[0], sine[1]
    step = [a - b for a, b in zip(weight_history[-1], weight_history[-2], strict=True)]
    signed_square = [math.copysign(d * d, d) for d in step]
    scale = math.sqrt(sum(v * v for v in signed_square))
    direction = [v / scale for v in signed_square] if scale > 0 else signed_square
    if loss_history[-1] < loss_history[-2]:
        direction = [-v for v in direction]
    weights = [d + s for d, s in zip(direction, sine, strict=True)]
    if weights[0] == 0:
        weights[0] = max(0.05, 0.1 * sum(abs(w) for w in weights) / len(weights))
    lowest = min(weights)
    if lowest < 0:
        weights = [w - lowest for w in weights]
    total = sum(abs(w) for w in weights)
    weights = [w / total for w in weights] if total > 0 else [0.5, 0.5]
    return weights[0], weights[1]


class AdaptiveRegressionLoss(nn.Module):
    """``w_mse·MSE + w_mae·MAE`` with weights updated once per epoch by :meth:`update`.

    Use it as a model's ``loss`` and add :class:`~plasticity_lightning.callbacks.AdaptiveLossWeights`, which calls
    :meth:`update` with the validation R² and loss after every validation and logs the weights. The weights and the
    per-epoch histories are buffers, so they are saved in checkpoints and a resumed run continues with them.

    Args:
        strategy: ``r2_based``, ``loss_based``, ``combined`` or ``physics_aware`` (see the module docstring).

    Example::

        >>> loss = AdaptiveRegressionLoss("r2_based")
        >>> [round(w, 4) for w in loss.update(r2=0.8, loss=0.3)]
        [0.76, 0.24]
        >>> round(loss(torch.zeros(4, 2), torch.ones(4, 2)).item(), 6)  # 0.76·1 + 0.24·1
        1.0
    """

    def __init__(self, strategy: Strategy = "r2_based") -> None:
        super().__init__()
        self.strategy = check_choice(type(self).__name__, "strategy", strategy, STRATEGIES)
        initial = adaptive_loss_weights(strategy)
        # float32: buffers follow the model to any device (Apple GPUs have no float64)
        self.register_buffer("weights", torch.tensor(initial, dtype=torch.float32))
        self.register_buffer("loss_history", torch.zeros(0, dtype=torch.float32))
        self.register_buffer("weight_history", torch.tensor([initial], dtype=torch.float32))
        self.register_buffer("updated_epoch", torch.tensor(-1, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # The histories grow with training: take the checkpoint's length instead of failing on a size mismatch.
        for name in ("loss_history", "weight_history"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=self.weights.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def mse_weight(self) -> float:
        return float(self.weights[0])

    @property
    def mae_weight(self) -> float:
        return float(self.weights[1])

    def update(self, r2: float, loss: float, epoch: int | None = None) -> tuple[float, float]:
        """Record one epoch's validation ``r2`` and ``loss`` and set the next epoch's weights (returned).

        With ``epoch``, a second call for the same epoch (several validations per epoch) changes nothing and returns
        the current weights.
        """
        if epoch is not None:
            if epoch <= int(self.updated_epoch):
                return self.mse_weight, self.mae_weight
            self.updated_epoch.fill_(epoch)
        device = self.weights.device
        self.loss_history = torch.cat(
            [self.loss_history, torch.tensor([float(loss)], dtype=torch.float32, device=device)]
        )
        new = adaptive_loss_weights(
            self.strategy, float(r2), float(loss), self.loss_history.tolist(), self.weight_history.tolist()
        )
        self.weights = torch.tensor(new, dtype=torch.float32, device=device)
        self.weight_history = torch.cat([self.weight_history, self.weights[None]])
        return new

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        error = prediction - target
        weights = self.weights.to(prediction.dtype)
        return weights[0] * error.pow(2).mean() + weights[1] * error.abs().mean()

    def extra_repr(self) -> str:
        return f"strategy={self.strategy!r}, w_mse={self.mse_weight:.4f}, w_mae={self.mae_weight:.4f}"
