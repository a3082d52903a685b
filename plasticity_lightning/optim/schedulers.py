"""Learning-rate schedules for continual streams."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

from plasticity_lightning.core.errors import PlasticityConfigError, check_positive_float, check_positive_int


class PeriodicMultiStepLR(LRScheduler):
    """``MultiStepLR`` that starts over every ``period`` epochs (or steps): one schedule per task.

    lr = base_lr · γ^(number of milestones ≤ epoch mod period). With ``period`` equal to the stream's
    ``epochs_per_task`` every task restarts at the base rate — Dohare et al.'s class-incremental CIFAR-100 protocol
    sets lr 0.1 at each task's start and multiplies it by 0.2 at epochs 60, 120 and 160 of the task
    (``period=200, milestones=[60, 120, 160], gamma=0.2``). The rate is a closed form of the epoch counter, so a
    resumed run continues the schedule exactly.

    Args:
        optimizer: the wrapped optimizer.
        period: epochs (steps, with ``lr_scheduler_interval: step``) after which the schedule restarts. Left out
            in a ``plasticity fit`` recipe whose datamodule has a task schedule, it is that schedule's
            ``epochs_per_task`` (or ``steps_per_task``): the task length is written once.
        milestones: increasing offsets within a period, each in ``[1, period)``.
        gamma: factor applied at each milestone.
        last_epoch: index of the last epoch (``-1`` starts the schedule).

    Example::

        >>> w = torch.nn.Parameter(torch.zeros(1))
        >>> optimizer = torch.optim.SGD([w], lr=0.1)
        >>> scheduler = PeriodicMultiStepLR(optimizer, period=4, milestones=[2, 3], gamma=0.5)
        >>> rates = []
        >>> for _ in range(6):
        ...     rates.append(scheduler.get_last_lr()[0])
        ...     optimizer.step()
        ...     scheduler.step()
        >>> rates
        [0.1, 0.1, 0.05, 0.025, 0.1, 0.1]
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        period: int | None = None,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        last_epoch: int = -1,
    ) -> None:
        owner = type(self).__name__
        if period is None:
            raise PlasticityConfigError(
                f"{owner}.period is not set; pass period (epochs or steps per restart), or leave it out in a "
                "`plasticity fit` recipe whose datamodule has a task schedule (it becomes epochs_per_task)"
            )
        self.period = check_positive_int(owner, "period", period)
        milestones = list(milestones)
        if (
            not all(isinstance(m, int) and not isinstance(m, bool) for m in milestones)
            or sorted(set(milestones)) != milestones
            or any(not 1 <= m < self.period for m in milestones)
        ):
            raise PlasticityConfigError(
                f"{owner}.milestones={milestones!r} is invalid; expected increasing integers in [1, period={period})"
            )
        self.milestones = milestones
        self.gamma = check_positive_float(owner, "gamma", gamma)
        super().__init__(optimizer, last_epoch)

    def _factor(self) -> float:
        return self.gamma ** bisect_right(self.milestones, self.last_epoch % self.period)

    def get_lr(self) -> list[float]:
        return [base * self._factor() for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()
