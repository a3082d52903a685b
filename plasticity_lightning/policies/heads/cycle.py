"""The prune → measure → grow → learn cycle of attention heads, as a plain object.

Sentinel-AI's ``AdaptivePlasticitySystem`` with every number measured: the cycle itself (measure, snapshot,
choose, prune, measure, grow; then judge, keep or revert), strategy ratings, a memory of successful transformations,
adaptation of the levels, the stop rule and the snapshot a failed cycle is reverted to.
:class:`~plasticity_lightning.callbacks.PlasticityCycle` drives it from a Lightning fit; a hand-written loop drives
it the same way (:class:`CycleController`).

This is the working version of Sentinel-AI's ``AdaptivePlasticitySystem`` (Sentinel-AI,
https://github.com/CambrianTech/sentinel-ai), whose shipped code scores heads and perplexity with random
placeholders and adds random jitter to its degeneration score. Here every number is measured: perplexity on a fixed
probe, degeneration of seeded generations, head scores from gradients, attention entropy or weights.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn

from plasticity_lightning.core.errors import (
    PlasticityConfigError,
    check_fraction,
    check_positive_float,
    check_positive_int,
)
from plasticity_lightning.policies.base import Policy, Settings, owner_field
from plasticity_lightning.policies.heads.reviver import HeadReviver
from plasticity_lightning.policies.heads.selection import (
    GROWTH_CHOICES,
    HEAD_SCORES,
    NonFiniteScores,
    choose_heads_to_grow,
    head_scores,
    lowest_heads,
    share_count,
)
from plasticity_lightning.surgery.heads import HeadGates

#: Sentinel-AI's starting ratings: random strategies start at half the others'
INITIAL_RATING = {"random": 0.5}
RATING_RANGE = (0.1, 10.0)


def updated_rating(rating: float, success: bool, improvement: float) -> float:
    """Sentinel-AI's rating rule.

    Success multiplies by 1 + clip(improvement, 0, 0.5), failure by 0.8; the result is kept in [0.1, 10].

    Args:
        rating: the strategy's current rating.
        success: whether the last cycle improved the metric.
        improvement: the relative improvement (clipped to [0, 0.5]).

    Example::

        >>> updated_rating(1.0, True, 0.2), updated_rating(1.0, True, 0.9), updated_rating(0.11, False, 0.0)
        (1.2, 1.5, 0.1)
    """
    factor = 1.0 + min(max(improvement, 0.0), 0.5) if success else 0.8
    return min(max(rating * factor, RATING_RANGE[0]), RATING_RANGE[1])


@dataclasses.dataclass(frozen=True)
class CycleSettings(Settings):
    """The settings of a :class:`CycleController` (and of a PlasticityCycle's ``cycle`` argument).

    Validated once at construction (errors name ``owner``'s field). In a LightningCLI YAML they are one group:
    ``cycle: {learn_steps: 100, prune_level: 0.2}``.

    Attributes:
        learn_steps: optimizer steps of the learning phase.
        max_cycles: cycles at most.
        prune_level: starting share of live heads pruned per cycle.
        growth_ratio: starting share of dead heads revived per cycle.
        pruning_strategies: head scores to choose among (``gradient``, ``entropy``, ``magnitude``, ``random``).
        growth_strategies: growth choices (``balanced``, ``entropy_gap``, ``gradient``, ``random``).
        max_perplexity_increase: allowed relative perplexity rise over a cycle.
        max_degeneration: upper bound of the degeneration measure (``None``: not judged).
        memory_capacity: successful transformations remembered.
        memory_replay: probability of replaying one.
        adapt: adapt prune level, growth ratio and learning steps between cycles.
        patience: cycles without a new best before cycling stops (``None``: never).
        min_improvement: relative perplexity gain that makes a new best.
        owner: the name in error messages, not an argument: ``CycleController``, or the callback that took these
            settings (:meth:`~plasticity_lightning.policies.base.Settings.with_owner`).

    Example::

        >>> CycleSettings(learn_steps=50, pruning_strategies=["entropy"]).pruning_strategies
        ('entropy',)
    """

    learn_steps: int = 100
    max_cycles: int = 10
    prune_level: float = 0.2
    growth_ratio: float = 0.5
    pruning_strategies: Sequence[str] = ("gradient", "entropy", "magnitude", "random")
    growth_strategies: Sequence[str] = ("balanced", "entropy_gap", "gradient", "random")
    max_perplexity_increase: float = 0.15
    max_degeneration: float | None = 0.5
    memory_capacity: int = 10
    memory_replay: float = 0.7
    adapt: bool = True
    patience: int | None = 3
    min_improvement: float = 0.01
    owner: str = owner_field("CycleController")

    def __post_init__(self) -> None:
        owner = self.owner
        if not isinstance(self.adapt, bool):
            raise PlasticityConfigError(f"{owner}.adapt={self.adapt!r} is invalid; expected true or false")
        checked = {
            "learn_steps": check_positive_int(owner, "learn_steps", self.learn_steps),
            "max_cycles": check_positive_int(owner, "max_cycles", self.max_cycles),
            "prune_level": check_fraction(owner, "prune_level", self.prune_level, low_open=True),
            "growth_ratio": check_fraction(owner, "growth_ratio", self.growth_ratio, low_open=True, high_open=False),
            "pruning_strategies": _check_strategies(owner, "pruning_strategies", self.pruning_strategies, HEAD_SCORES),
            "growth_strategies": _check_strategies(owner, "growth_strategies", self.growth_strategies, GROWTH_CHOICES),
            "max_perplexity_increase": check_positive_float(
                owner, "max_perplexity_increase", self.max_perplexity_increase, allow_zero=True
            ),
            "max_degeneration": None
            if self.max_degeneration is None
            else check_positive_float(owner, "max_degeneration", self.max_degeneration, allow_zero=True),
            "memory_capacity": check_positive_int(owner, "memory_capacity", self.memory_capacity, allow_zero=True),
            "memory_replay": check_fraction(owner, "memory_replay", self.memory_replay, high_open=False),
            "patience": None if self.patience is None else check_positive_int(owner, "patience", self.patience),
            "min_improvement": check_positive_float(owner, "min_improvement", self.min_improvement, allow_zero=True),
        }
        self._keep(checked)


class CycleController(Policy):
    """Cycles of prune → measure → grow → learn on attention heads, each judged and kept or reverted.

    :meth:`start` begins a cycle at an optimizer step:

    1. it measures (``measure()``: the perplexity on a fixed probe, the degeneration of seeded generations, the live
       heads) and snapshots parameters, optimizer states, gates and reviver state (:meth:`take_snapshot`);
    2. it chooses a pruning and a growth strategy (:meth:`plan`) — with probability ``memory_replay`` a remembered
       successful transformation (weighted by its improvement), else each drawn in proportion to its rating;
    3. it prunes ``max(1, int(prune_level · live heads))`` heads of lowest score (never a layer's last head) and
       measures again;
    4. it revives ``max(1, int(growth_ratio · dead heads))`` heads (fresh weights, gate ramp, boosted learning rate:
       :class:`~plasticity_lightning.policies.heads.HeadReviver`).

    Training then runs ``learn_steps`` optimizer steps (:meth:`due` says when they are over), and :meth:`finish`
    measures again and judges (:meth:`judge`): the cycle succeeds when the perplexity is at most
    ``(1 + max_perplexity_increase)`` × the cycle's first one and the degeneration at most ``max_degeneration``; a
    failed cycle restores the snapshot exactly. :meth:`conclude` updates the ratings (:func:`updated_rating`),
    remembers a successful cycle that was not a replay (the last ``memory_capacity``) with improvement = relative
    perplexity drop + 0.5 × relative drop in live heads, and with ``adapt`` adapts the levels as Sentinel-AI does:
    after a success the prune level grows (×1.2 up to 0.5 when perplexity improved by over 5%, else ×1.1 up to 0.4;
    learning ×0.9 steps after a big gain); after a failure it shrinks (×0.8, at least 0.05) while the growth ratio
    (×1.2, at most 0.9) and learning steps (×1.2) grow. After ``patience`` cycles without a new best (perplexity
    better by ``min_improvement``, or fewer live heads at a perplexity within tolerance), or ``max_cycles`` cycles,
    cycling stops (:attr:`stopped`; :meth:`ready` is then false).

    A cycle is not started on NaN/inf statistics: when the first perplexity or the head scores a strategy ranks by
    are not finite, :meth:`start` prunes and grows nothing (a pruning already made is undone), schedules the next try
    ``learn_steps`` steps later and raises :class:`~plasticity_lightning.policies.heads.NonFiniteScores`. A cycle
    whose final perplexity is NaN/inf fails its judgement and is reverted.

    Every random choice comes from the controller's generator; under DDP :attr:`broadcast` sends rank 0's plan and
    heads to every rank (``measure`` must return the same values on every rank), so all ranks prune, grow and revert
    alike. Everything — the snapshot included (about three model copies with Adam) — is in :meth:`state_dict`.

    In a plain loop (``measure`` a function of yours returning ``perplexity``, ``degeneration`` and ``live_heads``)::

        if controller.due(step):
            controller.finish(step, model, gates, reviver, measure)
        if controller.ready(step, start_step=100):
            controller.start(step, model, gates, reviver, measure, input_ids=probe_ids, importance=scores.current())

    Args:
        settings: a validated :class:`CycleSettings` (default: its defaults).
        seed: seed of every random choice.
    """

    def __init__(self, settings: CycleSettings | None = None, *, seed: int = 0) -> None:
        super().__init__(seed=seed, prefix="cycle")
        self.settings = settings or CycleSettings()
        self.owner = self.settings.owner
        # the levels and learn_steps adapt between cycles: the controller's own copies, starting at the settings
        self.learn_steps: int = self.settings.learn_steps
        self.max_cycles: int = self.settings.max_cycles
        self.prune_level: float = self.settings.prune_level
        self.growth_ratio: float = self.settings.growth_ratio
        self.pruning_strategies = list(self.settings.pruning_strategies)
        self.growth_strategies = list(self.settings.growth_strategies)
        self.max_perplexity_increase: float = self.settings.max_perplexity_increase
        self.max_degeneration: float | None = self.settings.max_degeneration
        self.memory_capacity: int = self.settings.memory_capacity
        self.memory_replay: float = self.settings.memory_replay
        self.adapt: bool = self.settings.adapt
        self.patience: int | None = self.settings.patience
        self.min_improvement: float = self.settings.min_improvement

        self.ratings = {
            **{f"prune/{s}": INITIAL_RATING.get(s, 1.0) for s in self.pruning_strategies},
            **{f"grow/{s}": INITIAL_RATING.get(s, 1.0) for s in self.growth_strategies},
        }
        self.memory: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, float] | None = None
        self.stale = 0
        self.stopped: str | None = None
        self.current: dict[str, Any] | None = None  # the cycle in its learning phase
        self.snapshot: dict[str, Any] | None = None
        self.retry_step = 0  # after a cycle skipped on NaN/inf statistics, the step of the next try
        #: sends rank 0's value to every process (identity on one; the callback puts its strategy's broadcast)
        self.broadcast: Callable[[Any], Any] = lambda value: value

    # ------------------------------------------------------------------ the cycle
    def start(
        self,
        step: int,
        model: nn.Module,
        gates: HeadGates,
        reviver: HeadReviver,
        measure: Callable[[], dict[str, float]],
        *,
        input_ids: torch.Tensor | None = None,
        importance: torch.Tensor | None = None,
        optimizers: Iterable[torch.optim.Optimizer] | None = None,
    ) -> dict[str, Any]:
        """Steps 1–4 at optimizer step ``step``.

        Measure, snapshot, choose, prune, measure, revive; the cycle then learns until :meth:`due`. Returns its record
        (:attr:`current`).

        Args:
            step: the optimizer step the cycle starts at.
            model: the model (a HF transformers model, or a module holding one at ``.model``).
            gates: the model's head gates.
            reviver: the reviver of grown heads (its ramps and boost; in the snapshot).
            measure: returns ``{"perplexity", "degeneration", "live_heads"}`` now.
            input_ids: token ids for the entropy scores (``entropy`` pruning, ``entropy_gap`` growth).
            importance: ``[layers, heads]`` gradient importance (``gradient`` pruning and growth).
            optimizers: whose state is snapshotted and cleared for revived heads (default: :attr:`optimizers`).

        Raises:
            NonFiniteScores: the first perplexity or the scores a strategy ranks by are NaN/inf; nothing is left
                pruned or grown, and the next try comes ``learn_steps`` steps later.
        """
        optimizers = self.optimizers if optimizers is None else list(optimizers)
        before = measure()
        if not math.isfinite(before["perplexity"]):  # nothing to judge a cycle against
            self.skip(step)
            raise NonFiniteScores("perplexity")
        self.take_snapshot(model, optimizers, gates, reviver)
        plan = self.broadcast(self.plan())
        try:
            pruned, after_pruning, grown = self._prune_and_grow(plan, model, gates, measure, input_ids, importance)
        except NonFiniteScores:  # the same scores on every rank: all ranks skip
            self.restore_snapshot(model, optimizers, gates, reviver)  # a pruning's gates
            self.snapshot = None
            self.skip(step)
            raise
        if grown:
            reviver.revive(grown, step, generator=self.generator, optimizers=optimizers)
        self.begin(
            step,
            {
                **plan,
                "pruned": [list(h) for h in pruned],
                "grown": [list(h) for h in grown],
                "before": before,
                "after_pruning": after_pruning,
            },
        )
        return self.current

    def _prune_and_grow(
        self,
        plan: dict[str, Any],
        model: nn.Module,
        gates: HeadGates,
        measure: Callable[[], dict[str, float]],
        input_ids: torch.Tensor | None,
        importance: torch.Tensor | None,
    ) -> tuple[list[tuple[int, int]], dict[str, float], list[tuple[int, int]]]:
        """Steps 3–4: gate off the lowest-scored heads, measure, choose the dead heads to revive.

        The heads to revive follow the plan's strategies; NaN/inf scores raise :class:`NonFiniteScores` before
        anything is revived.
        """
        alive = gates.mask.cpu() > 0
        count = share_count(plan["prune_level"], int(alive.sum()))
        scoring = {"importance": importance, "input_ids": input_ids, "generator": self.generator}
        scores = head_scores(plan["prune_strategy"], model, gates, **scoring)
        pruned = self.broadcast(lowest_heads(scores, alive, count, plan["prune_strategy"]))
        for layer, head in pruned:
            gates.set(layer, head, 0.0)
        after_pruning = measure()
        dead = int((gates.mask == 0).sum())
        grow_count = share_count(plan["growth_ratio"], dead)
        grown = choose_heads_to_grow(plan["growth_strategy"], model, gates, grow_count, **scoring)
        return pruned, after_pruning, self.broadcast(grown)

    def finish(
        self,
        step: int,
        model: nn.Module,
        gates: HeadGates,
        reviver: HeadReviver,
        measure: Callable[[], dict[str, float]],
        *,
        optimizers: Iterable[torch.optim.Optimizer] | None = None,
    ) -> dict[str, Any]:
        """Step 5 at optimizer step ``step``: measure, judge, keep or revert (to the snapshot), rate, remember, adapt.

        Returns the cycle's record (``after``, ``success``, ``reverted`` added). Arguments as in :meth:`start`.
        """
        optimizers = self.optimizers if optimizers is None else list(optimizers)
        after = measure()
        success = self.judge(self.current["before"], after)
        if not success:
            self.restore_snapshot(model, optimizers, gates, reviver)
        return self.conclude(after, success, step)

    # ------------------------------------------------------------------ deciding
    def plan(self) -> dict[str, Any]:
        """Strategies and levels: a replayed memory or rating-weighted draws (seeded: the same on all ranks)."""
        replay = self.memory and float(torch.rand(1, generator=self.generator)) < self.memory_replay
        if replay:
            lowest = min(m["improvement"] for m in self.memory)
            weights = torch.tensor([max(0.1, m["improvement"] - lowest + 0.1) for m in self.memory])
            chosen = self.memory[int(torch.multinomial(weights, 1, generator=self.generator))]
            keys = ("prune_strategy", "growth_strategy", "prune_level", "growth_ratio")
            return {**{k: chosen[k] for k in keys}, "replay": True}
        return {
            "prune_strategy": self._draw("prune", self.pruning_strategies),
            "growth_strategy": self._draw("grow", self.growth_strategies),
            "prune_level": self.prune_level,
            "growth_ratio": self.growth_ratio,
            "replay": False,
        }

    def _draw(self, kind: str, strategies: list[str]) -> str:
        weights = torch.tensor([self.ratings[f"{kind}/{s}"] for s in strategies], dtype=torch.float64)
        return strategies[int(torch.multinomial(weights, 1, generator=self.generator))]

    def begin(self, start_step: int, record: dict[str, Any]) -> None:
        """Enter the learning phase, from optimizer step ``start_step``, of the cycle described by ``record``.

        ``record`` holds its plan, heads and measurements.
        """
        self.current = {"cycle": len(self.history), "start_step": start_step, "learn_steps": self.learn_steps, **record}

    def skip(self, step: int) -> None:
        """A cycle skipped on NaN/inf statistics at ``step``: the next try comes ``learn_steps`` later."""
        self.retry_step = step + self.learn_steps

    def due(self, step: int) -> bool:
        """Whether the cycle in its learning phase has learned its ``learn_steps`` at optimizer step ``step``."""
        return self.current is not None and step - self.current["start_step"] >= self.current["learn_steps"]

    def ready(self, step: int, start_step: int, max_steps: int | None = None) -> bool:
        """Whether a new cycle may start at ``step``.

        None is running, cycling has not stopped, ``step`` is past ``start_step`` and a retry, and the whole cycle
        fits before ``max_steps`` (``None``: no end) — an unfinished cycle would leave heads pruned and revived heads
        unjudged (and unrevertable).
        """
        return (
            self.current is None
            and self.stopped is None
            and step >= max(start_step, self.retry_step)
            and (max_steps is None or step + self.learn_steps <= max_steps)
        )

    @property
    def wants_gradient(self) -> bool:
        """Whether a strategy ranks heads by gradient importance (:meth:`start` then needs ``importance``)."""
        return "gradient" in self.pruning_strategies or "gradient" in self.growth_strategies

    def summary(self, record: dict[str, Any]) -> dict[str, float]:
        """The scalars to log of a cycle's record.

        At its start: perplexities, pruned and grown heads; once :meth:`finish` has judged it: final perplexity,
        degeneration, success, live heads kept, the ratings.
        """
        if "after" not in record:
            return {
                "perplexity_before": record["before"]["perplexity"],
                "perplexity_after_pruning": record["after_pruning"]["perplexity"],
                "pruned_heads": len(record["pruned"]),
                "grown_heads": len(record["grown"]),
            }
        after, success = record["after"], record["success"]
        return {
            "perplexity_after": after["perplexity"],
            "degeneration": after["degeneration"],
            "success": float(success),
            "live_heads": after["live_heads"] if success else record["before"]["live_heads"],
            **{f"rating/{k}": v for k, v in self.ratings.items()},
        }

    # ------------------------------------------------------------------ judging
    def judge(self, before: dict[str, float], after: dict[str, float]) -> bool:
        """Whether a cycle that went from ``before`` to ``after`` succeeded (NaN fails every comparison)."""
        return after["perplexity"] <= before["perplexity"] * (1 + self.max_perplexity_increase) and (
            self.max_degeneration is None or after["degeneration"] <= self.max_degeneration
        )

    def conclude(self, after: dict[str, float], success: bool, step: int) -> dict[str, Any]:
        """Close the running cycle.

        Rate, remember, adapt, track the best, record it, maybe stop; returns the cycle's record.
        """
        record, self.current = self.current, None
        before = record["before"]
        self.snapshot = None
        improvement = (before["perplexity"] - after["perplexity"]) / before["perplexity"]
        head_reduction = (before["live_heads"] - after["live_heads"]) / before["live_heads"]
        for key in (f"prune/{record['prune_strategy']}", f"grow/{record['growth_strategy']}"):
            if key in self.ratings:
                self.ratings[key] = updated_rating(self.ratings[key], success, improvement)
        if success and not record["replay"] and self.memory_capacity:
            self.memory.append(
                {
                    **{k: record[k] for k in ("prune_strategy", "growth_strategy", "prune_level", "growth_ratio")},
                    "improvement": improvement + 0.5 * head_reduction,
                    "cycle": record["cycle"],
                }
            )
            self.memory = self.memory[-self.memory_capacity :]
        if self.adapt:
            self._adapt(success, improvement)
        self._track_best(success, after)
        record.update(after=after, success=success, reverted=not success, end_step=step)
        self.history.append(record)
        if self.stopped is None and len(self.history) >= self.max_cycles:
            self.stopped = "max_cycles"
        return record

    def _adapt(self, success: bool, improvement: float) -> None:
        if success and improvement > 0.05:
            self.prune_level = min(self.prune_level * 1.2, 0.5)
            self.learn_steps = max(1, round(self.learn_steps * 0.9))
        elif success:
            self.prune_level = min(self.prune_level * 1.1, 0.4)
        else:
            self.prune_level = max(self.prune_level * 0.8, 0.05)
            self.growth_ratio = min(self.growth_ratio * 1.2, 0.9)
            self.learn_steps = max(1, round(self.learn_steps * 1.2))

    def _track_best(self, success: bool, after: dict[str, float]) -> None:
        if success:
            best = self.best
            better = best is None or after["perplexity"] < best["perplexity"] * (1 - self.min_improvement)
            leaner = (
                best is not None
                and after["live_heads"] < best["live_heads"]
                and after["perplexity"] <= best["perplexity"] * (1 + self.max_perplexity_increase)
            )
            if better or leaner:
                self.best, self.stale = dict(after), 0
                return
        self.stale += 1
        if self.patience is not None and self.stale >= self.patience:
            self.stopped = "patience"

    # ------------------------------------------------------------------ snapshot
    def take_snapshot(
        self, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer], gates: Any, reviver: Any
    ) -> None:
        """Copy parameters, optimizer states, gates and reviver state to the CPU, for :meth:`restore_snapshot`.

        About three model copies with Adam.
        """
        self.snapshot = {
            "model": _to_cpu(model.state_dict()),
            "optimizers": [_to_cpu(optimizer.state_dict()["state"]) for optimizer in optimizers],
            "gates": gates.mask.cpu(),
            "reviver": reviver.state_dict(),
        }

    def restore_snapshot(
        self, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer], gates: Any, reviver: Any
    ) -> None:
        """Restore :meth:`take_snapshot`'s copy exactly.

        Into the existing parameters, which DDP and the optimizers keep referring to; the optimizers keep their
        current param groups (a scheduler's learning rates).
        """
        snapshot = self.snapshot
        model.load_state_dict(snapshot["model"])
        for optimizer, state in zip(optimizers, snapshot["optimizers"], strict=True):
            current = optimizer.state_dict()
            optimizer.load_state_dict({**current, "state": state})
        gates.load(snapshot["gates"])
        reviver.load_state_dict(snapshot["reviver"])

    # ------------------------------------------------------------------ record and state
    def record(self) -> dict[str, Any]:
        """Cycles, ratings, memory, levels and the stop reason (what the callback writes as JSON)."""
        return {
            "cycles": self.history,
            "ratings": self.ratings,
            "memory": self.memory,
            "best": self.best,
            "prune_level": self.prune_level,
            "growth_ratio": self.growth_ratio,
            "learn_steps": self.learn_steps,
            "stopped": self.stopped,
            "unfinished": self.current,  # a cycle cut short by the end of training (not judged, not reverted)
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            **self.record(),
            "stale": self.stale,
            "current": self.current,
            "snapshot": self.snapshot,
            "retry_step": self.retry_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.history = list(state_dict.get("cycles", []))
        self.ratings.update(state_dict.get("ratings", {}))
        self.memory = list(state_dict.get("memory", []))
        self.best = state_dict.get("best")
        self.prune_level = state_dict.get("prune_level", self.prune_level)
        self.growth_ratio = state_dict.get("growth_ratio", self.growth_ratio)
        self.learn_steps = state_dict.get("learn_steps", self.learn_steps)
        self.stopped = state_dict.get("stopped")
        self.stale = int(state_dict.get("stale", 0))
        self.current = state_dict.get("current", state_dict.get("unfinished"))
        self.snapshot = state_dict.get("snapshot")
        self.retry_step = int(state_dict.get("retry_step", 0))


def _to_cpu(collection: Any) -> Any:
    return apply_to_collection(collection, torch.Tensor, lambda t: t.detach().to("cpu", copy=True))


def _check_strategies(owner: str, name: str, values: Any, allowed: Sequence[str]) -> list[str]:
    if isinstance(values, str) or not values or any(v not in allowed for v in values) or len(set(values)) < len(values):
        raise PlasticityConfigError(
            f"{owner}.{name}={values!r} is invalid; expected a non-empty list of distinct entries drawn from "
            f"{', '.join(allowed)}"
        )
    return tuple(values)
