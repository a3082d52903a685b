"""Accuracy broken down by continual-learning task.

The summaries of a stream (first tasks against the last, the accuracy matrix) are in
:mod:`~plasticity_lightning.metrics.continual_summary` (no torch) and importable here.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

from plasticity_lightning.core.errors import check_positive_int
from plasticity_lightning.metrics.continual_summary import (
    COVERAGE_TEXT,
    accuracy_matrix_summary,
    first_and_last,
    matrix_coverage,
    per_task_series,
    seen_accuracy,
    summary_window,
    transfer_summary,
)

__all__ = [
    "COVERAGE_TEXT",
    "PerTaskAccuracy",
    "accuracy_matrix_summary",
    "first_and_last",
    "matrix_coverage",
    "per_task_accuracy",
    "per_task_series",
    "seen_accuracy",
    "summary_window",
    "transfer_summary",
]


def _as_class_ids(preds: torch.Tensor) -> torch.Tensor:
    # Logits/probabilities [N, C] -> class ids [N]; class ids pass through.
    return preds.argmax(dim=-1) if preds.ndim == 2 else preds


def _per_task_accuracy_update(
    preds: torch.Tensor, target: torch.Tensor, task_ids: torch.Tensor, num_tasks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    preds = _as_class_ids(preds)
    if not (preds.shape == target.shape == task_ids.shape) or preds.ndim != 1:
        raise ValueError(
            "Expected `preds` ([N] or [N, C]), `target` [N] and `task_ids` [N] with matching N, "
            f"got {tuple(preds.shape)}, {tuple(target.shape)}, {tuple(task_ids.shape)}"
        )
    task_ids = task_ids.long()
    if task_ids.numel() and (int(task_ids.min()) < 0 or int(task_ids.max()) >= num_tasks):
        raise ValueError(
            f"Expected every task id in [0, {num_tasks}), got values in [{int(task_ids.min())}, {int(task_ids.max())}]"
        )
    correct = torch.bincount(task_ids, weights=(preds == target).to(torch.float64), minlength=num_tasks)
    total = torch.bincount(task_ids, minlength=num_tasks)
    return correct.round().long(), total.long()


def _per_task_accuracy_compute(correct: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    # Tasks with no rows get NaN: "not evaluated" must not read as "0% accurate".
    accuracy = correct.double() / total.double().clamp(min=1)
    return torch.where(total > 0, accuracy, torch.full_like(accuracy, float("nan"))).float()


def per_task_accuracy(
    preds: torch.Tensor, target: torch.Tensor, task_ids: torch.Tensor, num_tasks: int
) -> torch.Tensor:
    """Accuracy of each task's rows; ``NaN`` for tasks with no rows.

    Args:
        preds: predicted class ids ``[N]`` or scores ``[N, C]`` (argmax is taken).
        target: true class ids ``[N]``.
        task_ids: task of each row ``[N]``, in ``[0, num_tasks)``.
        num_tasks: length of the result.

    Example::

        >>> preds = torch.tensor([0, 1, 1, 0])
        >>> target = torch.tensor([0, 1, 0, 0])
        >>> task_ids = torch.tensor([0, 0, 1, 1])
        >>> per_task_accuracy(preds, target, task_ids, num_tasks=3)
        tensor([1.0000, 0.5000,    nan])
    """
    check_positive_int("per_task_accuracy", "num_tasks", num_tasks)
    return _per_task_accuracy_compute(*_per_task_accuracy_update(preds, target, task_ids, num_tasks))


class PerTaskAccuracy(Metric):
    """Accumulating, DDP-synchronised twin of :func:`per_task_accuracy`.

    States are per-task counts of correct and total rows, summed across processes.

    Args:
        num_tasks: number of tasks in the stream.

    Example::

        >>> metric = PerTaskAccuracy(num_tasks=2)
        >>> metric.update(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]), torch.tensor([0, 1]))
        >>> metric.update(torch.tensor([1]), torch.tensor([1]), torch.tensor([1]))
        >>> metric.compute()
        tensor([1.0000, 0.5000])
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: torch.Tensor
    total: torch.Tensor

    def __init__(self, num_tasks: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_tasks = check_positive_int("PerTaskAccuracy", "num_tasks", num_tasks)
        self.add_state("correct", default=torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.zeros(num_tasks, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, task_ids: torch.Tensor) -> None:
        correct, total = _per_task_accuracy_update(preds, target, task_ids, self.num_tasks)
        self.correct += correct
        self.total += total

    def compute(self) -> torch.Tensor:
        return _per_task_accuracy_compute(self.correct, self.total)
