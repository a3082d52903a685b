"""What every trainer-free policy shares.

Its own random source, its state, the optimizers it resets, DDP averaging, and, for unit policies, which producer →
consumer pairs it bound and which init their new units get (and why).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
from torch import nn

from plasticity_lightning.core.errors import PlasticityConfigError, check_positive_float
from plasticity_lightning.nn.activations import gain_name_of, is_known_activation
from plasticity_lightning.nn.init import resolve_init_scheme
from plasticity_lightning.surgery import UnitPair, pair_units
from plasticity_lightning.surgery.topology import unit_weight

log = logging.getLogger(__name__)

_SETTINGS_OWNER: ContextVar[str | None] = ContextVar("settings_owner", default=None)
_Settings = TypeVar("_Settings", bound="Settings")


@contextlib.contextmanager
def settings_owner(owner: str) -> Iterator[None]:
    """Name ``owner`` in the messages of the settings objects built inside (their :func:`owner_field`).

    How a callback re-owns its settings (:meth:`Settings.with_owner`) and how the CLI names a YAML group's key path
    (``PlasticityCycle.cycle``) when one of its values is refused.

    Args:
        owner: the name that starts each message, e.g. ``PlasticityCycle`` or ``PlasticityCycle.cycle``.
    """
    token = _SETTINGS_OWNER.set(owner)
    try:
        yield
    finally:
        _SETTINGS_OWNER.reset(token)


def owner_field(default: str) -> Any:
    """The ``owner`` field of a settings dataclass: the name its validation messages start with.

    Not an argument (LightningCLI does not show it as a key): the name given by an enclosing :func:`settings_owner`,
    else ``default``.

    Args:
        default: the owner outside any :func:`settings_owner` (the policy that takes the settings).
    """
    return dataclasses.field(default_factory=lambda: _SETTINGS_OWNER.get() or default, init=False, compare=False)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of the frozen settings dataclasses: validated once when built, messages naming their owner.

    :class:`~plasticity_lightning.policies.heads.CycleSettings` and
    :class:`~plasticity_lightning.policies.heads.ReviverSettings` check their values in ``__post_init__``
    (:meth:`_keep` stores the checked values); their messages start with ``owner`` (an :func:`owner_field`). A
    dataclass without fields of its own (jsonargparse reads only pure dataclasses as YAML groups); each subclass
    declares ``owner = owner_field(...)`` last.
    """

    def _keep(self, checked: dict[str, Any]) -> None:
        """Store the validated (normalised) values of ``checked`` on the frozen instance."""
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    def values(self) -> dict[str, Any]:
        """The settings without ``owner``."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "owner"}  # type: ignore[arg-type]

    def with_owner(self: _Settings, owner: str) -> _Settings:
        """A copy whose messages name ``owner`` (validated again, as built).

        Args:
            owner: the name its messages start with from now on (a callback's name).

        Example::

            >>> from plasticity_lightning.policies.heads import ReviverSettings
            >>> ReviverSettings(warmup_steps=3).with_owner("HeadGrowth").owner
            'HeadGrowth'
        """
        with settings_owner(owner):
            return dataclasses.replace(self)  # type: ignore[type-var]


def as_optimizers(optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None) -> list[Any]:
    """``None``, one optimizer or several, as a list."""
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "param_groups"):
        return [optimizer]
    return list(optimizer)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over the processes of the default ``torch.distributed`` group (identity without one).

    Pass it as a policy's ``reduce_mean`` in a hand-written DDP loop, so every rank takes the same decisions.

    Args:
        tensor: a tensor with the same shape on every process.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    reduced = tensor.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced / dist.get_world_size()


def owning_modules(parameter_names: Iterable[str]) -> list[str]:
    """The modules that hold the named parameters, in order, each once (``""``: the model itself).

    Example::

        >>> owning_modules(["0.weight", "0.bias", "2.weight", "scale"])
        ['0', '2', '']
    """
    return list(dict.fromkeys(name.rpartition(".")[0] for name in parameter_names))


class Policy:
    """Base of the trainer-free algorithms.

    It holds what every algorithm needs to be reproducible and correct in any training loop:

    * a CPU ``torch.Generator`` seeded with ``seed``, the same on every process, so every random choice is identical
      across DDP ranks without communication; draws on an accelerator use :meth:`generator_on`, a generator of that
      device with the same guarantees. Both are in :meth:`state_dict`, so a resumed run draws what the uninterrupted
      run would have drawn;
    * :attr:`optimizers`, whose state is cleared for every touched slice;
    * :attr:`reduce_mean`, which averages per-unit statistics across processes before any decision (``None``: one
      process; :func:`all_reduce_mean` for ``torch.distributed``);
    * :attr:`announce` and :attr:`warn`, where one-time reports and warnings go (the Lightning callbacks route them
      to rank zero).

    Args:
        seed: seed of the policy's own random draws.
        prefix: name of the policy's values in reports and warnings (a callback logs them under it).
    """

    def __init__(self, seed: int = 0, prefix: str = "policy") -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise PlasticityConfigError(f"{type(self).__name__}.seed={seed!r} is invalid; expected an integer")
        self.seed = seed
        self.prefix = prefix
        self.owner = type(self).__name__  # the name in messages (an adapting callback puts its own)
        self.generator = torch.Generator().manual_seed(seed)
        self._device_generators: dict[str, torch.Generator] = {}
        self._pending_device_states: dict[str, torch.Tensor] = {}
        self.optimizers: list[torch.optim.Optimizer] = []
        self.reduce_mean: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.announce: Callable[[str], None] = log.info
        self.warn: Callable[[str], None] = lambda message: warnings.warn(message, UserWarning, stacklevel=3)
        self._warned: set[str] = set()
        self._bound_layers: list[str] = []

    @property
    def bound_layers(self) -> list[str]:
        """The modules the policy acts on, as :meth:`report_binding` reported them (empty until it is attached)."""
        return list(self._bound_layers)

    def report_binding(self, names: Iterable[str]) -> None:
        """Record the modules the policy acts on and report them once.

        They become :attr:`bound_layers` (``""``, the model itself, is ``<model>``) and one line through
        :attr:`announce`: ``"<owner>: bound to N module(s): a, b, ..."``.
        """
        self._bound_layers = [name or "<model>" for name in names]
        shown = self._bound_layers[:12] + (
            [f"… {len(self._bound_layers) - 12} more"] if len(self._bound_layers) > 12 else []
        )
        self.announce(f"{self.owner}: bound to {len(self._bound_layers)} module(s): {', '.join(shown)}")

    def generator_on(self, device: torch.device | str) -> torch.Generator:
        """The random source for draws made on ``device``.

        The CPU generator itself on the CPU; on an accelerator a generator of that device type, seeded alike on every
        rank and kept in the checkpoint. Noise for every parameter is then drawn where the parameters live, with no
        host-side draw and copy per application.
        """
        kind = torch.device(device).type
        if kind == "cpu":
            return self.generator
        if kind not in self._device_generators:
            generator = torch.Generator(device=device).manual_seed(self.seed)
            if kind in self._pending_device_states:
                generator.set_state(self._pending_device_states.pop(kind))
            self._device_generators[kind] = generator
        return self._device_generators[kind]

    def reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` averaged across processes through :attr:`reduce_mean` (itself on one process)."""
        return tensor if self.reduce_mean is None else self.reduce_mean(tensor)

    def task_changed(self, task: Any) -> bool:
        """Record ``task``; whether it differs from the previous call's (never on the first call).

        The one task-change rule of the task-triggered policies.
        """
        previous, self.task = getattr(self, "task", None), task
        return previous is not None and previous != task

    def warn_once(self, key: str, message: str) -> None:
        """Send ``message`` to :attr:`warn` the first time ``key`` is seen."""
        if key not in self._warned:
            self._warned.add(key)
            self.warn(message)

    def warn_nonfinite(self, name: str, step: int | None) -> None:
        """Warn, once per ``name``, that a step was skipped because ``name``'s statistics were NaN/inf."""
        self.warn_once(
            f"nonfinite:{name}",
            f"{self.owner}: the statistics of {name!r} are NaN/inf at step {step}; such steps are skipped "
            f"there and counted in {self.prefix}/skipped_nonfinite",
        )

    def state_dict(self) -> dict[str, Any]:
        """The policy's state: its generators (subclasses add theirs)."""
        devices = {kind: g.get_state() for kind, g in self._device_generators.items()}
        return {"generator": self.generator.get_state(), "device_generators": devices}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "generator" in state_dict:
            self.generator.set_state(state_dict["generator"])
        # accelerator generators are rebuilt on first use, from these states
        self._device_generators = {}
        self._pending_device_states = dict(state_dict.get("device_generators", {}))


class ScheduledPolicy(Policy):
    """A policy that acts on the whole model at moments.

    Every ``cadence`` optimizer step (:meth:`step`) or when the task changes (:meth:`step_task`). Subclasses set
    :attr:`cadence` and :attr:`steps` and define :meth:`apply`.
    """

    cadence: Any  # a policies.cadence.StepCadence
    steps: int

    def step(self) -> bool:
        """One optimizer step has been taken.

        :meth:`apply` if it is the ``every_n_steps``-th; returns whether it did.
        """
        self.steps += 1
        if not self.cadence.take(self.steps):
            return False
        self.apply()
        return True

    def step_task(self, task: Any) -> bool:
        """:meth:`apply` if ``task`` differs from the task of the previous call (never on the first).

        Returns whether it did.
        """
        if not self.task_changed(task):
            return False
        self.apply()
        return True

    def apply(self, model: nn.Module | None = None) -> None:
        """Act now (on ``model``, or the model the policy was built with)."""
        raise NotImplementedError


class UnitPolicy(Policy):
    """A policy on hidden units: binds the producer → consumer pairs and the init of each producer's new units.

    :meth:`bind` finds the pairs (registered pairing rules, then ``torch.fx`` traces, block by block; see
    :mod:`plasticity_lightning.surgery.topology`), reports them once through :attr:`announce` with the blocks it
    skipped, and records for every producer the init scheme and gain of its new units and why
    (:attr:`init_reasons`). When the init had to be guessed it warns once, naming the argument that settles it:

    * ``init="auto"`` on a model without ``layer_init(name)`` falls back to PyTorch's default Linear/Conv init,
      U(±1/√fan_in) (±0.22 for 20 inputs, where Dohare et al.'s kaiming init with ReLU's gain draws ±0.55);
    * a named scheme takes its gain from the activation module between producer and consumer; with none in sight
      (a functional ``F.relu`` in ``forward``) or of an unknown kind, the gain is 1.

    Args:
        layers: producers (``Linear``/``Conv1D``/``Conv2d`` module names) whose units may be replaced; ``None``:
            every pair found.
        pairs: explicit ``[producer, consumer]`` (or ``[producer, consumer, [norms]]``) entries.
        init: ``"auto"`` (the model's ``layer_init(name)``, else PyTorch's default) or a scheme name (kaiming,
            kaiming_normal, xavier, xavier_normal, lecun, lecun_uniform, default) with the activation's gain.
        gain: gain of a named ``init`` for every pair, instead of the activation's.
        seed: see :class:`Policy`.
        prefix: see :class:`Policy`.
    """

    #: init names a subclass accepts besides the schemes (e.g. CBP's "sigma_orthogonal")
    extra_inits: tuple[str, ...] = ()

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        pairs: Sequence[Sequence[Any]] | None = None,
        init: str = "auto",
        gain: float | None = None,
        seed: int = 0,
        prefix: str = "policy",
    ) -> None:
        super().__init__(seed=seed, prefix=prefix)
        owner = type(self).__name__
        self.gain = None if gain is None else check_positive_float(owner, "gain", gain)
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise PlasticityConfigError(f"{owner}.layers={layers!r} is invalid; expected a list of module names")
        if pairs is not None and (isinstance(pairs, str) or not all(not isinstance(p, str) for p in pairs)):
            raise PlasticityConfigError(
                f"{owner}.pairs={pairs!r} is invalid; expected a list of [producer, consumer] lists"
            )
        self.layer_names = None if layers is None else list(layers)
        self.explicit_pairs = None if pairs is None else [list(p) for p in pairs]
        self.init = init if init in ("auto", *self.extra_inits) else resolve_init_scheme(init, owner=owner)
        self.pairs: list[UnitPair] = []
        self.skipped_blocks: dict[str, str] = {}  # block → why no pair was bound there
        self.inits: dict[str, tuple[str, float]] = {}  # producer → (scheme, gain) of its new units
        self.init_reasons: dict[str, str] = {}  # producer → where that init comes from
        self.binding = ""  # the one-paragraph report of the last bind

    @property
    def bound_layers(self) -> list[str]:
        """The bound pairs, ``"producer (+ partners) → consumer"``."""
        return [pair.describe() for pair in self.pairs]

    def bind(self, model: nn.Module) -> None:
        """Find the pairs on the (built) model and the init of each producer.

        Report them once, with what was skipped, and warn once if an init had to be guessed.
        """
        owner = self.owner
        pairing = pair_units(model, self.layer_names, self.explicit_pairs, owner=owner, warn=False)
        if self.explicit_pairs is None and pairing.skipped:
            self.warn(pairing.skipped_warning(owner))  # through the policy: rank zero's under a Lightning callback
        self.pairs, self.skipped_blocks = pairing.pairs, dict(pairing.skipped)
        self.inits, self.init_reasons = {}, {}
        defaults: list[str] = []  # producers that fell back to PyTorch's default init: "'name': ±b (kaiming ±k)"
        gains: list[str] = []  # pairs whose gain was guessed
        for pair in self.pairs:
            scheme, gain, reason = self._init_of(model, pair)
            self.inits[pair.producer] = (scheme, gain)
            self.init_reasons[pair.producer] = reason
            if reason.startswith("PyTorch's default"):
                fan_in = unit_weight(pair.producer_module)[0].numel()
                kaiming = nn.init.calculate_gain(gain_name_of(pair.activation)) * (3.0 / fan_in) ** 0.5
                defaults.append(f"{pair.producer!r} ±{fan_in**-0.5:.3g} (kaiming: ±{kaiming:.3g})")
            elif "gain 1 (" in reason:
                gains.append(f"{pair.producer!r} → {pair.consumer!r} ({reason.split('gain 1 (', 1)[1][:-1]})")
        self.binding = pairing.summary(owner)
        self.announce(self.binding)
        if defaults:
            self.warn_once(
                "init",
                f"{owner}: {type(model).__name__} has no layer_init(name), so new units get PyTorch's default init "
                f"U(±1/√fan_in): {', '.join(defaults)}; pass init='kaiming' for Dohare et al.'s init with the "
                "activation's gain, or another scheme name",
            )
        if gains:
            self.warn_once(
                "gain",
                f"{owner}: init={self.init!r} takes its gain from the activation between producer and consumer, but "
                f"none is known for {', '.join(gains)}, so the gain is 1; pass gain=... (√2 for ReLU)",
            )

    def _init_of(self, model: nn.Module, pair: UnitPair) -> tuple[str, float, str]:
        """(scheme, gain, where it comes from) for ``pair``'s new units."""
        if self.init == "auto":
            layer_init = getattr(model, "layer_init", None)
            if callable(layer_init):
                scheme, gain = layer_init(pair.producer)
                return scheme, gain, f"{type(model).__name__}.layer_init({pair.producer!r})"
            return "default", 1.0, "PyTorch's default init (the model has no layer_init)"
        scheme = self.init if self.init not in self.extra_inits else "default"
        if self.gain is not None:
            return scheme, self.gain, f"init={self.init!r}, gain={self.gain:g} as given"
        name = gain_name_of(pair.activation)
        param = pair.activation.negative_slope if isinstance(pair.activation, nn.LeakyReLU) else None
        gain = nn.init.calculate_gain(name, param)
        if pair.activation is None:
            # a functional activation (F.relu in forward) is not a module: the trace cannot name it
            return scheme, gain, f"init={self.init!r} with gain 1 (no activation module seen)"
        kind = type(pair.activation).__name__
        if not is_known_activation(pair.activation):
            return scheme, gain, f"init={self.init!r} with gain 1 (unknown activation {kind})"
        return scheme, gain, f"init={self.init!r} with the {name} gain of {kind}"
