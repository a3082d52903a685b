"""Entropies of predictions, activations and attention, in nats.

=============================  ======================================================================
function                       definition
=============================  ======================================================================
:func:`prediction_entropy`     mean over samples of H(softmax(logits)) = −Σ_c p_c ln p_c
:func:`activation_entropy`     StabilAI / SurgeCollapseNet: p = softmax(h, dim=1);
                               mean over samples of −Σ_i p_i ln(p_i + 1e-10)
:func:`attention_entropy`      per head: mean over batch and queries of −Σ_k a_k ln a_k, from attention
                               probabilities ``[batch, heads, queries, keys]``
=============================  ======================================================================

``0·ln 0 = 0`` throughout (except where StabilAI's ``+1e-10`` is part of the definition). Computed in the
input's floating dtype (float32 for float32 activations, as StabilAI does); half precision is promoted to
float32.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from plasticity_lightning.core.errors import check_positive_int

STABILAI_EPS = 1e-10


def _working_dtype(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _entropy(probs: torch.Tensor, dim: int) -> torch.Tensor:
    return -torch.special.xlogy(probs, probs).sum(dim=dim)


def prediction_entropy(logits: torch.Tensor, *, from_logits: bool = True) -> torch.Tensor:
    """Mean entropy of the predicted class distributions (``[N, C]`` logits, or probabilities).

    Args:
        logits: the model's outputs, ``[N, classes]``.
        from_logits: whether ``logits`` are logits (softmax first; default) or already probabilities.

    Example::

        >>> prediction_entropy(torch.zeros(3, 4))  # uniform over 4 classes: ln 4
        tensor(1.3863)
    """
    return _prediction_entropies(logits, from_logits).mean()


def _prediction_entropies(logits: torch.Tensor, from_logits: bool) -> torch.Tensor:
    if logits.ndim != 2:
        raise ValueError(f"Expected [N, C] predictions, got shape {tuple(logits.shape)}")
    x = _working_dtype(logits.detach())
    probs = x.softmax(dim=1) if from_logits else x
    return _entropy(probs, dim=1)


def _activation_entropies(outputs: torch.Tensor) -> torch.Tensor:
    if outputs.ndim < 2:
        raise ValueError(f"Expected layer outputs [N, units, ...], got shape {tuple(outputs.shape)}")
    probs = _working_dtype(outputs.detach()).softmax(dim=1)
    return -(probs * torch.log(probs + STABILAI_EPS)).sum(dim=1)


def activation_entropy(outputs: torch.Tensor) -> torch.Tensor:
    """StabilAI's activation entropy: softmax over the unit axis, entropy (with its +1e-10), mean over samples.

    For convolutions the softmax runs over channels at each position, and the mean over batch and positions.

    Args:
        outputs: one layer's outputs, ``[N, units]`` or ``[N, C, ...]`` (softmax over the unit axis).

    Example::

        >>> round(float(activation_entropy(torch.zeros(5, 8))), 4)  # uniform over 8 units: ln 8
        2.0794
    """
    return _activation_entropies(outputs).mean()


def _attention_entropies(attention: torch.Tensor) -> torch.Tensor:
    if attention.ndim != 4:
        raise ValueError(
            f"Expected attention probabilities [batch, heads, queries, keys], got {tuple(attention.shape)}"
        )
    return _entropy(_working_dtype(attention.detach()), dim=-1)  # [batch, heads, queries]


def attention_entropy(attention: torch.Tensor) -> torch.Tensor:
    """Entropy of each head's attention distribution, averaged over batch and queries → ``[heads]``.

    Args:
        attention: attention probabilities, ``[batch, heads, queries, keys]`` (each row sums to 1), as HF models return
            with ``output_attentions=True``.

    Example::

        >>> a = torch.full((1, 2, 3, 4), 0.25)  # uniform over 4 keys
        >>> a[0, 1] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # head 1 attends to one key
        >>> attention_entropy(a)
        tensor([1.3863, 0.0000])
    """
    return _attention_entropies(attention).mean(dim=(0, 2))


class _MeanOf(Metric):
    """Running mean of per-sample values, summed across processes."""

    is_differentiable = False
    full_state_update = False
    total: torch.Tensor
    count: torch.Tensor

    def __init__(self, size: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        shape = () if size is None else (size,)
        self.add_state("total", default=torch.zeros(shape, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, values: torch.Tensor, count: int) -> None:
        self.total += values
        self.count += count

    def compute(self) -> torch.Tensor:
        return self.total / self.count


class PredictionEntropy(_MeanOf):
    """Accumulating twin of :func:`prediction_entropy`.

    Args:
        from_logits: whether ``logits`` are logits (softmax first; default) or already probabilities.
        **kwargs: passed to :class:`torchmetrics.Metric`.

    Example::

        >>> metric = PredictionEntropy()
        >>> metric.update(torch.zeros(2, 2))
        >>> metric.update(torch.tensor([[100.0, 0.0]]))
        >>> round(float(metric.compute()), 4)  # (ln 2 + ln 2 + 0) / 3
        0.4621
    """

    higher_is_better = None

    def __init__(self, from_logits: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.from_logits = from_logits

    def update(self, logits: torch.Tensor) -> None:
        entropies = _prediction_entropies(logits, self.from_logits)
        self._add(entropies.sum(), entropies.numel())


class ActivationEntropy(_MeanOf):
    """Accumulating twin of :func:`activation_entropy`.

    Args:
        size: length of the accumulated value (``None``, the default: a single number).
        **kwargs: passed to :class:`torchmetrics.Metric`.
    """

    def update(self, outputs: torch.Tensor) -> None:
        entropies = _activation_entropies(outputs)
        self._add(entropies.sum(), entropies.numel())


class AttentionEntropy(_MeanOf):
    """Accumulating twin of :func:`attention_entropy`: per-head entropy over batches and processes.

    Args:
        num_heads: heads of the attention layer.
    """

    def __init__(self, num_heads: int, **kwargs) -> None:
        super().__init__(size=check_positive_int("AttentionEntropy", "num_heads", num_heads), **kwargs)

    def update(self, attention: torch.Tensor) -> None:
        entropies = _attention_entropies(attention)  # [batch, heads, queries]
        if entropies.shape[1] != self.total.shape[0]:
            raise ValueError(f"AttentionEntropy(num_heads={self.total.shape[0]}) got {entropies.shape[1]} heads")
        self._add(entropies.sum(dim=(0, 2)), entropies.shape[0] * entropies.shape[2])
