"""Weight constraints applied between optimizer steps: precision limits, oscillation damping, James-Stein shrinkage.

neural-network-lab-python's constraints (jesse318s/neural-network-lab-python on GitHub, TensorFlow/Keras) as
Lightning callbacks. Each one rewrites chosen parameters in place, under ``no_grad``, every ``every_n_epochs``
epochs (at the end of the training epoch, as the seed's ``constraint_interval``) and/or every ``every_n_steps``
optimizer steps. The rewrite is a deterministic function of the parameters and the callback's history, so DDP
ranks, which hold identical parameters, stay identical without communication; the history is saved in
checkpoints so a resumed run continues exactly. The epoch cadence acts after the epoch's last training batch, so
the epoch's validation and checkpoint see the constrained weights.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from plasticity_lightning.callbacks.interventions.base import Intervention
from plasticity_lightning.core.errors import (
    PlasticityConfigError,
    check_choice,
    check_positive_float,
    check_positive_int,
)
from plasticity_lightning.surgery.constraints import (
    MANTISSA_BITS,
    adaptive_damping_bits,
    clear_lowest_set_bits,
    james_stein_factor,
    mantissa_bits,
    round_mantissa,
    significant_bits,
    strict_extrema,
    truncate_ieee_bits,
)

Selection = Literal["all", "weights", "biases"]


class ParameterConstraint(Intervention):
    """Base of the weight constraints: which parameters, when, logging and per-parameter history.

    Subclasses implement :meth:`constrain` (new values of one parameter) and may keep per-parameter tensors in
    :attr:`history`, which is checkpointed.

    Args:
        every_n_epochs: apply after the last training batch of every n-th epoch (``None``: never).
        every_n_steps: apply after every n-th optimizer step (``None``: never).
        parameters: parameter names or glob patterns (``"hidden.*.linear.weight"``) to constrain; ``None``: the
            subclass's default selection (:attr:`default_selection`).
        prefix: first part of logged keys.
    """

    #: parameters constrained when ``parameters`` is None: every one, those with ≥ 2 dims, or 1-dim ones
    default_selection: Selection = "all"
    #: the constraint reads float32 bit patterns
    needs_float32: bool = False

    def __init__(
        self,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        parameters: Sequence[str] | None = None,
        prefix: str = "constraint",
    ) -> None:
        owner = type(self).__name__
        if every_n_epochs is not None:
            check_positive_int(owner, "every_n_epochs", every_n_epochs)
        if every_n_steps is not None:
            check_positive_int(owner, "every_n_steps", every_n_steps)
        super().__init__(seed=0, prefix=prefix, every_n_steps=every_n_steps)
        if every_n_epochs is None and every_n_steps is None:
            raise PlasticityConfigError(f"{owner}: every_n_epochs=None and every_n_steps=None never apply; set one")
        if parameters is not None and (isinstance(parameters, str) or not all(isinstance(p, str) for p in parameters)):
            raise PlasticityConfigError(f"{owner}.parameters={parameters!r} is invalid; expected a list of names")
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.patterns = None if parameters is None else list(parameters)
        self.history: dict[str, dict[str, torch.Tensor]] = {}
        self.applications = 0
        self._selected: list[str] = []
        self._applied_epoch: int | None = None

    @override
    def settings(self) -> dict[str, Any]:
        return {"every_n_epochs": self.every_n_epochs, "every_n_steps": self.every_n_steps, "parameters": self.patterns}

    # ------------------------------------------------------------------ selection
    def _default(self, parameter: torch.Tensor) -> bool:
        if self.default_selection == "weights":
            return parameter.ndim >= 2
        if self.default_selection == "biases":
            return parameter.ndim == 1
        return True

    def select(self, pl_module: torch.nn.Module) -> list[str]:
        """Names of the parameters this constraint rewrites (checked: patterns must match, dtypes must fit)."""
        owner = type(self).__name__
        named = {n: p for n, p in pl_module.named_parameters() if p.is_floating_point()}
        if self.patterns is None:
            chosen = [n for n, p in named.items() if self._default(p)]
        else:
            chosen = []
            for pattern in self.patterns:
                hits = [n for n in named if fnmatch.fnmatchcase(n, pattern)]
                if not hits:
                    raise PlasticityConfigError(
                        f"{owner}.parameters: {pattern!r} matches no parameter of {type(pl_module).__name__}; "
                        f"choose among {', '.join(list(named)[:12])}"
                    )
                chosen.extend(n for n in hits if n not in chosen)
        if not chosen:
            raise PlasticityConfigError(
                f"{owner}: {type(pl_module).__name__} has no {self.default_selection} parameters to constrain; "
                "name them with `parameters`"
            )
        if self.needs_float32:
            wrong = [f"{n} ({named[n].dtype})" for n in chosen if named[n].dtype != torch.float32]
            if wrong:
                raise PlasticityConfigError(
                    f"{owner} rewrites float32 bit patterns; {', '.join(wrong[:4])} "
                    f"{'is' if len(wrong) == 1 else 'are'} not float32. Keep parameters in float32 (mixed precision "
                    "such as 'bf16-mixed' does) or exclude them with `parameters`"
                )
        return chosen

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._selected = self.select(pl_module)

    # ------------------------------------------------------------------ cadence
    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        # the shared step rule: never at step 0, once per step (gradient accumulation ends several batches on one)
        by_step = self.cadence.due(step)
        # The epoch cadence acts after the epoch's last batch, not in on_train_epoch_end: validation and the
        # checkpoint saved after it (ModelCheckpoint saves on validation end) must see the constrained weights, or a
        # resumed run would lose the application.
        by_epoch = self.every_n_epochs is not None and trainer.is_last_batch and self._epoch_due(trainer)
        if by_step or by_epoch:
            self.cadence.mark(step)
            if by_epoch:
                self._applied_epoch = trainer.current_epoch
            self.apply(trainer, pl_module)

    def _epoch_due(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch
        return (epoch + 1) % self.every_n_epochs == 0 and self._applied_epoch != epoch

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # An epoch cut short (max_steps, a Timer, early stopping mid-epoch) never reaches its last batch: apply here
        # so the final weights are constrained.
        if self.every_n_epochs is not None and self._epoch_due(trainer):
            self._applied_epoch = trainer.current_epoch
            self.apply(trainer, pl_module)

    # ------------------------------------------------------------------ applying
    def constrain(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """New values of parameter ``name`` (``value`` is its current data; return a tensor of the same shape)."""
        raise NotImplementedError

    def apply(self, trainer: pl.Trainer | None, pl_module: torch.nn.Module) -> dict[str, float]:
        """Constrain every selected parameter now; returns (and logs) the share of elements changed."""
        if not self._selected:
            self._selected = self.select(pl_module)
        parameters = dict(pl_module.named_parameters())
        changed = total = 0
        with torch.no_grad():
            for name in self._selected:
                parameter = parameters[name]
                new = self.constrain(name, parameter.detach())
                changed += int((new != parameter).sum())
                total += parameter.numel()
                parameter.copy_(new)
        self.applications += 1
        values = {"changed_fraction": changed / max(total, 1), **self.extra_log()}
        if trainer is not None:
            self.log_values(trainer, values, force=True)
        return values

    def extra_log(self) -> dict[str, float]:
        """More values to log after an application (subclasses)."""
        return {}

    def _remember(self, name: str, key: str, value: torch.Tensor) -> None:
        self.history.setdefault(name, {})[key] = value.detach().clone()

    def _recall(self, name: str, key: str, like: torch.Tensor) -> torch.Tensor | None:
        value = self.history.get(name, {}).get(key)
        return None if value is None else value.to(like.device)

    @override
    def state_dict(self) -> dict[str, Any]:
        history = {name: {k: v.cpu() for k, v in entry.items()} for name, entry in self.history.items()}
        return {
            **super().state_dict(),
            "history": history,
            "applications": self.applications,
            "applied_epoch": self._applied_epoch,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = {name: dict(entry) for name, entry in state_dict.get("history", {}).items()}
        self.applications = state_dict.get("applications", 0)
        self._applied_epoch = state_dict.get("applied_epoch")


class WeightPrecision(ParameterConstraint):
    """Limit the binary precision of float32 weights.

    ``mode="mantissa"`` (the sane reading): round each mantissa to ``bits`` bits (0–23), half to even; the relative
    change is at most ``2^-(bits+1)``. ``mode="ieee_bits"``: neural-network-lab-python's
    ``BinaryWeightConstraintMax`` bit for bit — count "digits" from the first to the last set bit of the raw word
    (sign and exponent included) and zero the word's lowest excess bits (``bits`` 0–32; the seed's class default 5
    and README default 24); see :func:`~plasticity_lightning.surgery.constraints.truncate_ieee_bits`.

    ``max_additional_bits`` is the seed's ``BinaryWeightConstraintChanges``: each element may use at most that
    many more bits than it used at the previous application (the first application only records). The seed shares
    one record across all layers and compares against whichever array it processed last; here every parameter
    keeps its own. When both limits are set, the change limit is applied first and its result recorded (as the
    seed records its Changes constraint's output), then ``bits``.

    Args:
        bits: precision limit (see ``mode``), or ``None`` for the change limit alone.
        mode: ``"mantissa"`` or ``"ieee_bits"``.
        max_additional_bits: change limit per application, or ``None``.
        every_n_epochs: see :class:`ParameterConstraint`.
        every_n_steps: see :class:`ParameterConstraint`.
        parameters: see :class:`ParameterConstraint` (default: every parameter, as the seed does).
        prefix: see :class:`ParameterConstraint`.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[WeightPrecision(bits=8, every_n_epochs=10)])
    """

    needs_float32 = True

    def __init__(
        self,
        bits: int | None = 16,
        mode: Literal["mantissa", "ieee_bits"] = "mantissa",
        max_additional_bits: int | None = None,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        parameters: Sequence[str] | None = None,
        prefix: str = "weight_precision",
    ) -> None:
        super().__init__(every_n_epochs, every_n_steps, parameters, prefix)
        owner = type(self).__name__
        self.mode = check_choice(owner, "mode", mode, ("mantissa", "ieee_bits"))
        limit = MANTISSA_BITS if mode == "mantissa" else 32
        for field, value in (("bits", bits), ("max_additional_bits", max_additional_bits)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit):
                raise PlasticityConfigError(
                    f"{owner}.{field}={value!r} is invalid; expected an integer in [0, {limit}] for mode={mode!r}"
                )
        if bits is None and max_additional_bits is None:
            raise PlasticityConfigError(f"{owner}: bits=None and max_additional_bits=None constrain nothing; set one")
        self.bits = bits
        self.max_additional_bits = max_additional_bits

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "bits": self.bits, "mode": self.mode, "added": self.max_additional_bits}

    def _used_bits(self, value: torch.Tensor) -> torch.Tensor:
        return mantissa_bits(value) if self.mode == "mantissa" else significant_bits(value)

    def _limit(self, value: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
        return round_mantissa(value, bits) if self.mode == "mantissa" else truncate_ieee_bits(value, bits)

    @override
    def constrain(self, name: str, value: torch.Tensor) -> torch.Tensor:
        new = value
        if self.max_additional_bits is not None:
            previous = self._recall(name, "previous", value)
            if previous is not None and previous.shape == value.shape:
                new = self._limit(new, self._used_bits(previous) + self.max_additional_bits)
            self._remember(name, "previous", new)
        if self.bits is not None:
            new = self._limit(new, self.bits)
        return new


class OscillationDampener(ParameterConstraint):
    """Damp elements that oscillate: a strict local extremum over the last three applications.

    At each application, an element whose previous value is a strict extremum of (value two applications ago,
    previous value, current value) — ``a < b > c`` or ``a > b < c`` — is damped:

    * ``mode="lowest_bit"``: clear the lowest set bit of its float32 word (neural-network-lab-python's
      ``OscillationDampener``);
    * ``mode="adaptive"``: clear ``max(1, int(1 + (1 − e^{−2r})·(digits − 1)))`` lowest set bits (``digits`` as
      :func:`~plasticity_lightning.surgery.constraints.significant_bits` counts them), with
      ``r = |w − μ| / max(|μ|, 1e-8)`` and ``μ`` the mean over all applications so far of the parameter's mean
      (the seed's ``AdaptiveOscillationDampener``);
    * ``mode="shrink"``: move it toward the mean of its three values, ``w ← w − strength·(w − mean(a, b, w))``,
      which damps an oscillation of any amplitude (clearing a low bit barely changes a weight).

    The seed records the current weights *before* checking them, so it compares (previous, current, current) and
    never fires during training; here the history holds the two previous applications (after damping), as the
    seed's own tests intend. By default it acts on 1-dimensional parameters (biases), as the seed does.

    Args:
        mode: ``"lowest_bit"``, ``"adaptive"`` or ``"shrink"``.
        strength: share of the distance to the local mean removed by ``"shrink"`` (0 < strength ≤ 1).
        every_n_epochs: see :class:`ParameterConstraint`.
        every_n_steps: see :class:`ParameterConstraint`.
        parameters: see :class:`ParameterConstraint`.
        prefix: see :class:`ParameterConstraint`.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[OscillationDampener(mode="shrink", every_n_steps=10)])
    """

    default_selection = "biases"

    def __init__(
        self,
        mode: Literal["lowest_bit", "adaptive", "shrink"] = "lowest_bit",
        strength: float = 0.5,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        parameters: Sequence[str] | None = None,
        prefix: str = "oscillation_dampener",
    ) -> None:
        super().__init__(every_n_epochs, every_n_steps, parameters, prefix)
        owner = type(self).__name__
        self.mode = check_choice(owner, "mode", mode, ("lowest_bit", "adaptive", "shrink"))
        self.strength = check_positive_float(owner, "strength", strength)
        if self.strength > 1:
            raise PlasticityConfigError(f"{owner}.strength={strength!r} is invalid; expected 0 < strength <= 1")
        self.needs_float32 = self.mode != "shrink"
        self._fired = 0
        self._checked = 0

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "mode": self.mode, "strength": self.strength}

    @override
    def apply(self, trainer: pl.Trainer | None, pl_module: torch.nn.Module) -> dict[str, float]:
        self._fired = self._checked = 0
        return super().apply(trainer, pl_module)

    @override
    def constrain(self, name: str, value: torch.Tensor) -> torch.Tensor:
        older, previous = self._recall(name, "older", value), self._recall(name, "previous", value)
        new = value
        if self.mode == "adaptive":  # μ: mean of the parameter's means over every application, this one included
            means = torch.stack([value.double().mean(), value.new_ones((), dtype=torch.float64)])
            means = means if (kept := self._recall(name, "means", value)) is None else kept + means
            self._remember(name, "means", means)  # [sum of means, count]
        if older is not None and previous is not None and older.shape == value.shape:
            fires = strict_extrema(older, previous, value)
            self._fired += int(fires.sum())
            self._checked += value.numel()
            if fires.any():
                if self.mode == "lowest_bit":
                    damped = clear_lowest_set_bits(value, 1)
                elif self.mode == "adaptive":
                    mean = float(means[0] / means[1])
                    damped = clear_lowest_set_bits(value, adaptive_damping_bits(value, mean))
                else:
                    damped = value - self.strength * (value - (older + previous + value) / 3)
                new = torch.where(fires, damped, value)
        if previous is not None:
            self._remember(name, "older", previous)
        self._remember(name, "previous", new)
        return new

    @override
    def extra_log(self) -> dict[str, float]:
        return {"fired_fraction": self._fired / self._checked} if self._checked else {}


class JamesSteinShrinkage(ParameterConstraint):
    """James-Stein shrinkage of each tensor toward 0: ``λ = clip((p − 2)·σ²/‖w‖², 0, max_shrinkage)``, ``w ← (1 − λ)w``.

    neural-network-lab-python applies it as a Keras kernel constraint — after every optimizer step, to kernels
    (weights with ≥ 2 dims, the default selection here), with ``σ² = 1``. With ``σ² = 1`` and typical weights
    (mean square ≪ 1), λ saturates at ``max_shrinkage`` and each application scales the weights by
    ``1 − max_shrinkage``; ``variance`` sets σ² for a gentler pull. Logged: the mean λ.

    Args:
        variance: σ², the noise variance the estimator assumes.
        max_shrinkage: upper clip of λ (0 < max_shrinkage < 1).
        every_n_epochs: see :class:`ParameterConstraint`. The seed's cadence is
            ``every_n_epochs=None, every_n_steps=1``.
        every_n_steps: see :class:`ParameterConstraint`.
        parameters: see :class:`ParameterConstraint`.
        prefix: see :class:`ParameterConstraint`.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[JamesSteinShrinkage(variance=1e-4, every_n_epochs=1)])
    """

    default_selection = "weights"

    def __init__(
        self,
        variance: float = 1.0,
        max_shrinkage: float = 0.99,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        parameters: Sequence[str] | None = None,
        prefix: str = "james_stein",
    ) -> None:
        super().__init__(every_n_epochs, every_n_steps, parameters, prefix)
        owner = type(self).__name__
        self.variance = check_positive_float(owner, "variance", variance)
        self.max_shrinkage = check_positive_float(owner, "max_shrinkage", max_shrinkage)
        if self.max_shrinkage >= 1:
            raise PlasticityConfigError(f"{owner}.max_shrinkage={max_shrinkage!r} is invalid; expected 0 < it < 1")
        self._factors: list[float] = []

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "variance": self.variance, "max_shrinkage": self.max_shrinkage}

    @override
    def apply(self, trainer: pl.Trainer | None, pl_module: torch.nn.Module) -> dict[str, float]:
        self._factors = []
        return super().apply(trainer, pl_module)

    @override
    def constrain(self, name: str, value: torch.Tensor) -> torch.Tensor:
        factor = james_stein_factor(value, self.variance, self.max_shrinkage)
        self._factors.append(float(factor))
        return (value.double() * (1 - factor)).to(value.dtype)

    @override
    def extra_log(self) -> dict[str, float]:
        return {"mean_shrinkage": sum(self._factors) / len(self._factors)} if self._factors else {}
