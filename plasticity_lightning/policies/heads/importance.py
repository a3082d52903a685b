"""Head importance over a window of training batches, for any training loop.

Michel et al.'s gradient importance (from the loop's own backward pass, through the gates of
:class:`~plasticity_lightning.surgery.HeadGates`), the attention-entropy gap, or the weights' magnitude.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from plasticity_lightning.core.errors import check_choice, check_positive_int
from plasticity_lightning.policies.base import Policy
from plasticity_lightning.policies.heads.selection import entropy_gap, language_model
from plasticity_lightning.surgery.heads import HeadGates, head_weight_norms, normalize_importance

IMPORTANCE_METHODS = ("gradient", "entropy", "weight_magnitude")


class HeadImportanceScores(Policy):
    """Per-head importance, accumulated over ``num_batches`` training batches and refreshed every window.

    ``method="gradient"``: I_h = E|∂L/∂ξ_h|, with ξ the gates this object attaches (1 unless a head is pruned or
    ramping, so the model computes what it would without them); call :meth:`accumulate` after ``loss.backward()``.
    ``method="entropy"``: ln T − H of each head's attention on the window's last batch (one extra eager forward per
    window). ``method="weight_magnitude"``: the L2 norm of each head's weights. With ``normalize="layer"`` each
    layer's scores are divided by their L2 norm (Michel et al.'s ``--normalize_pruning_by_layer``). Scores are
    averaged across processes through :attr:`reduce_mean` before they are normalised.

    In a plain loop::

        scores = HeadImportanceScores(model, num_batches=50)
        for ids in batches:
            model(ids, labels=ids).loss.backward(); scores.accumulate(); optimizer.step(); optimizer.zero_grad()
            importance = scores.step(ids)  # a [layers, heads] tensor when a window ends, else None

    To resume, :meth:`load_state_dict` and then :meth:`bind` the model again (the window and gates are restored
    there, as at a Lightning fit start).

    Args:
        model: the model (HF transformers, or a module holding one at ``.model``); ``None``: :meth:`bind` later.
        num_batches: training batches per window.
        method: ``"gradient"``, ``"entropy"`` or ``"weight_magnitude"``.
        normalize: ``"layer"`` or ``None``.
        owner: the name in error messages.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        num_batches: int = 50,
        method: str = "gradient",
        normalize: str | None = "layer",
        owner: str = "HeadImportanceScores",
    ) -> None:
        super().__init__(seed=0, prefix="heads")
        self.owner = owner
        self.num_batches = check_positive_int(owner, "num_batches", num_batches)
        self.method = check_choice(owner, "method", method, IMPORTANCE_METHODS)
        if normalize is not None:
            check_choice(owner, "normalize", normalize, ("layer",))
        self.normalize = normalize
        self.model: nn.Module | None = None
        self.gates: HeadGates | None = None
        self.importance: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.count = 0
        self.last_ids: torch.Tensor | None = None
        self._pending_sum: torch.Tensor | None = None
        self._pending_gates: torch.Tensor | None = None
        if model is not None:
            self.bind(model)

    @property
    def bound_layers(self) -> list[str]:
        """The attention modules whose heads are scored."""
        return [] if self.gates is None else [name for name, _ in self.gates.layers]

    def bind(self, model: nn.Module) -> HeadGates:
        """Attach the gates to ``model`` and restore a loaded window; returns the gates.

        Attach the gates to ``model`` (kept when already on it: a second fit keeps its pruned heads) and restore a
        loaded window; returns the gates.
        """
        self.model = model
        if self.gates is None or not self.gates.attached_to(model):
            self.gates = HeadGates(model, differentiable=self.method == "gradient")
            self.announce(
                f"{self.owner}: gates on {self.gates.num_layers} attention modules of {self.gates.num_heads} heads "
                f"({', '.join(self.bound_layers)})"
            )
        self.gates.gates.requires_grad_(self.method == "gradient")
        self.sum = torch.zeros_like(self.gates.mask)
        if self._pending_sum is not None:  # a resumed window continues where the checkpoint left it
            self.sum += self._pending_sum.to(self.sum.device)
            self._pending_sum = None
        if self._pending_gates is not None:
            self.gates.load(self._pending_gates)
            self._pending_gates = None
        return self.gates

    def release(self) -> None:
        """Stop taking gradients of the gates (they stay on the model: pruned heads stay pruned)."""
        if self.gates is not None:
            self.gates.gates.requires_grad_(False)
            self.gates.gates.grad = None

    @torch.no_grad()
    def accumulate(self, loss_scale: float | None = None) -> None:
        """Add |∂L/∂ξ| of the last backward pass and clear it.

        Add |∂L/∂ξ| of the last backward pass (divided by ``loss_scale``: the gates are in no optimizer, so a
        mixed-precision GradScaler never unscales their gradient) and clear it; a non-finite gradient (an overflowing,
        skipped step) carries no information and is dropped.
        """
        if self.gates is None or self.method != "gradient" or self.gates.gates.grad is None:
            return
        grad = self.gates.gates.grad
        self.gates.gates.grad = None
        if loss_scale is not None:
            grad = grad / loss_scale
        if torch.isfinite(grad).all():
            self.sum += grad.abs()

    def step(self, input_ids: torch.Tensor | None = None) -> torch.Tensor | None:
        """Count one training batch (``input_ids``: its token ids, for ``method="entropy"``).

        At the end of a window compute :attr:`importance`, start a new window and return it, else return ``None``.
        """
        self.count += 1
        if self.method == "entropy":
            self.last_ids = input_ids
        if self.count < self.num_batches:
            return None
        self.importance = self.compute()
        self.sum.zero_()
        self.count = 0
        return self.importance

    def current(self) -> torch.Tensor:
        """The last window's importance, or the running window's when none has ended yet."""
        return self.importance if self.importance is not None else self.compute()

    @torch.no_grad()
    def compute(self, reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """The importance of the current window, ``[layers, heads]`` on the CPU.

        The importance of the current window, ``[layers, heads]`` on the CPU, averaged across processes and normalised.
        """
        if self.gates is None or self.sum is None:
            raise RuntimeError(f"{self.owner}.compute() needs the gates that bind(model) attaches")
        reduce = reduce_mean or self.reduce
        if self.method == "gradient":
            scores = reduce(self.sum / max(self.count, 1))
        elif self.method == "entropy":
            if self.last_ids is None:
                raise RuntimeError(f"{self.owner}(method='entropy') has seen no training batch yet")
            scores = reduce(entropy_gap(language_model(self.model), self.last_ids).to(self.sum.device))
        else:
            scores = torch.stack([head_weight_norms(module) for _, module in self.gates.layers])
        return normalize_importance(scores, self.normalize).cpu()

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "importance": self.importance,
            "sum": None if self.sum is None else self.sum.cpu(),
            "count": self.count,
            "gates": None if self.gates is None else self.gates.mask.cpu(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.importance = state_dict.get("importance")
        self.count = int(state_dict.get("count", 0))
        self._pending_sum = state_dict.get("sum")
        # applied by the next bind(model), as a fit start does: a plain loop calls bind again after loading
        self._pending_gates = state_dict.get("gates")
