"""The prune → measure → grow → learn cycle of attention heads in a Lightning fit.

A callback over :class:`~plasticity_lightning.policies.heads.CycleController`, which holds the cycle itself.
"""

from __future__ import annotations

import functools
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
    """Cycles of prune → measure → grow → learn on attention heads, each judged and kept or reverted.

    The Lightning adapter of :class:`~plasticity_lightning.policies.heads.CycleController`, which holds the cycle, its
    judgement, ratings, memory and adaptation (read there how a cycle runs). This callback decides *when*: a cycle
    starts from optimizer step ``start_step`` if it fits before ``max_steps`` and ends after its ``learn_steps``.
    It measures on the trainer: perplexity on a fixed validation probe, degeneration of seeded generations of
    ``prompts``, live heads. Under DDP rank 0's measurements and choices are broadcast, so all ranks prune, grow and
    revert alike. Everything, the snapshot included, is in ``state_dict`` (a run resumed mid-cycle finishes it as
    the uninterrupted run would); the record is written to ``<log_dir>/plasticity_cycle.json`` after each cycle; a
    cycle skipped on NaN/inf statistics is counted in ``cycle/skipped_nonfinite`` (the first one warns). Needs a
    :class:`HeadImportance` before it (its gates; its gradient importance for ``"gradient"`` strategies) and no
    :class:`HeadPruning` or :class:`HeadGrowth` (they would change the gates mid-cycle).

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
        controller = CycleController(cycle.with_owner(owner), seed=seed)  # its messages name this callback
        super().__init__(reviver=reviver, seed=seed, prefix=prefix, policy=controller)
        self.start_step = check_positive_int(owner, "start_step", start_step, allow_zero=True)
        metrics = ("repeated_3gram_rate", "max_token_repetition")
        self.degeneration_metric = check_choice(owner, "degeneration_metric", degeneration_metric, metrics)
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

    # ------------------------------------------------------------------ when it acts
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._importance = importance = find_head_importance(trainer, "PlasticityCycle")
        rivals = [type(c).__name__ for c in trainer.callbacks if isinstance(c, (HeadPruning, HeadGrowth))]
        if rivals:
            raise PlasticityConfigError(
                f"PlasticityCycle prunes and grows heads itself; remove {', '.join(rivals)} from the trainer (they "
                "would change the gates mid-cycle)"
            )
        if self.controller.wants_gradient and importance.method != "gradient":
            raise PlasticityConfigError(
                "PlasticityCycle's 'gradient' strategies need HeadImportance(method='gradient'), got "
                f"method={importance.method!r}; drop 'gradient' from pruning_strategies/growth_strategies"
            )
        resolve_tokenizer(trainer, self.tokenizer, "PlasticityCycle")
        require_validation(trainer, pl_module, "PlasticityCycle")
        self.start_reviver(trainer, importance.gates)
        self.controller.optimizers = self.optimizers(trainer)
        self.controller.broadcast = lambda value: trainer.strategy.broadcast(value, src=0)  # rank 0's plan and heads

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx):
        step, max_steps = trainer.global_step, trainer.max_steps
        if self.controller.due(step):
            self.finish_cycle(trainer, pl_module)
        if self.controller.ready(step, self.start_step, None if max_steps is None or max_steps < 0 else max_steps):
            self.start_cycle(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self.write_json(trainer)

    def start_cycle(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Start a cycle now (:meth:`CycleController.start`), or count and warn a skip on NaN/inf statistics."""
        ids = token_ids(self.probe.draw(trainer))
        gradient = self._importance.current(trainer) if self._importance.method == "gradient" else None
        try:
            record = self.controller.start(*self._inputs(trainer, pl_module), input_ids=ids, importance=gradient)
        except NonFiniteScores as skipped:  # the same statistics on every rank: all ranks skip
            self.skip_nonfinite(trainer, skipped.what)
            return
        self.log_values(trainer, self.controller.summary(record), force=True)

    def finish_cycle(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """End the cycle in its learning phase now (:meth:`CycleController.finish`), log it and write the record."""
        record = self.controller.finish(*self._inputs(trainer, pl_module))
        self.log_values(trainer, self.controller.summary(record), force=True)
        self.write_json(trainer)

    def _inputs(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Any, ...]:
        """What a cycle acts on: the optimizer step, the model, the gates, the reviver and the measurement."""
        measure = functools.partial(self.evaluate, trainer, pl_module)  # rank 0's values, broadcast
        return trainer.global_step, pl_module, self._importance.gates, self.reviver, measure

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Perplexity on the validation probe, degeneration of the seeded generations, live heads — rank 0's."""
        tokenizer = resolve_tokenizer(trainer, self.tokenizer, "PlasticityCycle")
        values = cycle_measures(
            pl_module,
            self._importance.gates,
            token_ids(self.probe.draw(trainer)),
            tokenizer,
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
        """Write :meth:`record` on rank 0 (strict JSON: a diverged perplexity is null); returns the path."""
        # run_directory broadcasts from rank 0: every rank must ask, or the ranks' collectives fall out of step
        path = Path(self.json_path or run_directory(trainer) / PLASTICITY_CYCLE_FILE)
        if not trainer.is_global_zero:
            return None
        return write_text_atomic(path, json.dumps(json_safe(self.record()), indent=2, allow_nan=False))


# The controller's settings and record read as the callback's own (cycle.history, cycle.ratings, cycle.prune_level,
# ...), as before the controller was split out; they are changed through the controller only.
_STATE = ("ratings", "memory", "history", "best", "stale", "stopped", "current", "snapshot", "retry_step")
for _name in (*CycleSettings().values(), *_STATE):
    setattr(PlasticityCycle, _name, property(lambda self, name=_name: getattr(self.policy, name)))
