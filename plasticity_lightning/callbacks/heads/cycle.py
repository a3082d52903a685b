"""The prune → measure → grow → learn cycle of attention heads, judged, kept or reverted, with strategy ratings: a
callback over :class:`~plasticity_lightning.policies.heads.CycleController`.

This is the working version of Sentinel-AI's ``AdaptivePlasticitySystem`` (Sentinel-AI,
https://github.com/CambrianTech/sentinel-ai), whose shipped code scores heads and perplexity with random
placeholders and adds random jitter to its degeneration score. Here every number is measured: perplexity on a fixed
validation probe, degeneration of seeded generations, head scores from gradients, attention entropy or weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from plasticity_lightning.callbacks.heads.growth import HeadGrowth, RevivingIntervention
from plasticity_lightning.callbacks.heads.importance import HeadImportance, find_head_importance, require_validation
from plasticity_lightning.callbacks.heads.monitors import check_prompts, resolve_tokenizer, score_generations
from plasticity_lightning.callbacks.heads.pruning import HeadPruning
from plasticity_lightning.core.batches import token_ids
from plasticity_lightning.core.errors import PlasticityConfigError, check_choice, check_positive_int
from plasticity_lightning.core.files import write_text_atomic
from plasticity_lightning.core.rundir import PLASTICITY_CYCLE_FILE, run_directory
from plasticity_lightning.core.serialization import json_safe
from plasticity_lightning.policies.heads.cycle import CycleController
from plasticity_lightning.policies.heads.selection import (
    NonFiniteScores,
    choose_heads_to_grow,
    head_scores,
    language_model,
    lowest_heads,
)
from plasticity_lightning.probes import ProbeSet

#: the settings the controller validates and holds (the callback's other arguments are its own)
_CONTROLLER_ARGS = (
    "learn_steps",
    "max_cycles",
    "prune_level",
    "growth_ratio",
    "pruning_strategies",
    "growth_strategies",
    "max_perplexity_increase",
    "max_degeneration",
    "memory_capacity",
    "memory_replay",
    "adapt",
    "patience",
    "min_improvement",
)


class PlasticityCycle(RevivingIntervention):
    """Cycles of prune → measure → grow → learn on attention heads, each judged and kept or reverted.

    From optimizer step ``start_step`` on, each cycle:

    1. measures the perplexity on a fixed validation probe and the degeneration of seeded generations, and
       snapshots parameters, optimizer states, gates and growth state;
    2. chooses a pruning and a growth strategy — with probability ``memory_replay`` a remembered successful
       transformation (weighted by its improvement), else each sampled in proportion to its rating;
    3. prunes ``max(1, int(prune_level · live heads))`` heads of lowest score (never a layer's last head) and
       measures the perplexity again;
    4. revives ``max(1, int(growth_ratio · dead heads))`` heads (fresh weights, gate ramp, boosted learning rate:
       :class:`~plasticity_lightning.policies.heads.HeadReviver`);
    5. lets training run ``learn_steps`` optimizer steps, then measures again. The cycle succeeds when the
       perplexity is at most ``(1 + max_perplexity_increase)`` × the cycle's first one and the degeneration
       metric at most ``max_degeneration``; a failed cycle restores the snapshot exactly.

    Ratings follow :func:`updated_rating`. A successful cycle that was not a replay is remembered (the last
    ``memory_capacity``) with improvement = relative perplexity drop + 0.5 × relative drop in live heads. With
    ``adapt``, Sentinel-AI's schedule adapts the levels: after a success the prune level grows (×1.2 up to 0.5 when
    perplexity improved by over 5%, else ×1.1 up to 0.4; learning ×0.9 steps after a big gain); after a failure it
    shrinks (×0.8, at least 0.05) while the growth ratio (×1.2, at most 0.9) and learning steps (×1.2) grow. After
    ``patience`` cycles without a new best (perplexity better by ``min_improvement``, or fewer live heads at a
    perplexity within tolerance), or ``max_cycles`` cycles, cycling stops and training goes on.

    Every rank measures the same probe with the same weights, and rank 0's measurements and choices are broadcast,
    so all ranks prune, grow and revert alike. Everything — snapshot included (about three model copies with Adam)
    — is in ``state_dict``, so a run resumed mid-cycle finishes it as the uninterrupted run would. The record of
    cycles, ratings and memory is written to ``<log_dir>/plasticity_cycle.json`` after each cycle.

    A cycle is not started on NaN/inf statistics: when the first perplexity or the head scores a strategy ranks by
    are not finite, nothing is pruned or grown (a pruning already made is undone), the skip is counted in
    ``cycle/skipped_nonfinite`` (the first one warns) and the next try comes ``learn_steps`` steps later. A cycle
    whose final perplexity is NaN/inf fails its judgement and is reverted.

    Needs a :class:`HeadImportance` before it (its gates; its gradient importance for ``"gradient"`` pruning or
    growth), and no :class:`HeadPruning` or :class:`HeadGrowth` on the same trainer (they would change the gates
    mid-cycle). The tokenizer is ``tokenizer`` or the datamodule's.

    Args:
        start_step: optimizer step of the first cycle.
        learn_steps: optimizer steps of the learning phase.
        max_cycles: cycles at most.
        prune_level: starting share of live heads pruned per cycle.
        growth_ratio: starting share of dead heads revived per cycle.
        pruning_strategies: head scores to choose among (``gradient``, ``entropy``, ``magnitude``, ``random``).
        growth_strategies: growth choices (``balanced``, ``entropy_gap``, ``gradient``, ``random``).
        max_perplexity_increase: allowed relative perplexity rise over a cycle.
        max_degeneration: upper bound of ``degeneration_metric`` (``None``: not judged).
        degeneration_metric: ``repeated_3gram_rate`` or ``max_token_repetition`` (lower is better).
        memory_capacity: successful transformations remembered.
        memory_replay: probability of replaying one.
        adapt: adapt prune level, growth ratio and learning steps between cycles.
        patience: cycles without a new best before cycling stops (``None``: never).
        min_improvement: relative perplexity gain that makes a new best.
        probe_size: validation blocks of the perplexity probe.
        prompts, max_new_tokens, tokenizer: generation for the degeneration check.
        output_scale, warmup_steps, initial_gate, lr_multiplier, boost_steps: revived heads (``ReviverSettings``;
            the defaults are :data:`~plasticity_lightning.policies.heads.CYCLE_REVIVER_SETTINGS`: a shorter ramp
            and boost, so that both end within a cycle's learning phase).
        json_path: where to write the record (``None``: ``<log_dir>/plasticity_cycle.json``).
        seed: seed of every random choice.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[HeadImportance(num_batches=20), PlasticityCycle(learn_steps=200)])
    """

    policy: CycleController

    def __init__(
        self,
        start_step: int = 100,
        learn_steps: int = 100,
        max_cycles: int = 10,
        prune_level: float = 0.2,
        growth_ratio: float = 0.5,
        pruning_strategies: Sequence[str] = ("gradient", "entropy", "magnitude", "random"),
        growth_strategies: Sequence[str] = ("balanced", "entropy_gap", "gradient", "random"),
        max_perplexity_increase: float = 0.15,
        max_degeneration: float | None = 0.5,
        degeneration_metric: Literal["repeated_3gram_rate", "max_token_repetition"] = "repeated_3gram_rate",
        memory_capacity: int = 10,
        memory_replay: float = 0.7,
        adapt: bool = True,
        patience: int | None = 3,
        min_improvement: float = 0.01,
        probe_size: int = 16,
        prompts: Sequence[str] = ("The", "It was", "And then"),
        max_new_tokens: int = 32,
        tokenizer: Any = None,
        output_scale: float = 0.01,
        warmup_steps: int = 20,
        initial_gate: float = 0.0,
        lr_multiplier: float = 5.0,
        boost_steps: int = 100,
        json_path: str | None = None,
        seed: int = 0,
        prefix: str = "cycle",
    ) -> None:
        arguments = locals()
        owner = "PlasticityCycle"
        controller = CycleController(seed=seed, owner=owner, **{name: arguments[name] for name in _CONTROLLER_ARGS})
        super().__init__(
            output_scale=output_scale,
            warmup_steps=warmup_steps,
            initial_gate=initial_gate,
            lr_multiplier=lr_multiplier,
            boost_steps=boost_steps,
            seed=seed,
            prefix=prefix,
            policy=controller,
        )
        self.start_step = check_positive_int(owner, "start_step", start_step, allow_zero=True)
        self.degeneration_metric = check_choice(
            owner, "degeneration_metric", degeneration_metric, ("repeated_3gram_rate", "max_token_repetition")
        )
        self.probe = ProbeSet(size=probe_size, source="val", seed=seed, owner=owner)
        self.prompts = check_prompts(owner, prompts)
        self.max_new_tokens = check_positive_int(owner, "max_new_tokens", max_new_tokens)
        self.tokenizer = tokenizer
        self.json_path = json_path
        self._initial = {"start_step": self.start_step, "learn_steps": controller.learn_steps}  # learn_steps adapts
        self._importance: HeadImportance | None = None

    @property
    def controller(self) -> CycleController:
        """The ratings, memory, levels and record of the cycles."""
        return self.policy

    @override
    def settings(self) -> dict[str, Any]:
        return {**super().settings(), **self._initial}

    # ------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._importance = find_head_importance(trainer, "PlasticityCycle")
        rivals = [type(c).__name__ for c in trainer.callbacks if isinstance(c, (HeadPruning, HeadGrowth))]
        if rivals:
            raise PlasticityConfigError(
                f"PlasticityCycle prunes and grows heads itself; remove {', '.join(rivals)} from the trainer (they "
                "would change the gates mid-cycle)"
            )
        controller = self.controller
        wants_gradient = "gradient" in controller.pruning_strategies or "gradient" in controller.growth_strategies
        if wants_gradient and self._importance.method != "gradient":
            raise PlasticityConfigError(
                "PlasticityCycle's 'gradient' strategies need HeadImportance(method='gradient'), got "
                f"method={self._importance.method!r}; drop 'gradient' from pruning_strategies/growth_strategies"
            )
        resolve_tokenizer(trainer, self.tokenizer, "PlasticityCycle")
        require_validation(trainer, pl_module, "PlasticityCycle")
        self.start_reviver(trainer, self._importance.gates)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self.write_json(trainer)

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.controller.due(step):
            self.finish_cycle(trainer, pl_module)
        if self.controller.ready(step, self.start_step) and self._room(trainer):
            self.start_cycle(trainer, pl_module)

    def _room(self, trainer: pl.Trainer) -> bool:
        """Whether a whole cycle fits before ``max_steps``: an unfinished cycle would leave heads pruned and revived
        heads unjudged (and unrevertable)."""
        return (
            trainer.max_steps is None
            or trainer.max_steps < 0
            or (trainer.global_step + self.controller.learn_steps <= trainer.max_steps)
        )

    # ------------------------------------------------------------------ measuring
    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Perplexity on the validation probe, degeneration of the seeded generations, live heads — rank 0's."""
        model = language_model(pl_module)
        ids = token_ids(self.probe.draw(trainer))
        was_training = model.training
        model.eval()
        with trainer.precision_plugin.forward_context():
            loss = float(model(ids, labels=ids).loss)
        model.train(was_training)
        # a diverged model has no text to judge (sampling from NaN probabilities fails): NaN fails every judgement
        degeneration = math.nan
        if math.isfinite(loss):
            tokenizer = resolve_tokenizer(trainer, self.tokenizer, "PlasticityCycle")
            scores, _ = score_generations(pl_module, tokenizer, self.prompts, self.max_new_tokens, self.seed)
            degeneration = scores[self.degeneration_metric]
        values = {
            "perplexity": math.inf if loss == math.inf else math.exp(min(loss, 700.0)),  # NaN stays NaN
            "degeneration": degeneration,
            "live_heads": int((self._importance.gates.mask > 0).sum()),
        }
        return trainer.strategy.broadcast(values, src=0)

    # ------------------------------------------------------------------ the cycle
    def start_cycle(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Steps 1–4: measure, snapshot, choose, prune, measure, grow."""
        before = self.evaluate(trainer, pl_module)
        if not math.isfinite(before["perplexity"]):  # nothing to judge a cycle against
            self._skip_cycle(trainer, "perplexity")
            return
        controller, gates = self.controller, self._importance.gates
        controller.take_snapshot(pl_module, self.optimizers(trainer), gates, self.reviver)
        plan = trainer.strategy.broadcast(controller.plan(), src=0)
        ids = token_ids(self.probe.draw(trainer))
        importance = self._importance.current(trainer) if self._importance.method == "gradient" else None
        try:
            pruned, after_pruning, grown = self._prune_and_grow(trainer, pl_module, plan, ids, importance)
        except NonFiniteScores as skipped:  # the same scores on every rank: all ranks skip
            controller.restore_snapshot(pl_module, self.optimizers(trainer), gates, self.reviver)  # a pruning's gates
            controller.snapshot = None
            self._skip_cycle(trainer, skipped.what)
            return
        controller.begin(
            trainer.global_step,
            {
                **plan,
                "pruned": [list(h) for h in pruned],
                "grown": [list(h) for h in grown],
                "before": before,
                "after_pruning": after_pruning,
            },
        )
        self.log_values(
            trainer,
            {
                "perplexity_before": before["perplexity"],
                "perplexity_after_pruning": after_pruning["perplexity"],
                "pruned_heads": len(pruned),
                "grown_heads": len(grown),
            },
            force=True,
        )

    def _prune_and_grow(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        plan: dict[str, Any],
        ids: torch.Tensor,
        importance: torch.Tensor | None,
    ) -> tuple[list[tuple[int, int]], dict[str, float], list[tuple[int, int]]]:
        """Steps 3–4: prune the lowest-scored heads, measure, revive heads (:class:`NonFiniteScores` on NaN/inf
        scores, before the revival)."""
        gates = self._importance.gates
        alive = gates.mask.cpu() > 0
        count = max(1, int(plan["prune_level"] * int(alive.sum())))
        scores = head_scores(
            plan["prune_strategy"], pl_module, gates, importance=importance, input_ids=ids, generator=self.generator
        )
        pruned = trainer.strategy.broadcast(lowest_heads(scores, alive, count, plan["prune_strategy"]), src=0)
        for layer, head in pruned:
            gates.set(layer, head, 0.0)
        after_pruning = self.evaluate(trainer, pl_module)

        dead = int((gates.mask == 0).sum())
        grow_count = max(1, int(plan["growth_ratio"] * dead)) if dead else 0
        grown = choose_heads_to_grow(
            plan["growth_strategy"],
            pl_module,
            gates,
            grow_count,
            importance=importance,
            input_ids=ids,
            generator=self.generator,
        )
        grown = trainer.strategy.broadcast(grown, src=0)
        if grown:
            self.reviver.revive(
                grown, trainer.global_step, generator=self.generator, optimizers=self.optimizers(trainer)
            )
        return pruned, after_pruning, grown

    def _skip_cycle(self, trainer: pl.Trainer, what: str) -> None:
        self.skip_nonfinite(trainer, what)
        self.controller.skip(trainer.global_step)

    def finish_cycle(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Step 5: measure, judge, keep or revert, rate, remember, adapt."""
        controller = self.controller
        after = self.evaluate(trainer, pl_module)
        before = controller.current["before"]
        success = controller.judge(before, after)
        if not success:
            controller.restore_snapshot(pl_module, self.optimizers(trainer), self._importance.gates, self.reviver)
        controller.conclude(after, success, trainer.global_step)
        self.log_values(
            trainer,
            {
                "perplexity_after": after["perplexity"],
                "degeneration": after["degeneration"],
                "success": float(success),
                "live_heads": after["live_heads"] if success else before["live_heads"],
                **{f"rating/{k}": v for k, v in controller.ratings.items()},
            },
            force=True,
        )
        self.write_json(trainer)

    # ------------------------------------------------------------------ record
    def record(self) -> dict[str, Any]:
        """Cycles, ratings, memory, levels and the stop reason (what :meth:`write_json` writes)."""
        return self.controller.record()

    def write_json(self, trainer: pl.Trainer) -> Path | None:
        """Write :meth:`record` on rank 0; returns the path."""
        # run_directory broadcasts from rank 0: every rank must ask, or the ranks' collectives fall out of step
        path = Path(self.json_path or run_directory(trainer) / PLASTICITY_CYCLE_FILE)
        if not trainer.is_global_zero:
            return None
        # strict JSON: a diverged perplexity (inf/NaN) is written as null
        return write_text_atomic(path, json.dumps(json_safe(self.record()), indent=2, allow_nan=False))


# The controller's settings and record read as the callback's own (cycle.history, cycle.ratings, cycle.prune_level,
# ...), as before the controller was split out; they are changed through the controller only.
_STATE = ("ratings", "memory", "history", "best", "stale", "stopped", "current", "snapshot", "retry_step")
for _name in (*_CONTROLLER_ARGS, *_STATE):
    setattr(PlasticityCycle, _name, property(lambda self, name=_name: getattr(self.policy, name)))
