"""Continual Backprop (Dohare et al., Nature 2024) and its rank-restoring variant RR-CBP, for any training loop."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from plasticity_lightning.core.errors import (
    PlasticityConfigError,
    check_choice,
    check_fraction,
    check_positive_float,
    check_positive_int,
)
from plasticity_lightning.policies.base import UnitPolicy, as_optimizers
from plasticity_lightning.probes.capture import is_transposed_linear
from plasticity_lightning.surgery import (
    InputCovariance,
    UnitPair,
    activation_energy_share,
    incoming_magnitude,
    outgoing_magnitude,
    reinit_units,
    sigma_orthogonal_rows,
    unit_magnitudes,
)
from plasticity_lightning.surgery import units as unit_surgery
from plasticity_lightning.surgery.topology import unit_weight
from plasticity_lightning.surgery.units import _abs_sums, column_means

UTILITIES = ("contribution", "zero_contribution", "adaptable_contribution")


def utility_step(
    activity: torch.Tensor,
    outgoing: torch.Tensor,
    incoming: torch.Tensor | None,
    utility: torch.Tensor,
    mean_activation: torch.Tensor,
    new_mean_activation: torch.Tensor | None,
    skipped: torch.Tensor,
    decay_rate: float,
) -> torch.Tensor:
    """One step of a pair's utility EMA, in place; returns whether the step's statistics were finite (0-d tensor).

    ``activity`` (mean |h| or |h − f̂| per unit and column) times the mean |w_out| of each column, averaged over the
    unit's columns (conv → flatten → linear: each H×W position has its own outgoing weights, as in Dohare's
    ``ConvGnT``; one column per unit otherwise), over the mean |w_in| for the adaptable utility (``incoming``), is
    the instantaneous utility; u ← η·u + (1 − η)·utility, and f ← ``new_mean_activation`` where given. NaN/inf
    statistics (or a utility loaded so) skip the step — both EMAs keep their values, ``skipped`` counts it — as a
    NaN would stay in the EMAs for good. Decided on the device, from statistics reduced across ranks, so every rank
    skips alike without a read-back. Pure tensor code: :class:`ContinualBackprop` runs it eagerly, or compiled for
    all pairs at once (large layers).
    """
    instantaneous = activity * outgoing
    instantaneous = instantaneous[:, 0] if instantaneous.shape[1] == 1 else instantaneous.mean(dim=1)
    if incoming is not None:
        instantaneous = instantaneous / incoming.clamp(min=torch.finfo(torch.float32).tiny)
    finite = torch.isfinite(instantaneous).all() & torch.isfinite(utility).all()
    utility.copy_(torch.where(finite, utility.lerp(instantaneous, 1 - decay_rate), utility))
    if new_mean_activation is not None:
        mean_activation.copy_(torch.where(finite, new_mean_activation, mean_activation))
    skipped += ~finite
    return finite


def _fused_pairs_update(
    consumers: list[torch.Tensor],
    producers: list[torch.Tensor | None],
    activities: list[torch.Tensor],
    utilities: list[torch.Tensor],
    mean_activations: list[torch.Tensor],
    new_mean_activations: list[torch.Tensor | None],
    skipped: list[torch.Tensor],
    decay_rate: float,
) -> list[torch.Tensor]:
    """:func:`utility_step` for several pairs.

    :func:`utility_step` for several pairs, with each pair's weight magnitudes taken here from its consumer weight (and
    producer weight, for the adaptable utility) as :func:`~plasticity_lightning.surgery.unit_magnitudes` takes them:
    what ``torch.compile`` turns into one program (see ``ContinualBackprop._fused_update``).
    """
    finite = []
    for i, consumer in enumerate(consumers):
        matrix = consumer.reshape(consumer.shape[0], -1)
        num_units, columns_per_unit = activities[i].shape
        outgoing = column_means(_abs_sums(matrix, rows=False)[0], matrix.shape[0], num_units, columns_per_unit)
        incoming = None
        producer = producers[i]
        if producer is not None:
            rows = producer.reshape(producer.shape[0], -1)
            incoming = _abs_sums(rows, rows=True)[0] / rows.shape[1]
        finite.append(
            utility_step(
                activities[i],
                outgoing,
                incoming,
                utilities[i],
                mean_activations[i],
                new_mean_activations[i],
                skipped[i],
                decay_rate,
            )
        )
    return finite


class _LayerState:
    """Per-producer running statistics: ages, utility EMA, mean-activation EMA, replacement accumulator.

    How many units are mature (age > ``maturity``) is also kept on the host, from the cohorts of units that may
    still be young (all units at the start, then each replaced group), so that a step without a replacement never
    waits for the device: on a GPU, asking the ``ages`` tensor would synchronise every step.
    """

    def __init__(self, units: int, device: torch.device, maturity: int) -> None:
        self.ages = torch.zeros(units, dtype=torch.long, device=device)
        self._units = units  # on the host: counted every step
        self.utility = torch.zeros(units, dtype=torch.float32, device=device)
        self.mean_activation = torch.zeros(units, dtype=torch.float32, device=device)
        self.accumulated = 0.0
        self.replaced = 0
        # steps whose statistics were NaN/inf, counted where they are known (on the device: no read-back per step)
        self.skipped = torch.zeros((), dtype=torch.long, device=device)
        self.maturity = maturity
        self._clock = 0  # steps aged so far; a cohort born at clock b has age clock - b
        self._young: deque[tuple[int, int]] = deque([(0, units)])  # (birth clock, units), oldest first
        self._young_units = units

    @property
    def num_units(self) -> int:
        return self._units

    @property
    def mature_units(self) -> int:
        """Units older than the maturity threshold (equal to ``(ages > maturity).sum()``, without reading it)."""
        return self.num_units - self._young_units

    def age(self, tensor: bool = True) -> None:
        """One optimizer step older (``tensor=False``: the host-side count only; ``ages`` follows later)."""
        if tensor:
            self.ages += 1
        self._clock += 1
        while self._young and self._clock - self._young[0][0] > self.maturity:
            self._young_units -= self._young.popleft()[1]

    def reset(self, units: torch.Tensor, *, mature: bool = False) -> None:
        """``units`` start again: age, utility and mean activation 0.

        ``mature=True`` promises that every unit was mature (as ``_choose`` guarantees): they join the young as one
        cohort. Otherwise the count is rebuilt from the ages (one small read), exact whichever units were reset.
        """
        self.ages[units] = 0
        self.utility[units] = 0.0
        self.mean_activation[units] = 0.0
        self.replaced += units.numel()
        if mature:
            self._young.append((self._clock, units.numel()))
            self._young_units += units.numel()
        else:
            self.sync_cohorts()

    def sync_cohorts(self) -> None:
        """Rebuild the host-side maturity count from ``ages`` (after loading them, or setting them by hand)."""
        ages = self.ages.cpu()
        young, counts = torch.unique(ages[ages <= self.maturity], return_counts=True)
        self._clock = 0
        self._young = deque((-int(a), int(c)) for a, c in sorted(zip(young, counts, strict=True), reverse=True))
        self._young_units = int(counts.sum())

    def state_dict(self) -> dict[str, Any]:
        return {
            "ages": self.ages.cpu(),
            "utility": self.utility.cpu(),
            "mean_activation": self.mean_activation.cpu(),
            "accumulated": self.accumulated,
            "replaced": self.replaced,
            "skipped": self.skipped.cpu(),
        }

    def load(self, state: dict[str, Any]) -> None:
        device = self.ages.device
        self.ages = state["ages"].to(device)
        self._units = self.ages.numel()
        self.utility = state["utility"].to(device)
        self.mean_activation = state["mean_activation"].to(device)
        self.accumulated = float(state["accumulated"])
        self.replaced = int(state["replaced"])
        self.skipped = torch.as_tensor(state.get("skipped", 0), dtype=torch.long).to(device)
        self.sync_cohorts()


class ContinualBackprop(UnitPolicy):
    """Continual Backprop: after every optimizer step, replace a small share of the least useful mature units.

    A plain object: no trainer, any ``nn.Module`` and optimizer. In a hand-written loop::

        cbp = ContinualBackprop(model, optimizer, replacement_rate=1e-4, maturity_threshold=100)
        for x, y in stream:
            optimizer.zero_grad(); loss_fn(model(x), y).backward(); optimizer.step()
            cbp.step()

    Construction binds the producer → consumer pairs (reported once, also in :attr:`bound_layers`; the init of new
    units and why in :attr:`init_reasons`) and puts forward pre-hooks on the consumers, which keep what each
    consumer received in *training* forward passes (train mode, gradients on; never evaluation or probes).
    :meth:`step` then acts on what was recorded since the last call, for every pair:

    * every unit ages by one step; f ← η·f + (1−η)·mean(h), f̂ = f / (1 − η^age);
    * instantaneous utility ``contribution`` = mean|h| · mean|w_out|; ``zero_contribution`` = mean|h − f̂| ·
      mean|w_out|; ``adaptable_contribution`` = zero_contribution / mean|w_in| (Dohare's code: means over the
      consumer's rows and the producer's inputs — ranking within a layer is the same as with sums; for conv →
      flatten → linear the product is taken per flattened column and averaged over the channel's columns, as
      in his ``ConvGnT``);
    * u ← η·u + (1−η)·utility, ranked as û = u / (1 − η^age) (bias-corrected, so young units are not
      judged on a shrunken EMA);
    * units older than ``maturity_threshold`` are eligible; ``n = ρ·#eligible`` (``count="eligible"``, Dohare's
      MLP ``GnT``) or ``n = ρ·width`` (``count="width"``, his ConvNet/ResNet code, only on steps with an eligible
      unit); with ``accumulate=True`` fractional parts carry over and ``int(acc)`` units are replaced, otherwise a
      fractional n < 1 replaces one unit with probability n;
    * the n eligible units with the lowest û get fresh incoming weights (the layer's own init), bias 0, reset
      BatchNorm/LayerNorm entries, zero outgoing weights (the network's output does not change) and zeroed
      optimizer state on exactly those rows/columns (:func:`~plasticity_lightning.surgery.reinit_units`); their
      age, utility and f restart at 0.

    ``init="sigma_orthogonal"`` is RR-CBP: new incoming weights Σ-orthogonal to the kept units' rows with unit
    Σ-norm, Σ the bias-corrected EMA (decay ``sigma_decay``) of the producer's input covariance, optionally scaled
    by an energy budget (:mod:`plasticity_lightning.surgery.sigma`, which lists the deviations from the reference).
    Linear producers only.

    Non-finite statistics: when a layer's instantaneous utility (or its utility EMA) holds a NaN or ±inf
    (diverged features or weights), that layer's step is skipped: its utility and mean-activation EMAs keep their
    previous values and no unit is replaced (replacements due that step are dropped, not carried over); its units
    still age. The check runs on the device; the host reads it only on steps that would replace units, so other
    steps never wait for the device. Skipped steps are counted per layer (:meth:`skipped_nonfinite`); the first one
    warns.

    DDP: with :attr:`reduce_mean` set (:func:`~plasticity_lightning.policies.all_reduce_mean`, or the Lightning
    callback's strategy), per-unit statistics are averaged across ranks before the utility update, and random draws
    come from a generator seeded alike on every rank, so every rank replaces the same units with the same weights.
    Resume: ages, utilities, f, accumulators, counts, Σ, the magnitude cache and the generator are in
    :meth:`state_dict`. Several forward passes between two steps (gradient accumulation) count as one batch.

    Speed: on large layers (a bound weight of at least
    :data:`~plasticity_lightning.surgery.units.FUSED_MIN_ELEMENTS` elements) the statistics of all pairs, their
    |w| sums included, run as one compiled program (``torch.compile``; compiled at the first step, its time in
    ``surgery.units.fused_compile_seconds``; eager PyTorch, after one warning, where it cannot compile). The results
    agree with the eager path's within float32 round-off.

    Deviations from the reference code (``lop/algos/gnt.py``, ``convGnT.py``, ``res_gnt.py``): the next-layer bias
    correction, a no-op there, is not performed; Conv layers use their own init (the reference always draws
    U(±1/√fan_in)); optimizer state is reset for every touched slice and every optimizer (the reference forgets
    some).

    Args:
        model: the network (``None``: bind later with :meth:`attach`).
        optimizer: its optimizer(s), whose state is cleared for replaced units.
        replacement_rate: ρ, the share of units replaced per step.
        maturity_threshold: m, steps a unit must live before it can be replaced.
        decay_rate: η, the utility EMA decay.
        utility: ``"contribution"``, ``"zero_contribution"`` or ``"adaptable_contribution"``.
        accumulate: carry fractional replacements over (``False``: Bernoulli for n < 1).
        count: ``"eligible"`` (ρ·#mature) or ``"width"`` (ρ·#units).
        init: ``"auto"`` (the layer's own scheme), a scheme name, or ``"sigma_orthogonal"`` (RR-CBP).
        gain: gain of a named ``init`` for every pair, instead of the activation's.
        sigma_decay: EMA decay of the input covariance (RR-CBP).
        sigma_ridge: ridge added to Σ (RR-CBP).
        energy_budget: scale RR-CBP rows to the activation's energy target instead of unit Σ-norm.
        magnitudes_every_n_steps: recompute the weight magnitudes |w_out| (and |w_in|) every n steps instead of every
            step (1, the default, is Dohare's algorithm). The pass over the weights is most of CBP's cost on large
            layers; between passes the cached magnitudes are used, stale by up to n − 1 optimizer steps. A replaced
            unit's own entries are patched (outgoing 0, its new incoming weights); what its replacement changes in
            neighbouring pairs' entries waits for the next refresh.
        window: update the statistics of up to this many steps at once (1: every step). The same algorithm — every
            step's utility from that step's features and weights, replacements on the steps they fall due — for
            small networks at small batches (online learning, RL), where the per-step cost is tens of tiny tensor
            operations: :meth:`step` then records the step's consumer inputs and a copy of the bound weights and
            counts on the host, and the EMAs of the pending steps are computed together (the recursion unrolled, in
            float64) when a unit is due for replacement or the window is full. Utilities then differ from
            ``window=1`` by float round-off only. Memory: ``window`` copies of the bound weights and inputs. Not
            with RR-CBP or ``magnitudes_every_n_steps > 1``.
        layers: see :class:`~plasticity_lightning.policies.base.UnitPolicy`.
        pairs: see :class:`~plasticity_lightning.policies.base.UnitPolicy`.
        seed: seed of the random draws.
        prefix: name of the values in reports.

    Example::

        >>> net = nn.Sequential(nn.Linear(20, 5), nn.ReLU(), nn.Linear(5, 1))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.01)
        >>> cbp = ContinualBackprop(net, opt, replacement_rate=1e-4, init="kaiming")
        >>> cbp.bound_layers
        ['0 → 2']
        >>> opt.zero_grad(); net(torch.rand(1, 20)).pow(2).mean().backward(); opt.step()
        >>> cbp.step()
        {'0': 0}
    """

    extra_inits = ("sigma_orthogonal",)
    #: the default utility's hooks reduce each consumer input to Σ|h| as it passes (``False``: they keep the inputs
    #: until the step, as the other utilities need; ``benchmarks/cbp_overhead.py`` times both)
    _reduce_in_hook = True

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
        *,
        replacement_rate: float = 1e-4,
        maturity_threshold: int = 100,
        decay_rate: float = 0.99,
        utility: Literal["contribution", "zero_contribution", "adaptable_contribution"] = "contribution",
        accumulate: bool = True,
        count: Literal["eligible", "width"] = "eligible",
        init: str = "auto",
        gain: float | None = None,
        sigma_decay: float = 0.99,
        sigma_ridge: float = 1e-4,
        energy_budget: bool = False,
        magnitudes_every_n_steps: int = 1,
        window: int = 1,
        layers: Sequence[str] | None = None,
        pairs: Sequence[Sequence[Any]] | None = None,
        seed: int = 0,
        prefix: str = "cbp",
    ) -> None:
        super().__init__(layers=layers, pairs=pairs, init=init, gain=gain, seed=seed, prefix=prefix)
        owner = type(self).__name__
        self.replacement_rate = check_fraction(owner, "replacement_rate", replacement_rate, high_open=False)
        self.maturity_threshold = check_positive_int(owner, "maturity_threshold", maturity_threshold, allow_zero=True)
        self.decay_rate = check_fraction(owner, "decay_rate", decay_rate)
        self.utility = check_choice(owner, "utility", utility, UTILITIES)
        if not isinstance(accumulate, bool):
            raise PlasticityConfigError(f"{owner}.accumulate={accumulate!r} is invalid; expected true or false")
        self.accumulate = accumulate
        self.count = check_choice(owner, "count", count, ("eligible", "width"))
        self.sigma_decay = check_fraction(owner, "sigma_decay", sigma_decay)
        self.sigma_ridge = check_positive_float(owner, "sigma_ridge", sigma_ridge, allow_zero=True)
        self.energy_budget = bool(energy_budget)
        if self.energy_budget and init != "sigma_orthogonal":
            raise PlasticityConfigError(
                f"{owner}.energy_budget=True needs init='sigma_orthogonal' (RR-CBP), got init={init!r}"
            )
        self.magnitudes_every_n_steps = check_positive_int(owner, "magnitudes_every_n_steps", magnitudes_every_n_steps)
        self.window = check_positive_int(owner, "window", window)
        if self.window > 1 and (init == "sigma_orthogonal" or magnitudes_every_n_steps != 1):
            raise PlasticityConfigError(
                f"{owner}.window={window!r} needs init other than 'sigma_orthogonal' and magnitudes_every_n_steps=1 "
                f"(got init={init!r}, magnitudes_every_n_steps={magnitudes_every_n_steps!r}); use window=1"
            )
        self._pending_steps = 0  # window > 1: steps recorded (inputs in _features, weights in the ring) not yet applied
        self._finite: dict[str, bool] = {}  # per producer: were the last flushed step's statistics finite
        # (outgoing, incoming) weight magnitudes per producer, reused for magnitudes_every_n_steps steps
        self._magnitudes: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self._magnitude_age = 0
        # per set of pairs stepped together: what one compilation of the fused step covers (None: eager)
        self._fused_keys: dict[tuple[str, ...], tuple[object, ...] | None] = {}
        self.states: dict[str, _LayerState] = {}
        self.covariances: dict[str, InputCovariance] = {}
        self._features: dict[str, list[torch.Tensor]] = {}
        self._inputs: dict[str, list[torch.Tensor]] = {}
        # per producer: positions summed by each recorded forward pass, when the hooks reduce (see _reducer)
        self._counts: dict[str, list[int]] = {}
        self._reduced = False  # do the hooks record Σ|h| (True) or the consumer inputs themselves
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._pending: dict[str, Any] | None = None
        self.steps = 0  # calls of step() since attach
        if model is not None:
            self.attach(model, optimizer)

    @property
    def sigma_orthogonal(self) -> bool:
        return self.init == "sigma_orthogonal"

    def settings(self) -> dict[str, Any]:
        """The arguments that distinguish two instances."""
        return {
            "replacement_rate": self.replacement_rate,
            "maturity_threshold": self.maturity_threshold,
            "decay_rate": self.decay_rate,
            "utility": self.utility,
            "accumulate": self.accumulate,
            "count": self.count,
            "init": self.init,
            "magnitudes_every_n_steps": self.magnitudes_every_n_steps,
            # only when set: instances (and checkpoints) from before the window existed keep their identity
            **({"window": self.window} if self.window > 1 else {}),
        }

    # ------------------------------------------------------------------ set-up
    def attach(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | Iterable[torch.optim.Optimizer] | None = None,
    ) -> None:
        """Bind to ``model``'s pairs and start recording the consumers' training inputs.

        Bind to ``model``'s pairs with fresh statistics (or those of a loaded :meth:`state_dict`) and start recording
        the consumers' training inputs. ``optimizer``: the optimizer(s) whose state is reset.
        """
        if optimizer is not None:
            self.optimizers = as_optimizers(optimizer)
        self.bind(model)
        self._magnitudes, self._magnitude_age = None, 0  # a loaded state restores them in _load_pending
        self._fused_keys = {}
        self.steps = 0
        if self.sigma_orthogonal:
            gated = [pair.describe() for pair in self.pairs if pair.gated]
            if gated:  # Σ-orthogonal rows are drawn for one producer; a gated unit has several (or fused halves)
                raise PlasticityConfigError(
                    f"ContinualBackprop(init='sigma_orthogonal') supports single-producer pairs only; {gated[0]!r} "
                    "is a gated MLP unit (restrict layers=[...] or use another init)"
                )
            convs = [pair.producer for pair in self.pairs if not isinstance(pair.producer_module, nn.Linear)]
            if convs:
                raise PlasticityConfigError(
                    f"ContinualBackprop(init='sigma_orthogonal') supports Linear producers only; {convs[0]!r} is a "
                    f"{type(dict(model.named_modules())[convs[0]]).__name__} (restrict layers=[...] or use "
                    "another init)"
                )
        self.states = {}
        self.covariances = {}
        for pair in self.pairs:
            self.states[pair.producer] = _LayerState(
                pair.num_units, pair.producer_module.weight.device, self.maturity_threshold
            )
            if self.sigma_orthogonal:
                self.covariances[pair.producer] = InputCovariance(pair.producer_module.in_features, self.sigma_decay)
        self._features, self._inputs, self._counts, self._pending_steps = {}, {}, {}, 0
        if self.window > 1:
            self._setup_window()
        if self._pending is not None:
            self._apply_state(self._pending)
            self._pending = None
        self._register_hooks()

    def _register_hooks(self) -> None:
        self.detach()
        # the default utility needs only Σ|h| per (unit, column) of a step: each forward pass reduces its consumer
        # input there and then, so no feature map is held (or concatenated) until the step
        self._reduced = self._reduce_in_hook and self.utility == "contribution" and self.window == 1
        for pair in self.pairs:
            features = self._features.setdefault(pair.producer, [])  # a loaded state may have filled it
            if self._reduced:
                counts = self._counts.setdefault(pair.producer, [])
                record = self._reducer(pair, features, counts)
            else:
                record = self._recorder(features)
            self._handles.append(pair.consumer_module.register_forward_pre_hook(record))
            if self.sigma_orthogonal:
                inputs = self._inputs.setdefault(pair.producer, [])
                self._handles.append(pair.producer_module.register_forward_pre_hook(self._recorder(inputs)))

    @staticmethod
    def _recorder(store: list[torch.Tensor]):
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            # Training forward passes only: not validation, sanity checks or monitors' probes (eval mode).
            if module.training and torch.is_grad_enabled():
                store.append(args[0].detach())

        return record

    @staticmethod
    def _reducer(pair: UnitPair, sums: list[torch.Tensor], counts: list[int]):
        """A recorder of Σ|h| over the positions of each training forward pass.

        A recorder that keeps Σ|h| over the positions of each training forward pass (float32, per unit and column:
        ``[units · columns]``, or ``[units]`` for a conv consumer) and how many positions it summed.
        """
        conv = isinstance(pair.consumer_module, nn.Conv2d)
        width = pair.num_units * pair.columns_per_unit

        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            if module.training and torch.is_grad_enabled():  # as _recorder: training forward passes only
                x = args[0].detach().float()
                if conv:  # [N, units, H, W]
                    sums.append(x.abs().sum(dim=(0, 2, 3)))
                    counts.append(x.numel() // x.shape[1])
                else:  # [..., units · columns]
                    x = x.reshape(-1, width)
                    sums.append(x.abs().sum(dim=0))
                    counts.append(x.shape[0])

        return record

    def detach(self) -> None:
        """Stop recording (remove the forward hooks); :meth:`attach` starts again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    _remove_hooks = detach

    def clear(self) -> None:
        """Forget what was recorded since the last step (e.g. forward passes whose step was skipped)."""
        for store in (self._features, self._inputs, self._counts):
            for recorded in store.values():
                recorded.clear()

    # ------------------------------------------------------------------ the algorithm
    def step(self, step: int | None = None) -> dict[str, int]:
        """One optimizer step has been taken.

        Update every pair on the inputs its consumer received since the last call and replace units. Call it after
        ``optimizer.step()``.

        Args:
            step: the training step, for messages (``None``: the number of calls so far).

        Returns:
            The number of units replaced so far, per producer (pairs without recorded inputs are left out).
        """
        self.steps += 1
        step = self.steps if step is None else step
        if self.window > 1:
            return self._step_in_window(step)
        return self._step_now(step)

    def _step_now(self, step: int) -> dict[str, int]:
        """:meth:`step` with every statistic updated now (``window=1``).

        Every pair that received inputs ages and takes this step's activity from them; then all of their utilities
        are updated — in one compiled program on large layers (:meth:`_fused_update`), pair by pair otherwise, from
        the magnitudes of the weights as the optimizer step left them — and only then are units chosen and replaced,
        pair by pair (a replacement changes its neighbours' weights, not this step's statistics).
        """
        active = [pair for pair in self.pairs if self._features[pair.producer]]
        states = [self.states[pair.producer] for pair in active]
        for state in states:
            state.age()
        activities = [
            self._activity(
                pair, state, self._features[pair.producer], self._counts[pair.producer] if self._reduced else None
            )
            for pair, state in zip(active, states, strict=True)
        ]
        finite = self._fused_update(active, states, activities)
        if finite is None:
            magnitudes = self._current_magnitudes()
            finite = [
                self._apply(state, activity, mean_activation, magnitudes[pair.producer])
                for pair, state, (activity, mean_activation) in zip(active, states, activities, strict=True)
            ]
        replaced: dict[str, int] = {}
        for pair, state, ok in zip(active, states, finite, strict=True):
            inputs = self._inputs.get(pair.producer, [])
            self._finish(pair, state, ok, inputs, step)
            self._features[pair.producer].clear()
            self._counts.get(pair.producer, []).clear()
            inputs.clear()
            replaced[pair.producer] = state.replaced
        return replaced

    def _fused_update(
        self,
        pairs: list[UnitPair],
        states: list[_LayerState],
        activities: list[tuple[torch.Tensor, torch.Tensor | None]],
    ) -> list[torch.Tensor] | None:
        """:meth:`_apply` for every pair in one compiled program, or ``None`` where it does not apply.

        :meth:`_apply` for every pair in one compiled program (``torch.compile``: the |w| sums, utilities and EMAs of
        all pairs, a few kernels in place of tens of small operations), or ``None`` (nothing done) where it does not
        apply: weights below :data:`~plasticity_lightning.surgery.units.FUSED_MIN_ELEMENTS`, reused magnitudes
        (``magnitudes_every_n_steps > 1``), inside a compiled region, or no compiler. The same arithmetic as the eager
        path, so results agree within float32 round-off.
        """
        if not pairs or unit_surgery.FUSED_MIN_ELEMENTS is None or self.magnitudes_every_n_steps != 1:
            return None
        names = tuple(pair.producer for pair in pairs)
        if names not in self._fused_keys:  # once per set of pairs: their shapes are fixed while bound
            self._fused_keys[names] = self._fused_key(pairs)
        key = self._fused_keys[names]
        if key is None or torch.compiler.is_compiling():
            return None
        adaptable = self.utility == "adaptable_contribution"
        with torch.no_grad():  # one grad mode for the compiled program, whatever the caller's (no recompile)
            finite = unit_surgery.run_compiled(
                _fused_pairs_update,
                key,
                [unit_weight(pair.consumer_module).detach() for pair in pairs],
                [unit_weight(pair.producer_module).detach() if adaptable else None for pair in pairs],
                [activity for activity, _ in activities],
                [state.utility for state in states],
                [state.mean_activation for state in states],
                [mean_activation for _, mean_activation in activities],
                [state.skipped for state in states],
                self.decay_rate,
                describe=f"the fused CBP step (torch.compile) failed for {', '.join(names)}; their statistics use "
                "eager PyTorch",
            )
        if finite is not None:  # as the eager path leaves them: fresh this step (no cache is reused at n = 1)
            self._magnitudes, self._magnitude_age = None, 1
        return finite

    def _fused_key(self, pairs: list[UnitPair]) -> tuple[object, ...] | None:
        """What one compilation of :meth:`_fused_update` covers, or ``None`` if its layers are too small for it."""
        weights = [unit_weight(pair.consumer_module) for pair in pairs]
        if self.utility == "adaptable_contribution":
            weights += [unit_weight(pair.producer_module) for pair in pairs]
        if max(weight.numel() for weight in weights) < unit_surgery.FUSED_MIN_ELEMENTS:
            return None
        layout = tuple((pair.num_units, pair.columns_per_unit) for pair in pairs)
        return ("cbp", self.utility, layout, *((tuple(w.shape), w.stride(), w.dtype, w.device) for w in weights))

    # ------------------------------------------------------------------ the window (window > 1)
    def _setup_window(self) -> None:
        """A ring of weight snapshots: every producer's and consumer's weight, one flat row per pending step."""
        modules: dict[int, nn.Module] = {}
        for pair in self.pairs:
            modules.setdefault(id(pair.producer_module), pair.producer_module)
            modules.setdefault(id(pair.consumer_module), pair.consumer_module)
        weights = [module.weight.detach() for module in modules.values()]
        if any(not w.is_contiguous() for w in weights) or len({(w.dtype, w.device) for w in weights}) > 1:
            raise PlasticityConfigError(
                f"{self.owner}.window={self.window} needs contiguous weights of one dtype and device in every bound "
                "layer; use window=1"
            )
        # views of the parameters' storage: they follow every in-place update (optimizer steps, replacements)
        self._flat = [w.view(-1) for w in weights]
        self._slices, offset = {}, 0
        for key, w in zip(modules, weights, strict=True):
            self._slices[key] = (offset, w.numel(), tuple(w.shape))
            offset += w.numel()
        self._ring = torch.empty(self.window, offset, dtype=weights[0].dtype, device=weights[0].device)
        self._ring_rows = self._ring.unbind(0)

    def _step_in_window(self, step: int) -> dict[str, int]:
        """:meth:`step` that records and counts, and updates the statistics only when needed.

        :meth:`step` that only records (the step's consumer inputs and a weight snapshot) and counts on the host, and
        brings the statistics up to date — all pending steps at once — when a unit is due for replacement or the window
        is full.
        """
        pending = self._pending_steps
        for pair in self.pairs:  # each list holds one input per pending step, then this step's forward passes
            features = self._features[pair.producer]
            if len(features) != pending + 1:
                if len(features) == pending:  # no input this step: the per-step path, after the pending steps
                    self.flush()
                    return self._step_now(step)
                features[pending:] = [torch.cat(features[pending:])]  # micro-batches of one step: one batch
        torch.cat(self._flat, out=self._ring_rows[pending])
        self._pending_steps = pending + 1
        replaced: dict[str, int] = {}
        for pair in self.pairs:
            state = self.states[pair.producer]
            state.age(tensor=False)
            number = self._count(state)  # in the per-step path's order of generator draws
            if number:
                finite = self.flush()
                if finite.get(pair.producer, True):
                    self._replace(pair, self._lowest(state, number), mature=True)
                else:  # never replace on a NaN ranking
                    self.warn_nonfinite(pair.producer, step)
            replaced[pair.producer] = state.replaced
        if self._pending_steps >= self.window:
            self.flush()
        return replaced

    @torch.no_grad()
    def flush(self) -> dict[str, bool]:
        """Bring the statistics of the pending steps (``window > 1``) up to date now.

        Returns, per producer, whether the last step's statistics were finite.

        :meth:`step` flushes by itself when a unit is due for replacement and when the window is full; between,
        :attr:`states` lags by the pending steps. Flushing by hand (e.g. to read the states at the end) starts a new
        window, which changes the float round-off of the steps that follow compared with a run that did not flush
        there. :meth:`state_dict` never flushes: it saves the pending steps.
        """
        pending, self._pending_steps = self._pending_steps, 0
        finite = self._finite  # kept: a second pair's decision in the same step reads the flags of this flush
        if not pending:
            return finite
        snapshots = self._ring[:pending]
        for pair in self.pairs:
            state = self.states[pair.producer]
            recorded = self._features[pair.producer]
            features, recorded[:] = recorded[:pending], recorded[pending:]  # later forward passes stay
            outgoing, incoming = self._window_magnitudes(pair, snapshots)
            done = len({f.shape for f in features}) == 1 and self._window_update(
                pair, state, torch.stack(features), outgoing, incoming
            )
            if done:
                state.ages += pending
                finite[pair.producer] = True
                continue
            # NaN/inf somewhere, or batches of different sizes: step by step, exactly as the per-step path
            last = None
            for j, step_features in enumerate(features):
                state.ages += 1
                last = self._update(
                    pair, state, [step_features], (outgoing[j], None if incoming is None else incoming[j])
                )
            finite[pair.producer] = bool(last)
        return finite

    def _window_magnitudes(self, pair: UnitPair, snapshots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per pending step, the weight magnitudes of every unit.

        Per pending step: mean |w_out| per (unit, column) ``[k, units, columns]`` and, for the adaptable utility, mean
        |w_in| per unit ``[k, units]`` — :func:`~plasticity_lightning.surgery.unit_magnitudes` on snapshots.
        """
        k = len(snapshots)

        def weight(module: nn.Module) -> torch.Tensor:  # [k, out, in, ...], as unit_weight orients it
            offset, numel, shape = self._slices[id(module)]
            w = snapshots[:, offset : offset + numel].reshape(k, *shape)
            return w.transpose(1, 2) if is_transposed_linear(module) else w

        consumer = weight(pair.consumer_module).abs().float()
        per_input = consumer.sum(dim=1).reshape(k, pair.num_units * pair.columns_per_unit, -1)
        outgoing = per_input.sum(dim=2) / (consumer.shape[1] * per_input.shape[2])
        outgoing = outgoing.reshape(k, pair.num_units, pair.columns_per_unit)
        if self.utility != "adaptable_contribution":
            return outgoing, None
        producer = weight(pair.producer_module).abs().float().reshape(k, pair.num_units, -1)
        return outgoing, producer.sum(dim=2) / producer.shape[2]

    @staticmethod
    def _unrolled(a: float, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 (a^(j+1) for j < k, the k×k matrix a^(j−i) for i ≤ j, 0 above).

        x_j = a·x_(j−1) + b_j unrolled, x_j = a^(j+1)·x_(−1) + Σ_(i≤j) a^(j−i)·b_i.
        """
        j = torch.arange(k, dtype=torch.float64, device=device)
        lag = j[:, None] - j[None, :]
        return a ** (j + 1), torch.where(lag >= 0, a ** lag.clamp(min=0), torch.zeros((), dtype=torch.float64))

    def _ema_path(self, start: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Every f_j = η·f_(j−1) + (1−η)·values_j of ``values`` ``[k, units]`` (f_(−1) = ``start``), float64.

        In blocks of c ≈ √k steps: the recursion unrolled within every block at once (one c×c matrix), then across
        the blocks' ends (decay η^c, one ⌈k/c⌉-square matrix) — about k·√k work and memory, where one k×k matrix
        would cost k² (8 MB and a k² power at k = 1000, for every window length met).
        """
        k, eta = len(values), self.decay_rate
        block = math.isqrt(k - 1) + 1  # block² ≥ k
        blocks = -(-k // block)
        inner_powers, inner = self._unrolled(eta, block, values.device)
        outer_powers, outer = self._unrolled(eta**block, blocks, values.device)
        padded = values.new_zeros(blocks * block, values.shape[1])
        padded[:k] = values  # zeros after the last step change nothing before it
        local = inner @ ((1 - eta) * padded.reshape(blocks, block, -1))  # each block from f = 0 before it
        ends = outer_powers[:, None] * start + outer @ local[:, -1]  # f at the end of every block
        before = torch.cat([start[None], ends[:-1]])  # f before every block
        return (local + inner_powers[None, :, None] * before[:, None]).reshape(blocks * block, -1)[:k]

    def _window_update(
        self,
        pair: UnitPair,
        state: _LayerState,
        features: torch.Tensor,
        outgoing: torch.Tensor,
        incoming: torch.Tensor | None,
    ) -> bool:
        """The EMAs over the ``k`` pending steps at once, in float64.

        The EMAs over the ``k`` pending steps at once (``features``: ``[k, ...]``, one step's consumer input each), in
        float64; False (nothing changed) if any statistic is NaN/inf.
        """
        k = len(features)
        eta = self.decay_rate
        device = state.utility.device
        if isinstance(pair.consumer_module, nn.Conv2d):  # as unit_columns, per step: [k, positions, units, columns]
            columns = features.detach().float().movedim(2, -1).reshape(k, -1, features.shape[2], 1)
        else:
            columns = features.detach().float().reshape(k, -1, pair.num_units, pair.columns_per_unit)
        mean_activation = None
        if self.utility == "contribution":
            activity = columns.abs().mean(dim=1)
        else:  # f_j = η^(j+1)·f_0 + Σ_(i≤j) (1−η)·η^(j−i)·mean(h_i), then f̂_j = f_j / (1 − η^age_j)
            mean_h = self.reduce(columns.mean(dim=(1, 3))).double()
            mean_activation = self._ema_path(state.mean_activation.double(), mean_h)
            ages = state.ages.double() + torch.arange(1, k + 1, dtype=torch.float64, device=device)[:, None]
            corrected = (mean_activation / (1 - eta**ages)).float()
            activity = (columns - corrected[:, None, :, None]).abs().mean(dim=1)
        instantaneous = self.reduce(activity).mul_(outgoing)
        instantaneous = instantaneous[..., 0] if pair.columns_per_unit == 1 else instantaneous.mean(dim=2)
        if incoming is not None:
            instantaneous = instantaneous / incoming.clamp(min=torch.finfo(torch.float32).tiny)
        if not bool(torch.isfinite(instantaneous).all() & torch.isfinite(state.utility).all()):
            return False
        # u_k = η^k·u_0 + Σ_j (1−η)·η^(k−1−j)·utility_j
        weights = (1 - eta) * eta ** torch.arange(k - 1, -1, -1, dtype=torch.float64, device=device)
        state.utility.copy_(eta**k * state.utility.double() + weights @ instantaneous.double())
        if mean_activation is not None:
            state.mean_activation.copy_(mean_activation[-1])
        return True

    def skipped_nonfinite(self) -> int:
        """Layer-steps skipped so far for NaN/inf statistics, summed over layers (reads the device); warns once."""
        skipped = [(name, int(state.skipped)) for name, state in self.states.items()]
        for name, count in skipped:
            if count:
                self.warn_nonfinite(name, None)
                break
        return sum(count for _, count in skipped)

    def _current_magnitudes(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        if self._magnitudes is None or self._magnitude_age >= self.magnitudes_every_n_steps:
            self._magnitudes = unit_magnitudes(self.pairs, incoming=self.utility == "adaptable_contribution")
            self._magnitude_age = 0
        self._magnitude_age += 1
        return self._magnitudes

    @torch.no_grad()
    def step_pair(
        self,
        pair: UnitPair,
        features: list[torch.Tensor],
        inputs: list[torch.Tensor] | None = None,
        magnitudes: tuple[torch.Tensor, torch.Tensor | None] | None = None,
        *,
        step: int | None = None,
    ) -> torch.Tensor:
        """One CBP step for ``pair`` on this step's consumer inputs; returns the replaced unit indices.

        ``magnitudes``: the pair's (outgoing, incoming) weight magnitudes if already computed for the step.
        """
        state = self.states[pair.producer]
        state.age()
        finite = self._update(pair, state, features, magnitudes)
        return self._finish(pair, state, finite, inputs, step)

    def _finish(
        self,
        pair: UnitPair,
        state: _LayerState,
        finite: torch.Tensor,
        inputs: list[torch.Tensor] | None,
        step: int | None,
    ) -> torch.Tensor:
        """After the pair's statistics were updated: RR-CBP's covariance, then the choice and the replacement."""
        if self.sigma_orthogonal and inputs:
            batch = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).to(torch.float64)
            self.covariances[pair.producer].update_moment(self.reduce(batch.T @ batch / len(batch)))
        units = self._choose(state)
        if units.numel():
            if bool(finite):  # never replace on a NaN ranking: one read, only on steps that would replace
                self._replace(pair, units, mature=True)
            else:
                self.warn_nonfinite(pair.producer, step)
                units = units[:0]
        return units

    def _update(
        self,
        pair: UnitPair,
        state: _LayerState,
        features: list[torch.Tensor],
        magnitudes: tuple[torch.Tensor, torch.Tensor | None] | None,
    ) -> torch.Tensor:
        """The EMAs of one step (the units have aged); returns whether its statistics were finite (0-d tensor)."""
        activity, mean_activation = self._activity(pair, state, features)
        if magnitudes is None or (magnitudes[1] is None and self.utility == "adaptable_contribution"):
            outgoing = outgoing_magnitude(pair) if magnitudes is None else magnitudes[0]
            incoming = incoming_magnitude(pair) if self.utility == "adaptable_contribution" else None
            magnitudes = (outgoing, incoming)
        return self._apply(state, activity, mean_activation, magnitudes)

    def _apply(
        self,
        state: _LayerState,
        activity: torch.Tensor,
        mean_activation: torch.Tensor | None,
        magnitudes: tuple[torch.Tensor, torch.Tensor | None],
    ) -> torch.Tensor:
        """:func:`utility_step` on ``state`` with this step's activity and the pair's weight magnitudes."""
        outgoing, incoming = magnitudes
        return utility_step(
            activity,
            outgoing,
            incoming,
            state.utility,
            state.mean_activation,
            mean_activation,
            state.skipped,
            self.decay_rate,
        )

    def _activity(
        self, pair: UnitPair, state: _LayerState, features: list[torch.Tensor], counts: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This step's utility terms per (unit, column), averaged across ranks.

        This step's mean |h| (``"contribution"``) or mean |h − f̂| per (unit, column) ``[units, columns]``, averaged
        across ranks, and the updated mean-activation EMA f that it used (``None`` for ``"contribution"``, which does
        not track f). The units have aged.

        ``counts``: ``features`` are the hooks' Σ|h| per forward pass (see :meth:`_reducer`), over these many
        positions each; the same mean (bit for bit with one forward pass per step; within float32 round-off over
        several micro-batches, which are summed apart).
        """
        if counts is not None:
            total = features[0] if len(features) == 1 else torch.stack(features).sum(dim=0)
            activity = (total / sum(counts)).reshape(pair.num_units, -1)
            return self.reduce(activity), None
        # every micro-batch of the step (gradient accumulation) counts, as one batch
        x = (features[0] if len(features) == 1 else torch.cat(features)).detach().float()
        conv = isinstance(pair.consumer_module, nn.Conv2d)
        if conv:  # [N, units, H, W]: batch × places are positions (unit_columns' view, without moving the axis)
            positions, per_unit = (0, 2, 3), (1, -1, 1, 1)
        else:  # [positions, units, columns] (see unit_columns)
            x = x.reshape(-1, pair.num_units, pair.columns_per_unit)
            positions, per_unit = (0,), (1, -1, 1)
        mean_activation = None
        if self.utility == "contribution":
            activity = x.abs().mean(dim=positions)
        else:  # f (the mean activation) is tracked by the utilities that use it
            mean_h = self.reduce(x.mean(dim=(0, 2, 3) if conv else (0, 2)))
            mean_activation = state.mean_activation.lerp(mean_h, 1 - self.decay_rate)
            corrected = mean_activation / self._correction(state)
            activity = (x - corrected.view(per_unit)).abs().mean(dim=positions)
        return self.reduce(activity[:, None] if conv else activity), mean_activation

    def _correction(self, state: _LayerState) -> torch.Tensor:
        """Bias correction 1 − η^age of each unit's EMAs."""
        return 1 - self.decay_rate ** state.ages.to(torch.float32)

    def _choose(self, state: _LayerState) -> torch.Tensor:
        """The units to replace this step. Decided on the host: a step without replacement reads nothing back."""
        number = self._count(state)
        return self._lowest(state, number) if number else state.ages.new_zeros(0)

    def _count(self, state: _LayerState) -> int:
        """How many units to replace this step (host only; with ``accumulate=False`` a draw from the generator)."""
        eligible = state.mature_units
        if eligible == 0:
            return 0
        base = eligible if self.count == "eligible" else state.num_units
        expected = self.replacement_rate * base
        if self.accumulate:
            state.accumulated += expected
            number = int(state.accumulated)
            state.accumulated -= number
        elif expected < 1:
            number = int(torch.rand(1, generator=self.generator).item() <= expected)
        else:
            number = int(expected)
        return min(number, eligible)

    def _lowest(self, state: _LayerState, number: int) -> torch.Tensor:
        """The ``number`` mature units with the lowest bias-corrected utility."""
        corrected = state.utility / self._correction(state)
        corrected = corrected.masked_fill(state.ages <= state.maturity, torch.inf)  # lowest first; never a young unit
        return torch.topk(corrected, number, largest=False).indices

    def _replace(self, pair: UnitPair, units: torch.Tensor, *, mature: bool = False) -> None:
        scheme, gain = self.inits[pair.producer]
        incoming = None
        if self.sigma_orthogonal:
            weight = pair.producer_module.weight.detach()
            keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
            keep[units] = False
            share = activation_energy_share(pair.activation) if self.energy_budget else None
            incoming = sigma_orthogonal_rows(
                weight[keep],
                self.covariances[pair.producer].covariance(self.sigma_ridge),
                units.numel(),
                generator=self.generator,
                energy_share=share,
            )
        reinit_units(
            pair, units, init=scheme, gain=gain, generator=self.generator, incoming=incoming, optimizers=self.optimizers
        )
        if self._magnitudes is not None and pair.producer in self._magnitudes:  # keep a reused cache exact for them
            outgoing, incoming_mean = self._magnitudes[pair.producer]
            outgoing[units] = 0.0
            if incoming_mean is not None:
                rows = pair.producer_module.weight.detach()[units]
                incoming_mean[units] = rows.abs().reshape(units.numel(), -1).mean(dim=1).float()
        self.states[pair.producer].reset(units, mature=mature)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "layers": {name: state.state_dict() for name, state in self.states.items()},
            "covariances": {name: cov.state_dict() for name, cov in self.covariances.items()},
            # the cache is part of the trajectory when it is reused: a resumed run continues with it
            "magnitudes": None
            if self._magnitudes is None or self.magnitudes_every_n_steps == 1
            else {k: [None if t is None else t.cpu() for t in v] for k, v in self._magnitudes.items()},
            "magnitude_age": self._magnitude_age,
            # pending steps (window > 1) are saved, not flushed: a resumed run finishes the same window
            **(
                {
                    "window": {
                        "inputs": {k: [t.cpu() for t in v[: self._pending_steps]] for k, v in self._features.items()},
                        "snapshots": self._ring[: self._pending_steps].cpu(),
                    }
                }
                if self._pending_steps
                else {}
            ),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; per-layer statistics apply at the next :meth:`attach` (or now if attached)."""
        super().load_state_dict(state_dict)
        # kept for the next attach: a callback loads its checkpoint before the fit binds the layers afresh
        self._pending = state_dict
        if self.states:  # already bound: apply now too
            self._apply_state(state_dict)

    def _apply_state(self, pending: dict[str, Any]) -> None:
        missing = set(pending.get("layers", {})) ^ set(self.states)
        if missing:
            self.warn(
                f"ContinualBackprop: the checkpoint's layers differ from this model's ({sorted(missing)}); "
                "those layers start fresh"
            )
        for name, layer_state in pending.get("layers", {}).items():
            if name in self.states:
                self.states[name].load(layer_state)
        for name, cov_state in pending.get("covariances", {}).items():
            if name in self.covariances:
                self.covariances[name].load_state_dict(cov_state)
        cached = pending.get("magnitudes")
        if cached is not None and set(cached) == set(self.states):
            device = next(iter(self.states.values())).ages.device
            self._magnitudes = {
                name: (out.to(device), None if inc is None else inc.to(device)) for name, (out, inc) in cached.items()
            }
            self._magnitude_age = int(pending.get("magnitude_age", 0))
        window = pending.get("window")
        if self.window > 1:
            for recorded in self._features.values():
                recorded.clear()  # in place: the hooks hold these lists
            self._pending_steps = 0
            if window and set(window["inputs"]) == set(self.states):
                count = len(window["snapshots"])
                for name, tensors in window["inputs"].items():
                    self._features.setdefault(name, [])[:] = [t.to(self._ring.device) for t in tensors]
                self._ring[:count].copy_(window["snapshots"])
                self._pending_steps = count
                for state in self.states.values():  # the saved ages lag by the pending steps; the host count does not
                    for _ in range(count):
                        state.age(tensor=False)
