"""Reviving gated-off attention heads.

Fresh weights, a gate ramp and a per-slice learning-rate boost — the one declaration of the reviver's settings
(:class:`ReviverSettings`) and the stateful :class:`HeadReviver`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from plasticity_lightning.core.errors import (
    PlasticityConfigError,
    check_fraction,
    check_positive_float,
    check_positive_int,
)
from plasticity_lightning.policies.base import Policy, Settings, as_optimizers, owner_field, settings_owner
from plasticity_lightning.surgery.heads import HeadGates, reinit_heads


def _finite(owner: str, name: str, value: float) -> float:
    if not math.isfinite(value):
        raise PlasticityConfigError(f"{owner}.{name}={value!r} is invalid; expected a finite number")
    return value


@dataclasses.dataclass(frozen=True)
class ReviverSettings(Settings):
    """How revived heads start and learn again, validated once at construction (errors name ``owner``'s field).

    Attributes:
        output_scale: output-projection inputs of a revived head ~ N(0, (output_scale·std)²); Sentinel-AI revives
            at 0.01.
        std: init scale of the Q/K/V weights (GPT-2's ``initializer_range``).
        warmup_steps: optimizer steps of the gate ramp (0: the gate is 1 at once).
        initial_gate: where the gate ramp starts (exclusive).
        lr_multiplier: learning-rate factor of a revived head right after revival (1: no boost).
        boost_steps: optimizer steps over which the factor decays back to 1.
        owner: the name in error messages, not an argument: ``HeadReviver``, or the callback that took these
            settings (:meth:`~plasticity_lightning.policies.base.Settings.with_owner`).

    Example::

        >>> ReviverSettings(warmup_steps=4).warmup_steps
        4
    """

    output_scale: float = 0.01
    std: float = 0.02
    warmup_steps: int = 100
    initial_gate: float = 0.0
    lr_multiplier: float = 5.0
    boost_steps: int = 1000
    owner: str = owner_field("HeadReviver")

    def __post_init__(self) -> None:
        owner = self.owner
        checked = {
            "output_scale": _finite(
                owner, "output_scale", check_positive_float(owner, "output_scale", self.output_scale, allow_zero=True)
            ),
            "std": check_positive_float(owner, "std", self.std),
            "warmup_steps": check_positive_int(owner, "warmup_steps", self.warmup_steps, allow_zero=True),
            "initial_gate": check_fraction(owner, "initial_gate", self.initial_gate, high_open=False),
            "lr_multiplier": _finite(
                owner, "lr_multiplier", check_positive_float(owner, "lr_multiplier", self.lr_multiplier)
            ),
            "boost_steps": check_positive_int(owner, "boost_steps", self.boost_steps, allow_zero=True),
        }
        self._keep(checked)


#: the reviver settings of a PlasticityCycle. Its cycles judge a revived head after ``learn_steps`` (100 by
#: default), so the ramp and the boost must end within one cycle: the standalone defaults (a 100-step ramp and a
#: 1000-step boost, for growth that has the rest of the fit) would still be boosting when the cycle is judged.
CYCLE_REVIVER_SETTINGS = ReviverSettings(warmup_steps=20, boost_steps=100)


class HeadReviver(Policy):
    """Brings gated-off heads back to life, and steers them while they learn again.

    :meth:`revive` gives each head fresh Q/K/V weights and near-silent output rows
    (:func:`~plasticity_lightning.surgery.reinit_heads` with ``output_scale``) and clears their optimizer state.
    Then, for every optimizer step ``t`` after the revival:

    * the head's gate ramps linearly from ``initial_gate`` to 1 over ``warmup_steps``: during the k-th step after
      the revival it is ``initial_gate + (1 - initial_gate)·min(1, k/warmup_steps)`` — never 0, so a revived head
      learns from its first step and is not mistaken for a pruned one;
    * its slices (Q/K/V weights and biases, output-projection inputs:
      :class:`~plasticity_lightning.surgery.HeadLayout`) learn with the learning rate multiplied by
      ``1 + (lr_multiplier - 1)·max(0, 1 - t/boost_steps)`` — a boost that decays linearly back to 1.

    Why not a param group: an optimizer param group holds whole tensors, but ``c_attn`` fuses every head of a layer
    into one tensor, so a boosted group would boost the heads that never left too. The boost is applied as an
    optimizer step hook that scales the step's change of exactly those slices, which *is* a per-slice learning
    rate for every optimizer whose update is proportional to its learning rate (SGD with or without momentum,
    Adam, AdamW — including decoupled weight decay — RMSprop, Adagrad without ``lr_decay``). No parameter is added
    or replaced (DDP-safe), and every rank applies the same factors.

    In a plain loop: ``reviver = HeadReviver(gates, optimizer=optimizer)``, ``reviver.revive(heads, step)`` when
    heads come back, ``reviver.update(step)`` before each training step.

    Args:
        gates: the model's :class:`~plasticity_lightning.surgery.HeadGates`.
        settings: a validated :class:`ReviverSettings` (default: its defaults); keyword arguments override fields.
        optimizer: optimizer(s) whose state is cleared for revived slices and whose steps are boosted
            (:meth:`attach`).
        seed: seed of the fresh weights' generator (when :meth:`revive` is given none).
        **overrides: ``output_scale``, ``std``, ``warmup_steps``, ``initial_gate``, ``lr_multiplier``,
            ``boost_steps``, ``owner`` (see :class:`ReviverSettings`).

    Example::

        >>> from transformers import GPT2Config, GPT2LMHeadModel
        >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=50))
        >>> gates = HeadGates(model)
        >>> gates.set(1, 3, 0.0)
        >>> reviver = HeadReviver(gates, warmup_steps=4)
        >>> reviver.revive([(1, 3)], step=10)
        >>> reviver.update(step=12)  # the third step after the revival
        >>> float(gates.gates[1, 3])
        0.75
    """

    def __init__(
        self,
        gates: HeadGates,
        settings: ReviverSettings | None = None,
        *,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        seed: int = 0,
        **overrides: Any,
    ) -> None:
        super().__init__(seed=seed, prefix="heads")
        unknown = set(overrides) - {f.name for f in dataclasses.fields(ReviverSettings)}
        if unknown:
            raise PlasticityConfigError(
                f"HeadReviver: unknown setting(s) {', '.join(sorted(unknown))}; expected fields of ReviverSettings"
            )
        # validated here only when something is overridden: a callback hands over settings checked at its __init__
        settings = settings or ReviverSettings()
        if overrides:
            with settings_owner(overrides.pop("owner", settings.owner)):
                settings = dataclasses.replace(settings, **overrides)
        self.settings = settings
        self.owner = self.settings.owner
        self.output_scale: float = self.settings.output_scale
        self.std: float = self.settings.std
        self.warmup_steps: int = self.settings.warmup_steps
        self.initial_gate: float = self.settings.initial_gate
        self.lr_multiplier: float = self.settings.lr_multiplier
        self.boost_steps: int = self.settings.boost_steps
        self.gates = gates
        #: heads being revived: (layer, head, optimizer step of the revival)
        self.reviving: list[tuple[int, int, int]] = []
        self.step = 0
        self._handles: list[Any] = []
        self._before: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor, float]] = []
        if optimizer is not None:
            self.attach(as_optimizers(optimizer))

    @property
    def bound_layers(self) -> list[str]:
        """The attention modules whose heads this reviver acts on."""
        return [name for name, _ in self.gates.layers]

    def gate_at(self, age: int) -> float:
        """The gate during optimizer step ``start + age`` of a head revived at step ``start``."""
        if self.warmup_steps == 0 or age + 1 >= self.warmup_steps:
            return 1.0
        return self.initial_gate + (1.0 - self.initial_gate) * (max(age, 0) + 1) / self.warmup_steps

    def lr_factor_at(self, age: int) -> float:
        """The learning-rate factor ``age`` optimizer steps after revival."""
        if self.boost_steps == 0:
            return 1.0
        return 1.0 + (self.lr_multiplier - 1.0) * max(0.0, 1.0 - max(age, 0) / self.boost_steps)

    @torch.no_grad()
    def revive(
        self,
        heads: Sequence[tuple[int, int]],
        step: int,
        *,
        generator: torch.Generator | None = None,
        optimizers: Iterable[torch.optim.Optimizer] | None = None,
    ) -> None:
        """Re-initialise ``heads`` and start their gate ramp and boost with optimizer step ``step`` (the next one).

        ``heads`` are ``(layer, head)`` pairs. Draws come from ``generator`` (default: the reviver's own); the
        optimizer state of the revived slices is cleared in ``optimizers`` (default: the attached ones).
        """
        optimizers = self.optimizers if optimizers is None else list(optimizers)
        generator = self.generator if generator is None else generator
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            if not (0 <= int(layer) < self.gates.num_layers and 0 <= int(head) < self.gates.num_heads):
                raise PlasticityConfigError(
                    f"HeadReviver.revive: head ({layer}, {head}) is out of range for {self.gates.num_layers} layers "
                    f"of {self.gates.num_heads} heads"
                )
            by_layer.setdefault(int(layer), []).append(int(head))
        for layer, layer_heads in sorted(by_layer.items()):
            reinit_heads(
                self.gates.layouts[layer],
                layer_heads,
                std=self.std,
                output_scale=self.output_scale,
                generator=generator,
                optimizers=optimizers,
            )
        revived = {(int(layer), int(head)) for layer, head in heads}
        self.reviving = [r for r in self.reviving if (r[0], r[1]) not in revived]
        self.reviving += [(layer, head, int(step)) for layer, head in sorted(revived)]
        for layer, head in revived:
            self.gates.set(layer, head, self.gate_at(0))
        self.update(step)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Set the ramping gates for optimizer step ``step``.

        Forget heads whose ramp and boost are over, and heads gated off again meanwhile (pruned: the ramp itself never
        sets 0).
        """
        self.step = int(step)
        self.reviving = [r for r in self.reviving if float(self.gates.gates[r[0], r[1]]) != 0.0]
        for layer, head, start in self.reviving:
            self.gates.set(layer, head, self.gate_at(self.step - start))
        done = max(self.warmup_steps, self.boost_steps)
        self.reviving = [r for r in self.reviving if self.step - r[2] < done]

    def attach(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Apply the learning-rate boost on every step of ``optimizers`` (and clear their state on revival)."""
        self.detach()
        self.optimizers = list(optimizers)
        for optimizer in self.optimizers:
            self._handles.append(optimizer.register_step_pre_hook(self._remember))
            self._handles.append(optimizer.register_step_post_hook(self._boost))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _slices(self) -> list[tuple[torch.Tensor, int, torch.Tensor, float]]:
        """(parameter, dim, index, factor) of every boosted head slice."""
        slices = []
        for layer, head, start in self.reviving:
            factor = self.lr_factor_at(self.step - start)
            if factor == 1.0:
                continue
            for piece, index in self.gates.layouts[layer].owned([head]):
                slices.append((piece.param, piece.dim, index, factor))
        return slices

    @torch.no_grad()
    def _remember(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._before = [
            (param, dim, index.to(param.device), param.index_select(dim, index.to(param.device)), factor)
            for param, dim, index, factor in self._slices()
        ]

    @torch.no_grad()
    def _boost(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for param, dim, index, before, factor in self._before:
            after = param.index_select(dim, index)
            param.index_copy_(dim, index, before + factor * (after - before))
        self._before = []

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "reviving": list(self.reviving), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.reviving = [tuple(int(v) for v in r) for r in state.get("reviving", [])]
        self.step = int(state.get("step", 0))
