"""Weight constraints for any training loop: precision limits, oscillation damping, James-Stein shrinkage, NaP.

neural-network-lab-python's constraints (jesse318s/neural-network-lab-python on GitHub, TensorFlow/Keras) as plain
objects. Each rewrites chosen parameters in place, under ``no_grad``, when :meth:`~ParameterConstraint.apply` is
called, or every ``every_n_steps`` calls of :meth:`~ParameterConstraint.step` (after ``optimizer.step()``). The
rewrite is a deterministic function of the parameters and the constraint's per-parameter history, so DDP ranks, which
hold identical parameters, stay identical without communication; the history is in :meth:`state_dict`, so a resumed
loop continues exactly. The Lightning callbacks of the same names add the epoch cadence and logging.

In a hand-written loop::

    precision = WeightPrecision(model, bits=8, every_n_steps=100)
    for x, y in stream:
        optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
        precision.step()
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from plasticity_lightning.core.errors import (
    PlasticityConfigError,
    check_choice,
    check_positive_float,
    check_positive_int,
)
from plasticity_lightning.policies.base import ScheduledPolicy, owning_modules
from plasticity_lightning.policies.cadence import StepCadence
from plasticity_lightning.surgery.constraints import (
    MANTISSA_BITS,
    adaptive_damping_bits,
    clear_lowest_set_bits,
    james_stein_factor,
    mantissa_bits,
    project_to_norm,
    round_mantissa,
    significant_bits,
    strict_extrema,
    truncate_ieee_bits,
)

Selection = Literal["all", "weights", "biases"]


class ParameterConstraint(ScheduledPolicy):
    """Base of the weight constraints: which parameters, the step cadence and the per-parameter history.

    Subclasses implement :meth:`constrain` (new values of one parameter) and may keep per-parameter tensors in
    :attr:`history`, which is in :meth:`state_dict`. :meth:`apply` returns the share of elements it changed and the
    subclass's own values (:meth:`extra_log`). The constraint draws nothing at random.

    Args:
        model: the network (``None``: give it to :meth:`attach`).
        every_n_steps: period of :meth:`step` (``None``: only :meth:`apply`).
        parameters: parameter names or glob patterns (``"hidden.*.linear.weight"``) to constrain; ``None``: the
            subclass's default selection (:attr:`default_selection`).
        prefix: name of the values in reports.
    """

    #: parameters constrained when ``parameters`` is None: every one, those with ≥ 2 dims, or 1-dim ones
    default_selection: Selection = "all"
    #: the constraint reads float32 bit patterns
    needs_float32: bool = False

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        every_n_steps: int | None = None,
        parameters: Sequence[str] | None = None,
        prefix: str = "constraint",
    ) -> None:
        super().__init__(seed=0, prefix=prefix)
        if every_n_steps is not None:
            check_positive_int(self.owner, "every_n_steps", every_n_steps)
        if parameters is not None and (isinstance(parameters, str) or not all(isinstance(p, str) for p in parameters)):
            raise PlasticityConfigError(f"{self.owner}.parameters={parameters!r} is invalid; expected a list of names")
        self.cadence = StepCadence(every_n_steps)
        self.steps = 0
        self.patterns = None if parameters is None else list(parameters)
        self.history: dict[str, dict[str, torch.Tensor]] = {}
        self.applications = 0
        self.selected: list[str] = []
        self.model: nn.Module | None = None
        self._model = model  # attached once the subclass has its settings (needs_float32 may depend on them)

    def _attach_given_model(self) -> None:
        """Attach the model given to the constructor; subclasses call it last in their ``__init__``."""
        if self._model is not None:
            self.attach(self._model)
        self._model = None

    @property
    def every_n_steps(self) -> int | None:
        return self.cadence.every_n_steps

    # ------------------------------------------------------------------ selection
    def _default(self, parameter: torch.Tensor) -> bool:
        if self.default_selection == "weights":
            return parameter.ndim >= 2
        if self.default_selection == "biases":
            return parameter.ndim == 1
        return True

    def select(self, model: nn.Module) -> list[str]:
        """Names of the parameters this constraint rewrites (checked: patterns must match, dtypes must fit)."""
        owner = self.owner
        named = {n: p for n, p in model.named_parameters() if p.is_floating_point()}
        if self.patterns is None:
            chosen = [n for n, p in named.items() if self._default(p)]
        else:
            chosen = []
            for pattern in self.patterns:
                hits = [n for n in named if fnmatch.fnmatchcase(n, pattern)]
                if not hits:
                    raise PlasticityConfigError(
                        f"{owner}.parameters: {pattern!r} matches no parameter of {type(model).__name__}; "
                        f"choose among {', '.join(list(named)[:12])}"
                    )
                chosen.extend(n for n in hits if n not in chosen)
        if not chosen:
            raise PlasticityConfigError(
                f"{owner}: {type(model).__name__} has no {self.default_selection} parameters to constrain; "
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

    def attach(self, model: nn.Module) -> None:
        """Use ``model``: select its parameters now (a bad pattern or dtype is refused here) and report them once."""
        self.model = model
        self.selected = self.select(model)
        self.report_binding(owning_modules(self.selected))

    # ------------------------------------------------------------------ applying
    def constrain(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """New values of parameter ``name`` (``value`` is its current data; return a tensor of the same shape)."""
        raise NotImplementedError

    def begin(self) -> None:
        """Called at the start of every application (subclasses reset their per-application counts)."""

    def apply(self, model: nn.Module | None = None) -> dict[str, float]:  # type: ignore[override]
        """Constrain every selected parameter of ``model`` (or the attached one) now.

        Returns the share of elements changed (``changed_fraction``) and :meth:`extra_log`'s values.
        """
        if model is None:
            model = self.model
        if model is None:
            raise PlasticityConfigError(f"{self.owner}: no model; pass it to {self.owner}(model, ...)")
        if not self.selected:
            self.selected = self.select(model)
        self.begin()
        parameters = dict(model.named_parameters())
        changed = total = 0
        with torch.no_grad():
            for name in self.selected:
                parameter = parameters[name]
                new = self.constrain(name, parameter.detach())
                changed += int((new != parameter).sum())
                total += parameter.numel()
                parameter.copy_(new)
        self.applications += 1
        return {"changed_fraction": changed / max(total, 1), **self.extra_log()}

    def extra_log(self) -> dict[str, float]:
        """More values to report after an application (subclasses)."""
        return {}

    def _remember(self, name: str, key: str, value: torch.Tensor) -> None:
        self.history.setdefault(name, {})[key] = value.detach().clone()

    def _recall(self, name: str, key: str, like: torch.Tensor) -> torch.Tensor | None:
        value = self.history.get(name, {}).get(key)
        return None if value is None else value.to(like.device)

    def state_dict(self) -> dict[str, Any]:
        history = {name: {k: v.cpu() for k, v in entry.items()} for name, entry in self.history.items()}
        return {**super().state_dict(), "history": history, "applications": self.applications, "steps": self.steps}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = {name: dict(entry) for name, entry in state_dict.get("history", {}).items()}
        self.applications = state_dict.get("applications", 0)
        self.steps = int(state_dict.get("steps", 0))
        self.cadence.mark(self.steps)


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
        model: see :class:`ParameterConstraint`.
        bits: precision limit (see ``mode``), or ``None`` for the change limit alone.
        mode: ``"mantissa"`` or ``"ieee_bits"``.
        max_additional_bits: change limit per application, or ``None``.
        every_n_steps: see :class:`ParameterConstraint`.
        parameters: see :class:`ParameterConstraint` (default: every parameter, as the seed does).
        prefix: see :class:`ParameterConstraint`.

    Example::

        >>> net = nn.Linear(2, 1)
        >>> with torch.no_grad():
        ...     _ = net.weight.copy_(torch.tensor([[1.0 + 2**-10, 1.5]]))  # 1.5 = 1.1b needs 1 mantissa bit
        >>> WeightPrecision(net, bits=1, parameters=["weight"]).apply()["changed_fraction"]
        0.5
        >>> net.weight.tolist()
        [[1.0, 1.5]]
    """

    needs_float32 = True

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        bits: int | None = 16,
        mode: Literal["mantissa", "ieee_bits"] = "mantissa",
        max_additional_bits: int | None = None,
        every_n_steps: int | None = None,
        parameters: Sequence[str] | None = None,
        prefix: str = "weight_precision",
    ) -> None:
        super().__init__(model, every_n_steps=every_n_steps, parameters=parameters, prefix=prefix)
        owner = self.owner
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
        self._attach_given_model()

    def _used_bits(self, value: torch.Tensor) -> torch.Tensor:
        return mantissa_bits(value) if self.mode == "mantissa" else significant_bits(value)

    def _limit(self, value: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
        return round_mantissa(value, bits) if self.mode == "mantissa" else truncate_ieee_bits(value, bits)

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
    seed's own tests intend. By default it acts on 1-dimensional parameters (biases), as the seed does. Reported:
    ``fired_fraction``, the share of checked elements damped at the last application.

    Args:
        model: see :class:`ParameterConstraint`.
        mode: ``"lowest_bit"``, ``"adaptive"`` or ``"shrink"``.
        strength: share of the distance to the local mean removed by ``"shrink"`` (0 < strength ≤ 1).
        every_n_steps: see :class:`ParameterConstraint`.
        parameters: see :class:`ParameterConstraint`.
        prefix: see :class:`ParameterConstraint`.

    Example::

        >>> net = nn.Linear(1, 3)
        >>> dampener = OscillationDampener(net, mode="shrink", strength=0.5)
        >>> for value in (0.0, 1.0, 0.0):  # the bias goes up, then back down: 1.0 was a strict maximum
        ...     _ = net.bias.data.fill_(value)
        ...     values = dampener.apply()
        >>> values["fired_fraction"], net.bias.tolist()  # 0 moved halfway to mean(0, 1, 0) = 1/3
        (1.0, [0.1666666716337204, 0.1666666716337204, 0.1666666716337204])
    """

    default_selection = "biases"

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        mode: Literal["lowest_bit", "adaptive", "shrink"] = "lowest_bit",
        strength: float = 0.5,
        every_n_steps: int | None = None,
        parameters: Sequence[str] | None = None,
        prefix: str = "oscillation_dampener",
    ) -> None:
        super().__init__(model, every_n_steps=every_n_steps, parameters=parameters, prefix=prefix)
        owner = self.owner
        self.mode = check_choice(owner, "mode", mode, ("lowest_bit", "adaptive", "shrink"))
        self.strength = check_positive_float(owner, "strength", strength)
        if self.strength > 1:
            raise PlasticityConfigError(f"{owner}.strength={strength!r} is invalid; expected 0 < strength <= 1")
        self.needs_float32 = self.mode != "shrink"
        self.fired = 0
        self.checked = 0
        self._attach_given_model()

    def begin(self) -> None:
        self.fired = self.checked = 0

    def constrain(self, name: str, value: torch.Tensor) -> torch.Tensor:
        older, previous = self._recall(name, "older", value), self._recall(name, "previous", value)
        new = value
        if self.mode == "adaptive":  # μ: mean of the parameter's means over every application, this one included
            means = torch.stack([value.double().mean(), value.new_ones((), dtype=torch.float64)])
            means = means if (kept := self._recall(name, "means", value)) is None else kept + means
            self._remember(name, "means", means)  # [sum of means, count]
        if older is not None and previous is not None and older.shape == value.shape:
            fires = strict_extrema(older, previous, value)
            self.fired += int(fires.sum())
            self.checked += value.numel()
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

    def extra_log(self) -> dict[str, float]:
        return {"fired_fraction": self.fired / self.checked} if self.checked else {}


class JamesSteinShrinkage(ParameterConstraint):
    """James-Stein shrinkage of each tensor toward 0: ``λ = clip((p − 2)·σ²/‖w‖², 0, max_shrinkage)``, ``w ← (1 − λ)w``.

    neural-network-lab-python applies it as a Keras kernel constraint — after every optimizer step, to kernels
    (weights with ≥ 2 dims, the default selection here), with ``σ² = 1``. With ``σ² = 1`` and typical weights
    (mean square ≪ 1), λ saturates at ``max_shrinkage`` and each application scales the weights by
    ``1 − max_shrinkage``; ``variance`` sets σ² for a gentler pull. Reported: ``mean_shrinkage``, the mean λ.

    Args:
        model: see :class:`ParameterConstraint`.
        variance: σ², the noise variance the estimator assumes.
        max_shrinkage: upper clip of λ (0 < max_shrinkage < 1).
        every_n_steps: see :class:`ParameterConstraint` (the seed's cadence is 1).
        parameters: see :class:`ParameterConstraint`.
        prefix: see :class:`ParameterConstraint`.

    Example::

        >>> net = nn.Linear(4, 3)  # a 3×4 weight: p = 12, λ = 10·σ²/‖w‖²
        >>> _ = net.weight.data.fill_(1.0)
        >>> JamesSteinShrinkage(net, variance=0.6).apply()["mean_shrinkage"]
        0.5
        >>> net.weight[0, 0].item()
        0.5
    """

    default_selection = "weights"

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        variance: float = 1.0,
        max_shrinkage: float = 0.99,
        every_n_steps: int | None = None,
        parameters: Sequence[str] | None = None,
        prefix: str = "james_stein",
    ) -> None:
        super().__init__(model, every_n_steps=every_n_steps, parameters=parameters, prefix=prefix)
        owner = self.owner
        self.variance = check_positive_float(owner, "variance", variance)
        self.max_shrinkage = check_positive_float(owner, "max_shrinkage", max_shrinkage)
        if self.max_shrinkage >= 1:
            raise PlasticityConfigError(f"{owner}.max_shrinkage={max_shrinkage!r} is invalid; expected 0 < it < 1")
        self.factors: list[float] = []
        self._attach_given_model()

    def begin(self) -> None:
        self.factors = []

    def constrain(self, name: str, value: torch.Tensor) -> torch.Tensor:
        factor = james_stein_factor(value, self.variance, self.max_shrinkage)
        self.factors.append(float(factor))
        return (value.double() * (1 - factor)).to(value.dtype)

    def extra_log(self) -> dict[str, float]:
        return {"mean_shrinkage": sum(self.factors) / len(self.factors)} if self.factors else {}


class NormalizeAndProject(ParameterConstraint):
    """Normalize-and-Project (NaP; Lyle et al. 2024): each weight rescaled to the norm it had when attached.

    Lyle et al. 2024, "Normalization and effective learning rates in reinforcement learning": with normalisation
    layers before each activation a layer's function does not depend on its weights' scale, but its effective
    learning rate falls as the norm grows; holding the norm fixed keeps the effective learning rate, and with it
    plasticity. The initial norms are read when the model is attached (and kept in :meth:`state_dict`, so a resumed
    loop projects to the same norms). Reported: ``mean_scale``, the mean ‖θ₀‖/‖θ‖ before projecting (above 1 when the
    weights shrank, below 1 when they grew).

    Args:
        model: see :class:`ParameterConstraint`.
        every_n_steps: see :class:`ParameterConstraint` (the paper projects after every step: 1).
        parameters: parameter names or glob patterns; ``None``: every weight with two or more dimensions (Linear and
            Conv weights). Normalisation scales can be named too.
        prefix: see :class:`ParameterConstraint`.

    Example::

        >>> net = nn.Linear(4, 3)
        >>> nap = NormalizeAndProject(net)
        >>> _ = net.weight.data.mul_(2.0)
        >>> nap.apply()["mean_scale"]
        0.5
        >>> bool(torch.isclose(net.weight.norm(), nap.history["weight"]["initial_norm"].float()))
        True
    """

    default_selection = "weights"

    def __init__(
        self,
        model: nn.Module | None = None,
        *,
        every_n_steps: int | None = 1,
        parameters: Sequence[str] | None = None,
        prefix: str = "normalize_project",
    ) -> None:
        super().__init__(model, every_n_steps=every_n_steps, parameters=parameters, prefix=prefix)
        self.scales: list[float] = []
        self._attach_given_model()

    def attach(self, model: nn.Module) -> None:
        """Select the parameters and record their norms now (a resumed loop keeps the norms it loaded)."""
        super().attach(model)
        parameters = dict(model.named_parameters())
        for name in self.selected:
            if self._recall(name, "initial_norm", parameters[name]) is not None:
                continue
            norm = torch.linalg.vector_norm(parameters[name].detach().to(torch.float64))
            if not bool(norm > 0) or not bool(torch.isfinite(norm)):
                raise PlasticityConfigError(
                    f"{self.owner}.parameters: {name!r} has initial norm {float(norm)}; projecting to it would "
                    "hold the parameter at zero (or NaN). Exclude it with `parameters` or initialise it to non-zero"
                )
            self._remember(name, "initial_norm", norm)

    def apply(self, model: nn.Module | None = None) -> dict[str, float]:  # type: ignore[override]
        """Project every selected parameter to its initial norm now (attaching ``model`` first if none is)."""
        if not self.history:
            target = model if model is not None else self.model
            if target is not None:
                self.attach(target)
        return super().apply(model)

    def begin(self) -> None:
        self.scales = []

    def constrain(self, name: str, value: torch.Tensor) -> torch.Tensor:
        target = self._recall(name, "initial_norm", value)
        current = torch.linalg.vector_norm(value.to(torch.float64))
        self.scales.append(float(target / current) if current > 0 else float("nan"))
        return project_to_norm(value, target)

    def extra_log(self) -> dict[str, float]:
        return {"mean_scale": sum(self.scales) / len(self.scales)} if self.scales else {}
