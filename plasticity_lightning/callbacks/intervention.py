"""Shared machinery of the interventions: strategy checks, a rank-agreeing RNG, the bound unit pairs, logging."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, SingleDeviceStrategy, XLAStrategy
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from typing_extensions import override

from plasticity_lightning.callbacks.base import TaskAwareCallback
from plasticity_lightning.core.errors import PlasticityConfigError, check_positive_float
from plasticity_lightning.nn.init import resolve_init_scheme
from plasticity_lightning.surgery import UnitPair, pair_units

# Activation → torch's gain name. Like Dohare et al.'s code, ReLU-like units (GELU, SiLU/swish, ELU) take ReLU's.
_GAINS = {
    "ReLU": "relu",
    "GELU": "relu",
    "SiLU": "relu",
    "ELU": "relu",
    "LeakyReLU": "leaky_relu",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "SELU": "selu",
    "Identity": "linear",
}


def _gain_name(activation: nn.Module | None) -> str:
    """torch's gain name for an activation module; unknown GELU/SiLU variants (HF's ``NewGELUActivation``,
    ``SiLUActivation``) are ReLU-like."""
    if activation is None:
        return "linear"
    kind = type(activation).__name__
    if kind in _GAINS:
        return _GAINS[kind]
    return "relu" if any(word in kind.upper() for word in ("GELU", "SILU", "SWISH")) else "linear"


class Intervention(TaskAwareCallback):
    """Base of the callbacks that change the model during training.

    It owns what every intervention needs to be correct under DDP and on resume:

    * a CPU ``torch.Generator`` seeded with ``seed`` — the same on every rank, so every random choice (which
      units, which new weights) is identical across processes without communication — whose state is saved in
      the checkpoint, so a resumed run draws what the uninterrupted run would have drawn; large draws on an
      accelerator use :meth:`generator_on`, a generator of that device with the same guarantees;
    * a check in ``setup`` that the strategy keeps full parameters on every rank (single device or DDP);
    * the optimizers whose state is reset for touched parameters;
    * logging through every logger and ``trainer.callback_metrics``, at the trainer's ``log_every_n_steps``.

    Args:
        seed: seed of the intervention's own random draws.
        prefix: first part of every logged key.
    """

    def __init__(self, seed: int = 0, prefix: str = "intervention") -> None:
        super().__init__()
        if not isinstance(seed, int):
            raise PlasticityConfigError(f"{type(self).__name__}.seed={seed!r} is invalid; expected an integer")
        self.seed = seed
        self.prefix = prefix
        self.generator = torch.Generator().manual_seed(seed)
        self._device_generators: dict[str, torch.Generator] = {}
        self._pending_device_states: dict[str, torch.Tensor] = {}
        self._last_step: int | None = None  # the optimizer step acted on last
        self._state_key: str | None = None
        self._nonfinite_warned: set[str] = set()

    @property
    def state_key(self) -> str:
        if self._state_key is None:
            self._state_key = self._generate_state_key(prefix=self.prefix, **self.settings())
        return self._state_key

    def settings(self) -> dict[str, Any]:
        """Arguments that distinguish two instances (part of :attr:`state_key`)."""
        return {"seed": self.seed}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        # DeepSpeed and XLA derive from DDPStrategy but shard or copy parameters: in-place surgery would be undone
        supported = isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not isinstance(
            strategy, (DeepSpeedStrategy, XLAStrategy)
        )
        if stage == "fit" and not supported:
            raise PlasticityConfigError(
                f"{type(self).__name__} changes parameters in place and needs every rank to hold the full model; "
                f"strategy {type(trainer.strategy).__name__} is not supported (use a single device, 'ddp' or "
                "'ddp_spawn')"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # A new fit starts at step 0 (also the second fit of one instance); a resumed one at its checkpoint's step,
        # where, with gradient accumulation, its first batches end again and must not act a second time.
        self._last_step = trainer.global_step

    def generator_on(self, device: torch.device | str) -> torch.Generator:
        """The random source for draws made on ``device``: the CPU generator itself on the CPU; on an accelerator a
        generator of that device type, seeded alike on every rank and kept in the checkpoint. Noise for every
        parameter is then drawn where the parameters live, with no host-side draw and copy per application."""
        kind = torch.device(device).type
        if kind == "cpu":
            return self.generator
        if kind not in self._device_generators:
            generator = torch.Generator(device=device).manual_seed(self.seed)
            if kind in self._pending_device_states:
                generator.set_state(self._pending_device_states.pop(kind))
            self._device_generators[kind] = generator
        return self._device_generators[kind]

    @staticmethod
    def optimizers(trainer: pl.Trainer | None) -> list[torch.optim.Optimizer]:
        return list(trainer.optimizers) if trainer is not None else []

    @staticmethod
    def reduce_mean(trainer: pl.Trainer | None, tensor: torch.Tensor) -> torch.Tensor:
        """Average across DDP ranks (identity on one process), so every rank takes the same decisions."""
        if trainer is None or trainer.world_size == 1:
            return tensor
        return trainer.strategy.reduce(tensor, reduce_op="mean")

    @staticmethod
    def log_due(trainer: pl.Trainer) -> bool:
        """Whether :meth:`log_values` logs at this step without ``force`` (every ``log_every_n_steps`` steps)."""
        return trainer.global_step % max(trainer.log_every_n_steps, 1) == 0

    def warn_nonfinite(self, name: str, step: int | None) -> None:
        """Warn, once per ``name``, that a step was skipped because ``name``'s statistics were NaN/inf."""
        if name not in self._nonfinite_warned:
            self._nonfinite_warned.add(name)
            rank_zero_warn(
                f"{type(self).__name__}: the statistics of {name!r} are NaN/inf at step {step}; such steps are "
                f"skipped there and counted in {self.prefix}/skipped_nonfinite"
            )

    def log_values(self, trainer: pl.Trainer, values: dict[str, float], *, force: bool = False) -> None:
        """Log ``values`` under ``prefix/`` every ``log_every_n_steps`` optimizer steps (always with ``force``)."""
        if not values or not (force or self.log_due(trainer)):
            return
        metrics = {f"{self.prefix}/{name}": float(value) for name, value in values.items()}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})

    @override
    def state_dict(self) -> dict[str, Any]:
        devices = {kind: g.get_state() for kind, g in self._device_generators.items()}
        return {**super().state_dict(), "generator": self.generator.get_state(), "device_generators": devices}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        if "generator" in state_dict:
            self.generator.set_state(state_dict["generator"])
        # accelerator generators are rebuilt on first use, from these states
        self._device_generators = {}
        self._pending_device_states = dict(state_dict.get("device_generators", {}))


class UnitIntervention(Intervention):
    """An intervention on hidden units: finds the producer → consumer pairs and the init of new units.

    At the start of every fit it binds the pairs and logs them once, with the blocks it skipped (INFO, rank zero;
    also in :attr:`pairs` and :attr:`skipped_blocks`). With no arguments, any model works whose blocks a pairing
    rule reads (torch and HF transformer MLPs, gated MLPs, BERT, timm, ConvNeXt; see
    :mod:`plasticity_lightning.surgery.rules`) or that ``torch.fx`` traces, block by block; a block neither can read
    is skipped with one warning that names it.

    Args:
        layers: producers (``Linear``/``Conv1D``/``Conv2d`` module names) whose units may be replaced; ``None``:
            every pair found (see :mod:`plasticity_lightning.surgery.topology`).
        pairs: explicit ``[producer, consumer]`` (or ``[producer, consumer, [norms]]``) entries, for blocks nothing
            can read or to restrict the pairs exactly; refused when they share weights with another module or when
            a traced graph contradicts them.
        init: init scheme of new incoming weights: ``"auto"`` uses the model's ``layer_init(name)`` (our models
            report the scheme each layer was built with) and else PyTorch's default; or a scheme name (kaiming,
            kaiming_normal, xavier, xavier_normal, lecun, lecun_uniform, default), with the gain of the
            activation between producer and consumer (as traced; for explicit pairs of a model that cannot be
            traced, 1 unless ``gain`` is given).
        gain: gain of a named ``init`` scheme for every pair, instead of the traced activation's.
        seed: seed of the intervention's random draws.
        prefix: first part of logged keys.
    """

    def __init__(
        self,
        layers: Sequence[str] | None = None,
        pairs: Sequence[Sequence[Any]] | None = None,
        init: str = "auto",
        gain: float | None = None,
        seed: int = 0,
        prefix: str = "intervention",
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
        self.inits: dict[str, tuple[str, float]] = {}

    #: init names a subclass accepts besides the schemes (e.g. CBP's "sigma_orthogonal")
    extra_inits: tuple[str, ...] = ()

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "layers": self.layer_names, "pairs": self.explicit_pairs}

    def bind(self, pl_module: pl.LightningModule) -> None:
        """Find the pairs on the (built) model and the init of each producer; log them once, with what was skipped.

        Explicit pairs take their activation (and a gated unit's partner producers) from the rules and traces
        where those agree with them.
        """
        owner = type(self).__name__
        pairing = pair_units(pl_module, self.layer_names, self.explicit_pairs, owner=owner)
        self.pairs, self.skipped_blocks = pairing.pairs, dict(pairing.skipped)
        self.inits = {pair.producer: self._init_of(pl_module, pair) for pair in self.pairs}
        rank_zero_info(pairing.summary(owner))

    def _init_of(self, pl_module: nn.Module, pair: UnitPair) -> tuple[str, float]:
        if self.init == "auto":
            layer_init = getattr(pl_module, "layer_init", None)
            return layer_init(pair.producer) if callable(layer_init) else ("default", 1.0)
        scheme = self.init if self.init not in self.extra_inits else "default"
        if self.gain is not None:
            return scheme, self.gain
        name = _gain_name(pair.activation)
        param = pair.activation.negative_slope if isinstance(pair.activation, nn.LeakyReLU) else None
        return scheme, nn.init.calculate_gain(name, param)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.bind(pl_module)
