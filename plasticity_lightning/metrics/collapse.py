"""Softmax Collapse and naive loss minimisation (Prieto et al. 2025).

=================================  =================================================================================
function                           definition
=================================  =================================================================================
:func:`softmax_collapse_fraction`  share of rows whose softmax normaliser Σ_j exp(z_j − max z) is exactly 1 in the
                                   given precision: every non-maximal term was absorbed (the paper's
                                   ``softmax_collapse``; it uses the max logit, not the label)
:func:`zero_loss_fraction`         share of rows whose cross-entropy, computed in that precision, is exactly 0 (the
                                   paper's ``zero_terms``)
:func:`logit_norm`                 mean L2 norm of the logit rows
:func:`nlm_alignment`              cos(−∇L, θ): alignment of the descent direction with scaling the weights along
                                   themselves (naive loss minimisation; ⊥Grad removes this component)
:func:`loss_nlm_alignment`         the same for a model and a loss closure, overall and per weight tensor
=================================  =================================================================================

Two classes collapse in float32 once the logit gap exceeds ≈ 16.6 (exp(−gap) < 2⁻²⁴); in float64 ≈ 36.7.

Non-finite logits (NaN or ±inf in the given precision, e.g. beyond 65504 in float16) make both shares NaN, and a
non-finite parameter or gradient makes ``nlm_alignment`` NaN: a diverged model has no collapse share, and the
comparisons (``== 1``, ``== 0``, ``> 0``) would otherwise report it as a clean 0.0.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable

import torch
from torchmetrics import Metric

from plasticity_lightning.core.errors import check_choice

PRECISIONS = ("float16", "float32", "float64")


def _in(logits: torch.Tensor, precision: str) -> torch.Tensor:
    check_choice("softmax collapse", "precision", precision, PRECISIONS)
    if logits.ndim != 2:
        raise ValueError(f"Expected [N, C] logits, got shape {tuple(logits.shape)}")
    return logits.detach().to(getattr(torch, precision))


def _collapsed(logits: torch.Tensor, precision: str) -> torch.Tensor:
    z = _in(logits, precision)
    z = z - z.max(dim=1, keepdim=True).values
    return z.exp().sum(dim=1) == 1


def _zero_loss(logits: torch.Tensor, targets: torch.Tensor, precision: str) -> torch.Tensor:
    z = _in(logits, precision)
    return torch.nn.functional.cross_entropy(z, targets.long(), reduction="none") == 0


def _nonfinite_rows(logits: torch.Tensor, precision: str) -> torch.Tensor:
    """How many rows hold a NaN/inf logit in ``precision``."""
    return (~torch.isfinite(_in(logits, precision))).any(dim=1).sum()


def _share(flags: torch.Tensor, logits: torch.Tensor, precision: str) -> float:
    return float(flags.float().mean()) if not int(_nonfinite_rows(logits, precision)) else math.nan


def softmax_collapse_fraction(logits: torch.Tensor, precision: str = "float32") -> float:
    """Share of rows whose softmax normaliser is exactly 1 in ``precision`` (NaN if any logit is non-finite).

    Args:
        logits: the model's output logits, ``[N, classes]``.
        precision: the floating-point format the softmax is evaluated in: ``"float16"``, ``"float32"`` (default: what a
            float32 model computes) or ``"float64"`` (Prieto et al. 2025).

    Example::

        >>> softmax_collapse_fraction(torch.tensor([[0.0, 200.0], [0.0, 5.0]]))
        0.5
    """
    return _share(_collapsed(logits, precision), logits, precision)


def zero_loss_fraction(
    logits: torch.Tensor,
    targets: torch.Tensor,
    precision: str = "float32",
    criterion: torch.nn.Module | None = None,
) -> float:
    """Share of rows whose cross-entropy in ``precision`` is exactly 0 (NaN if any logit is non-finite).

    With a ``criterion`` that is another loss with a ``reduction`` (StableMax cross-entropy), the share of rows whose
    own loss term is exactly 0 instead — what its training sees, computed as it computes it (NaN if any logit is
    non-finite in its own dtype). A ``nn.CrossEntropyLoss`` criterion, or one without ``reduction``, gives the
    cross-entropy share.

    Args:
        logits: the model's output logits, ``[N, classes]``.
        targets: the class index of each row, ``[N]``.
        precision: the floating-point format the softmax is evaluated in: ``"float16"``, ``"float32"`` (default: what a
            float32 model computes) or ``"float64"`` (Prieto et al. 2025).
        criterion: the model's training loss (``None``: softmax cross-entropy).

    Example::

        >>> zero_loss_fraction(torch.tensor([[0.0, 200.0], [0.0, 200.0]]), torch.tensor([1, 0]))
        0.5
        >>> from plasticity_lightning.losses import StableMaxCrossEntropy
        >>> logits, targets = torch.tensor([[-1e8, 1e8], [0.0, 200.0]]), torch.tensor([1, 1])
        >>> zero_loss_fraction(logits, targets), zero_loss_fraction(logits, targets, criterion=StableMaxCrossEntropy())
        (1.0, 0.5)
    """
    if criterion is None or isinstance(criterion, torch.nn.CrossEntropyLoss) or not hasattr(criterion, "reduction"):
        return _share(_zero_loss(logits, targets, precision), logits, precision)
    check_choice("softmax collapse", "precision", precision, PRECISIONS)
    if not bool(torch.isfinite(logits).all()):
        return math.nan
    per_row = copy.copy(criterion)
    per_row.reduction = "none"
    with torch.no_grad():
        return float((per_row(logits, targets) == 0).float().mean())


def logit_norm(logits: torch.Tensor) -> float:
    """Mean L2 norm of the logit rows.

    Args:
        logits: the model's output logits, ``[N, classes]``.
    """
    return float(logits.detach().double().norm(dim=1).mean())


def nlm_alignment(params: Iterable[torch.Tensor], grads: Iterable[torch.Tensor | None]) -> float:
    """cos(−g, θ) over the concatenation of ``params`` and their gradients (``None`` gradients are skipped).

    0 when either is all zero, NaN when either holds a NaN or infinite value.

    Args:
        params: the parameters θ (any shapes; flattened and concatenated).
        grads: their gradients g, in the same order (``None`` skips that parameter).

    Example::

        >>> nlm_alignment([torch.tensor([1.0, 0.0])], [torch.tensor([-2.0, 0.0])])  # descent scales θ up
        1.0
    """
    dot = norm_w = norm_g = 0.0
    for param, grad in zip(params, grads, strict=True):
        if grad is None:
            continue
        w, g = param.detach().double().reshape(-1), grad.detach().double().reshape(-1)
        dot -= float(torch.dot(w, g))
        norm_w += float(torch.dot(w, w))
        norm_g += float(torch.dot(g, g))
    denominator = (norm_w * norm_g) ** 0.5
    if not (math.isfinite(dot) and math.isfinite(denominator)):
        return math.nan  # a NaN would otherwise fail `> 0` and read as a clean 0.0
    return dot / denominator if denominator > 0 else 0.0


def loss_nlm_alignment(model: torch.nn.Module, loss: Callable[[], torch.Tensor]) -> tuple[float, dict[str, float]]:
    """:func:`nlm_alignment` of ``loss()``'s gradient over ``model``'s trainable parameters, overall and per tensor.

    ``loss`` is called with the model in eval mode (each module's mode is restored afterwards) and gradients enabled;
    the gradient comes from ``torch.autograd.grad``, so no ``.grad`` is touched.

    Args:
        model: the model θ belongs to.
        loss: computes the loss from ``model``, e.g. ``lambda: criterion(model(x), y)``.

    Returns:
        The alignment over all trainable parameters, and ``{name: alignment}`` for each weight tensor (two or more
        dimensions) that has a gradient.

    Example::

        >>> model = torch.nn.Linear(2, 1, bias=False)
        >>> with torch.no_grad():
        ...     _ = model.weight.copy_(torch.tensor([[1.0, 0.0]]))
        >>> loss_nlm_alignment(model, lambda: -model(torch.tensor([[2.0, 0.0]])).sum())  # descent scales θ up
        (1.0, {'weight': 1.0})
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.enable_grad():
            grads = torch.autograd.grad(loss(), [p for _, p in named], allow_unused=True)
    finally:
        for module, flag in flags.items():
            module.train(flag)
    per_tensor = {
        name: nlm_alignment([param], [grad])
        for (name, param), grad in zip(named, grads, strict=True)
        if param.ndim >= 2 and grad is not None
    }
    return nlm_alignment([p for _, p in named], grads), per_tensor


class SoftmaxCollapse(Metric):
    """Accumulating twin of :func:`softmax_collapse_fraction` and :func:`zero_loss_fraction`.

    Accumulating twin of :func:`softmax_collapse_fraction` and :func:`zero_loss_fraction` (``update(logits, targets)``;
    ``compute()`` returns ``{"softmax_collapse", "zero_terms", "logit_norm"}``), summed across processes. Both shares
    are NaN once any row had a non-finite logit.

    Args:
        precision: ``float16``, ``float32`` or ``float64``.
    """

    is_differentiable = False
    full_state_update = False
    collapsed: torch.Tensor
    zero: torch.Tensor
    norm: torch.Tensor
    count: torch.Tensor
    nonfinite: torch.Tensor

    def __init__(self, precision: str = "float32", **kwargs) -> None:
        super().__init__(**kwargs)
        self.precision = check_choice("SoftmaxCollapse", "precision", precision, PRECISIONS)
        for name in ("collapsed", "zero", "norm", "count", "nonfinite"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.collapsed += _collapsed(logits, self.precision).sum()
        self.zero += _zero_loss(logits, targets, self.precision).sum()
        self.norm += logits.detach().double().norm(dim=1).sum()
        self.count += logits.shape[0]
        self.nonfinite += _nonfinite_rows(logits, self.precision)

    def compute(self) -> dict[str, torch.Tensor]:
        finite = self.nonfinite == 0
        return {
            "softmax_collapse": torch.where(finite, self.collapsed / self.count, torch.nan),
            "zero_terms": torch.where(finite, self.zero / self.count, torch.nan),
            "logit_norm": self.norm / self.count,
        }
