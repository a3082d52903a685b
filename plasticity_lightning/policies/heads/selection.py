"""Which attention heads to prune and which to revive.

Head scores (gradient importance, entropy gap, weight magnitude, random draws) and the selection rules on them, for any
HF transformers model with sliceable attention (:func:`~plasticity_lightning.surgery.attention_layouts`). Plain
functions: no trainer, the caller's generator.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from plasticity_lightning.core.errors import PlasticityConfigError
from plasticity_lightning.surgery.heads import HeadGates, head_attention_entropy, head_weight_norms

#: how heads can be scored: importance orders (low = prune first, high = grow first)
HEAD_SCORES = ("gradient", "entropy", "magnitude", "random")
#: how heads to revive can be chosen, and the head score each ranks by (balanced ranks by layer occupancy)
GROWTH_SCORE = {"balanced": None, "entropy_gap": "entropy", "gradient": "gradient", "random": "random"}
GROWTH_CHOICES = tuple(GROWTH_SCORE)


class NonFiniteScores(ArithmeticError):
    """Head scores that a decision ranks by (importance, entropy gap, weight norms) are NaN/inf.

    The callers skip that step instead of ranking heads on them.

    Attributes:
        what: which scores (``"importance"``, ``"entropy"``, …), for the warning and the skip count.
    """

    def __init__(self, what: str) -> None:
        super().__init__(f"head scores by {what!r} are NaN/inf")
        self.what = what


def require_finite_scores(scores: torch.Tensor, candidates: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteScores` when a candidate head's score is NaN/inf.

    Raise :class:`NonFiniteScores` when a score of a candidate head (``candidates``: a boolean ``[layers, heads]`` mask)
    is NaN/inf.

    Args:
        scores: head scores, ``[layers, heads]``.
        candidates: boolean ``[layers, heads]`` mask of the heads that may be chosen.
        what: what the scores are, named in the error.
    """
    if not bool(torch.isfinite(scores[candidates.to(scores.device)]).all()):
        raise NonFiniteScores(what)


def share_count(fraction: float, total: int) -> int:
    """How many of ``total`` heads a share selects.

    ``max(1, int(fraction · total))``, and 0 of none (the one rule of the pruning and growth steps).

    Args:
        fraction: the share of heads to select (0-1).
        total: the number of heads to select from.

    Example::

        >>> share_count(0.2, 12), share_count(0.5, 1), share_count(0.5, 0)
        (2, 1, 0)
    """
    return max(1, int(fraction * total)) if total else 0


def language_model(module: nn.Module) -> nn.Module:
    """The HF transformers model of ``module``: ``module.model`` (as in CausalLM) or ``module`` itself.

    Args:
        module: a CausalLM-style module or the HF model itself.
    """
    inner = getattr(module, "model", None)
    for candidate in (inner, module):
        if candidate is not None and hasattr(candidate, "config") and hasattr(candidate, "set_attn_implementation"):
            return candidate
    raise PlasticityConfigError(
        f"{type(module).__name__} is not a HF transformers model and has none at .model (as CausalLM does)"
    )


def entropy_gap(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """ln T − attention entropy of every head, ``[layers, heads]``: high for focused heads, 0 for uniform ones.

    Args:
        model: a HF GPT-2 model.
        input_ids: token ids, ``[N, T]``.
    """
    return math.log(input_ids.shape[-1]) - head_attention_entropy(model, input_ids)


def head_scores(
    method: str,
    model: nn.Module,
    gates: HeadGates,
    *,
    importance: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Scores of every head, ``[layers, heads]`` on the CPU, by ``method`` (see :data:`HEAD_SCORES`).

    ``"gradient"`` returns ``importance`` (Michel et al.'s E|∂L/∂ξ_h|, e.g. :class:`HeadImportanceScores`');
    ``"entropy"`` the entropy gap on ``input_ids`` (Sentinel-AI prunes the highest-entropy heads, i.e. the smallest
    gap); ``"magnitude"`` the L2 norm of each head's weights; ``"random"`` uniform draws from ``generator``.
    ``model`` is the HF model or a module holding it at ``.model``.

    Args:
        method: ``"gradient"``, ``"entropy"``, ``"magnitude"`` or ``"random"`` (:data:`HEAD_SCORES`).
        model: the HF model, or a module holding it at ``.model``.
        gates: the model's head gates (:class:`~plasticity_lightning.surgery.HeadGates`).
        importance: Michel et al.'s importance, ``[layers, heads]`` (needed by ``"gradient"``).
        input_ids: token ids, ``[N, T]``, for the entropy scores (needed by ``"entropy"``).
        generator: the random generator of the ``"random"`` scores (and of ``"balanced"``'s draws); default ``None``:
            torch's global one.
    """
    if method == "gradient":
        if importance is None:
            raise PlasticityConfigError("head scores by 'gradient' need HeadImportance(method='gradient') results")
        return importance.float().cpu()
    if method == "entropy":
        if input_ids is None:
            raise PlasticityConfigError("head scores by 'entropy' need token ids to measure attention on")
        return entropy_gap(language_model(model), input_ids)
    if method == "magnitude":
        return torch.stack([head_weight_norms(module) for _, module in gates.layers]).cpu()
    if method == "random":
        return torch.rand(tuple(gates.gates.shape), generator=generator)
    raise PlasticityConfigError(f"head score method {method!r} is invalid; expected one of {', '.join(HEAD_SCORES)}")


def lowest_heads(
    importance: torch.Tensor, alive: torch.Tensor, count: int, what: str = "importance"
) -> list[tuple[int, int]]:
    """The ``count`` alive heads of lowest importance, never a layer's last alive head (ties: lowest index).

    :class:`NonFiniteScores` (naming ``what``) when an alive head's importance is NaN/inf.

    Args:
        importance: head scores, ``[layers, heads]``.
        alive: boolean ``[layers, heads]`` mask of the live heads.
        count: how many heads to return.
        what: what the scores are, named in the error (default ``"importance"``).

    Example::

        >>> imp = torch.tensor([[0.1, 0.9], [0.2, 0.3]])
        >>> lowest_heads(imp, torch.ones(2, 2, dtype=torch.bool), 3)  # layer 0 keeps one head, so does layer 1
        [(0, 0), (1, 0)]
    """
    require_finite_scores(importance, alive, what)
    remaining = alive.sum(dim=1).tolist()
    order = sorted(
        (float(importance[layer, head]), layer, head)
        for layer in range(alive.shape[0])
        for head in range(alive.shape[1])
        if alive[layer, head]
    )
    chosen = []
    for _, layer, head in order:
        if len(chosen) == count:
            break
        if remaining[layer] > 1:
            chosen.append((layer, head))
            remaining[layer] -= 1
    return chosen


def heads_to_grow(
    choice: str,
    mask: torch.Tensor,
    count: int,
    scores: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[tuple[int, int]]:
    """Up to ``count`` gated-off heads (``mask == 0``) to revive.

    ``"balanced"``: one at a time from the layer with the fewest live heads (ties: lower layer), a random dead head
    of it; the other choices take the dead heads of highest ``scores`` (entropy gap, gradient importance, or random
    draws — see :func:`head_scores`).

    Args:
        choice: ``"balanced"``, ``"entropy_gap"``, ``"gradient"`` or ``"random"`` (:data:`GROWTH_CHOICES`).
        mask: the gate mask, ``[layers, heads]`` (0: gated off).
        count: how many heads at most.
        scores: the scores the choice ranks by (default ``None``; not used by ``"balanced"``).
        generator: the random generator of the ``"random"`` scores (and of ``"balanced"``'s draws); default ``None``:
            torch's global one.

    Example::

        >>> mask = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        >>> heads_to_grow("gradient", mask, 2, scores=torch.tensor([[0.0, 0.3, 0.1], [0.2, 0.5, 0.0]]))
        [(1, 1), (0, 1)]
    """
    dead = [(layer, head) for layer, head in zip(*torch.nonzero(mask == 0, as_tuple=True), strict=True)]
    dead = [(int(layer), int(head)) for layer, head in dead]
    count = min(count, len(dead))
    if choice == "balanced":
        alive = (mask > 0).sum(dim=1).tolist()
        draws = torch.rand(tuple(mask.shape), generator=generator)
        chosen: list[tuple[int, int]] = []
        for _ in range(count):
            open_layers = sorted({layer for layer, head in dead if (layer, head) not in chosen})
            layer = min(open_layers, key=lambda i: (alive[i], i))
            head = max((h for li, h in dead if li == layer and (li, h) not in chosen), key=lambda h: draws[layer, h])
            chosen.append((layer, head))
            alive[layer] += 1
        return chosen
    if scores is None:
        raise PlasticityConfigError(f"growth choice {choice!r} needs head scores")
    require_finite_scores(scores, mask == 0, GROWTH_SCORE[choice] or choice)
    order = sorted(dead, key=lambda lh: (-float(scores[lh]), lh))
    return order[:count]


def choose_heads_to_grow(
    choice: str,
    model: nn.Module,
    gates: HeadGates,
    count: int,
    *,
    importance: torch.Tensor | None = None,
    input_ids: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[tuple[int, int]]:
    """:func:`heads_to_grow` with the scores ``choice`` ranks by (:data:`GROWTH_SCORE`, :func:`head_scores`).

    Args:
        choice: ``"balanced"``, ``"entropy_gap"``, ``"gradient"`` or ``"random"`` (:data:`GROWTH_CHOICES`).
        model: the HF model, or a module holding it at ``.model``.
        gates: the model's head gates (:class:`~plasticity_lightning.surgery.HeadGates`).
        count: how many heads at most.
        importance: Michel et al.'s importance, ``[layers, heads]`` (needed by ``"gradient"``).
        input_ids: token ids, ``[N, T]``, for the entropy scores (needed by ``"entropy"``).
        generator: the random generator of the ``"random"`` scores (and of ``"balanced"``'s draws); default ``None``:
            torch's global one.
    """
    method = GROWTH_SCORE[choice]
    scores = (
        None
        if method is None
        else head_scores(method, model, gates, importance=importance, input_ids=input_ids, generator=generator)
    )
    return heads_to_grow(choice, gates.mask.cpu(), count, scores, generator)
