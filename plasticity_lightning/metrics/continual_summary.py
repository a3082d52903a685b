"""Summaries of a continual stream from its per-task numbers.

The accuracy matrix (average accuracy, forgetting, backward and forward transfer, what was measured), the first tasks
against the last, per-task series. Plain Python, no torch: ``plasticity report`` reads finished runs with these without
importing torch or torchmetrics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from plasticity_lightning.core.errors import check_positive_int


def summary_window(num_tasks: int) -> int:
    """Tasks averaged at each end of a stream when the first tasks are set against the last.

    A tenth of the stream, at least one (5 of 50 tasks, 15 of 150, as in the README's tables).

    Example::

        >>> summary_window(50), summary_window(150), summary_window(3)
        (5, 15, 1)
    """
    check_positive_int("summary_window", "num_tasks", num_tasks)
    return max(1, num_tasks // 10)


def first_and_last(values: Sequence[float], window: int) -> tuple[float, float]:
    """Means of the first and of the last ``window`` entries of a per-task series, ignoring NaN (not measured).

    NaN where a window has no measured entry.

    Example::

        >>> first_and_last([1.0, 2.0, float("nan"), 4.0, 5.0], 2)
        (1.5, 4.5)
    """
    check_positive_int("first_and_last", "window", window)

    def mean(part: Sequence[float]) -> float:
        finite = [float(v) for v in part if math.isfinite(v)]
        return sum(finite) / len(finite) if finite else math.nan

    return mean(values[:window]), mean(values[-window:])


def accuracy_matrix_summary(rows: Mapping[int, Sequence[float]]) -> dict[str, float]:
    """Standard continual-learning numbers from an accuracy matrix ``rows[t][k]``.

    Standard continual-learning numbers from an accuracy matrix ``rows[t][k]`` (accuracy on task ``k`` after training on
    task ``t``; NaN where task ``k`` was not evaluated then).

    * ``new_task_acc``: accuracy on the latest task right after learning it, ``rows[t][t]``;
    * ``avg_seen_acc``: mean of ``rows[t][k]`` over ``k ≤ t``; NaN unless every one of them was evaluated (a mean
      over the few that were would not be a mean over the seen tasks);
    * ``avg_forgetting``: mean over earlier tasks ``k`` of (best accuracy on ``k`` at any earlier row − accuracy on
      ``k`` now), over the tasks evaluated now and at least once before; NaN when there is none.

    Example::

        >>> nan = float("nan")
        >>> accuracy_matrix_summary({0: [0.9, nan], 1: [0.7, 0.8]})
        {'new_task_acc': 0.8, 'avg_seen_acc': 0.75, 'avg_forgetting': 0.20000000000000007}
        >>> accuracy_matrix_summary({0: [0.9, nan], 1: [nan, 0.8]})
        {'new_task_acc': 0.8, 'avg_seen_acc': nan, 'avg_forgetting': nan}
    """
    if not rows:
        return {}
    last = max(rows)
    row = rows[last]
    seen = [row[k] for k in range(last + 1)]
    forgetting = []
    for k in range(last):
        history = [rows[t][k] for t in rows if k <= t < last and math.isfinite(rows[t][k])]
        if history and math.isfinite(row[k]):
            forgetting.append(max(history) - row[k])
    return {
        "new_task_acc": float(row[last]),
        "avg_seen_acc": sum(seen) / len(seen) if all(math.isfinite(v) for v in seen) else math.nan,
        "avg_forgetting": sum(forgetting) / len(forgetting) if forgetting else math.nan,
    }


def transfer_summary(
    rows: Mapping[int, Sequence[float]], random_init: Sequence[float] | None = None
) -> dict[str, float]:
    """Backward and forward transfer of an accuracy matrix (Lopez-Paz & Ranzato 2017, GEM).

    Backward and forward transfer of an accuracy matrix (Lopez-Paz & Ranzato 2017, GEM), NaN where the cells they need
    were not measured.

    * ``bwt``: mean over earlier tasks ``k`` of ``rows[T][k] − rows[k][k]`` (``T`` the last row): what later
      training did to a task once learned (negative: forgetting);
    * ``fwt_next``: mean over rows ``t`` of ``rows[t][t + 1] − b[t + 1]``, with ``b`` the accuracy of the randomly
      initialised network before any training (``random_init``): how much training up to task ``t`` helps the next
      task before it is seen (the paper's FWT);
    * ``fwt_all``: the same over every future task, the mean of ``rows[t][k] − b[k]`` over all ``k > t``.

    Forward transfer needs future tasks evaluated (``eval_on: all``) and ``b``; a pair with a missing cell is left
    out of its mean.

    Example::

        >>> nan = float("nan")
        >>> rows = {0: [0.9, 0.3, 0.2], 1: [0.7, 0.8, 0.4], 2: [0.6, 0.7, 0.9]}
        >>> {k: round(v, 4) for k, v in transfer_summary(rows, [0.1, 0.1, 0.2]).items()}
        {'bwt': -0.2, 'fwt_next': 0.2, 'fwt_all': 0.1333}
        >>> transfer_summary({0: [0.9, nan]})
        {'bwt': nan, 'fwt_next': nan, 'fwt_all': nan}
    """

    def mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else math.nan

    def cell(t: int, k: int) -> float:
        return float(rows[t][k]) if t in rows and k < len(rows[t]) else math.nan

    if not rows:
        return {"bwt": math.nan, "fwt_next": math.nan, "fwt_all": math.nan}
    last = max(rows)
    backward = [cell(last, k) - cell(k, k) for k in range(last)]
    base = [float(v) for v in random_init] if random_init is not None else []
    forward_next, forward_all = [], []
    for t in rows:
        for k in range(t + 1, min(len(rows[t]), len(base))):
            gain = cell(t, k) - base[k]
            forward_all.append(gain)
            if k == t + 1:
                forward_next.append(gain)
    finite = [v for v in backward if math.isfinite(v)]
    return {
        "bwt": mean(finite),
        "fwt_next": mean([v for v in forward_next if math.isfinite(v)]),
        "fwt_all": mean([v for v in forward_all if math.isfinite(v)]),
    }


def seen_accuracy(rows: Mapping[int, Sequence[float]], num_tasks: int) -> list[float]:
    """Mean accuracy over the tasks seen so far after each task.

    ``mean(rows[t][:t + 1])``, NaN where any of them was not evaluated (or row ``t`` is missing). Entry ``t`` equals
    ``accuracy_matrix_summary`` of rows ``0..t``.

    Example::

        >>> nan = float("nan")
        >>> seen_accuracy({0: [0.9, nan], 1: [0.7, 0.8]}, 3)
        [0.9, 0.75, nan]
    """
    series = []
    for t in range(num_tasks):
        cells = list(rows[t][: t + 1]) if t in rows else [math.nan]
        series.append(sum(cells) / len(cells) if all(math.isfinite(v) for v in cells) else math.nan)
    return series


def matrix_coverage(rows: Mapping[int, Sequence[float]]) -> str:
    """What an accuracy matrix measured.

    ``"seen"`` (every task so far after each task), ``"current"`` (only the task being learned, e.g. ``eval_on:
    current``), ``"partial"`` or ``"none"``.

    Example::

        >>> nan = float("nan")
        >>> matrix_coverage({0: [0.9, nan], 1: [0.7, 0.8]}), matrix_coverage({0: [0.9, nan], 1: [nan, 0.8]})
        ('seen', 'current')
    """
    cells = [row[: t + 1] for t, row in rows.items()]
    if not cells or not any(math.isfinite(v) for row in cells for v in row):
        return "none"
    if all(math.isfinite(v) for row in cells for v in row):
        return "seen"
    if all(math.isfinite(row[-1]) for row in cells):
        return "current"
    return "partial"


COVERAGE_TEXT = {
    "seen": "every seen task after each task",
    "current": "only the task being learned (eval_on: current): no mean over seen tasks, no forgetting",
    "partial": "some tasks after some tasks",
    "none": "nothing",
}


def per_task_series(tasks: Sequence[int | None], values: Sequence[float], num_tasks: int) -> list[float]:
    """One value per task from measurements in time order, plus the state the stream ended in.

    Entry ``t < num_tasks`` is the first measurement taken while on task ``t`` (with the monitors' default
    cadence, the one taken as the task starts: the network as task ``t − 1`` left it, on task ``t``'s data, as
    Dohare et al. measure). Entry ``num_tasks`` is the last measurement when it came after the last task's first
    one (the end of training), else NaN. Tasks never measured, and measurements without a task, give NaN.

    Example::

        >>> per_task_series([0, 0, 1, 2, 2], [10.0, 11.0, 9.0, 8.0, 7.5], num_tasks=3)
        [10.0, 9.0, 8.0, 7.5]
    """
    check_positive_int("per_task_series", "num_tasks", num_tasks)
    series = [math.nan] * (num_tasks + 1)
    first_index: dict[int, int] = {}
    for index, task in enumerate(tasks):
        if task is not None and 0 <= task < num_tasks and task not in first_index:
            first_index[task] = index
            series[task] = float(values[index])
    if values and num_tasks - 1 in first_index and first_index[num_tasks - 1] < len(values) - 1:
        series[num_tasks] = float(values[-1])
    return series
