"""Whole-parameter policies for any training loop.

Shrink & Perturb, L2 toward the initial weights, head and layer resets.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from plasticity_lightning.core.errors import (
    PlasticityConfigError,
    check_choice,
    check_positive_float,
    check_positive_int,
)
from plasticity_lightning.nn.init import init_layer_
from plasticity_lightning.policies.base import Policy, ScheduledPolicy, as_optimizers, owning_modules
from plasticity_lightning.policies.cadence import StepCadence
from plasticity_lightning.surgery import reset_optimizer_state

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _selected_modules(
    owner: str, model: nn.Module, layers: Sequence[str] | None, kinds: tuple[type, ...]
) -> dict[str, nn.Module]:
    modules = {name: m for name, m in model.named_modules() if isinstance(m, kinds)}
    if layers is None:
        return modules
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise PlasticityConfigError(
            f"{owner}.layers: {unknown[0]!r} is not a weight or normalisation layer of {type(model).__name__}; "
            f"choose among {', '.join(list(modules)[:12])}"
        )
    return {name: modules[name] for name in layers}


def _layer_init(model: nn.Module, name: str) -> tuple[str, float]:
    layer_init = getattr(model, "layer_init", None)
    return layer_init(name) if callable(layer_init) else ("default", 1.0)


def fresh_layer(model: nn.Module, name: str, module: nn.Module, generator: torch.Generator) -> nn.Module:
    """A copy of ``module`` re-initialised as the model initialised it (``layer_init``; else PyTorch's default).

    Hooks on ``module`` (a monitor's capture, an injection's frozen terms) are not copied: what they hold (a callback,
    its trainer, a dataloader iterator) need not be copyable, and the copy only lends its fresh values.

    Args:
        model: the model holding the layer (its ``layer_init`` decides the scheme).
        name: the layer's name in ``model``.
        module: the layer.
        generator: the random generator the fresh values are drawn from.
    """
    saved = [(attr, hooks) for attr in _HOOK_DICTS if (hooks := module.__dict__.get(attr))]
    for attr, hooks in saved:
        module.__dict__[attr] = type(hooks)()
    try:
        fresh = copy.deepcopy(module)
    finally:
        for attr, hooks in saved:
            module.__dict__[attr] = hooks
    if isinstance(module, _WEIGHT_LAYERS):
        scheme, gain = _layer_init(model, name)
        init_layer_(fresh, scheme, gain=gain, generator=generator)
    else:  # normalisation layers start at weight 1, bias 0
        with torch.no_grad():
            if getattr(fresh, "weight", None) is not None:
                fresh.weight.fill_(1.0)
            if getattr(fresh, "bias", None) is not None:
                fresh.bias.zero_()
    return fresh


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def fresh_copy(model: nn.Module, seed: int) -> nn.Module:
    """A deep copy of ``model`` with every parameter drawn afresh from ``seed``, as a network trained from scratch.

    Weight layers get the model's own init (``layer_init(name)``, else PyTorch's default) through
    :func:`fresh_layer`; normalisation layers start at weight 1, bias 0 with fresh running statistics; any other
    module with parameters of its own (embeddings, attention projections) runs its ``reset_parameters`` under a
    generator seeded from ``seed``. The copy is the same on every DDP rank. Hooks on the model's modules (a
    monitor's feature capture, an intervention's) are not copied: they belong to the original, and what they hold (a
    callback, its trainer, a dataloader) need not be copyable.

    Args:
        model: the model to copy.
        seed: seed of every fresh parameter.

    Example::

        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> a, b = fresh_copy(net, seed=1), fresh_copy(net, seed=1)
        >>> torch.equal(a[0].weight, b[0].weight), torch.equal(a[0].weight, net[0].weight)
        (True, False)
    """
    saved = []
    for module in model.modules():  # hide the hooks during the copy; the same dicts come back (handles stay valid)
        for attr in _HOOK_DICTS:
            hooks = module.__dict__.get(attr)
            if hooks:
                saved.append((module, attr, hooks))
                module.__dict__[attr] = type(hooks)()
    # what cannot be copied (e.g. LightningCLI's optimizer factory, which reaches the trainer) is shared, not copied
    memo: dict[int, Any] = {}
    for module in model.modules():
        for attr, value in module.__dict__.items():
            if attr not in ("_parameters", "_buffers", "_modules", "_trainer") and not isinstance(value, nn.Module):
                try:
                    copy.deepcopy(value)
                except Exception:
                    memo[id(value)] = value
    try:
        copy_ = copy.deepcopy(model, memo)
    finally:
        for module, attr, hooks in saved:
            module.__dict__[attr] = hooks
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in copy_.named_modules():
            if isinstance(module, (*_WEIGHT_LAYERS, *_NORM_LAYERS)):
                fresh = fresh_layer(copy_, name, module, generator)
                for param, new in zip(module.parameters(recurse=False), fresh.parameters(recurse=False), strict=True):
                    param.copy_(new.to(param.device))
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.reset_running_stats()
            elif callable(getattr(module, "reset_parameters", None)) and any(
                True for _ in module.parameters(recurse=False)
            ):
                # the global RNG, on the CPU and the module's accelerator, is left as it was
                devices = sorted({p.device.index or 0 for p in module.parameters(recurse=False) if p.is_cuda})
                with torch.random.fork_rng(devices=devices):
                    torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
                    module.reset_parameters()
    return copy_


def _guessed_inits(owner: str, model: nn.Module, names: Iterable[str]) -> str | None:
    """A warning when fresh weights for ``names`` fall back to PyTorch's default init (no ``layer_init``)."""
    if callable(getattr(model, "layer_init", None)):
        return None
    names = [repr(name) if name else "the model itself" for name in names]
    if not names:
        return None
    return (
        f"{owner}: {type(model).__name__} has no layer_init(name), so fresh weights of {', '.join(names[:4])}"
        f"{' …' if len(names) > 4 else ''} follow PyTorch's default U(±1/√fan_in); give the model a "
        "layer_init(name) -> (scheme, gain) method to choose"
    )


class ShrinkAndPerturb(ScheduledPolicy):
    """Shrink & Perturb (Ash & Adams 2020): θ ← λ·θ + p·θ_fresh (or + p·θ₀, toward the initial weights).

    ``noise="fresh_init"`` (the paper): θ_fresh is a newly initialised copy of each weight and normalisation layer
    (its own init scheme — the model's ``layer_init(name)``, else PyTorch's default, which warns once — so every
    layer keeps its scale); defaults λ = 0.4, p = 0.1. ``noise="gaussian"``: θ ← λ·θ + N(0, p²) on every trainable
    parameter — Dohare et al.'s continual variant (``shrink=1``, ``perturb=σ``, every step, with the optimizer's
    weight decay doing the shrinking). Fresh values come from the policy's generator, seeded alike on every DDP
    rank, so ranks stay identical. ``noise="initial"``: θ ← λ·θ + p·θ₀ on every trainable parameter, θ₀ the
    parameters when the policy was attached (kept in :meth:`state_dict`) — Plasticine's variant, which pulls toward
    the initial weights instead of adding fresh ones (``shrink=0.999999, perturb=1e-6`` every step: p = 1 − λ; no
    random draw, so ranks agree trivially). Optimizer state is kept (as in the paper).

    In a hand-written loop, :meth:`apply` acts now (e.g. when new data arrives) and :meth:`step`, called after
    ``optimizer.step()``, acts every ``every_n_steps`` steps.

    Args:
        model: the network (``None``: give it to :meth:`attach`).
        shrink: λ.
        perturb: p (the fresh-init or initial-weight mix) or σ (the Gaussian noise std).
        noise: ``"fresh_init"``, ``"gaussian"`` or ``"initial"``.
        every_n_steps: period of :meth:`step` (``None``: only :meth:`apply`).
        layers: module names to change (``None``: every Linear/Conv/norm layer, or every parameter with
            ``noise="gaussian"`` or ``"initial"``).
        seed: seed of the fresh values.
        prefix: name of the values in reports.

    Example::

        >>> net = nn.Linear(3, 2)
        >>> before = net.weight.detach().clone()
        >>> ShrinkAndPerturb(net, shrink=0.5, perturb=0.0).apply()
        >>> torch.equal(net.weight, before * 0.5)
        True
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        shrink: float = 0.4,
        perturb: float = 0.1,
        noise: Literal["fresh_init", "gaussian", "initial"] = "fresh_init",
        every_n_steps: int | None = None,
        layers: Sequence[str] | None = None,
        seed: int = 0,
        prefix: str = "shrink_perturb",
    ) -> None:
        super().__init__(seed=seed, prefix=prefix)
        owner = type(self).__name__
        self.shrink = check_positive_float(owner, "shrink", shrink, allow_zero=True)
        self.perturb = check_positive_float(owner, "perturb", perturb, allow_zero=True)
        self.noise = check_choice(owner, "noise", noise, ("fresh_init", "gaussian", "initial"))
        if every_n_steps is not None:
            check_positive_int(owner, "every_n_steps", every_n_steps)
        self.cadence = StepCadence(every_n_steps)
        self.layer_names = None if layers is None else list(layers)
        self.model: nn.Module | None = None
        self.applied = 0
        self.steps = 0
        #: θ₀ per parameter name (``noise="initial"``)
        self.initial: dict[str, torch.Tensor] = {}
        if model is not None:
            self.attach(model)

    @property
    def every_n_steps(self) -> int | None:
        return self.cadence.every_n_steps

    def attach(self, model: nn.Module) -> None:
        """Use ``model`` (its layers are checked now)."""
        self.model = model
        if self.noise == "fresh_init":
            kinds = (*_WEIGHT_LAYERS, *_NORM_LAYERS)
            modules = _selected_modules(self.owner, model, self.layer_names, kinds)
            guess = _guessed_inits(self.owner, model, [n for n, m in modules.items() if isinstance(m, _WEIGHT_LAYERS)])
            if guess:
                self.warn_once("init", guess)
            self.report_binding(modules)
        else:
            self.report_binding(owning_modules(self._named_params(model)))
        if self.noise == "initial":
            params = self._named_params(model)
            if not self.initial:  # a resumed run keeps the point it started from
                self.initial = {name: p.detach().clone() for name, p in params.items()}
            else:
                self.initial = {name: value.to(params[name].device) for name, value in self.initial.items()}

    @torch.no_grad()
    def apply(self, model: nn.Module | None = None) -> None:
        """Shrink and perturb now."""
        model = self.model if model is None else model
        if model is None:
            raise PlasticityConfigError("ShrinkAndPerturb.apply: no model; pass it to ShrinkAndPerturb(model, ...)")
        if self.noise == "gaussian":
            for param in self._gaussian_params(model):
                generator = self.generator_on(param.device)  # drawn where the parameter lives
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype, device=param.device)
                param.mul_(self.shrink).add_(noise, alpha=self.perturb)
        elif self.noise == "initial":
            if not self.initial:
                self.attach(model)
            for name, param in self._named_params(model).items():
                param.mul_(self.shrink).add_(self.initial[name], alpha=self.perturb)
        else:
            kinds = (*_WEIGHT_LAYERS, *_NORM_LAYERS)
            for name, module in _selected_modules(self.owner, model, self.layer_names, kinds).items():
                fresh = fresh_layer(model, name, module, self.generator)
                for param, new in zip(module.parameters(recurse=False), fresh.parameters(recurse=False), strict=True):
                    param.mul_(self.shrink).add_(new.to(param.device), alpha=self.perturb)
        self.applied += 1

    def _gaussian_params(self, model: nn.Module) -> list[nn.Parameter]:
        if self.layer_names is None:
            return [p for p in model.parameters() if p.requires_grad]
        modules = dict(model.named_modules())
        unknown = [name for name in self.layer_names if name not in modules]
        if unknown:
            raise PlasticityConfigError(f"{self.owner}.layers: the model has no module named {unknown[0]!r}")
        return [p for name in self.layer_names for p in modules[name].parameters() if p.requires_grad]

    def _named_params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The parameters ``noise="initial"`` pulls, by name (the same selection as ``"gaussian"``)."""
        kept = {id(p) for p in self._gaussian_params(model)}
        return {name: p for name, p in model.named_parameters() if id(p) in kept}

    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), "applied": self.applied, "steps": self.steps}
        if self.initial:
            state["initial"] = {name: value.cpu() for name, value in self.initial.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.applied = int(state_dict.get("applied", 0))
        self.steps = int(state_dict.get("steps", 0))
        self.cadence.mark(self.steps)
        if "initial" in state_dict:
            devices = {name: p.device for name, p in self.model.named_parameters()} if self.model is not None else {}
            self.initial = {
                name: value.to(devices.get(name, value.device)) for name, value in state_dict["initial"].items()
            }


class L2Init(Policy):
    """L2 toward the initial parameters (Kumar, Marklund & Van Roy 2023): adds λ‖θ − θ₀‖² to the loss.

    Implemented on the gradients, ``g ← g + 2λ(θ − θ₀)``, which is the gradient of the penalised loss without
    touching the loss: call :meth:`step` after ``backward()`` and **before** ``optimizer.step()`` (after DDP has
    averaged the gradients and AMP has unscaled them). θ₀ is copied when the policy is attached (and kept in
    :meth:`state_dict`, so a resumed run pulls toward the same point).

    Args:
        model: the network (``None``: give it to :meth:`attach`).
        weight: λ (the paper's sweep: 1e-2 … 1e-5).
        layers: module names whose parameters are regularised (``None``: every trainable parameter).
        prefix: name of the values in reports.

    Example::

        >>> net = nn.Linear(2, 1)
        >>> _ = nn.init.zeros_(net.weight)  # exact arithmetic below, whatever the random init
        >>> l2 = L2Init(net, weight=0.5)
        >>> with torch.no_grad():
        ...     _ = net.weight.add_(1.0)
        >>> net.weight.grad = torch.zeros_like(net.weight)
        >>> l2.step()  # the penalty λ‖θ − θ₀‖², and 2λ(θ − θ₀) added to the gradient
        1.0
        >>> net.weight.grad.tolist()
        [[1.0, 1.0]]
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        weight: float = 1e-3,
        layers: Sequence[str] | None = None,
        prefix: str = "l2_init",
    ) -> None:
        super().__init__(prefix=prefix)
        self.weight = check_positive_float(type(self).__name__, "weight", weight)
        self.layer_names = None if layers is None else list(layers)
        self.initial: dict[str, torch.Tensor] = {}
        self._bound: dict[str, nn.Parameter] = {}
        if model is not None:
            self.attach(model)

    def _params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if self.layer_names is None:
            return named
        modules = dict(model.named_modules())
        unknown = [name for name in self.layer_names if name not in modules]
        if unknown:
            raise PlasticityConfigError(f"{self.owner}.layers: the model has no module named {unknown[0]!r}")
        prefixes = tuple(f"{name}." for name in self.layer_names)
        return {n: p for n, p in named.items() if n.startswith(prefixes)}

    def attach(self, model: nn.Module) -> None:
        """Regularise ``model``'s parameters toward their values now (or toward a loaded θ₀)."""
        params = self._bound = self._params(model)
        self.report_binding(owning_modules(params))
        if not self.initial:  # a resumed run keeps the point it started from
            self.initial = {name: p.detach().clone() for name, p in params.items()}
        else:
            self.initial = {name: value.to(params[name].device) for name, value in self.initial.items()}

    @torch.no_grad()
    def step(self, penalty: bool = True) -> float | None:
        """Add 2λ(θ − θ₀) to every bound gradient.

        Returns the penalty λ‖θ − θ₀‖² (``None`` with ``penalty=False``, which saves a read-back).
        """
        total = 0.0
        for name, param in self._bound.items():
            difference = param - self.initial[name]
            if param.grad is not None:
                param.grad.add_(difference, alpha=2 * self.weight)
            if penalty:
                total += float(difference.pow(2).sum())
        return self.weight * total if penalty else None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial": {k: v.cpu() for k, v in self.initial.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.initial = dict(state_dict.get("initial", {}))
        if self._bound:  # attached already: move θ₀ where the parameters are
            self.initial = {name: value.to(self._bound[name].device) for name, value in self.initial.items()}


class HeadReset(Policy):
    """Re-initialise the output layer when a new task starts (Dohare et al.'s Continual-ImageNet protocol).

    ``mode="init"`` draws fresh weights as the model initialised the layer (``layer_init``; else PyTorch's
    default, which warns once), ``mode="zero"`` sets weight and bias to 0 (the reference code's head reset). The
    layer's optimizer state is cleared. In a hand-written loop, :meth:`step` with the current task id resets at
    every task change (not before the first task); :meth:`apply` resets now.

    Args:
        model: the network (``None``: give it to :meth:`attach`).
        optimizer: its optimizer(s), whose state for the head is cleared.
        layer: module name of the head (``None``: the model's ``output_layer()``).
        mode: ``"init"`` or ``"zero"``.
        seed: seed of the fresh weights.
        prefix: name of the values in reports.

    Example::

        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> reset = HeadReset(net, layer="2", mode="zero")
        >>> [reset.step(task) for task in (0, 0, 1)]
        [False, False, True]
        >>> net[2].weight.abs().sum().item()
        0.0
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        *,
        layer: str | None = None,
        mode: Literal["init", "zero"] = "init",
        seed: int = 0,
        prefix: str = "head_reset",
    ) -> None:
        super().__init__(seed=seed, prefix=prefix)
        self.layer = layer
        self.mode = check_choice(type(self).__name__, "mode", mode, ("init", "zero"))
        self.model: nn.Module | None = None
        self.resets = 0
        self.task: Any = None
        if model is not None:
            self.attach(model, optimizer)

    def head(self, model: nn.Module | None = None) -> tuple[str, nn.Module]:
        """(name, module) of the head."""
        model = self.model if model is None else model
        if model is None:
            raise PlasticityConfigError("HeadReset: no model; pass it to HeadReset(model, ...)")
        if self.layer is None:
            output_layer = getattr(model, "output_layer", None)
            if not callable(output_layer):
                raise PlasticityConfigError(
                    f"HeadReset: {type(model).__name__} has no output_layer(); name the head with layer=..."
                )
            return output_layer()
        layers = {name: m for name, m in model.named_modules() if isinstance(m, _WEIGHT_LAYERS)}
        if self.layer not in layers:
            raise PlasticityConfigError(
                f"HeadReset.layer={self.layer!r} is not a Linear/Conv layer of {type(model).__name__}; choose "
                f"among {', '.join(list(layers)[-8:])}"
            )
        return self.layer, layers[self.layer]

    def attach(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    ) -> None:
        """Use ``model`` (its head is checked now); ``optimizer``: the optimizer(s) whose head state is cleared."""
        if optimizer is not None:
            self.optimizers = as_optimizers(optimizer)
        self.model = model
        name, _ = self.head(model)
        self.report_binding([name])
        if self.mode == "init":
            guess = _guessed_inits(self.owner, model, [name])
            if guess:
                self.warn_once("init", guess)

    def step(self, task: Any) -> bool:
        """Reset if ``task`` differs from the task of the previous call (never on the first).

        Returns whether it did.
        """
        if not self.task_changed(task):
            return False
        self.apply()
        return True

    @torch.no_grad()
    def apply(self, model: nn.Module | None = None) -> None:
        """Reset the head now."""
        model = self.model if model is None else model
        name, head = self.head(model)
        if self.mode == "zero":
            for param in head.parameters(recurse=False):
                param.zero_()
        else:
            fresh = fresh_layer(model, name, head, self.generator)
            for param, new in zip(head.parameters(recurse=False), fresh.parameters(recurse=False), strict=True):
                param.copy_(new)
        for optimizer in self.optimizers:
            for param in head.parameters(recurse=False):
                reset_optimizer_state(optimizer, param, 0, torch.arange(param.shape[0]))
        self.resets += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "resets": self.resets, "task": self.task}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.resets = int(state_dict.get("resets", 0))
        self.task = state_dict.get("task")


class LayerReset(ScheduledPolicy):
    """Reset chosen layers, or the whole network, to fresh initial values (Nikishin et al. 2022).

    Reset chosen layers, or the whole network, to fresh initial values (Nikishin et al. 2022, "The Primacy Bias in Deep
    Reinforcement Learning"), with their optimizer state cleared.

    Every weight and normalisation layer inside each target module is redrawn as the model initialised it
    (``layer_init(name)``, else PyTorch's default, which warns once) from the policy's generator (seeded alike on
    every DDP rank); any other module with parameters of its own runs ``reset_parameters`` under that generator.
    The optimizer state of every reset parameter is dropped (momentum; Adam's moments and step count restart).
    This generalises :class:`HeadReset` (one layer) to any set of layers. In a hand-written loop, :meth:`step` after
    ``optimizer.step()`` resets every ``every_n_steps`` steps, :meth:`step_task` at every task change (not before
    the first), :meth:`apply` now.

    Args:
        model: the network (``None``: give it to :meth:`attach`).
        optimizer: its optimizer(s), whose state for the reset parameters is cleared.
        layers: names of the modules to reset (any module: a block resets everything in it); ``None``: the whole
            network.
        every_n_steps: period of :meth:`step` (``None``: only task changes and :meth:`apply`).
        reset_optimizer: clear the optimizer state of the reset parameters.
        seed: seed of the fresh values.
        prefix: name of the values in reports.

    Example::

        >>> torch.manual_seed(0) and None
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> before = net[0].weight.detach().clone()
        >>> LayerReset(net, layers=["2"]).apply()
        >>> torch.equal(net[0].weight, before)
        True
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        *,
        layers: Sequence[str] | None = None,
        every_n_steps: int | None = None,
        reset_optimizer: bool = True,
        seed: int = 0,
        prefix: str = "layer_reset",
    ) -> None:
        super().__init__(seed=seed, prefix=prefix)
        owner = type(self).__name__
        if layers is not None and (
            isinstance(layers, str) or not all(isinstance(name, str) for name in layers) or not layers
        ):
            raise PlasticityConfigError(
                f"{owner}.layers={layers!r} is invalid; expected a non-empty list of module names, or null for the "
                "whole network"
            )
        if every_n_steps is not None:
            check_positive_int(owner, "every_n_steps", every_n_steps)
        if not isinstance(reset_optimizer, bool):
            raise PlasticityConfigError(
                f"{owner}.reset_optimizer={reset_optimizer!r} is invalid; expected true or false"
            )
        self.layer_names = None if layers is None else list(layers)
        self.cadence = StepCadence(every_n_steps)
        self.reset_optimizer = reset_optimizer
        self.model: nn.Module | None = None
        self.resets = 0
        self.steps = 0
        self.task: Any = None
        if model is not None:
            self.attach(model, optimizer)

    @property
    def every_n_steps(self) -> int | None:
        return self.cadence.every_n_steps

    def targets(self, model: nn.Module | None = None) -> dict[str, nn.Module]:
        """The modules to reset, by name (``{"": model}`` for the whole network)."""
        model = self.model if model is None else model
        if model is None:
            raise PlasticityConfigError("LayerReset: no model; pass it to LayerReset(model, ...)")
        if self.layer_names is None:
            return {"": model}
        modules = dict(model.named_modules())
        targets = {}
        for name in self.layer_names:
            if name not in modules:
                raise PlasticityConfigError(
                    f"{self.owner}.layers: {name!r} is not a module of {type(model).__name__}; choose among "
                    f"{', '.join(n for n in list(modules)[1:13])}"
                )
            if not any(True for _ in modules[name].parameters()):
                raise PlasticityConfigError(
                    f"{self.owner}.layers: {name!r} ({type(modules[name]).__name__}) has no parameters to reset"
                )
            targets[name] = modules[name]
        return targets

    def attach(
        self, model: nn.Module, optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None
    ) -> None:
        """Use ``model`` (its targets are checked now); ``optimizer``: the optimizer(s) whose state is cleared."""
        if optimizer is not None:
            self.optimizers = as_optimizers(optimizer)
        self.model = model
        self.report_binding(self.targets(model))
        weights = [
            f"{prefix}.{name}" if prefix and name else prefix or name
            for prefix, target in self.targets(model).items()
            for name, module in target.named_modules()
            if isinstance(module, _WEIGHT_LAYERS)
        ]
        guess = _guessed_inits(self.owner, model, weights)
        if guess:
            self.warn_once("init", guess)

    @torch.no_grad()
    def apply(self, model: nn.Module | None = None) -> None:
        """Reset the targets now."""
        model = self.model if model is None else model
        touched: list[nn.Parameter] = []
        for prefix, target in self.targets(model).items():
            for name, module in target.named_modules():
                full = f"{prefix}.{name}" if prefix and name else prefix or name
                own = list(module.parameters(recurse=False))
                if not own:
                    continue
                if isinstance(module, (*_WEIGHT_LAYERS, *_NORM_LAYERS)):
                    fresh = fresh_layer(model, full, module, self.generator)
                    for param, new in zip(own, fresh.parameters(recurse=False), strict=True):
                        param.copy_(new.to(param.device))
                elif callable(getattr(module, "reset_parameters", None)):
                    devices = sorted({p.device.index or 0 for p in own if p.is_cuda})
                    with torch.random.fork_rng(devices=devices):
                        torch.manual_seed(int(torch.randint(2**62, (1,), generator=self.generator)))
                        module.reset_parameters()
                else:
                    continue
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.reset_running_stats()
                touched += own
        if self.reset_optimizer:  # the whole state goes: Adam restarts its moments and its step count
            for optimizer in self.optimizers:
                for param in touched:
                    optimizer.state.pop(param, None)
        self.resets += 1

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "resets": self.resets, "steps": self.steps, "task": self.task}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.resets = int(state_dict.get("resets", 0))
        self.steps = int(state_dict.get("steps", 0))
        self.task = state_dict.get("task")
        self.cadence.mark(self.steps)
