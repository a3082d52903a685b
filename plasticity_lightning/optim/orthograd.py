"""⊥Grad (Prieto et al. 2025): step only along the part of each gradient orthogonal to its weights.

Past the point of fitting the training set, gradients align with "naive loss minimisation" — scaling the weights
along their current direction, which grows the logits without changing predictions and drives Softmax Collapse.
⊥Grad removes that component: ∇⊥L(θ) = ∇L − (θᵀ∇L / θᵀθ) θ, per parameter tensor, before any optimizer's step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer

from plasticity_lightning.core.errors import PlasticityConfigError

EPS = 1e-30


@torch.no_grad()
def orthogonalize_gradient_(param: torch.Tensor, *, rescale: bool = True, eps: float = EPS) -> None:
    """Replace ``param.grad`` by its component orthogonal to ``param`` (both flattened), in place.

    With ``rescale`` the result is scaled back to the original gradient norm (the reference code's behaviour);
    without, it is the paper's formula.

    Args:
        param: a parameter with a ``.grad`` (left unchanged when it has none, or a sparse one).
        rescale: scale the result back to the original gradient's norm (default True, Prieto et al. 2025's reference
            code).
        eps: added to ‖θ‖² in the projection's denominator (default 1e-30).

    Example::

        >>> w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> orthogonalize_gradient_(w, rescale=False); w.grad
        tensor([0., 4.])
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> orthogonalize_gradient_(w); w.grad  # back to norm 5
        tensor([0., 5.])
    """
    grad = param.grad
    if grad is None or grad.is_sparse:
        return
    w, g = param.detach().reshape(-1), grad.reshape(-1)
    # accumulate the dot products in float64 where the tensors are lower precision: θᵀθ of a large tensor in
    # float16/bfloat16 would overflow or lose the projection entirely
    work = torch.float64 if w.dtype in (torch.float16, torch.bfloat16) else w.dtype
    w, g = w.to(work), g.to(work)
    projection = torch.dot(w, g) / (torch.dot(w, w) + eps)
    orthogonal = g - projection * w
    if rescale:
        orthogonal = orthogonal * (g.norm() / (orthogonal.norm() + eps))
    grad.copy_(orthogonal.view_as(grad).to(grad.dtype))


class OrthoGrad(Optimizer):
    """Wrap any torch optimizer so that it steps along ⊥Grad: ⊥AdamW, ⊥SGD, ...

    Before each step of ``base``, every parameter's gradient loses its component along the parameter
    (:func:`orthogonalize_gradient_`). Learning rates, state and checkpoints are the base optimizer's (its
    ``param_groups`` and ``state`` are this object's), so LR schedulers, Lightning and the surgery engine's
    optimizer-state resets see an ordinary optimizer.

    Args:
        params: parameters or parameter groups.
        base: callable building the inner optimizer from parameter groups — a class (``torch.optim.AdamW``) or,
            in YAML, ``{class_path: torch.optim.AdamW, init_args: {lr: 0.01, betas: [0.9, 0.99]}}``.
        rescale: restore each gradient's norm after the projection (the reference code) or not (the paper).
        projection_eps: added to θᵀθ and to the norm in the rescaling (named apart from the base optimizers'
            ``eps``, which a YAML config would otherwise carry over).

    Example::

        >>> from functools import partial
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 0.0]))
        >>> opt = OrthoGrad([w], base=partial(torch.optim.SGD, lr=0.1), rescale=False)
        >>> w.grad = torch.tensor([3.0, 4.0]); opt.step(); w
        Parameter containing:
        tensor([ 1.0000, -0.4000], requires_grad=True)

    In a recipe::

        model:
          init_args:
            optimizer:
              class_path: plasticity_lightning.optim.OrthoGrad
              init_args:
                base: {class_path: torch.optim.AdamW, init_args: {lr: 0.01, weight_decay: 0.0}}
    """

    def __init__(
        self,
        params: Iterable[Any],
        base: Callable[[Iterable[Any]], Optimizer] = torch.optim.AdamW,
        rescale: bool = True,
        projection_eps: float = EPS,
    ) -> None:
        if not callable(base):
            raise PlasticityConfigError(
                f"OrthoGrad.base={base!r} is invalid; expected an optimizer class or a callable taking parameters"
            )
        self.base_optimizer = base(params)
        if not isinstance(self.base_optimizer, Optimizer):
            raise PlasticityConfigError(
                f"OrthoGrad.base built a {type(self.base_optimizer).__name__}, not a torch.optim.Optimizer"
            )
        if not isinstance(rescale, bool):
            raise PlasticityConfigError(f"OrthoGrad.rescale={rescale!r} is invalid; expected true or false")
        if not isinstance(projection_eps, (int, float)) or not 0 <= projection_eps < 1e-3:
            raise PlasticityConfigError(
                f"OrthoGrad.projection_eps={projection_eps!r} is invalid; expected a number in [0, 1e-3)"
            )
        self.rescale = rescale
        self.eps = float(projection_eps)
        # share, not copy: schedulers and checkpoints act on the base optimizer's groups and state
        super().__init__(self.base_optimizer.param_groups, self.base_optimizer.defaults)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            # the closure runs once, here: the base optimizer then steps on the projected gradients (optimizers
            # that re-evaluate the closure, such as LBFGS, cannot be wrapped)
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                orthogonalize_gradient_(param, rescale=self.rescale, eps=self.eps)
        self.base_optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state

    def __repr__(self) -> str:
        return f"OrthoGrad(rescale={self.rescale}, base={self.base_optimizer!r})"
