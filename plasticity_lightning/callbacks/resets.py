"""Whole-parameter interventions: Shrink & Perturb, L2 toward the initial weights, output-head reset."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from typing_extensions import override

from plasticity_lightning.callbacks.intervention import Intervention
from plasticity_lightning.core.errors import (
    PlasticityConfigError,
    check_choice,
    check_positive_float,
    check_positive_int,
)
from plasticity_lightning.nn.init import init_layer_
from plasticity_lightning.surgery import reset_optimizer_state

_WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _selected_modules(
    owner: str, pl_module: nn.Module, layers: Sequence[str] | None, kinds: tuple[type, ...]
) -> dict[str, nn.Module]:
    modules = {name: m for name, m in pl_module.named_modules() if isinstance(m, kinds)}
    if layers is None:
        return modules
    unknown = [name for name in layers if name not in modules]
    if unknown:
        raise PlasticityConfigError(
            f"{owner}.layers: {unknown[0]!r} is not a weight or normalisation layer of {type(pl_module).__name__}; "
            f"choose among {', '.join(list(modules)[:12])}"
        )
    return {name: modules[name] for name in layers}


def fresh_layer(pl_module: nn.Module, name: str, module: nn.Module, generator: torch.Generator) -> nn.Module:
    """A copy of ``module`` re-initialised as the model initialised it (``layer_init``; else PyTorch's default)."""
    fresh = copy.deepcopy(module)
    if isinstance(module, _WEIGHT_LAYERS):
        layer_init = getattr(pl_module, "layer_init", None)
        scheme, gain = layer_init(name) if callable(layer_init) else ("default", 1.0)
        init_layer_(fresh, scheme, gain=gain, generator=generator)
    else:  # normalisation layers start at weight 1, bias 0
        with torch.no_grad():
            if getattr(fresh, "weight", None) is not None:
                fresh.weight.fill_(1.0)
            if getattr(fresh, "bias", None) is not None:
                fresh.bias.zero_()
    return fresh


class ShrinkAndPerturb(Intervention):
    """Shrink & Perturb (Ash & Adams 2020): θ ← λ·θ + p·θ_fresh.

    ``noise="fresh_init"`` (the paper): θ_fresh is a newly initialised copy of each weight and normalisation layer
    (its own init scheme, so every layer keeps its scale), applied when a new task starts and/or every
    ``every_n_steps`` optimizer steps; defaults λ = 0.4, p = 0.1. ``noise="gaussian"``: θ ← λ·θ + N(0, p²) on every
    trainable parameter — Dohare et al.'s continual variant (``shrink=1``, ``perturb=σ``, ``every_n_steps=1``, with
    the optimizer's weight decay doing the shrinking). Fresh values come from a generator seeded alike on every
    DDP rank, so ranks stay identical. Optimizer state is kept (as in the paper).

    Args:
        shrink: λ.
        perturb: p (the fresh-init mix) or σ (the Gaussian noise std).
        noise: ``"fresh_init"`` or ``"gaussian"``.
        on_task_change: apply when a new task starts (not before the first).
        every_n_steps: also apply every n optimizer steps (``None``: never).
        layers: module names to change (``None``: every Linear/Conv/norm layer, or every parameter with
            ``noise="gaussian"``).
        seed: seed of the fresh values.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[ShrinkAndPerturb(shrink=0.4, perturb=0.1)])
    """

    def __init__(
        self,
        shrink: float = 0.4,
        perturb: float = 0.1,
        noise: Literal["fresh_init", "gaussian"] = "fresh_init",
        on_task_change: bool = True,
        every_n_steps: int | None = None,
        layers: Sequence[str] | None = None,
        seed: int = 0,
        prefix: str = "shrink_perturb",
    ) -> None:
        super().__init__(seed=seed, prefix=prefix)
        self.shrink = check_positive_float("ShrinkAndPerturb", "shrink", shrink, allow_zero=True)
        self.perturb = check_positive_float("ShrinkAndPerturb", "perturb", perturb, allow_zero=True)
        self.noise = check_choice("ShrinkAndPerturb", "noise", noise, ("fresh_init", "gaussian"))
        self.on_task_change = on_task_change
        if every_n_steps is not None:
            check_positive_int("ShrinkAndPerturb", "every_n_steps", every_n_steps)
        if not on_task_change and every_n_steps is None:
            raise PlasticityConfigError(
                "ShrinkAndPerturb: on_task_change=False with every_n_steps=None never applies; set one of them"
            )
        self.every_n_steps = every_n_steps
        self.layer_names = None if layers is None else list(layers)
        self.applied = 0
        self._last_step: int | None = None

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "shrink": self.shrink, "perturb": self.perturb, "noise": self.noise}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.noise == "fresh_init":
            _selected_modules("ShrinkAndPerturb", pl_module, self.layer_names, (*_WEIGHT_LAYERS, *_NORM_LAYERS))

    @override
    def on_task_start(self, trainer, pl_module, context, previous_task) -> None:
        if self.on_task_change and previous_task is not None:
            self.apply(trainer, pl_module)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every_n_steps and step and step != self._last_step and step % self.every_n_steps == 0:
            self._last_step = step
            self.apply(trainer, pl_module)

    @torch.no_grad()
    def apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Shrink and perturb now."""
        if self.noise == "gaussian":
            params = self._gaussian_params(pl_module)
            for param in params:
                generator = self.generator_on(param.device)  # drawn where the parameter lives
                noise = torch.randn(param.shape, generator=generator, dtype=param.dtype, device=param.device)
                param.mul_(self.shrink).add_(noise, alpha=self.perturb)
        else:
            kinds = (*_WEIGHT_LAYERS, *_NORM_LAYERS)
            for name, module in _selected_modules("ShrinkAndPerturb", pl_module, self.layer_names, kinds).items():
                fresh = fresh_layer(pl_module, name, module, self.generator)
                for param, new in zip(module.parameters(recurse=False), fresh.parameters(recurse=False), strict=True):
                    param.mul_(self.shrink).add_(new.to(param.device), alpha=self.perturb)
        self.applied += 1
        self.log_values(trainer, {"applied": self.applied}, force=self.every_n_steps is None)

    def _gaussian_params(self, pl_module: nn.Module) -> list[nn.Parameter]:
        if self.layer_names is None:
            return [p for p in pl_module.parameters() if p.requires_grad]
        modules = dict(pl_module.named_modules())
        unknown = [name for name in self.layer_names if name not in modules]
        if unknown:
            raise PlasticityConfigError(f"ShrinkAndPerturb.layers: the model has no module named {unknown[0]!r}")
        return [p for name in self.layer_names for p in modules[name].parameters() if p.requires_grad]

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "applied": self.applied, "last_step": self._last_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.applied = int(state_dict.get("applied", 0))
        self._last_step = state_dict.get("last_step")


class L2Init(Intervention):
    """L2 toward the initial parameters (Kumar, Marklund & Van Roy 2023): adds λ‖θ − θ₀‖² to the loss.

    Implemented on the gradients (``g ← g + 2λ(θ − θ₀)`` in ``on_before_optimizer_step``, after DDP averaging and
    AMP unscaling, before gradient clipping), which is the gradient of the penalised loss without touching the
    model's ``training_step``. θ₀ is copied at the start of ``fit`` and kept in the checkpoint, so a resumed run
    pulls toward the same point. The penalty λ‖θ − θ₀‖² is logged as ``l2_init/penalty``.

    Args:
        weight: λ (the paper's sweep: 1e-2 … 1e-5).
        layers: module names whose parameters are regularised (``None``: every trainable parameter).

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[L2Init(weight=1e-3)])
    """

    def __init__(self, weight: float = 1e-3, layers: Sequence[str] | None = None, prefix: str = "l2_init") -> None:
        super().__init__(prefix=prefix)
        self.weight = check_positive_float("L2Init", "weight", weight)
        self.layer_names = None if layers is None else list(layers)
        self.initial: dict[str, torch.Tensor] = {}
        self._bound: dict[str, nn.Parameter] = {}

    @override
    def settings(self) -> dict[str, Any]:
        return {"weight": self.weight, "layers": self.layer_names}

    def _params(self, pl_module: nn.Module) -> dict[str, nn.Parameter]:
        named = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
        if self.layer_names is None:
            return named
        modules = dict(pl_module.named_modules())
        unknown = [name for name in self.layer_names if name not in modules]
        if unknown:
            raise PlasticityConfigError(f"L2Init.layers: the model has no module named {unknown[0]!r}")
        prefixes = tuple(f"{name}." for name in self.layer_names)
        return {n: p for n, p in named.items() if n.startswith(prefixes)}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = self._bound = self._params(pl_module)
        if not self.initial:  # a resumed run keeps the point it started from
            self.initial = {name: p.detach().clone() for name, p in params.items()}
        else:
            self.initial = {name: value.to(params[name].device) for name, value in self.initial.items()}

    @override
    @torch.no_grad()
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        penalty = 0.0
        for name, param in self._bound.items():
            difference = param - self.initial[name]
            if param.grad is not None:
                param.grad.add_(difference, alpha=2 * self.weight)
            if trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
                penalty += float(difference.pow(2).sum())
        self.log_values(trainer, {"penalty": self.weight * penalty})

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "initial": {k: v.cpu() for k, v in self.initial.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.initial = dict(state_dict.get("initial", {}))


class HeadReset(Intervention):
    """Re-initialise the output layer when a new task starts (Dohare et al.'s Continual-ImageNet protocol).

    ``mode="init"`` draws fresh weights as the model initialised the layer (``layer_init``; else PyTorch's
    default), ``mode="zero"`` sets weight and bias to 0 (the reference code's head reset). The layer's optimizer
    state is cleared. The first task keeps its initial head.

    Args:
        layer: module name of the head (``None``: the model's ``output_layer()``).
        mode: ``"init"`` or ``"zero"``.
        seed: seed of the fresh weights.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[HeadReset(mode="zero")])
    """

    def __init__(
        self,
        layer: str | None = None,
        mode: Literal["init", "zero"] = "init",
        seed: int = 0,
        prefix: str = "head_reset",
    ) -> None:
        super().__init__(seed=seed, prefix=prefix)
        self.layer = layer
        self.mode = check_choice("HeadReset", "mode", mode, ("init", "zero"))
        self.resets = 0

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "layer": self.layer, "mode": self.mode}

    def _head(self, pl_module: nn.Module) -> tuple[str, nn.Module]:
        if self.layer is None:
            output_layer = getattr(pl_module, "output_layer", None)
            if not callable(output_layer):
                raise PlasticityConfigError(
                    f"HeadReset: {type(pl_module).__name__} has no output_layer(); name the head with layer=..."
                )
            return output_layer()
        layers = {name: m for name, m in pl_module.named_modules() if isinstance(m, _WEIGHT_LAYERS)}
        if self.layer not in layers:
            raise PlasticityConfigError(
                f"HeadReset.layer={self.layer!r} is not a Linear/Conv layer of {type(pl_module).__name__}; choose "
                f"among {', '.join(list(layers)[-8:])}"
            )
        module = layers[self.layer]
        return self.layer, module

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._head(pl_module)

    @override
    def on_task_start(self, trainer, pl_module, context, previous_task) -> None:
        if previous_task is not None:
            self.reset(trainer, pl_module)

    @torch.no_grad()
    def reset(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name, head = self._head(pl_module)
        if self.mode == "zero":
            for param in head.parameters(recurse=False):
                param.zero_()
        else:
            fresh = fresh_layer(pl_module, name, head, self.generator)
            for param, new in zip(head.parameters(recurse=False), fresh.parameters(recurse=False), strict=True):
                param.copy_(new)
        for optimizer in self.optimizers(trainer):
            for param in head.parameters(recurse=False):
                reset_optimizer_state(optimizer, param, 0, torch.arange(param.shape[0]))
        self.resets += 1
        self.log_values(trainer, {"resets": self.resets}, force=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "resets": self.resets}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.resets = int(state_dict.get("resets", 0))
