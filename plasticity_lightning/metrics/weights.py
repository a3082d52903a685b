"""Weight statistics: mean |w|, norms and distance from the initial weights."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch


def _tensors(weights: torch.Tensor | Iterable[torch.Tensor]) -> list[torch.Tensor]:
    return [weights] if isinstance(weights, torch.Tensor) else list(weights)


def mean_abs_weight(weights: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    """Mean |w| over every element of one tensor or of several (Dohare et al.'s average weight magnitude).

    Args:
        weights: one tensor, or an iterable of tensors taken together as one vector.

    Example::

        >>> mean_abs_weight([torch.tensor([1.0, -3.0]), torch.tensor([2.0])])
        tensor(2., dtype=torch.float64)
    """
    tensors = _tensors(weights)
    total = sum(t.detach().abs().to(torch.float64).sum() for t in tensors)
    count = sum(t.numel() for t in tensors)
    return torch.as_tensor(total / count if count else 0.0, dtype=torch.float64)


def weight_norm(weights: torch.Tensor | Iterable[torch.Tensor]) -> torch.Tensor:
    """L2 (Frobenius) norm over every element.

    Args:
        weights: one tensor, or an iterable of tensors taken together as one vector.

    Example::

        >>> weight_norm(torch.tensor([[3.0, 4.0]]))
        tensor(5., dtype=torch.float64)
    """
    squares = sum(t.detach().to(torch.float64).pow(2).sum() for t in _tensors(weights))
    return torch.as_tensor(squares, dtype=torch.float64).sqrt()


def distance_from_init(
    weights: torch.Tensor | Iterable[torch.Tensor],
    initial: torch.Tensor | Iterable[torch.Tensor],
    *,
    relative: bool = False,
) -> torch.Tensor:
    """‖θ − θ₀‖₂ over every element (÷ ‖θ₀‖₂ with ``relative``; 0 when θ₀ = 0 and θ = θ₀).

    Args:
        weights: the current weights θ: one tensor, or an iterable of tensors taken together as one vector.
        initial: the initial weights θ₀, in the same order and shapes.
        relative: divide by ‖θ₀‖₂ (default False: the absolute distance, in weight units).

    Example::

        >>> distance_from_init(torch.tensor([3.0, 4.0]), torch.zeros(2))
        tensor(5., dtype=torch.float64)
    """
    current, start = _tensors(weights), _tensors(initial)
    if len(current) != len(start) or any(a.shape != b.shape for a, b in zip(current, start, strict=True)):
        raise ValueError("weights and initial weights differ in number or shape of tensors")
    distance = weight_norm(
        [
            a.detach().to(torch.float64) - b.detach().to(a.device, torch.float64)
            for a, b in zip(current, start, strict=True)
        ]
    )
    if not relative:
        return distance
    reference = weight_norm(start)
    return distance / reference if reference > 0 else torch.zeros((), dtype=torch.float64)


def layer_weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``{layer name: weight}`` for every parameter with two or more dimensions.

    ``{layer name: weight}`` for every parameter with two or more dimensions (Linear/Conv/embedding weights), named
    after its module; biases and normalisation parameters are left out, as Neural Elements does.

    Args:
        module: the model whose weight matrices and kernels are collected.

    Example::

        >>> list(layer_weights(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))))
        ['0', '2']
    """
    return {name.rsplit(".", 1)[0] if "." in name else name: p for name, p in module.named_parameters() if p.ndim >= 2}


def _norm_mean_max(values: torch.Tensor) -> torch.Tensor:
    v = values.to(torch.float64)  # one float64 copy per tensor, on its own device
    return torch.stack([torch.linalg.vector_norm(v), v.mean(), v.max()])


def _norm_mean_std(values: torch.Tensor) -> torch.Tensor:
    v = values.to(torch.float64)
    return torch.stack([torch.linalg.vector_norm(v), v.mean(), v.std(unbiased=False)])


def gradient_stats(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Neural Elements' per-record gradient statistics of the given weights (their ``.grad``).

    ``layer_grad_norms`` (‖∂L/∂W_l‖_F), ``mean_grad`` (mean over layers of mean |g_l|), ``max_grad`` (max over layers of
    max |g_l|) and ``global_norm``. Layers without a gradient are skipped.

    Args:
        weights: ``{layer name: weight}``, e.g. from :func:`layer_weights`, after a backward pass.

    Example::

        >>> w = torch.nn.Parameter(torch.ones(2, 2))
        >>> w.grad = torch.tensor([[3.0, 0.0], [0.0, -4.0]])
        >>> stats = gradient_stats({"fc": w})
        >>> stats["layer_grad_norms"], stats["mean_grad"], stats["max_grad"]
        ({'fc': 5.0}, 1.75, 4.0)
    """
    grads = {name: w.grad.detach() for name, w in weights.items() if w.grad is not None}
    if not grads:
        return {"layer_grad_norms": {}, "mean_grad": math.nan, "max_grad": math.nan, "global_norm": math.nan}
    # One device->host transfer for all layers: per-layer .item() calls would each synchronise a GPU.
    stats = torch.stack([_norm_mean_max(g.abs()) for g in grads.values()]).cpu()
    norms, means, maxes = stats[:, 0], stats[:, 1], stats[:, 2]
    return {
        "layer_grad_norms": dict(zip(grads, norms.tolist(), strict=True)),
        "mean_grad": float(means.mean()),
        "max_grad": float(maxes.max()),
        "global_norm": float(norms.pow(2).sum().sqrt()),
    }


def weight_stats(weights: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Neural Elements' per-record weight statistics.

    ``layer_weight_norms``, layer-averaged ``mean_weight`` and ``std_weight``, plus ``mean_abs_weight`` over all
    elements (Dohare et al.).

    Args:
        weights: ``{layer name: weight}``, e.g. from :func:`layer_weights`.

    Example::

        >>> weight_stats({"fc": torch.tensor([[3.0, -4.0]])})["layer_weight_norms"]
        {'fc': 5.0}
    """
    if not weights:
        return {"layer_weight_norms": {}, "mean_weight": math.nan, "std_weight": math.nan, "mean_abs_weight": math.nan}
    stats = torch.stack([_norm_mean_std(w.detach()) for w in weights.values()]).cpu()
    return {
        "layer_weight_norms": dict(zip(weights, stats[:, 0].tolist(), strict=True)),
        "mean_weight": float(stats[:, 1].mean()),
        "std_weight": float(stats[:, 2].mean()),
        "mean_abs_weight": float(mean_abs_weight(weights.values())),
    }
