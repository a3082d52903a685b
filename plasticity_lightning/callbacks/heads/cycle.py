"""The prune → measure → grow → learn cycle of attention heads in a Lightning fit: a callback over
:class:`~plasticity_lightning.policies.heads.CycleController`, which holds the cycle itself.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from typing_extensions import override

from plasticity_lightning.callbacks.heads.growth import HeadGrowth, RevivingIntervention
from plasticity_lightning.callbacks.heads.importance import HeadImportance, find_head_importance, require_validation
from plasticity_lightning.callbacks.heads.monitors import check_prompts, resolve_tokenizer
from plasticity_lightning.callbacks.heads.pruning import HeadPruning
from plasticity_lightning.core.batches import token_ids
from plasticity_lightning.core.errors import PlasticityConfigError, check_choice, check_positive_int
from plasticity_lightning.core.files import write_text_atomic
from plasticity_lightning.core.rundir import PLASTICITY_CYCLE_FILE, run_directory
from plasticity_lightning.core.serialization import json_safe
from plasticity_lightning.policies.heads.cycle import CycleController, CycleSettings
from plasticity_lightning.policies.heads.measures import cycle_measures
from plasticity_lightning.policies.heads.reviver import CYCLE_REVIVER_SETTINGS, ReviverSettings
from plasticity_lightning.policies.heads.selection import NonFiniteScores
from plasticity_lightning.probes import ProbeSet


class PlasticityCycle(RevivingIntervention):
    """Cycles of prune → measure → grow → learn on attention heads, each judged and kept or reverted: the Lightning
    adapter of :class:`~plasticity_lightning.policies.heads.CycleController`, which holds the cycle, its judgement,
    the ratings, memory and adaptation (read there how a cycle runs).

    This callback decides *when*: the first cycle starts at optimizer step ``start_step`` (and only if a whole
    cycle fits before ``max_steps``), and a cycle ends after its ``learn_steps``. It measures on the trainer: the
    perplexity on a fixed validation probe (``probe_size`` blocks), the degeneration of seeded generations of
    ``prompts`` (``degeneration_metric``), the live heads. Under DDP every rank measures the same probe with the
    same weights and rank 0's measurements and choices are broadcast, so all ranks prune, grow and revert alike.
    Everything, the snapshot included, is in ``state_dict``, so a run resumed mid-cycle finishes it as the
    uninterrupted run would. The record of cycles, ratings and memory is written to
    ``<log_dir>/plasticity_cycle.json`` after each cycle. A cycle skipped on NaN/inf statistics is counted in
    ``cycle/skipped_nonfinite`` (the first one warns).

    Needs a :class:`HeadImportance` before it (its gates; its gradient importance for ``"gradient"`` pruning or
    growth), and no :class:`HeadPruning` or :class:`HeadGrowth` on the same trainer (they would change the gates
    mid-cycle). The tokenizer is ``tokenizer`` or the datamodule's.

    Args:
        start_step: optimizer step of the first cycle.
        cycle: the cycle's settings (learning steps, levels, strategies, judgement, memory, adaptation, stop rule):
            :class:`~plasticity_lightning.policies.heads.CycleSettings`, by default its defaults (in a YAML:
            ``cycle: {learn_steps: 100, max_cycles: 6}``).
        degeneration_metric: ``repeated_3gram_rate`` or ``max_token_repetition`` (lower is better).
        probe_size: validation blocks of the perplexity probe.
        prompts: prompts whose seeded continuations are scored for degeneration.
        max_new_tokens: tokens generated per prompt.
        tokenizer: encodes the prompts (``None``: the datamodule's).
        reviver: how revived heads start and learn again:
            :class:`~plasticity_lightning.policies.heads.ReviverSettings`, by default
            :data:`~plasticity_lightning.policies.heads.CYCLE_REVIVER_SETTINGS` (a shorter ramp and boost than
            growth's, so that both end within a cycle's learning phase; a YAML ``reviver: {warmup_steps: 10}``
            changes only that field of it).
        json_path: where to write the record (``None``: ``<log_dir>/plasticity_cycle.json``).
        seed: seed of every random choice.
        prefix: first part of every logged key.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> from plasticity_lightning.policies.heads import CycleSettings
        >>> cycle = PlasticityCycle(start_step=400, cycle=CycleSettings(learn_steps=200))
        >>> trainer = Trainer(callbacks=[HeadImportance(num_batches=20), cycle])
    """

    policy: CycleController

    def __init__(
        self,
        start_step: int = 100,
        cycle: CycleSettings = CycleSettings(),  # noqa: B008 (frozen: one shared default is safe)
        degeneration_metric: Literal["repeated_3gram_rate", "max_token_repetition"] = "repeated_3gram_rate",
        probe_size: int = 16,
        prompts: Sequence[str] = ("The", "It was", "And then"),
        max_new_tokens: int = 32,
        tokenizer: Any = None,
        reviver: ReviverSettings = CYCLE_REVIVER_SETTINGS,
        json_path: str | None = None,
        seed: int = 0,
        prefix: str = "cycle",
    ) -> None:
        owner = "PlasticityCycle"
        if not isinstance(cycle, CycleSettings):
            raise PlasticityConfigError(f"{owner}.cycle={cycle!r} is invalid; expected a CycleSettings")
        # validated when it was built; re-owned so that the controller's messages name this callback
        controller = CycleController(dataclasses.replace(cycle, owner=owner), seed=seed)
        super().__init__(reviver=reviver, seed=seed, prefix=prefix, policy=controller)
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
        controller.optimizers = self.optimizers(trainer)
        controller.broadcast = lambda value: trainer.strategy.broadcast(value, src=0)

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
        heads unjudged (and unrevertable).
        """
        return (
            trainer.max_steps is None
            or trainer.max_steps < 0
            or (trainer.global_step + self.controller.learn_steps <= trainer.max_steps)
        )

    def start_cycle(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start a cycle now (:meth:`CycleController.start`), or count and warn a skip on NaN/inf statistics."""
        gradient = self._importance.method == "gradient"
        try:
            record = self.controller.start(
                trainer.global_step,
                pl_module,
                self._importance.gates,
                self.reviver,
                lambda: self.evaluate(trainer, pl_module),
                input_ids=token_ids(self.probe.draw(trainer)),
                importance=self._importance.current(trainer) if gradient else None,
            )
        except NonFiniteScores as skipped:  # the same statistics on every rank: all ranks skip
            self.skip_nonfinite(trainer, skipped.what)
            return
        before, after = record["before"], record["after_pruning"]
        values = {"perplexity_before": before["perplexity"], "perplexity_after_pruning": after["perplexity"]}
        self.log_values(
            trainer, {**values, "pruned_heads": len(record["pruned"]), "grown_heads": len(record["grown"])}, force=True
        )

    def finish_cycle(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """End the cycle in its learning phase now (:meth:`CycleController.finish`), log it and write the record."""
        record = self.controller.finish(
            trainer.global_step,
            pl_module,
            self._importance.gates,
            self.reviver,
            lambda: self.evaluate(trainer, pl_module),
        )
        after, success = record["after"], record["success"]
        self.log_values(
            trainer,
            {
                "perplexity_after": after["perplexity"],
                "degeneration": after["degeneration"],
                "success": float(success),
                "live_heads": after["live_heads"] if success else record["before"]["live_heads"],
                **{f"rating/{k}": v for k, v in self.controller.ratings.items()},
            },
            force=True,
        )
        self.write_json(trainer)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Perplexity on the validation probe, degeneration of the seeded generations, live heads — rank 0's."""
        values = cycle_measures(
            pl_module,
            self._importance.gates,
            token_ids(self.probe.draw(trainer)),
            resolve_tokenizer(trainer, self.tokenizer, "PlasticityCycle"),
            self.prompts,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            metric=self.degeneration_metric,
            forward_context=trainer.precision_plugin.forward_context,
        )
        return trainer.strategy.broadcast(values, src=0)

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
for _name in (*CycleSettings().values(), *_STATE):
    setattr(PlasticityCycle, _name, property(lambda self, name=_name: getattr(self.policy, name)))
