"""Plasticity injection (Nikishin et al., NeurIPS 2023), for any training loop."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from plasticity_lightning.core.errors import PlasticityConfigError, check_positive_int
from plasticity_lightning.policies.base import ScheduledPolicy, as_optimizers
from plasticity_lightning.policies.cadence import StepCadence
from plasticity_lightning.policies.resets import LayerReset, fresh_copy


class PlasticityInjection(ScheduledPolicy):
    """Plasticity injection (Nikishin et al. 2023, "Deep Reinforcement Learning with Plasticity Injection").

    At an injection the head h with parameters θ is frozen and a fresh copy θ'₁ is added, minus a frozen copy θ'₂ of
    that fresh copy: the network's output becomes ``h(x; θ) + h(x; θ'₁) − h(x; θ'₂)`` with θ'₂ = θ'₁, so the function
    is unchanged at the moment of injection (bit for bit: the two fresh terms are the same computation and cancel to
    exactly 0) while the trainable head starts again from a fresh init. Only θ'₁ trains; the rest of the network keeps
    receiving gradients through all three terms. The trainable parameters stay the same tensors: θ'₁ is drawn *into*
    the head's own parameters (as :class:`LayerReset` draws them: the model's ``layer_init(name)``, else PyTorch's
    default; optimizer state dropped), and θ and θ'₂ are kept as frozen tensors that a forward hook on the head adds
    in. So no parameter is added or frozen mid-fit (DDP's reducer sees the same parameters) and the count of trainable
    parameters is unchanged, as in the paper.

    Repeated injections nest: the whole function before an injection is what is frozen, so every injection leaves
    the output unchanged; each one adds two frozen forward passes of the head to every forward pass (after 49
    injections a step of the plasticity-loss recipe's MLP costs ~8x one without; ``benchmarks/injection_overhead.py``).

    ``merge=True`` bounds that cost for a head whose output is linear in its parameters (one ``Linear`` or
    ``Conv``: h(x; a) + h(x; b) − h(x; c) = h(x; a + b − c)): the frozen terms are folded into one frozen head
    M = Σθ − Σθ'₂, so every forward pass costs one extra head pass whatever the number of injections. An injection
    still leaves the output unchanged bit for bit (its new terms are held apart until the next :meth:`step`); they
    are folded at that step, right after an optimizer step has changed the function anyway, and the fold rounds the
    sum once (a change of float round-off, ~1e-7 relative in float32, instead of the exact cancellation).

    The frozen tensors are the policy's state (:meth:`state_dict`), not the model's: a model loaded without its
    injection state computes only the live head.

    In a hand-written loop::

        injection = PlasticityInjection(model, optimizer, layer="head")
        ...
        injection.step_task(task_id)   # injects when the task changes (not before the first task)

    Args:
        model: the network (``None``: give it to :meth:`attach`).
        optimizer: its optimizer(s), whose state for the head is dropped at each injection.
        layer: module name of the head (any module with parameters, e.g. a block of the last layers); ``None``: the
            model's ``output_layer()``.
        every_n_steps: period of :meth:`step` (``None``: only task changes and :meth:`apply`).
        merge: fold the frozen terms into one frozen head at the :meth:`step` after each injection (a ``Linear`` or
            ``Conv`` head only): a constant cost per step instead of one growing with the injections.
        seed: seed of the fresh heads.
        prefix: name of the values in reports.

    Example::

        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> x = torch.randn(5, 3)
        >>> before = net(x)
        >>> injection = PlasticityInjection(net, layer="2")
        >>> injection.apply()
        >>> torch.equal(net(x), before), injection.injections
        (True, 1)
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        *,
        layer: str | None = None,
        every_n_steps: int | None = None,
        merge: bool = False,
        seed: int = 0,
        prefix: str = "injection",
    ) -> None:
        super().__init__(seed=seed, prefix=prefix)
        owner = type(self).__name__
        if not isinstance(merge, bool):
            raise PlasticityConfigError(f"{owner}.merge={merge!r} is invalid; expected true or false")
        if layer is not None and not isinstance(layer, str):
            raise PlasticityConfigError(
                f"{owner}.layer={layer!r} is invalid; expected the module name of the head (e.g. 'head'), or null "
                "for the model's output_layer()"
            )
        if every_n_steps is not None:
            check_positive_int(owner, "every_n_steps", every_n_steps)
        self.layer = layer
        self.merge = merge
        self.cadence = StepCadence(every_n_steps)
        self.model: nn.Module | None = None
        self.injections = 0
        self.steps = 0
        self.task: Any = None
        # θ₁, c₁, θ₂, c₂, …: the head's parameters frozen at each injection (θ) and the fresh values drawn then (c)
        self.frozen: list[dict[str, torch.Tensor]] = []
        # merge=True: the folded terms Σθ − Σc as one set of head parameters (None: nothing folded yet)
        self.merged: dict[str, torch.Tensor] | None = None
        self._name = ""
        self._head: nn.Module | None = None
        self._shadow: nn.Module | None = None  # a hook-free copy of the head that evaluates the frozen tensors
        self._handle: Any = None
        self._reset: LayerReset | None = None
        if model is not None:
            self.attach(model, optimizer)

    @property
    def every_n_steps(self) -> int | None:
        return self.cadence.every_n_steps

    def head(self, model: nn.Module | None = None) -> tuple[str, nn.Module]:
        """(name, module) of the head, checked to be a separable part of ``model``."""
        model = self.model if model is None else model
        owner = self.owner
        if model is None:
            raise PlasticityConfigError(f"{owner}: no model; pass it to {owner}(model, ...) or call attach(model)")
        if self.layer is None:
            output_layer = getattr(model, "output_layer", None)
            if not callable(output_layer):
                raise PlasticityConfigError(
                    f"{owner}: {type(model).__name__} has no output_layer(), so its head is unknown; name the head "
                    "with layer=... (the module that maps the features to the outputs, e.g. 'head')"
                )
            name, module = output_layer()
        else:
            name = self.layer
            modules = dict(model.named_modules())
            if name == "":
                raise PlasticityConfigError(
                    f"{owner}.layer='' is the whole {type(model).__name__}, not a head: injection needs a head "
                    "separate from the layers that feed it; name a submodule"
                )
            if name not in modules:
                holder, _, attr = name.rpartition(".")
                if holder in modules and isinstance(getattr(modules[holder], attr, None), torch.Tensor):
                    raise PlasticityConfigError(
                        f"{owner}.layer={name!r} is a tensor, not a module; name the module that holds it: {holder!r}"
                    )
                raise PlasticityConfigError(
                    f"{owner}.layer={name!r} is not a module of {type(model).__name__}; choose among "
                    f"{', '.join(n for n in list(modules)[-8:] if n)}"
                )
            module = modules[name]
        if not isinstance(module, nn.Module):
            raise PlasticityConfigError(f"{owner}.layer={name!r} is a {type(module).__name__}, not a module")
        params = dict(module.named_parameters())
        if not params:
            raise PlasticityConfigError(f"{owner}: the head {name!r} ({type(module).__name__}) has no parameters")
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
            raise PlasticityConfigError(
                f"{owner}: the head {name!r} holds batch normalisation, whose running statistics a frozen copy cannot "
                "share with the live head; name a head without BatchNorm"
            )
        inside = {id(p) for p in params.values()}
        for other_name, other in model.named_modules():
            if other_name == name or other_name.startswith(f"{name}."):
                continue
            shared = [n for n, p in other.named_parameters(recurse=False) if id(p) in inside]
            if shared:
                raise PlasticityConfigError(
                    f"{owner}: the head {name!r} is not separable: {other_name!r}.{shared[0]} is one of its parameters "
                    "(tied weights); freezing the head would freeze that module too"
                )
        if self.merge and not isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
            raise PlasticityConfigError(
                f"{owner}.merge=True needs a head whose output is linear in its parameters (one Linear or Conv "
                f"module); the head {name!r} is a {type(module).__name__}; use merge=False"
            )
        return name, module

    def attach(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None
    ) -> None:
        """Use ``model`` and add the frozen terms held so far to its head's output.

        Use ``model`` (its head is checked now) and add the frozen terms held so far (a loaded state's) to its head's
        output; ``optimizer``: the optimizer(s) whose head state is dropped at each injection.
        """
        if optimizer is not None:
            self.optimizers = as_optimizers(optimizer)
        self.detach()
        name, head = self.head(model)
        self.model, self._name, self._head = model, name, head
        # the fresh head is LayerReset's (the model's init, optimizer state dropped), drawn from this policy's generator
        self._reset = LayerReset(layers=[name], reset_optimizer=True, seed=self.seed, prefix=self.prefix)
        self._reset.generator = self.generator
        self._reset.owner, self._reset.warn = self.owner, self.warn
        self._reset.announce = lambda message: None  # the injection reports the binding itself, once
        self._reset.attach(model, self.optimizers)
        self.report_binding([name])
        self._shadow = fresh_copy(head, seed=0).requires_grad_(False)  # its own values are never used
        device = next(head.parameters()).device
        self.frozen = [{k: v.to(device) for k, v in values.items()} for values in self.frozen]
        if self.merged is not None:
            self.merged = {k: v.to(device) for k, v in self.merged.items()}
        self._handle = head.register_forward_hook(self._add_frozen, with_kwargs=True)

    def detach(self) -> None:
        """Stop adding the frozen terms to the head's output (the state is kept; :meth:`attach` adds them again)."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _frozen_output(self, values: dict[str, torch.Tensor], args: tuple, kwargs: dict) -> torch.Tensor:
        shadow, head = self._shadow, self._head
        if shadow is None or head is None:  # the hook exists only while attached
            raise RuntimeError(f"{self.owner}: the frozen head is evaluated before attach()")
        shadow.train(head.training)
        return functional_call(shadow, values, args, kwargs)

    def _add_frozen(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.frozen and self.merged is None:
            return None
        if not isinstance(output, torch.Tensor):
            raise PlasticityConfigError(
                f"{self.owner}: the head {self._name!r} returns a {type(output).__name__}; injection adds the outputs "
                "of frozen copies of the head, so it must return one tensor"
            )
        # g₁ = h(θ₁) (+ h(M), the folded terms); g_j = (h(θ_j) − h(c_(j−1))) + g_(j−1); output = (h(live) − h(c_k))
        # + g_k. The terms that cancel at an injection are subtracted first, so the sum is unchanged bit for bit
        # (h(θ₁) + h(M) equals the h(live) + h(M) before it: float addition commutes).
        frozen = self.frozen
        if not frozen:
            return output + self._frozen_output(self.merged, args, kwargs)
        total = self._frozen_output(frozen[0], args, kwargs)
        if self.merged is not None:
            total = total + self._frozen_output(self.merged, args, kwargs)
        for j in range(2, len(frozen), 2):
            total = (
                self._frozen_output(frozen[j], args, kwargs) - self._frozen_output(frozen[j - 1], args, kwargs)
            ) + total
        return (output - self._frozen_output(frozen[-1], args, kwargs)) + total

    def step(self) -> bool:
        """One optimizer step has been taken.

        With ``merge``, fold the terms of the injections since the last step (:meth:`fold`); then inject if it is the
        ``every_n_steps``-th. Returns whether it injected.
        """
        self.fold()
        return super().step()

    @torch.no_grad()
    def fold(self) -> bool:
        """Fold the frozen terms into one merged frozen head (with ``merge``).

        With ``merge``: fold the frozen terms into the one merged frozen head M = Σθ − Σθ'₂ (a head linear in its
        parameters computes the same function up to the rounding of that sum); returns whether there was anything to
        fold. Without ``merge`` it does nothing.
        """
        if not self.merge or not self.frozen:
            return False
        merged = self.merged
        for theta, fresh in zip(self.frozen[0::2], self.frozen[1::2], strict=True):
            delta = {k: theta[k] - fresh[k] for k in theta}
            merged = delta if merged is None else {k: merged[k] + delta[k] for k in merged}
        self.merged, self.frozen = merged, []
        return True

    @torch.no_grad()
    def apply(self, model: nn.Module | None = None) -> None:
        """Inject now.

        Inject now: freeze the head's function so far, draw fresh head parameters and subtract their frozen copy.
        """
        if model is not None and model is not self.model:
            self.attach(model)
        if self.model is None or self._head is None or self._reset is None:
            raise PlasticityConfigError(f"{self.owner}.apply: no model; pass it to {self.owner}(model, ...)")
        self._reset.optimizers = self.optimizers
        self.frozen.append({k: p.detach().clone() for k, p in self._head.named_parameters()})
        self._reset.apply()
        self.frozen.append({k: p.detach().clone() for k, p in self._head.named_parameters()})
        self.injections += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "injections": self.injections,
            "steps": self.steps,
            "task": self.task,
            "frozen": [{k: v.cpu() for k, v in values.items()} for values in self.frozen],
            "merged": None if self.merged is None else {k: v.cpu() for k, v in self.merged.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.injections = int(state_dict.get("injections", 0))
        self.steps = int(state_dict.get("steps", 0))
        self.task = state_dict.get("task")
        self.cadence.mark(self.steps)
        frozen = [dict(values) for values in state_dict.get("frozen", [])]
        merged = state_dict.get("merged")
        merged = None if merged is None else dict(merged)
        if self._head is not None:  # attached already: where the head lives
            device = next(self._head.parameters()).device
            frozen = [{k: v.to(device) for k, v in values.items()} for values in frozen]
            merged = None if merged is None else {k: v.to(device) for k, v in merged.items()}
        self.frozen, self.merged = frozen, merged
