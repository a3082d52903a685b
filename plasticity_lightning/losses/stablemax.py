"""StableMax and its cross-entropy (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability").

StableMax(x)_i = s(x_i) / Σ_j s(x_j) with s(x) = x + 1 for x ≥ 0 and 1 / (1 − x) for x < 0: it grows linearly
instead of exponentially, so large logits do not absorb the small terms of the normaliser and the loss cannot
round to exactly zero (Softmax Collapse). The paper's code computes it in float64; so does this module by default.
"""

from __future__ import annotations

import torch
from torch import nn

from plasticity_lightning.core.errors import check_choice

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "input": None}


def stablemax_s(x: torch.Tensor) -> torch.Tensor:
    """s(x) = x + 1 (x ≥ 0), 1 / (1 − x) (x < 0): positive, continuous, with continuous first derivative at 0.

    Args:
        x: logits (any shape).

    Example::

        >>> stablemax_s(torch.tensor([-3.0, 0.0, 2.0]))
        tensor([0.2500, 1.0000, 3.0000])
    """
    # 1 - x >= 1 where x < 0, so no epsilon is needed (the paper's code adds 1e-30); clamp keeps the unused branch
    # of torch.where finite for x >= 1
    return torch.where(x < 0, 1.0 / (1.0 - x.clamp(max=0.0)), x + 1.0)


def stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """StableMax probabilities along ``dim``.

    Example::

        >>> stablemax(torch.tensor([0.0, 1.0, -1.0]))  # s = 1, 2, 0.5
        tensor([0.2857, 0.5714, 0.1429])
    """
    s = stablemax_s(x)
    return s / s.sum(dim=dim, keepdim=True)


def log_stablemax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """log StableMax(x) along ``dim``.

    Args:
        x: logits (any shape).
        dim: the class axis (default -1).
    """
    s = stablemax_s(x)
    return torch.log(s) - torch.log(s.sum(dim=dim, keepdim=True))


class StableMaxCrossEntropy(nn.Module):
    """−log StableMax(logits)_y, averaged (or summed, or per sample) over the batch.

    Args:
        precision: ``"float64"`` (the paper's code: logits cast to float64 and the loss returned in float64),
            ``"float32"``, or ``"input"`` (the logits' own dtype; half precision is promoted to float32).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Usable as ``loss: stablemax_cross_entropy`` by every classification model of the library.

    Example::

        >>> loss = StableMaxCrossEntropy()
        >>> round(float(loss(torch.tensor([[0.0, 1.0, -1.0]]), torch.tensor([1]))), 6)  # -log(2 / 3.5)
        0.559616
    """

    def __init__(self, precision: str = "float64", reduction: str = "mean") -> None:
        super().__init__()
        self.precision = check_choice("StableMaxCrossEntropy", "precision", precision, tuple(_DTYPES))
        self.reduction = check_choice("StableMaxCrossEntropy", "reduction", reduction, ("mean", "sum", "none"))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dtype = _DTYPES[self.precision]
        if dtype is None:
            dtype = logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32
        log_probs = log_stablemax(logits.to(dtype), dim=1)
        per_sample = -log_probs.gather(1, target.long().unsqueeze(1)).squeeze(1)
        if self.reduction == "mean":
            return per_sample.mean()
        return per_sample.sum() if self.reduction == "sum" else per_sample


class PrecisionCrossEntropy(nn.Module):
    """Softmax cross-entropy computed in a chosen precision (the paper's float16/32/64 baselines).

    Args:
        precision: the float format the cross-entropy is computed in: ``"float16"``, ``"float32"`` or ``"float64"``
            (default; Prieto et al. 2025's baselines).
        reduction: ``"mean"`` (default), ``"sum"`` or ``"none"``, as in :func:`torch.nn.functional.cross_entropy`.

    Example::

        >>> logits = torch.tensor([[0.0, 30.0]])  # exp(-30) ≈ 9e-14: absorbed by 1 in float32, not in float64
        >>> float(PrecisionCrossEntropy("float32")(logits, torch.tensor([1])))  # collapsed: exactly 0
        0.0
        >>> PrecisionCrossEntropy("float64")(logits, torch.tensor([1])).item() > 0
        True
    """

    def __init__(self, precision: str = "float64", reduction: str = "mean") -> None:
        super().__init__()
        self.precision = check_choice(
            "PrecisionCrossEntropy", "precision", precision, ("float16", "float32", "float64")
        )
        self.reduction = check_choice("PrecisionCrossEntropy", "reduction", reduction, ("mean", "sum", "none"))

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        dtype = getattr(torch, self.precision)
        return nn.functional.cross_entropy(logits.to(dtype), target.long(), reduction=self.reduction)
