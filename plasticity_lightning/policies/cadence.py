"""When a periodic action is due: the one step rule shared by the policies' plain-loop ``step()`` and the callbacks.

Every periodic action of the library (CBP's per-step replacement, ReDo's recycling, Shrink & Perturb, the weight
constraints, the monitors' step cadence) asks :class:`StepCadence` whether it is due after ``step`` optimizer
steps. The rule, written once:

* **never at step 0**: nothing has been trained yet (with gradient accumulation, the first micro-batches end at
  step 0; an action there would act on an untrained model, or twice on the first step);
* **a multiple of** ``every_n_steps``;
* **once per step**: hooks that run several times on one optimizer step (gradient accumulation, a skipped optimizer
  step, a resumed run's first batches ending again on the checkpoint's step) act on its first call only.

``last_step`` is part of the owner's checkpoint, so a resumed run does not act again on the step it was saved on.
"""

from __future__ import annotations

from dataclasses import dataclass

from plasticity_lightning.core.errors import check_positive_int


@dataclass
class StepCadence:
    """Every ``every_n_steps`` optimizer steps, never at step 0, at most once per step.

    Args:
        every_n_steps: the period in optimizer steps (``None``: never due).
        last_step: the step the action was last taken on (or the step a fit started from).

    Example::

        >>> cadence = StepCadence(every_n_steps=2)
        >>> [step for step in (0, 1, 2, 2, 3, 4) if cadence.take(step)]
        [2, 4]
    """

    every_n_steps: int | None = 1
    last_step: int | None = None

    def __post_init__(self) -> None:
        if self.every_n_steps is not None:
            check_positive_int("StepCadence", "every_n_steps", self.every_n_steps)

    def due(self, step: int) -> bool:
        """Whether the action is due after ``step`` optimizer steps (does not mark it taken)."""
        every = self.every_n_steps
        return every is not None and step > 0 and step % every == 0 and step != self.last_step

    def take(self, step: int) -> bool:
        """:meth:`due`, and if so mark ``step`` as taken."""
        if not self.due(step):
            return False
        self.last_step = step
        return True

    def mark(self, step: int) -> None:
        """Record that the action was taken at ``step`` (or that a fit starts there: its step is not acted on)."""
        self.last_step = step
