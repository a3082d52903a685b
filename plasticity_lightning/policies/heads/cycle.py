"""The controller of the prune → measure → grow → learn cycle of attention heads (Sentinel-AI's
``AdaptivePlasticitySystem``, with every number measured): strategy ratings, a memory of successful
transformations, adaptation of the levels, the judgement of a cycle, the stop rule and the snapshot a failed cycle
is reverted to. A plain object with its own generator; :class:`~plasticity_lightning.callbacks.PlasticityCycle`
drives it from a Lightning fit, a hand-written loop can drive it the same way."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
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
from plasticity_lightning.policies.base import Policy
from plasticity_lightning.policies.heads.selection import GROWTH_CHOICES, HEAD_SCORES

#: Sentinel-AI's starting ratings: random strategies start at half the others'
INITIAL_RATING = {"random": 0.5}
RATING_RANGE = (0.1, 10.0)


def updated_rating(rating: float, success: bool, improvement: float) -> float:
    """Sentinel-AI's rating rule: success multiplies by 1 + clip(improvement, 0, 0.5), failure by 0.8; the result is
    kept in [0.1, 10].

    Example::

        >>> updated_rating(1.0, True, 0.2), updated_rating(1.0, True, 0.9), updated_rating(0.11, False, 0.0)
        (1.2, 1.5, 0.1)
    """
    factor = 1.0 + min(max(improvement, 0.0), 0.5) if success else 0.8
    return min(max(rating * factor, RATING_RANGE[0]), RATING_RANGE[1])


class CycleController(Policy):
    """What a cycle decides, and what it remembers between cycles.

    :meth:`plan` chooses a pruning and a growth strategy and their levels — with probability ``memory_replay`` a
    remembered successful transformation (weighted by its improvement), else each strategy drawn in proportion to
    its rating. :meth:`judge` says whether a cycle succeeded: its perplexity at most ``(1 + max_perplexity_increase)``
    × its first one, and its degeneration at most ``max_degeneration``. :meth:`conclude` updates the ratings
    (:func:`updated_rating`), remembers a successful cycle that was not a replay (the last ``memory_capacity``) with
    improvement = relative perplexity drop + 0.5 × relative drop in live heads, adapts the levels (``adapt``) and
    stops after ``patience`` cycles without a new best or after ``max_cycles``. :meth:`take_snapshot` and
    :meth:`restore_snapshot` copy and restore parameters, optimizer states, gates and reviver state for a failed
    cycle. All of it is in :meth:`state_dict`.

    Args:
        learn_steps, max_cycles, prune_level, growth_ratio, pruning_strategies, growth_strategies,
            max_perplexity_increase, max_degeneration, memory_capacity, memory_replay, adapt, patience,
            min_improvement: see :class:`~plasticity_lightning.callbacks.PlasticityCycle`.
        seed: seed of every random choice.
        owner: the name in error messages.
    """

    def __init__(
        self,
        learn_steps: int = 100,
        max_cycles: int = 10,
        prune_level: float = 0.2,
        growth_ratio: float = 0.5,
        pruning_strategies: Sequence[str] = ("gradient", "entropy", "magnitude", "random"),
        growth_strategies: Sequence[str] = ("balanced", "entropy_gap", "gradient", "random"),
        max_perplexity_increase: float = 0.15,
        max_degeneration: float | None = 0.5,
        memory_capacity: int = 10,
        memory_replay: float = 0.7,
        adapt: bool = True,
        patience: int | None = 3,
        min_improvement: float = 0.01,
        seed: int = 0,
        owner: str = "CycleController",
    ) -> None:
        super().__init__(seed=seed, prefix="cycle")
        self.owner = owner
        self.learn_steps = check_positive_int(owner, "learn_steps", learn_steps)
        self.max_cycles = check_positive_int(owner, "max_cycles", max_cycles)
        self.prune_level = check_fraction(owner, "prune_level", prune_level, low_open=True)
        self.growth_ratio = check_fraction(owner, "growth_ratio", growth_ratio, low_open=True, high_open=False)
        self.pruning_strategies = _check_strategies(owner, "pruning_strategies", pruning_strategies, HEAD_SCORES)
        self.growth_strategies = _check_strategies(owner, "growth_strategies", growth_strategies, GROWTH_CHOICES)
        self.max_perplexity_increase = check_positive_float(
            owner, "max_perplexity_increase", max_perplexity_increase, allow_zero=True
        )
        self.max_degeneration = (
            None
            if max_degeneration is None
            else check_positive_float(owner, "max_degeneration", max_degeneration, allow_zero=True)
        )
        self.memory_capacity = check_positive_int(owner, "memory_capacity", memory_capacity, allow_zero=True)
        self.memory_replay = check_fraction(owner, "memory_replay", memory_replay, high_open=False)
        if not isinstance(adapt, bool):
            raise PlasticityConfigError(f"{owner}.adapt={adapt!r} is invalid; expected true or false")
        self.adapt = adapt
        self.patience = None if patience is None else check_positive_int(owner, "patience", patience)
        self.min_improvement = check_positive_float(owner, "min_improvement", min_improvement, allow_zero=True)

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
        """Enter the learning phase, from optimizer step ``start_step``, of the cycle described by ``record`` (its
        plan, heads and measurements)."""
        self.current = {"cycle": len(self.history), "start_step": start_step, "learn_steps": self.learn_steps, **record}

    def skip(self, step: int) -> None:
        """A cycle skipped on NaN/inf statistics at ``step``: the next try comes ``learn_steps`` later."""
        self.retry_step = step + self.learn_steps

    def due(self, step: int) -> bool:
        """Whether the cycle in its learning phase has learned its ``learn_steps`` at optimizer step ``step``."""
        return self.current is not None and step - self.current["start_step"] >= self.current["learn_steps"]

    def ready(self, step: int, start_step: int) -> bool:
        """Whether a new cycle may start at ``step`` (none running, not stopped, past ``start_step`` and a retry)."""
        return self.current is None and self.stopped is None and step >= max(start_step, self.retry_step)

    # ------------------------------------------------------------------ judging
    def judge(self, before: dict[str, float], after: dict[str, float]) -> bool:
        """Whether a cycle that went from ``before`` to ``after`` succeeded (NaN fails every comparison)."""
        return after["perplexity"] <= before["perplexity"] * (1 + self.max_perplexity_increase) and (
            self.max_degeneration is None or after["degeneration"] <= self.max_degeneration
        )

    def conclude(self, after: dict[str, float], success: bool, step: int) -> dict[str, Any]:
        """Close the running cycle: rate, remember, adapt, track the best, record it, maybe stop; returns the
        cycle's record."""
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
        """Copy parameters, optimizer states, gates and reviver state to the CPU (about three model copies with
        Adam), for :meth:`restore_snapshot`."""
        self.snapshot = {
            "model": _to_cpu(model.state_dict()),
            "optimizers": [_to_cpu(optimizer.state_dict()["state"]) for optimizer in optimizers],
            "gates": gates.mask.cpu(),
            "reviver": reviver.state_dict(),
        }

    def restore_snapshot(
        self, model: nn.Module, optimizers: Iterable[torch.optim.Optimizer], gates: Any, reviver: Any
    ) -> None:
        """Restore :meth:`take_snapshot`'s copy exactly (into the existing parameters, which DDP and the optimizers
        keep referring to; the optimizers keep their current param groups: a scheduler's learning rates)."""
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
    return list(values)
